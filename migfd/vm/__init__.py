"""One VM process: devices with real backends, a guest on an accelerator, a QMP monitor.

``migfd vm`` is to this package what ``qemu-system-x86_64`` is to QEMU's
softmmu: it parses a QEMU-like command line (:mod:`.main`), opens the
backends (or, with ``--incoming``, waits to receive them), runs the guest on
its accelerator (:mod:`migfd.accel`) under the VM's run state
(:mod:`.machine`), and answers QMP (:mod:`.monitor`), including the
migration commands that drive :mod:`migfd.migration`.
"""

from __future__ import annotations

from migfd.vm.machine import DEFAULT_MACHINE, VM
from migfd.vm.main import add_arguments, build_vm, run
from migfd.vm.monitor import Monitor

__all__ = ["DEFAULT_MACHINE", "VM", "Monitor", "add_arguments", "build_vm", "run"]
