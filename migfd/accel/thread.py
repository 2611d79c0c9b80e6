"""The thread accelerator: the guest's CPU work done by Python guest threads.

The first RAM backend's guest-progress counter is bumped by a guest thread
(:meth:`MemoryBackendMemfd.start_progress`), and each backend dirties its own
pages in its own thread at ``--dirty-rate``; nothing migrates as CPU state.
Dirty pages are those threads' own record (the VMM's bitmap).
"""

from __future__ import annotations

from typing import Any

from migfd.accel.base import Accelerator, guest_ram
from migfd.devices.base import Device, RunControl
from migfd.devices.memfd import MemoryBackendMemfd


class ThreadAccelerator(Accelerator):
    name = "thread"

    def __init__(self, config):
        super().__init__(config)
        self.ram: list[MemoryBackendMemfd] = []

    def attach(self, devices: list[Device]) -> list[Device]:
        self.ram = guest_ram(devices)
        return []

    def start(self, ctl: RunControl) -> None:
        if self.ram:
            self.ram[0].start_progress(ctl)  # the first backend is guest RAM from address 0
        for dev in self.ram:
            dev.start_dirtier(ctl, self.config.dirty_rate_bytes_s)

    def info(self) -> dict[str, Any]:
        return dict(super().info(), **{"dirty-log": "vmm"})
