"""``migfd compare`` has the power the project promises, on the trial counts a real run has.

Each test compares the committed reference run (3-7 trials a point) with a
doctored copy of it, in which one thing is changed on purpose, and checks
the verdicts: the change is found, and nothing else is. The reference run is
real data; the doctoring is the FIXTURE (a known change to find):

- fd-passing downtime x3, nothing else: ``regressed`` at >= 95% of those points,
  nothing else flagged (the regression of one code path);
- fd-passing frames lost 0 -> 2..8 a trial (tap-traffic): ``regressed``;
- every time and floor x U(0.99, 1.01): nothing flagged (jitter is not a change);
- every time halved, floors included: the machine reads ``faster`` and at most
  5% of the normalized verdicts call a change (a faster machine is not better code);
- each point's trials drawn again with replacement: nothing flagged.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from migfd.paths import repo_root
from migfd.results.compare import NOT_THE_MACHINE, compare, machine
from migfd.results.load import POINT_KEYS, load_results
from migfd.stats import FASTER, IMPROVED, REGRESSED, SAME, SLOWER

#: a real run of format 1 (Python-thread guests, 3-5 trials a point), kept as test data: the power
#: and shape of compare are held on it, whatever run benchmarks/reference/ holds now
REFERENCE = repo_root() / "tests" / "data" / "runs" / "20261201T214847Z-vm"
CHANGED = [REGRESSED, IMPROVED]


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    if REFERENCE is None:
        pytest.skip("no committed reference run under benchmarks/reference/")
    df, _ = load_results(REFERENCE)
    return df


def time_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.endswith("_ns") and df[c].notna().any()]


def scaled(df: pd.DataFrame, rows: pd.Series, column: str, factor) -> pd.DataFrame:
    out = df.copy()
    values = out.loc[rows, column].astype("float64") * factor
    out.loc[rows, column] = values.round().astype("Int64") if column.endswith("_ns") else values
    return out


def flagged(changes: pd.DataFrame, column: str = "verdict") -> pd.DataFrame:
    return changes[changes[column].isin(CHANGED)]


def show(rows: pd.DataFrame) -> str:
    return rows[["scenario", "mode", "variant", "ram_bytes", "n_fds", "live", "metric", "ratio", "ci_low",
                 "ci_high", "p_adjusted", "verdict"]].to_string()


def test_a_lone_3x_fd_passing_downtime_regression_is_found_and_nothing_else(reference):
    fd = reference["mode"] == "fd-passing"
    changes = compare(reference, scaled(reference, fd, "downtime_ns", 3))
    target = (changes["mode"] == "fd-passing") & (changes["metric"] == "downtime_ns")
    assert target.sum() >= 20, "ram-size, fd-count, tap-traffic and chardev points of fd-passing"
    found = (changes.loc[target, "verdict"] == REGRESSED).mean()
    assert found >= 0.95, f"{found:.0%} regressed:\n{show(changes[target])}"
    others = flagged(changes[~target])
    assert others.empty, show(others)
    # the floors did not move: over them, the same regression
    found = (changes.loc[target, "verdict_normalized"] == REGRESSED).mean()
    assert found >= 0.95 and flagged(changes[~target], "verdict_normalized").empty


def test_frames_lost_from_0_to_2_to_8_a_trial_is_regressed(reference):
    rows = (reference["scenario"] == "tap-traffic") & (reference["mode"] == "fd-passing")
    assert (reference.loc[rows, "frames_lost"] == 0).all(), "the reference run lost no frame with fd-passing"
    new = reference.copy()
    new.loc[rows, "frames_lost"] = np.random.default_rng(17).integers(2, 9, int(rows.sum()))
    changes = compare(reference, new)
    lost = changes[(changes["scenario"] == "tap-traffic") & (changes["mode"] == "fd-passing")
                   & (changes["metric"] == "frames_lost")].iloc[0]
    assert lost["verdict"] == REGRESSED == lost["verdict_normalized"], lost.to_dict()
    assert lost["kind"] == "count" and lost["base_rate"] == 0 and lost["new_rate"] > 0
    assert lost["ci_low"] > 1  # the rate's interval, not the p-value alone, lies above BASE's
    for column in ("verdict", "verdict_normalized"):
        others = flagged(changes.drop(lost.name), column)
        assert others.empty, show(others)


@pytest.mark.parametrize("seed", range(3))
def test_one_percent_jitter_flags_nothing(reference, seed):
    rng = np.random.default_rng(seed)
    new = reference
    everything = pd.Series(True, index=reference.index)
    for column in [*time_columns(reference), "value"]:
        new = scaled(new, everything, column, rng.uniform(0.99, 1.01, len(new)))
    changes = compare(reference, new)
    assert len(changes) > 150
    for column in ("verdict", "verdict_normalized"):
        assert flagged(changes, column).empty, show(flagged(changes, column))


def halved(df: pd.DataFrame) -> pd.DataFrame:
    """Everything twice as fast: every time / 2; floors in bytes/s x 2, in ns / 2."""
    everything = pd.Series(True, index=df.index)
    out = df
    for column in time_columns(df):
        out = scaled(out, everything, column, 0.5)
    rate = df["unit"].str.endswith("/s")
    return scaled(scaled(out, rate, "value", 2.0), ~rate, "value", 0.5)


def test_halving_every_time_reads_as_a_faster_machine_not_better_code(reference):
    new = halved(reference)
    ma = machine(reference, new)
    assert ma.verdict == FASTER and ma.floors >= 10, ma.as_json()
    assert ma.overall.interval.value == pytest.approx(0.5, rel=0.01)
    assert ma.throughput.interval.value == pytest.approx(2.0, rel=0.01)
    changes = compare(reference, new)
    normalized = changes.dropna(subset=["verdict_normalized"])
    assert len(normalized) > 150
    share = normalized["verdict_normalized"].isin(CHANGED).mean()
    assert share <= 0.05, show(flagged(normalized, "verdict_normalized"))
    # ... while the raw verdicts see everything improve: the machine is the whole change
    assert (changes["verdict"] == IMPROVED).mean() > 0.5
    assert not (changes["verdict"] == REGRESSED).any()


def test_the_same_machine_reads_as_the_same(reference):
    assert machine(reference, reference.copy()).verdict == SAME


def resampled(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Each point's trials drawn again with replacement: the noise of a rerun, and nothing else."""
    rng = np.random.default_rng(seed)
    parts = [g.iloc[rng.integers(0, len(g), len(g))] for _, g in df.groupby(POINT_KEYS, dropna=False)]
    return pd.concat(parts, ignore_index=True)


