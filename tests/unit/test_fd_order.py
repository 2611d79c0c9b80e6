"""When should the fds move: the fd-order scenario's two orders compared (migfd.results.fd_order).

Fixture rows, not measurements: round numbers whose medians and ratios can be checked by hand.
"""

from __future__ import annotations

import pandas as pd

from migfd.results.fd_order import AT_SWITCHOVER, EARLY, order_conclusion, order_phases, order_table
from result_rows import MS, fd_count_rows, fixture_row, table


def order_rows(variant: str, downtimes_ms, outages_ms, first_id: int = 0) -> list[dict]:
    return [fixture_row(trial_id=f"t{first_id + i}", scenario="fd-order", mode="fd-passing", variant=variant,
                        backend="ram+tap+chardev", ram_bytes=64 << 20, live=True, trial=i,
                        downtime_ns=int(d * MS), outage_ns=int(o * MS), frames_sent=1000, frames_lost=0,
                        frames_duplicated=0)
            for i, (d, o) in enumerate(zip(downtimes_ms, outages_ms))]


def timelines(trials: dict[str, list[tuple[str, str, int, int]]]) -> pd.DataFrame:
    return pd.DataFrame([(tid, side, phase, a, b) for tid, spans in trials.items() for side, phase, a, b in spans],
                        columns=["trial_id", "side", "phase", "start_ns", "end_ns"])


def test_early_fds_shorter_downtime_same_outage_is_said_as_such():
    # downtime halved with a clear interval; the outage the same in both orders: inconclusive
    df = table(order_rows(AT_SWITCHOVER, [2.0, 2.1, 1.9, 2.0, 2.05], [6, 9, 5, 8, 7])
               + order_rows(EARLY, [1.0, 1.05, 0.95, 1.0, 1.02], [7, 5, 9, 6, 8], first_id=10))
    t = order_table(df).set_index("metric")
    assert t.loc["downtime (reported), 64 MiB", "early / at switchover"].startswith("0.5 [")
    text = order_conclusion(df, pd.DataFrame(columns=["trial_id", "side", "phase", "start_ns", "end_ns"]))
    downtime, outage = text.split("\n\n")[:2]
    assert "shortens it" in downtime
    assert "inconclusive" in outage


def test_early_fds_that_lengthen_the_downtime_are_not_called_shorter():
    df = table(order_rows(AT_SWITCHOVER, [1.0, 1.05, 0.95, 1.0], [5, 5.1, 4.9, 5])
               + order_rows(EARLY, [2.0, 2.1, 1.9, 2.0], [5, 5.1, 4.9, 5], first_id=10))
    downtime = order_conclusion(df, pd.DataFrame(columns=["trial_id"])).split("\n\n")[0]
    assert "does not shorten it" in downtime


def test_the_phases_that_moved_come_first_and_the_slopes_per_order():
    df = table(order_rows(AT_SWITCHOVER, [1.0, 1.0], [1, 1]) + order_rows(EARLY, [0.6, 0.6], [1, 1], first_id=10)
               + fd_count_rows(5.0, "batched") + fd_count_rows(0.5, EARLY))
    spans = {f"t{i}": [("source", "stop", 0, 100_000), ("destination", "post-load:net0/tap", 100_000, 1_000_000)]
             for i in (0, 1)}
    spans.update({f"t{i}": [("source", "stop", 0, 100_000), ("destination", "post-load:net0/tap", 100_000, 600_000)]
                  for i in (10, 11)})
    phases = order_phases(df, timelines(spans))
    assert phases.iloc[0]["phase"] == "backends: validate + adopt"
    assert phases.iloc[0]["early − at switchover"] == -400_000
    slopes = order_table(df).set_index("metric").loc["downtime per extra fd (fd-count slope)"]
    assert slopes.iloc[0] == "5 µs/fd over 3 fd counts" and slopes.iloc[1] == "500 ns/fd over 3 fd counts"
    text = order_conclusion(df, timelines(spans))
    assert "backends: validate + adopt −400 µs" in text
    assert "early / at switchover = 0.1 [0.1, 0.1]: early, the fds' send, receive and validation leave" in text


def test_a_run_without_both_orders_says_so():
    df = table(order_rows(AT_SWITCHOVER, [1.0, 1.0], [1, 1]))
    assert "no fd-order trials of both orders" in order_conclusion(df, pd.DataFrame(columns=["trial_id"]))


def test_each_ram_size_is_judged_on_its_own_and_the_steps_are_the_largest_size():
    small = order_rows(AT_SWITCHOVER, [1.0, 1.0, 1.0], [2, 2, 2]) + order_rows(EARLY, [1.0, 1.0, 1.0], [2, 2, 2], 10)
    large = [dict(r, ram_bytes=1 << 30) for r in order_rows(AT_SWITCHOVER, [3.0, 3.1, 2.9], [5, 5.1, 4.9], 20)
             + order_rows(EARLY, [1.0, 1.05, 0.95], [3, 3.1, 2.9], 30)]
    df = table(small + large)
    text = order_conclusion(df, pd.DataFrame(columns=["trial_id"]))
    assert "**Downtime (reported), 64 MiB RAM**" in text and "**Downtime (reported), 1 GiB RAM**" in text
    lines = {line.split("**")[1]: line for line in text.split("\n\n") if line.startswith("**")}
    assert "does not shorten it" in lines["Downtime (reported), 64 MiB RAM"]  # exactly 1: not shorter
    assert "shortens it" in lines["Downtime (reported), 1 GiB RAM"]
    spans = {f"t{i}": [("destination", "post-load:ram0/memory-backend-memfd", 0, 2_000_000)] for i in (20, 21, 22)}
    spans.update({f"t{i}": [("destination", "post-load:ram0/memory-backend-memfd", 0, 100)] for i in (30, 31, 32)})
    steps = order_phases(df, timelines(spans))
    assert steps.iloc[0]["early − at switchover"] == 100 - 2_000_000
