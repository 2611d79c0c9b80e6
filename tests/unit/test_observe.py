"""The guest-progress observer's rules, on recorded samples: no process, no clock."""

from __future__ import annotations

import numpy as np
import pytest

from migfd.peers.observe import (
    OwnGaps, Silence, echo_silence, longest_before, progress_times, silences_between, switchover_outage,
)

pytestmark = pytest.mark.unit

P = 100_000  # ns between samples


def samples(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) * P


def test_a_stopped_guest_is_one_silence_from_its_last_to_its_first_progress():
    t = samples(40)
    v = np.arange(40, dtype=np.int64)  # a running guest: a change every interval
    v[10:25] = v[10]  # stopped after sample 10, runs again at sample 25
    v[25:] = v[10] + np.arange(1, 16)
    silences = silences_between(progress_times(t, v), 3 * P)
    assert silences == [Silence(10 * P, 25 * P)]


def test_a_single_write_while_nothing_runs_is_not_progress():
    # A state-copy destination writes the counter's page once, during the downtime.
    t = samples(40)
    src = np.arange(40, dtype=np.int64)
    src[10:] = 10  # the source stops for good at sample 10
    dst = np.full(40, -1, dtype=np.int64)  # the destination's RAM appears at sample 12
    dst[12:] = 0
    dst[18:] = 10  # the copied page: one write
    dst[30:] = 10 + np.arange(1, 11)  # the guest runs on the destination from sample 30
    silences = silences_between(progress_times(t, np.stack([src, dst], axis=1)), 3 * P)
    assert silences == [Silence(10 * P, 30 * P)]


def test_the_last_precopy_pass_and_the_final_stage_writing_the_page_back_to_back_are_not_progress():
    t = samples(40)
    src = np.arange(40, dtype=np.int64)
    src[10:] = 10
    dst = np.zeros(40, dtype=np.int64)
    dst[15] = 7   # the last precopy pass...
    dst[16:] = 10  # ... and the final stage, in the next interval
    dst[30:] = 10 + np.arange(1, 11)
    silences = silences_between(progress_times(t, np.stack([src, dst], axis=1)), 3 * P)
    assert silences == [Silence(10 * P, 30 * P)]


def test_unreadable_samples_never_count_as_change():
    t = samples(10)
    v = np.array([-1, -1, -1, 5, 5, 5, 5, 5, 5, 5], dtype=np.int64)
    assert len(progress_times(t, v)) == 0


def test_own_gaps_mark_the_silences_that_hold_them():
    own = OwnGaps(limit_ns=2 * P)
    for prev, now in [(0, P), (P, 9 * P), (9 * P, 10 * P)]:
        own.note(prev, now)
    assert own.gaps == [(P, 9 * P)]
    progress = np.array([0, P, 9 * P, 10 * P, 20 * P, 21 * P], dtype=np.int64)
    silences = silences_between(progress, 3 * P, own)
    assert [(s.start_ns, s.end_ns, s.own) for s in silences] == [(P, 9 * P, True), (10 * P, 20 * P, False)]
    assert silences[0].own_gap_ns == 8 * P


def test_a_change_across_the_observers_own_gap_is_no_evidence_of_progress():
    t = samples(30)
    t[15:] += 50 * P  # the observer did not run between samples 14 and 15
    v = np.arange(30, dtype=np.int64)  # the guest changed the counter across that gap too
    own = OwnGaps(limit_ns=3 * P)
    for k in range(1, 30):
        own.note(int(t[k - 1]), int(t[k]))
    silences = silences_between(progress_times(t, v, own_limit_ns=own.limit_ns), 3 * P, own)
    # the first change seen after the gap is from sample 15 to 16
    assert [(s.start_ns, s.end_ns, s.own) for s in silences] == [(int(t[14]), int(t[16]), True)]


def test_the_switchover_outage_is_the_longest_silence_over_the_reported_pause():
    a, b, c = Silence(100, 200), Silence(300, 900), Silence(1000, 5000)
    # the stop is asked at 250 and the guest stops a little later: b overlaps the pause, c does not
    assert switchover_outage([a, b, c], (250, 600)) is b
    assert switchover_outage([a, b, c], (150, 600)) is b  # a overlaps too, but is shorter
    assert switchover_outage([a, b, c], (0, 10_000)) is c  # QEMU without events: the whole migration
    assert switchover_outage([a, b], (950, 990)) is None  # nothing over the pause: no outage
    assert longest_before([a, b, c], 0, 950) is b
    assert longest_before([a, b, c], 0, 250) is a


def test_an_echo_stream_silence_is_its_longest_gap_over_the_pause():
    arrivals = [0, 250, 500, 750, 4_000, 4_250]
    s = echo_silence(arrivals, stop_ns=800, resume_ns=3_000)
    assert (s.start_ns, s.end_ns) == (750, 4_000)
    # an echo after the stop was asked (the chardev still ran while the vCPUs stopped):
    # the client's silence starts there, not at the last echo before the request
    s = echo_silence([0, 250, 500, 750, 1_100, 4_000], stop_ns=800, resume_ns=3_000)
    assert (s.start_ns, s.end_ns) == (1_100, 4_000)
    # a gap inside the pause that is longer than the one over the resume is the silence
    s = echo_silence([0, 700, 2_900, 3_100], stop_ns=800, resume_ns=3_000)
    assert (s.start_ns, s.end_ns) == (700, 2_900)
    assert echo_silence([900, 4_000], stop_ns=800, resume_ns=3_000) is None  # no echo before the stop
    assert echo_silence(arrivals, stop_ns=800, resume_ns=5_000) is None  # no echo after the resume
    assert echo_silence([], 0, 1) is None
