"""What an accelerator is to the VM: the guest's CPUs behind one small interface.

An accelerator runs the guest's CPU work over the VM's RAM devices: the
thread accelerator as Python guest threads, KVM as vCPU threads in
``KVM_RUN``. The VM asks it for the devices that migrate its CPU state (the
``cpu`` sections), lets it set up a fresh guest's firmware area, starts it
parked, and stops and resumes it through :class:`~migfd.devices.base.RunControl`
(which calls :meth:`Accelerator.pause` first on a stop, :meth:`Accelerator.resume`
last on a resume, as QEMU pauses the vCPUs before the devices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from migfd.devices.base import Device, RunControl
from migfd.devices.memfd import MemoryBackendMemfd

#: the accelerators ``migfd vm --accel`` knows
ACCELERATORS = ("kvm", "thread")


@dataclass(frozen=True)
class GuestConfig:
    """What the guest does: CPUs, how fast it dirties how much RAM, how much of the time it runs."""

    #: vCPUs (kvm); the thread accelerator runs one progress thread whatever this says
    smp: int = 1
    #: bytes a second the guest stamps (pages of the first RAM backend under kvm; every backend under thread)
    dirty_rate_bytes_s: int = 0
    #: bytes of RAM the stamps go to (kvm), from the first data page; 0: all of it below 4 GiB
    working_set_bytes: int = 0
    #: the fraction of each period a vCPU runs before it halts (kvm); 1.0: it never halts
    duty: float = 1.0
    #: the period of the duty cycle, µs
    duty_period_us: int = 1000


def guest_ram(devices: list[Device]) -> list[MemoryBackendMemfd]:
    """The RAM backends among ``devices``, in order: guest RAM, the first one from address 0."""
    return [d for d in devices if isinstance(d, MemoryBackendMemfd)]


class Accelerator:
    """The interface; see the module docstring. Subclasses: thread, kvm."""

    name = ""

    def __init__(self, config: GuestConfig):
        self.config = config
        #: set by :func:`migfd.accel.create` when this one runs instead of the one asked for
        self.requested = self.name
        self.fallback_reason = ""

    def attach(self, devices: list[Device]) -> list[Device]:
        """Take the VM's RAM among its devices (the first backend is guest-physical 0); return
        the devices that migrate the CPUs' state."""
        raise NotImplementedError

    def setup_firmware(self) -> None:
        """A fresh guest (not an incoming one): write what the guest needs into its firmware area."""

    def start(self, ctl: RunControl) -> None:
        """Start the guest's CPUs parked; ``ctl`` runs and stops them with the devices' threads."""
        raise NotImplementedError

    def pause(self, timeout_s: float) -> None:
        """Stop every CPU; returns when none runs guest code (a runner of RunControl)."""

    def resume(self) -> None:
        """Run every CPU again (a runner of RunControl)."""

    def shutdown(self) -> None:
        """Make the CPU threads exit without running the guest again."""

    def info(self) -> dict[str, Any]:
        """For x-query-guest: which accelerator runs, why (a fallback), what the CPUs did."""
        out: dict[str, Any] = {"name": self.name, "requested": self.requested}
        if self.fallback_reason:
            out["fallback-reason"] = self.fallback_reason
        return out

    def close(self) -> None:
        """Close every fd; after :meth:`shutdown`."""
