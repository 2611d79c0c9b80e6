"""QEMU's trace lines turned into a timeline (migfd.peers.qemu_trace), on lines real QEMUs wrote.

The 10.0 lines are from a cpr-transfer of a 64 MiB pc guest (QEMU 10.0.2, the
sample in the issue's facts); the 7.2 lines from a precopy of the same guest
(QEMU 7.2.22), both with ``-msg timestamp=on``. Excerpts: most device sections
are left out, the rest is as QEMU printed it (trailing spaces included).
"""

from __future__ import annotations

import pytest

from migfd.peers.qemu_trace import (
    TRACE_EVENTS, TraceEvent, completion_sections, cpr_fds, is_trace_line, parse_trace, qemu_timeline,
    trace_arguments,
)

CPR_SOURCE = """\
22274@1796144816.597392:cpr_save_fd ram0, id 0, fd 8
22274@1796144816.613291:cpr_save_fd pc.bios, id 0, fd 12
22274@1796144818.179576:cpr_state_save cpr-transfer mode
22274@1796144818.241315:vmstate_downtime_checkpoint src-downtime-start
22274@1796144818.241676:vmstate_downtime_checkpoint src-vm-stopped
22315@1796144818.241791:savevm_state_header 
22315@1796144818.241841:savevm_state_setup 
22315@1796144818.242856:migration_precopy_complete 
22315@1796144818.242862:savevm_send_switchover_start 
22315@1796144818.242866:savevm_command_send com=0xb len=0
22315@1796144818.242912:savevm_section_start ram, section_id 1
22315@1796144818.243022:savevm_section_end ram, section_id 1 -> 0
22315@1796144818.243029:vmstate_downtime_checkpoint src-iterable-saved
22315@1796144818.243033:savevm_section_start timer, section_id 0
22315@1796144818.243047:savevm_section_end timer, section_id 0 -> 0
22315@1796144818.243086:savevm_section_start cpu, section_id 4
22315@1796144818.243303:savevm_section_end cpu, section_id 4 -> 0
22315@1796144818.245172:savevm_section_skip smbus-eeprom, section_id 30
22315@1796144818.245208:savevm_section_start globalstate, section_id 39
22315@1796144818.245219:savevm_section_end globalstate, section_id 39 -> 0
22315@1796144818.245735:vmstate_downtime_checkpoint src-non-iterable-saved
22315@1796144818.245756:vmstate_downtime_checkpoint src-downtime-end
22274@1796144818.245901:savevm_state_cleanup 
"""

CPR_DESTINATION = """\
22295@1796144818.179729:cpr_transfer_input /tmp/qemu-probe.8k7i0qh2/cpr.sock
22295@1796144818.179858:cpr_state_load cpr-transfer mode
2026-12-01T17:06:58.180436Z qemu-system-x86_64: -qmp unix:/tmp/qemu-probe.8k7i0qh2/dst.qmp,server=on,wait=on: \
info: QEMU waiting for connection on: disconnected:unix:/tmp/qemu-probe.8k7i0qh2/dst.qmp,server=on
22295@1796144818.181883:cpr_find_fd ram0, id 0 returns 13
22295@1796144818.242724:loadvm_state_setup 
22295@1796144818.246920:vmstate_downtime_checkpoint dst-precopy-loadvm-completed
22295@1796144818.246954:vmstate_downtime_checkpoint dst-precopy-bh-enter
22295@1796144818.246965:vmstate_downtime_checkpoint dst-precopy-bh-announced
22295@1796144818.247084:vmstate_downtime_checkpoint dst-precopy-bh-vm-started
22295@1796144818.247090:loadvm_state_cleanup 
"""

PRECOPY_72_SOURCE = """\
5596@1796146660.182550:savevm_state_header 
5596@1796146660.182606:savevm_state_setup 
5596@1796146660.183889:savevm_state_iterate 
5596@1796146660.183903:savevm_section_start ram, section_id 2
5596@1796146660.210449:savevm_section_end ram, section_id 2 -> 1
5596@1796146660.211560:savevm_state_complete_precopy 
5596@1796146660.211589:savevm_section_start ram, section_id 2
5596@1796146660.211853:savevm_section_end ram, section_id 2 -> 0
5596@1796146660.211873:savevm_section_start timer, section_id 0
5596@1796146660.211889:savevm_section_end timer, section_id 0 -> 0
5596@1796146660.211893:savevm_section_start cpu_common, section_id 4
5596@1796146660.211902:savevm_section_end cpu_common, section_id 4 -> 0
5596@1796146660.213871:savevm_section_start acpi_build, section_id 39
5596@1796146660.213878:savevm_section_end acpi_build, section_id 39 -> 0
5596@1796146660.213881:savevm_section_start globalstate, section_id 40
5596@1796146660.213888:savevm_section_end globalstate, section_id 40 -> 0
5556@1796146660.214054:savevm_state_cleanup 
2026-12-01T17:37:45.931903Z qemu-system-x86_64: terminating on signal 15 from pid 5764 (bash)
"""

