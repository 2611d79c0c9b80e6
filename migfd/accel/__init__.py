"""Accelerators: who runs the guest's CPU work (``migfd vm --accel kvm|thread``).

``kvm`` runs flat 32-bit guest code on vCPUs in ``KVM_RUN`` and takes the
dirty pages of a live migration from KVM's dirty log; ``thread`` runs the
guest's work as Python threads. :func:`create` makes the one asked for, or
falls back to ``thread`` when KVM cannot run here, with the reason logged and
kept (x-query-guest reports it under ``accel``).
"""

from __future__ import annotations

import logging

from migfd.accel.base import ACCELERATORS, Accelerator, GuestConfig
from migfd.accel.kvm import KvmError, probe
from migfd.accel.thread import ThreadAccelerator
from migfd.accel.vcpu import KvmAccelerator
from migfd.errors import MigrationError

__all__ = ["ACCELERATORS", "Accelerator", "GuestConfig", "KvmAccelerator", "ThreadAccelerator", "create", "default_accel"]

log = logging.getLogger("migfd.accel")


def default_accel() -> str:
    """``kvm`` where /dev/kvm opens and works, else ``thread``."""
    return "kvm" if not probe() else "thread"


def create(name: str | None, config: GuestConfig) -> Accelerator:
    """The accelerator ``name`` (None: the default), or ``thread`` with the reason when KVM cannot run."""
    requested = name or "kvm"
    if requested not in ACCELERATORS:
        raise MigrationError(f"--accel {requested}: one of {', '.join(ACCELERATORS)}")
    if requested == "thread":
        return ThreadAccelerator(config)
    reason = probe()
    if not reason:
        try:
            return KvmAccelerator(config)
        except (KvmError, OSError, ValueError) as exc:
            reason = str(exc)
    log.warning("accelerator kvm unavailable, running the guest on threads: %s", reason)
    accel = ThreadAccelerator(config)
    accel.requested = requested
    accel.fallback_reason = reason
    return accel
