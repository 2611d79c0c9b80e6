"""The performance targets (migfd.results.targets) on small hand-built tables: each verdict on
both sides of its threshold, inconclusive on an interval that straddles it, not measured with its reason.

The rows are fixtures of the analysis code (tests/unit/result_rows.py), not measurements.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from migfd.results.plots import plot_downtime_vs_ram
from migfd.results.targets import TARGETS, targets
from migfd.units import GiB, MiB
from result_rows import (
    with_outage,
    MS,
    US,
    fd_count_rows,
    fd_floor_rows,
    fixture_row,
    floor_row,
    medians_line,
    qemu_rows,
    ram_rows,
    table,
    traffic_rows,
)

def verdict(df, key, meta=None) -> pd.Series:
    return targets(df, meta, keys=[key]).iloc[0]


@pytest.mark.parametrize("large_ms, expected", [(12.5, "pass"), (12.6, "fail")])
def test_target_flat_in_ram_flips_at_1_25(large_ms, expected):
    df = table(ram_rows("fd-passing", 64 * MiB, [10, 10, 10]) + ram_rows("fd-passing", GiB, [large_ms] * 3))
    t = verdict(df, "flat-in-ram")
    assert t["measured"] == pytest.approx(large_ms / 10)
    assert t["verdict"] == expected
    assert (t["why"] == "") == (expected == "pass")


def test_target_flat_takes_the_worse_of_live_and_non_live():
    df = table(ram_rows("fd-passing", 64 * MiB, [10] * 3) + ram_rows("fd-passing", GiB, [11] * 3)
               + ram_rows("fd-passing", 64 * MiB, [10] * 3, live=True)
               + ram_rows("fd-passing", GiB, [20] * 3, live=True))
    t = verdict(df, "flat-in-ram")
    assert t["measured"] == pytest.approx(2.0) and "live:" in t["detail"] and t["verdict"] == "fail"


def test_target_verdict_is_taken_on_the_interval():
    # medians 10 and 12 ms (1.2: below 1.25), but the trials spread so much the interval straddles 1.25
    noisy = table(ram_rows("fd-passing", 64 * MiB, [8, 10, 12]) + ram_rows("fd-passing", GiB, [9, 12, 16]))
    t = verdict(noisy, "flat-in-ram")
    assert t["measured"] == pytest.approx(1.2) and t["ci_low"] < 1.25 < t["ci_high"]
    assert t["verdict"] == "inconclusive" and "straddles" in t["why"]
    # the same medians from steady trials pass
    steady = table(ram_rows("fd-passing", 64 * MiB, [9.9, 10, 10.1]) + ram_rows("fd-passing", GiB, [11.9, 12, 12.1]))
    t = verdict(steady, "flat-in-ram")
    assert t["verdict"] == "pass" and t["ci_high"] <= 1.25
    # a single trial per size has no interval: it cannot pass
    single = table(ram_rows("fd-passing", 64 * MiB, [10]) + ram_rows("fd-passing", GiB, [10]))
    assert verdict(single, "flat-in-ram")["verdict"] == "inconclusive"


@pytest.mark.parametrize("copy_ms, expected", [(1000, "pass"), (999, "fail")])
def test_target_copy_vs_fd_at_1gib_flips_at_100(copy_ms, expected):
    df = table(ram_rows("fd-passing", GiB, [10, 10]) + ram_rows("state-copy", GiB, [copy_ms, copy_ms]))
    t = verdict(df, "copy-vs-fd-1gib")
    assert t["measured"] == pytest.approx(copy_ms / 10) and t["verdict"] == expected


def test_target_copy_vs_fd_not_measured_without_1gib():
    df = table(ram_rows("fd-passing", 256 * MiB, [10]) + ram_rows("state-copy", 256 * MiB, [500]))
    t = verdict(df, "copy-vs-fd-1gib")
    assert t["verdict"] == "not-measured" and np.isnan(t["measured"])
    assert "256 MiB" in t["why"] and "50" in t["detail"]  # the ratio where it was measured
    meta = {"scenarios": {"ram-size": {"ran": True, "skipped_points": [
        {"ram_bytes": GiB, "reason": "1 GiB needs 4 GiB of free memory"}]}}}
    assert "needs 4 GiB of free memory" in verdict(df, "copy-vs-fd-1gib", meta)["why"]


def test_target_zero_frames():
    assert verdict(table(traffic_rows([0, 0], [0, 0])), "zero-frames-lost")["verdict"] == "pass"
    t = verdict(table(traffic_rows([0, 1], [0, 0])), "zero-frames-lost")
    assert t["verdict"] == "fail" and t["measured"] == 1 and "1 frames lost" in t["why"]
    t = verdict(table(traffic_rows([0], [2])), "zero-frames-lost")
    assert t["verdict"] == "fail" and t["measured"] == 2
    # state copy losing frames does not touch the fd-passing target
    assert verdict(table(traffic_rows([0], [0]) + traffic_rows([500], [0], "state-copy")),
                   "zero-frames-lost")["verdict"] == "pass"


def test_target_zero_frames_counts_failed_trials():
    rows = traffic_rows([0, 4], [0, 0])
    rows[1].update(ok=False, error="check: RAM verification failed")  # it lost 4 frames all the same
    t = verdict(table(rows), "zero-frames-lost")
    assert t["verdict"] == "fail" and t["measured"] == 4 and "1 of them failed" in t["detail"]
    # a failed trial without counts: what it lost is unknown, so the target cannot pass
    rows = traffic_rows([0, 0], [0, 0])
    rows[1].update(ok=False, error="migration: timed out", frames_sent="", frames_lost="", frames_duplicated="")
    t = verdict(table(rows), "zero-frames-lost")
    assert t["verdict"] == "inconclusive" and "no frame counts" in t["why"]


def test_not_measured_says_why_from_metadata():
    meta = {"scenarios": {"tap-traffic": {"ran": False, "reason": "needs root and /dev/net/tun"},
                          "qemu-peer": {"ran": False, "reason": "qemu-system-x86_64 is not installed"}}}
    df = table(ram_rows("fd-passing", 64 * MiB, [10]))
    t = targets(df, meta).set_index("target")
    frames = t.loc[TARGETS["zero-frames-lost"].name]
    assert frames["verdict"] == "not-measured" and "needs root and /dev/net/tun" in frames["why"]
    qemu = t.loc[TARGETS["vs-qemu"].name]
    assert qemu["verdict"] == "not-measured" and "qemu-system-x86_64 is not installed" in qemu["why"]
    assert len(t) == len(TARGETS)
    # without metadata the table still says which rows are missing
    assert "no tap-traffic rows" in verdict(df, "zero-frames-lost")["why"]


def test_not_measured_when_every_trial_failed():
    rows = traffic_rows([0], [0])
    rows[0].update(ok=False, error="migration: timed out", frames_sent="", frames_lost="", frames_duplicated="")
    t = verdict(table(rows), "zero-frames-lost")
    assert t["verdict"] == "not-measured" and "timed out" in t["why"]


def copy_rows(size: int, n: int = 2, live=False) -> list[dict]:
    # 1 GiB per 1.25 s of downtime: 0.8 GiB/s; total time (with setup and the source's release) much longer
    return [fixture_row(scenario="ram-size", mode="state-copy", backend="ram", ram_bytes=size, live=live,
                        trial=i, downtime_ns=int(1250 * MS * size / GiB), total_ns=int(4000 * MS * size / GiB),
                        setup_ns=100 * MS, bytes_sent=size) for i in range(n)]


def throughput_floor(size: int, bps: float, n: int = 2) -> list[dict]:
    return [floor_row("unix-throughput", ram_bytes=size, total_ns=int(size / bps * 1e9), value=bps, unit="bytes/s")
            for _ in range(n)]


@pytest.mark.parametrize("floor_bps, expected", [(GiB, "pass"), (GiB + 2 * MiB, "fail")])
def test_target_copy_throughput_flips_at_0_8(floor_bps, expected):
    t = verdict(table(copy_rows(GiB) + throughput_floor(GiB, floor_bps)), "copy-throughput")
    # the window is the downtime of the non-live copy, not total - setup (which holds the release)
    assert t["measured"] == pytest.approx(0.8 * GiB / floor_bps)
    assert t["verdict"] == expected


def test_target_copy_throughput_compares_the_same_size_only():
    # a 4 GiB copy against a floor measured at 256 MiB is no comparison
    t = verdict(table(copy_rows(4 * GiB) + throughput_floor(256 * MiB, GiB)), "copy-throughput")
    assert t["verdict"] == "not-measured" and "256 MiB" in t["why"] and "4 GiB" in t["why"]
    # with floors at both sizes, each size is compared with its own; the worse decides
    t = verdict(table(copy_rows(256 * MiB) + copy_rows(4 * GiB) + throughput_floor(256 * MiB, GiB)
                      + throughput_floor(4 * GiB, 2 * GiB)), "copy-throughput")
    assert t["measured"] == pytest.approx(0.4) and t["verdict"] == "fail" and "4 GiB" in t["detail"]
    # live copies are not this target's (their window holds the running guest)
    assert verdict(table(copy_rows(GiB, live=True) + throughput_floor(GiB, GiB)),
                   "copy-throughput")["verdict"] == "not-measured"


@pytest.mark.parametrize("floor_us, expected", [(100, "pass"), (99, "fail")])
def test_target_handover_floor_flips_at_10(floor_us, expected):
    rows = traffic_rows([0, 0, 0], [0, 0, 0])  # fd-passing downtime 1 ms
    rows += [floor_row("handover-floor", backend="ram+tap+chardev", n_fds=3, device_state_bytes=400,
                       total_ns=floor_us * US, value=floor_us * US, unit="ns")] * 2
    t = verdict(table(rows), "handover-floor")
    assert t["measured"] == pytest.approx(1000 / floor_us) and t["verdict"] == expected


@pytest.mark.parametrize("per_fd_us, expected", [(2.0, "pass"), (2.1, "fail")])
def test_target_per_fd_cost_flips_at_2(per_fd_us, expected):
    # the unbatched series is slower per fd and must not be the one compared
    df = table(fd_count_rows(per_fd_us) + fd_count_rows(50, "unbatched") + fd_floor_rows())
    t = verdict(df, "per-fd-cost")
    assert t["measured"] == pytest.approx(per_fd_us) and t["verdict"] == expected


def test_target_per_fd_cost_interval_comes_from_the_trials():
    rows = fd_count_rows(2.0) + fd_floor_rows()
    # the two trials at 21 fds: 1.5 and 2.5 µs per fd; their median is the 2.0 of the threshold
    rows[4]["downtime_ns"], rows[5]["downtime_ns"] = int(1 * MS + 30 * US), int(1 * MS + 50 * US)
    t = verdict(table(rows), "per-fd-cost")
    assert t["measured"] == pytest.approx(2.0)
    assert t["ci_low"] == pytest.approx(1.5) and t["ci_high"] == pytest.approx(2.5)
    assert t["verdict"] == "inconclusive"


def test_target_per_fd_cost_judges_the_default_batch_and_shows_the_large_one():
    # batched-253 (x-fds-per-message) is cheaper per fd, but the default configuration is judged
    t = verdict(table(fd_count_rows(2.1) + fd_count_rows(0.5, "batched-253") + fd_floor_rows()), "per-fd-cost")
    assert t["measured"] == pytest.approx(2.1) and t["verdict"] == "fail"
    assert t["detail"].startswith("batched: slope")
    assert "; batched-253 (x-fds-per-message, migfd to migfd): 0.5" in t["detail"]
    assert "batched-253" not in verdict(table(fd_count_rows(2.1) + fd_floor_rows()), "per-fd-cost")["detail"]
    # the fds sent before the stop (x-early-fds) likewise: shown beside, never judged
    t = verdict(table(fd_count_rows(2.1) + fd_count_rows(0.25, "early-fds") + fd_floor_rows()), "per-fd-cost")
    assert t["measured"] == pytest.approx(2.1)
    assert "; early-fds (x-early-fds: the fds before the stop, migfd to migfd): 0.25" in t["detail"]


def test_target_vs_qemu_is_strict_and_takes_qemus_faster_mode():
    fd = with_outage(ram_rows("fd-passing", 64 * MiB, [10, 10, 10]), [10, 10, 10])
    assert verdict(table(fd + qemu_rows([20, 20])), "vs-qemu")["verdict"] == "pass"
    t = verdict(table(fd + qemu_rows([20, 20]) + qemu_rows([10, 10], "qemu-ram-shared")), "vs-qemu")
    assert t["measured"] == pytest.approx(1.0) and t["verdict"] == "fail"  # equal is not below
    assert "RAM shared" in t["detail"] and "misses < 1" in t["why"]
    # a size QEMU ran but fd-passing did not is not a comparison
    t = verdict(table(fd + qemu_rows([20], size=128 * MiB)), "vs-qemu")
    assert t["verdict"] == "not-measured"


def test_target_vs_qemu_compares_outage_with_outage():
    # migfd reports 10 ms and is cut off 20; QEMU says 5 (ends on the source), pauses 40, is cut off 50
    fd = with_outage(ram_rows("fd-passing", 64 * MiB, [10, 10, 10]), [20, 20, 20])
    q = qemu_rows([5, 5], outage_ms=[50, 50])
    for row in q:
        row["stop_resume_ns"] = 40 * MS
    t = verdict(table(fd + q), "vs-qemu")
    assert t["measured"] == pytest.approx(0.4) and t["verdict"] == "pass"
    assert "same observer" in t["detail"]
    # KVM where the run has it (migfd's guest runs on KVM), whatever TCG did
    tcg = [dict(r, accel="tcg", outage_ns=5 * MS) for r in qemu_rows([5, 5])]
    kvm = [dict(r, accel="kvm") for r in q]
    t = verdict(table(fd + kvm + tcg), "vs-qemu")
    assert t["measured"] == pytest.approx(0.4) and "(kvm)" in t["detail"]
    # a run older than the observer has no outage: nothing to compare
    old = ram_rows("fd-passing", 64 * MiB, [10, 10, 10])
    t = verdict(table(old + [dict(r, outage_ns="") for r in q]), "vs-qemu")
    assert t["verdict"] == "not-measured" and "observer" in t["why"]


def test_the_downtime_figure_draws_qemus_stop_resume_events():
    fd = ram_rows("fd-passing", 64 * MiB, [10, 10, 10])
    q = qemu_rows([5, 5])
    for row in q:
        row["stop_resume_ns"] = 40 * MS
    fig = plot_downtime_vs_ram(table(fd + q), {})
    series = medians_line(fig.axes[0], "QEMU ? RAM copied")
    assert list(series.get_ydata()) == [40.0] and "STOP → RESUME" in fig.axes[0].get_title()


def test_targets_ignore_failed_trials():
    rows = ram_rows("fd-passing", 64 * MiB, [10, 10]) + ram_rows("fd-passing", GiB, [10, 10])
    rows.append(fixture_row(scenario="ram-size", mode="fd-passing", backend="ram", ram_bytes=GiB, live=False,
                            trial=9, downtime_ns=900 * MS, ok=False, error="check: RAM differs"))
    t = verdict(table(rows), "flat-in-ram")
    assert t["verdict"] == "pass" and t["measured"] == pytest.approx(1.0)
    assert "1 of 5 trials failed" in t["detail"]


def test_unknown_target_key():
    with pytest.raises(ValueError, match="unknown target"):
        targets(table([]), keys=["nope"])


def test_target_vs_qemu_per_version_against_filled_ram():
    fd = with_outage(ram_rows("fd-passing", 64 * MiB, [10, 10, 10]), [10, 10, 10])

    def q(version, variant, ms):
        rows = qemu_rows(ms)
        for r in rows:
            r.update(peer_version=version, variant=variant)
        return rows

    # QEMU 10.0 with RAM as it comes (zero pages) is faster, but that is not like with like
    rows = fd + q("7.2.22", "filled", [20, 20]) + q("10.0.2", "filled", [30, 30]) + q("10.0.2", "idle", [5, 5])
    t = verdict(table(rows), "vs-qemu")
    assert t["verdict"] == "pass" and t["measured"] == pytest.approx(0.5) and "QEMU 7.2.22" in t["detail"]
    # each version is a point: one QEMU faster than fd-passing fails the target
    t = verdict(table(fd + q("7.2.22", "filled", [20, 20]) + q("10.0.2", "filled", [8, 8])), "vs-qemu")
    assert t["verdict"] == "fail" and "QEMU 10.0.2" in t["detail"] and "worst of 2" in t["detail"]


# -- issue 9's targets ----------------------------------------------------------


@pytest.mark.parametrize("floor_us, stretch", [(200, "met"), (199, "missed")])
def test_target_handover_floor_shows_the_stretch_goal(floor_us, stretch):
    rows = traffic_rows([0, 0, 0], [0, 0, 0])  # fd-passing downtime 1 ms
    rows += [floor_row("handover-floor", backend="ram+tap+chardev", n_fds=3, total_ns=floor_us * US)] * 2
    t = verdict(table(rows), "handover-floor")
    assert t["verdict"] == "pass" and f"stretch goal ≤ 5: {stretch}" in t["detail"]


def variant_rows(variant: str, downtimes_ms: dict[int, list[float]], backend="tap") -> list[dict]:
    """fd-count fd-passing rows of one variant: {n_fds: downtimes in ms}; batched = 16 fds a message."""
    per_message = 16 if variant == "batched" else 1
    return [fixture_row(scenario="fd-count", mode="fd-passing", variant=variant, backend=backend, n_fds=n,
                        live=True, trial=i, downtime_ns=int(d * MS), fds_passed=n,
                        fd_messages=-(-n // per_message))
            for n, ds in downtimes_ms.items() for i, d in enumerate(ds)]


@pytest.mark.parametrize("unbatched_ms, expected", [(20.0, "pass"), (20.1, "fail")])
def test_target_unbatched_linear_flips_at_2(unbatched_ms, expected):
    # compared at the most fds both variants have (16): the batched 256 has no unbatched partner
    df = table(variant_rows("batched", {1: [1, 1], 16: [10, 10], 256: [50, 50]})
               + variant_rows("unbatched", {1: [1, 1], 16: [unbatched_ms] * 2}))
    t = verdict(df, "unbatched-linear")
    assert t["measured"] == pytest.approx(unbatched_ms / 10) and t["verdict"] == expected
    assert "16 fds" in t["detail"] and "16 fds in 16 messages" in t["detail"] and "16 fds in 1 messages" in t["detail"]
    assert (t["why"] == "") == (expected == "pass")


def test_target_unbatched_linear_inconclusive_and_not_measured():
    noisy = table(variant_rows("batched", {256: [9, 10, 11]}) + variant_rows("unbatched", {256: [15, 20, 26]}))
    t = verdict(noisy, "unbatched-linear")
    assert t["measured"] == pytest.approx(2.0) and t["ci_low"] < 2 < t["ci_high"]
    assert t["verdict"] == "inconclusive"
    t = verdict(table(variant_rows("batched", {256: [10, 10]})), "unbatched-linear")
    assert t["verdict"] == "not-measured" and "both batched and unbatched" in t["why"]
    meta = {"scenarios": {"fd-count": {"ran": False, "reason": "needs root"}}}
    assert "needs root" in verdict(table(ram_rows("fd-passing", 64 * MiB, [1])), "unbatched-linear", meta)["why"]


def total_rows(size: int, totals_ms, live=False) -> list[dict]:
    # downtime the same at every size: only the total time may move this target
    return [dict(r, total_ns=int(t * MS)) for r, t in zip(ram_rows("fd-passing", size, [2] * len(totals_ms),
                                                                   live=live), totals_ms)]


@pytest.mark.parametrize("large_ms, expected", [(12.5, "pass"), (12.6, "fail")])
def test_target_total_flat_in_ram_flips_at_1_25(large_ms, expected):
    df = table(total_rows(64 * MiB, [10, 10, 10]) + total_rows(4 * GiB, [large_ms] * 3))
    t = verdict(df, "total-flat-in-ram")
    assert t["measured"] == pytest.approx(large_ms / 10) and t["verdict"] == expected
    assert "4 GiB" in t["detail"] and "64 MiB" in t["detail"] and "each live value" in t["detail"]
    assert verdict(df, "flat-in-ram")["verdict"] == "pass"  # the downtime is flat: another target


def test_target_total_flat_takes_the_worse_live_value_and_needs_two_sizes():
    df = table(total_rows(64 * MiB, [10] * 3) + total_rows(GiB, [11] * 3)
               + total_rows(64 * MiB, [10, 10.1, 10.2], live=True) + total_rows(GiB, [12, 13, 14], live=True))
    t = verdict(df, "total-flat-in-ram")
    assert t["measured"] == pytest.approx(13 / 10.1) and t["detail"].startswith("worst of 2: live:")
    assert t["verdict"] == "inconclusive" and "straddles" in t["why"]
    t = verdict(table(total_rows(64 * MiB, [10, 10])), "total-flat-in-ram")
    assert t["verdict"] == "not-measured" and "one RAM size" in t["why"]


def cpr_rows(outage_ms, version="10.0.2", variant="filled", size=64 * MiB, own_ms=0.5) -> list[dict]:
    """qemu-peer cpr-transfer rows: QEMU's own downtime ``own_ms`` (ends on the source), the guest's
    pause (STOP → RESUME) a little shorter than the observer's outage ``outage_ms``."""
    rows = qemu_rows([own_ms] * len(outage_ms), mode="qemu-cpr-transfer", size=size, outage_ms=outage_ms)
    for r, p in zip(rows, outage_ms):
        r.update(peer_version=version, variant=variant, stop_resume_ns=int(p * 0.8 * MS))
    return rows