PRECOPY_72_DESTINATION = """\
5567@1796146660.184186:loadvm_state_setup 
5567@1796146660.184234:qemu_loadvm_state_section 1
5567@1796146660.184237:qemu_loadvm_state_section_startfull 2(ram) 0 4
5567@1796146660.184706:qemu_loadvm_state_section 2
5567@1796146660.184714:qemu_loadvm_state_section_partend 2
5567@1796146660.212904:qemu_loadvm_state_section 3
5567@1796146660.212918:qemu_loadvm_state_section_partend 2
5567@1796146660.213961:qemu_loadvm_state_section 4
5567@1796146660.213967:qemu_loadvm_state_section_startfull 0(timer) 0 2
5567@1796146660.215864:qemu_loadvm_state_section 4
5567@1796146660.215879:qemu_loadvm_state_section_startfull 40(globalstate) 0 1
5567@1796146660.215887:qemu_loadvm_state_section 0
5567@1796146660.215920:loadvm_state_cleanup 
"""

# QEMU 10.0.2, precopy: the END of RAM and a device section on the destination
PRECOPY_10_DESTINATION = """\
5878@1796146670.325647:qemu_loadvm_state_section 1
5878@1796146670.325650:qemu_loadvm_state_section_startfull 1(ram) 0 4
5878@1796146670.325838:qemu_loadvm_state_section 2
5878@1796146670.325842:qemu_loadvm_state_section_partend 1
5878@1796146670.335414:qemu_loadvm_state_section 8
5878@1796146670.335454:qemu_loadvm_state_section_command 0
5878@1796146670.335461:qemu_loadvm_state_section 3
5878@1796146670.335463:qemu_loadvm_state_section_partend 1
5878@1796146670.335477:vmstate_downtime_load type=iterable idstr=ram instance_id=0 downtime=10
5878@1796146670.336960:qemu_loadvm_state_section 4
5878@1796146670.336968:qemu_loadvm_state_section_startfull 0(timer) 0 2
5878@1796146670.336976:vmstate_downtime_load type=non-iterable idstr=timer instance_id=0 downtime=4
"""


def phases(timeline: list[dict], side: str, *names: str) -> dict[str, tuple[int, int]]:
    """{phase: (start_ns, end_ns)} of one side, for the named phases (each must occur once)."""
    out = {}
    for p in timeline:
        if p["side"] == side and p["phase"] in names:
            assert p["phase"] not in out, f"{p['phase']} twice"
            out[p["phase"]] = (p["start_ns"], p["end_ns"])
    return out


def test_parse_reads_trace_lines_and_skips_qemu_messages():
    events = parse_trace(CPR_DESTINATION)
    assert len(events) == 9  # the ISO-stamped message is not a trace line
    assert events[0] == TraceEvent(22295, 1796144818_179729, "cpr_transfer_input",
                                   "/tmp/qemu-probe.8k7i0qh2/cpr.sock")
    assert events[3] == TraceEvent(22295, 1796144818_242724, "loadvm_state_setup", "")  # trailing space
    assert [e.time_us for e in events] == sorted(e.time_us for e in events)
    assert not is_trace_line("2026-12-01T17:06:58.180436Z qemu-system-x86_64: info: QEMU waiting")
    assert is_trace_line("22295@1796144818.247090:loadvm_state_cleanup ")


def test_lines_without_timestamps_give_no_timeline():
    # without -msg timestamp=on QEMU prints "event args" alone: nothing to place in time
    bare = "vmstate_downtime_checkpoint src-downtime-start\nsavevm_state_header\n"
    assert parse_trace(bare) == []
    assert qemu_timeline(parse_trace(bare), []) == []


def test_cpr_transfer_checkpoints_become_phases_from_the_source_stop():
    timeline = qemu_timeline(parse_trace(CPR_SOURCE), parse_trace(CPR_DESTINATION))
    src = phases(timeline, "source", "stop", "iterable-save", "device-save", "completion")
    assert src == {"stop": (0, 361_000), "iterable-save": (361_000, 1_714_000),
                   "device-save": (1_714_000, 4_420_000), "completion": (4_420_000, 4_441_000)}
    dst = phases(timeline, "destination", "loadvm", "bh-wait", "announce", "vm-start")
    # no section events on this destination: its load starts at loadvm_state_setup
    assert dst == {"loadvm": (1_409_000, 5_605_000), "bh-wait": (5_605_000, 5_639_000),
                   "announce": (5_639_000, 5_650_000), "vm-start": (5_650_000, 5_769_000)}
    assert all(p["side"] in ("source", "destination") and isinstance(p["start_ns"], int) for p in timeline)
    assert [p["start_ns"] for p in timeline] == sorted(p["start_ns"] for p in timeline)