@pytest.mark.parametrize("seed", range(5))
def test_resampling_noise_of_the_reference_run_is_never_a_change(reference, seed):
    changes = compare(reference, resampled(reference, seed))
    assert len(changes) > 150
    for column in ("verdict", "verdict_normalized"):
        assert flagged(changes, column).empty, show(flagged(changes, column))


def test_tripling_every_time_floors_included_reads_as_a_slower_machine(reference):
    """The other way round: a 3x slower machine. As measured nearly everything regressed; over the
    floors, nothing did."""
    everything = pd.Series(True, index=reference.index)
    new = reference
    for column in time_columns(reference):
        new = scaled(new, everything, column, 3.0)
    rate = reference["unit"].str.endswith("/s")
    new = scaled(scaled(new, rate, "value", 1 / 3), ~rate, "value", 3.0)
    assert machine(reference, new).verdict == SLOWER
    changes = compare(reference, new)
    timed = changes[changes["kind"] != "count"]
    assert (timed["verdict"] == REGRESSED).mean() >= 0.8 and not (timed["verdict"] == IMPROVED).any()
    assert timed["verdict_normalized"].isin(CHANGED).mean() <= 0.05


def test_the_handover_floors_parts_and_its_loaded_twin_do_not_move_the_machine(reference):
    """handover-oneway and commit-roundtrip are parts of the handover floor's own switchovers, the loaded
    floor is the probe's load: five times slower in NEW alone, they leave the machine where it was."""
    hand = reference[(reference["scenario"] == "limits") & (reference["variant"] == "handover-floor")]
    assert not hand.empty, "the reference run has a handover floor"
    extra = pd.concat([hand.assign(variant=v) for v in NOT_THE_MACHINE], ignore_index=True)
    base = pd.concat([reference, extra], ignore_index=True)
    new = pd.concat([reference, scaled(extra, pd.Series(True, index=extra.index), "value", 5.0)], ignore_index=True)
    ma = machine(base, new)
    assert ma.verdict == SAME and ma.floors == machine(reference, reference.copy()).floors, ma.as_json()