def full_vm_rows(outage_ms=(1, 1, 1)) -> list[dict]:
    """fd-passing of RAM + TAP + chardev: downtime 1 ms (traffic_rows), the given outage."""
    return with_outage(traffic_rows([0] * len(outage_ms), [0] * len(outage_ms)), outage_ms)


@pytest.mark.parametrize("outage_ms, expected", [(1.01, "pass"), (1.0, "fail")])
def test_target_below_cpr_transfer_is_strict_and_takes_the_outage(outage_ms, expected):
    t = verdict(table(full_vm_rows() + cpr_rows([outage_ms] * 3)), "below-cpr-transfer")
    # neither QEMU's own downtime (0.5 ms, ends on the source) nor its STOP → RESUME (0.8 ms): the outage
    assert t["measured"] == pytest.approx(1 / outage_ms) and t["verdict"] == expected
    assert "QEMU 10.0.2 cpr-transfer at 64 MiB" in t["detail"] and "STOP → RESUME" in t["detail"]


def test_target_below_cpr_transfer_prefers_qemu_10_0_filled_ram_of_the_same_size():
    fd = full_vm_rows()
    rows = (fd + cpr_rows([2, 2]) + cpr_rows([0.5, 0.5], version="10.1.0") + cpr_rows([0.5, 0.5], variant="idle")
            + cpr_rows([0.5, 0.5], size=GiB))
    t = verdict(table(rows), "below-cpr-transfer")
    assert t["measured"] == pytest.approx(0.5) and t["verdict"] == "pass"
    # without 10.0, the newest QEMU the run has
    t = verdict(table(fd + cpr_rows([0.5, 0.5], version="10.1.0") + cpr_rows([4, 4], version="9.2.0")),
                "below-cpr-transfer")
    assert t["measured"] == pytest.approx(2.0) and "QEMU 10.1.0" in t["detail"] and t["verdict"] == "fail"