def test_cpr_transfer_sections_and_fds():
    source = parse_trace(CPR_SOURCE)
    timeline = qemu_timeline(source, [])
    saves = [(p["phase"], p["start_ns"], p["end_ns"]) for p in timeline if p["phase"].startswith("save:")]
    assert saves == [("save:ram", 1_597_000, 1_707_000), ("save:timer", 1_718_000, 1_732_000),
                     ("save:cpu", 1_771_000, 1_988_000), ("save:globalstate", 3_893_000, 3_904_000)]
    iterable, devices = completion_sections(source)
    assert [s.idstr for s in iterable] == ["ram"]
    # RAM is iterable and the skipped smbus-eeprom section was never saved
    assert [s.idstr for s in devices] == ["timer", "cpu", "globalstate"]
    assert cpr_fds(source) == 2
    assert cpr_fds(parse_trace(CPR_SOURCE + "22274@1796144818.300000:cpr_delete_fd pc.bios, id 0\n")) == 1


def test_events_are_points_and_the_stop_event_is_the_origin_only_without_the_checkpoint():
    src = parse_trace(CPR_SOURCE)
    timeline = qemu_timeline(src, parse_trace(CPR_DESTINATION), stop_us=1796144818_241473,
                             resume_us=1796144818_247000)
    points = {p["phase"]: (p["side"], p["start_ns"], p["end_ns"]) for p in timeline if p["phase"].isupper()}
    assert points == {"STOP": ("source", 158_000, 158_000), "RESUME": ("destination", 5_685_000, 5_685_000)}
    without = [e for e in src if e.args != "src-downtime-start"]
    moved = phases(qemu_timeline(without, [], stop_us=1796144818_241473), "source", "iterable-save")
    assert moved == {"iterable-save": (361_000 - 158_000, 1_714_000 - 158_000)}


def test_qemu_72_without_checkpoints():
    source, destination = parse_trace(PRECOPY_72_SOURCE), parse_trace(PRECOPY_72_DESTINATION)
    timeline = qemu_timeline(source, destination)  # origin: savevm_state_complete_precopy
    assert phases(timeline, "source", "stop", "iterable-save", "device-save") == {
        "iterable-save": (0, 293_000), "device-save": (313_000, 2_328_000)}
    assert phases(timeline, "destination", "loadvm") == {"loadvm": (1_344_000, 4_360_000)}
    loads = [(p["phase"], p["start_ns"], p["end_ns"]) for p in timeline if p["phase"].startswith("load:")]
    assert loads == [("load:ram", -27_326_000, -26_854_000), ("load:ram", -26_854_000, 1_344_000),
                     ("load:ram", 1_344_000, 2_401_000), ("load:timer", 2_401_000, 4_304_000),
                     ("load:globalstate", 4_304_000, 4_327_000)]
    assert [s.idstr for s in completion_sections(source)[1]] == ["timer", "cpu_common", "acpi_build",
                                                                 "globalstate"]
    # a RAM iteration before the stop is on the timeline, before zero
    assert ("save:ram", -27_657_000, -1_111_000) in [(p["phase"], p["start_ns"], p["end_ns"]) for p in timeline]


def test_qemu_10_loads_end_at_their_own_downtime_event():
    loads = [(p["phase"], p["start_ns"], p["end_ns"])
             for p in qemu_timeline([], parse_trace(PRECOPY_10_DESTINATION), stop_us=1796146670_335000)
             if p["phase"].startswith("load:")]
    assert loads == [("load:ram", -9_353_000, -9_162_000), ("load:ram", -9_162_000, 414_000),
                     ("load:ram", 461_000, 477_000), ("load:timer", 1_960_000, 1_976_000)]


@pytest.mark.parametrize("has_checkpoint", [True, False])
def test_trace_arguments_enable_only_what_the_qemu_has(has_checkpoint):
    available = {"savevm_state_setup", "savevm_section_start", "loadvm_state_setup",
                 "qemu_loadvm_state_section"} | ({"vmstate_downtime_checkpoint"} if has_checkpoint else set())
    args = trace_arguments(available)
    assert args[-2:] == ["-msg", "timestamp=on"]
    enabled = [a.removeprefix("enable=") for a in args[1:-2:2]]
    assert args[:-2:2] == ["-trace"] * len(enabled)
    assert set(enabled) <= set(TRACE_EVENTS)
    assert {"savevm_*", "loadvm_state_*", "qemu_loadvm_state_section*"} <= set(enabled)
    assert ("vmstate_downtime_checkpoint" in enabled) == has_checkpoint
    assert "cpr_save_fd" not in enabled
