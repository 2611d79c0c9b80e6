"""Per-thread knobs of the OS: names, timer slack, scheduling class.

One place for the few ``prctl``/``sched_setscheduler`` calls the VM, the
migration and the observers make on their own threads. Each is an
optimisation or a convenience: where the kernel refuses, the thread goes on
as it was.

Thread names: CPython leaves every thread of a process named after the
process (``python``), so ``top -H``, ``perf sched`` or an ftrace of a
switchover cannot tell the vCPU from the migration thread.
:func:`name_new_threads` gives each thread started afterwards its Python
name at the OS level, as QEMU's ``-name debug-threads=on`` does for its own.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

PR_SET_NAME = 15
PR_SET_TIMERSLACK = 29
#: the kernel keeps 15 bytes of a thread's name
OS_NAME_BYTES = 15

_libc = ctypes.CDLL(None, use_errno=True)


def set_os_name(name: str) -> None:
    """The calling thread's name as the kernel shows it (``/proc/self/task/TID/comm``)."""
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode("utf-8", "replace")[:OS_NAME_BYTES]), 0, 0, 0)


def _name_on_first_call(frame, event, arg) -> None:
    sys.setprofile(None)  # once: from here the thread runs without a profile hook
    set_os_name(threading.current_thread().name)


def name_new_threads() -> None:
    """Every thread the threading module starts from now on takes its Python name at the OS level.

    ``threading.setprofile`` installs a hook in each new thread before its
    target runs; the hook names the thread and removes itself.
    """
    threading.setprofile(_name_on_first_call)


def fine_timer_slack() -> None:
    """The calling thread's sleeps end within ~1 µs of their time, not the default 50 µs."""
    _libc.prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(1000), 0, 0, 0)


def idle_priority() -> None:
    """Put the calling thread under SCHED_IDLE (any user may lower its own priority)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        pass


def normal_priority() -> None:
    """Put the calling thread back under SCHED_OTHER (any thread may lower its own priority)."""
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except (OSError, AttributeError):
        pass


def realtime(priority: int) -> bool:
    """Put the calling thread under SCHED_FIFO at ``priority``; False where that is not allowed."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        return True
    except (OSError, AttributeError):
        return False