def test_target_below_cpr_transfer_inconclusive_and_not_measured():
    fd = full_vm_rows()
    t = verdict(table(fd + cpr_rows([0.8, 1.0, 1.3])), "below-cpr-transfer")
    assert t["ci_low"] < 1 < t["ci_high"] and t["verdict"] == "inconclusive"
    t = verdict(table(fd + qemu_rows([3, 3])), "below-cpr-transfer")  # QEMU 7.2: no cpr-transfer
    assert t["verdict"] == "not-measured" and "cpr-transfer needs QEMU 10.0" in t["why"]
    t = verdict(table(fd), "below-cpr-transfer", {"scenarios": {"qemu-peer": {"ran": False, "reason": "no QEMU"}}})
    assert t["verdict"] == "not-measured" and "no QEMU" in t["why"]
    t = verdict(table(cpr_rows([2, 2])), "below-cpr-transfer")
    assert t["verdict"] == "not-measured" and "ram+tap+chardev" in t["why"]
    # a run older than the observer: downtime only, no outage to compare
    t = verdict(table(traffic_rows([0, 0], [0, 0]) + cpr_rows([2, 2])), "below-cpr-transfer")
    assert t["verdict"] == "not-measured" and "observer" in t["why"]


# -- the outage issue's targets ------------------------------------------------------------


