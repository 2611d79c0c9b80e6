"""migfd.bench.adaptive: rounds are added to a group until its points are precise, up to a cap, with
the modes still alternating; every point's trials and reason are recorded.

The downtimes are FIXTURES (steady or spread on purpose), fed to the schedule
as the runner would feed it rows; no process is started.
"""

from __future__ import annotations

from pathlib import Path


from migfd.bench import adaptive
from migfd.bench.adaptive import Schedule, trial_cap
from migfd.bench.scenario import BenchContext, TrialSpec, interleave
from migfd.units import GiB, MiB


def ctx(**kw) -> BenchContext:
    return BenchContext(quick=False, trials=None, tmp=Path("/nonexistent"), mem_available=0, **kw)


def plan(sizes=(64 * MiB,), trials=5) -> list[TrialSpec]:
    return [TrialSpec("ram-size", item["mode"], item["trial"], backend="ram", ram_bytes=size, n_fds=1, live=True)
            for size in sizes
            for item in interleave([{}], [{"mode": m} for m in ("fd-passing", "state-copy")], trials)]


def drive(schedule: Schedule, context: BenchContext, downtime) -> list[TrialSpec]:
    """Run the schedule as the runner does: every trial's row is in before the next decision."""
    done = []
    while (spec := schedule.next()) is not None:
        row = spec.row()
        row.update(downtime_ns=downtime(spec, len(done)), ok=True)
        context.rows.append(row)
        done.append(spec)
    return done


def steady(spec, i):
    return 2_000_000 + (i % 3) * 10_000  # ±0.5%: precise after the planned five


def noisy(spec, i):
    return [1_000_000, 3_000_000, 2_000_000, 5_000_000][i % 4]  # far from ±10%


def test_precise_points_get_the_planned_trials_only():
    c = ctx()
    schedule = Schedule(plan(), c, adaptive=True)
    assert len(drive(schedule, c, steady)) == 10
    points = schedule.report()
    assert {p["mode"] for p in points} == {"fd-passing", "state-copy"}
    assert all(p["reason"] == "precise" and p["trials"] == 5 for p in points)


def test_noisy_points_get_rounds_up_to_the_cap_and_modes_still_alternate():
    c = ctx()
    schedule = Schedule(plan(), c, adaptive=True)
    done = drive(schedule, c, noisy)
    cap = trial_cap(plan()[0], 5)
    assert cap == 15 and len(done) == 2 * cap
    # each added trial number runs every mode once, the order reversed on odd trials
    for trial in range(5, cap):
        modes = [s.mode for s in done if s.trial == trial]
        assert modes == (["fd-passing", "state-copy"] if trial % 2 == 0 else ["state-copy", "fd-passing"])
    assert all(p["reason"] == "cap" and p["trials"] == cap for p in schedule.report())
    assert schedule.total == len(done)


def test_each_group_is_decided_on_its_own():
    c = ctx()
    sizes = (64 * MiB, 4 * GiB)
    schedule = Schedule(plan(sizes, trials=3), c, adaptive=True)
    done = drive(schedule, c, lambda spec, i: noisy(spec, i) if spec.ram_bytes == 64 * MiB else steady(spec, i))
    big = [s for s in done if s.ram_bytes == 4 * GiB]
    assert len(big) == 6  # precise: no more 4 GiB trials than planned
    # and the small size's rounds came before the big size's first trial
    first_big = done.index(big[0])
    assert all(s.ram_bytes == 64 * MiB for s in done[:first_big]) and len(done[:first_big]) == 30


def test_big_ram_is_capped_lower():
    spec = plan((4 * GiB,))[0]
    assert trial_cap(spec, 3) == 4 and trial_cap(plan((GiB,))[0], 5) == 8
    c = ctx()
    schedule = Schedule(plan((4 * GiB,), trials=3), c, adaptive=True)
    assert len(drive(schedule, c, noisy)) == 8


def test_budget_stops_the_rounds(monkeypatch):
    monkeypatch.setattr(adaptive, "EXTRA_BUDGET_S", 0.0)
    c = ctx()
    schedule = Schedule(plan(), c, adaptive=True)
    assert len(drive(schedule, c, noisy)) == 10
    assert {p["reason"] for p in schedule.report()} == {"budget"}


def test_fixed_trials_are_never_extended():
    c = ctx()
    schedule = Schedule(plan(trials=2), c, adaptive=False)
    assert len(drive(schedule, c, noisy)) == 4
    assert {p["reason"] for p in schedule.report()} == {"fixed"}


def test_points_whose_trials_all_failed_do_not_ask_for_more():
    c = ctx()
    schedule = Schedule(plan(), c, adaptive=True)
    done = []
    while (spec := schedule.next()) is not None:
        row = spec.row()
        failed = spec.mode == "state-copy"
        row.update(downtime_ns=None if failed else steady(spec, len(done)), ok=not failed)
        c.rows.append(row)
        done.append(spec)
    assert len(done) == 10


def test_a_slow_group_does_not_starve_the_groups_after_it(monkeypatch):
    # a fake clock: each 1 GiB trial takes 10 s, each 64 MiB trial 1 s; both sizes are noisy
    clock = [0.0]
    monkeypatch.setattr(adaptive.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(adaptive, "EXTRA_BUDGET_S", 45.0)
    c = ctx()
    schedule = Schedule(plan((GiB, 64 * MiB), trials=5), c, adaptive=True)

    def costly(spec, i):
        clock[0] += 10.0 if spec.ram_bytes == GiB else 1.0
        return noisy(spec, i)

    done = drive(schedule, c, costly)
    big = [s for s in done if s.ram_bytes == GiB]
    small = [s for s in done if s.ram_bytes == 64 * MiB]
    # 1 GiB: a round costs 20 s, its share of 45 s is 22.5 s: one round, and no more
    assert len(big) == 2 * 5 + 2
    # 64 MiB: a round costs 2 s and the rest of the budget is its own: up to its cap
    assert len(small) == 2 * trial_cap(small[0], 5)
    reasons = {p["ram_bytes"]: p["reason"] for p in schedule.report()}
    assert reasons == {GiB: "budget", 64 * MiB: "cap"}