@pytest.mark.parametrize("outage_ms, expected", [(1.5, "pass"), (1.6, "fail")])
def test_target_outage_vs_downtime_is_the_median_excess_per_trial(outage_ms, expected):
    rows = with_outage(traffic_rows([0, 0, 0, 0, 0], [0] * 5), [outage_ms] * 5)  # downtime 1 ms
    t = verdict(table(rows), "outage-vs-downtime")
    assert t["measured"] == pytest.approx(outage_ms - 1) and t["verdict"] == expected
    # one metric alone moves it: the downtime the VM reports, not the outage
    late = [dict(r, downtime_ns=int(0.4 * MS)) for r in with_outage(traffic_rows([0] * 5, [0] * 5), [1.0] * 5)]
    assert verdict(table(late), "outage-vs-downtime")["verdict"] == "fail"
    assert verdict(table(traffic_rows([0, 0], [0, 0])), "outage-vs-downtime")["verdict"] == "not-measured"


def test_target_client_excess_threshold_follows_the_line_rate():
    rows = [fixture_row(scenario="chardev", mode="fd-passing", backend="ram+chardev", ram_bytes=64 * MiB, live=True,
                        trial=i, downtime_ns=1 * MS, switchover_silence_ns=int(2.2 * MS)) for i in range(5)]
    # excess 1.2 ms: within 0.5 ms + 2 x 0.5 ms at 2000 lines/s, beyond 0.5 ms + 2 x 0.25 ms at 4000
    meta = lambda rate: {"scenarios": {"chardev": {"ran": True, "line_rate_per_s": rate}}}  # noqa: E731
    assert verdict(table(rows), "client-excess", meta(2000))["verdict"] == "pass"
    t = verdict(table(rows), "client-excess", meta(4000))
    assert t["verdict"] == "fail" and t["threshold"] == "≤ 1" and "0.25 ms" in t["detail"]
    assert verdict(table(rows), "client-excess", {})["verdict"] == "not-measured"


def default_rows(scenario: str, messages: list[int], fds: int = 3, ok=True) -> list[dict]:
    return [fixture_row(scenario=scenario, mode="fd-passing", backend="ram+tap+chardev", ram_bytes=64 * MiB,
                        live=True, trial=i, downtime_ns=MS, fds_passed=fds, fd_messages=m, ok=ok)
            for i, m in enumerate(messages)]


def test_target_fd_batching_default():
    t = verdict(table(default_rows("tap-traffic", [1, 2]) + default_rows("chardev", [1])), "fd-batching-default")
    assert t["verdict"] == "pass" and t["measured"] == 1.0
    assert "3 of 3" in t["detail"] and "9 fds in 4 messages" in t["detail"] and "README" in t["detail"]
    # one migration that sent one fd per sendmsg fails it
    t = verdict(table(default_rows("tap-traffic", [1, 3])), "fd-batching-default")
    assert t["verdict"] == "fail" and t["measured"] == 0.5 and "1 migrations sent one fd per sendmsg" in t["why"]
    # fd-count's variants set x-batch-fds themselves, a failed trial and one fd say nothing about the default
    t = verdict(table(default_rows("tap-traffic", [1]) + variant_rows("unbatched", {16: [5]})
                      + default_rows("chardev", [3], ok=False) + default_rows("ram-size", [1], fds=1)),
                "fd-batching-default")
    assert t["verdict"] == "pass" and "1 of 1" in t["detail"]
    t = verdict(table(default_rows("ram-size", [1, 1], fds=1)), "fd-batching-default")
    assert t["verdict"] == "not-measured" and np.isnan(t["measured"])


def test_every_target_of_issue_9_is_a_row():
    names = list(targets(table([]))["target"])
    for key in ("handover-floor", "per-fd-cost", "unbatched-linear", "copy-throughput", "total-flat-in-ram",
                "below-cpr-transfer", "fd-batching-default"):
        assert TARGETS[key].name in names
    assert [TARGETS[k].threshold_text() for k in ("handover-floor", "per-fd-cost", "unbatched-linear",
                                                   "copy-throughput", "total-flat-in-ram", "below-cpr-transfer",
                                                   "fd-batching-default")] == ["≤ 10", "≤ 2", "≤ 2", "≥ 0.8",
                                                                               "≤ 1.25", "< 1", "= 1"]


@pytest.mark.parametrize("qemu_ms, expected", [(4.0, "pass"), (3.9, "fail")])
def test_target_moonshot_halves_qemus_cpr_transfer_outage(qemu_ms, expected):
    # fd-passing outage 2 ms at 64 MiB, live; QEMU 10.0 cpr-transfer 4 ms: exactly half passes
    fd = with_outage(ram_rows("fd-passing", 64 * MiB, [1, 1, 1], live=True), [2, 2, 2])
    t = verdict(table(fd + cpr_rows([qemu_ms] * 3)), "moonshot")
    assert t["measured"] == pytest.approx(2 / qemu_ms) and t["verdict"] == expected
    # only the outage moves it: the downtime may be anything
    fast = [dict(r, downtime_ns=1) for r in fd]
    assert verdict(table(fast + cpr_rows([qemu_ms] * 3)), "moonshot")["measured"] == pytest.approx(2 / qemu_ms)
    # QEMU 7.2 has no cpr-transfer; a run without the observer has no outage
    assert verdict(table(fd + cpr_rows([4, 4], version="7.2.22")), "moonshot")["verdict"] == "not-measured"


def test_fd_order_trials_count_their_frames_but_not_in_the_default_configurations_figures():
    """fd-order changes the order of the fds and the RAM size: its downtimes stay out of the
    handover target (tap-traffic's, the default order); a frame it lost is lost all the same."""
    rows = traffic_rows([0, 0, 0], [0, 0, 0])  # fd-passing downtime 1 ms
    rows += [floor_row("handover-floor", backend="ram+tap+chardev", n_fds=3, total_ns=200 * US)] * 2
    slow = [dict(r, scenario="fd-order", variant="early-fds", downtime_ns=50 * MS, ram_bytes=1 << 30)
            for r in traffic_rows([0, 0, 0], [0, 0, 0])]
    t = verdict(table(rows + slow), "handover-floor")
    assert t["measured"] == pytest.approx(5) and t["verdict"] == "pass"
    slow[0]["frames_lost"] = 3
    t = verdict(table(rows + slow), "zero-frames-lost")
    assert t["verdict"] == "fail" and t["measured"] == 3
