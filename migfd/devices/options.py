"""The device each option string of a migfd VM's command line builds.

``from_options("object", "memory-backend-memfd,id=ram0,size=64M")`` is what
``-object memory-backend-memfd,id=ram0,size=64M`` does on a VM's command line.
Each device kind registers itself (:func:`~migfd.devices.base.register_device`)
under its option group and driver, and takes its own options from the string
(:meth:`~migfd.devices.base.Device.from_opts`); this module only finds it.
"""

from __future__ import annotations

from migfd.devices.base import DEVICE_KINDS, Device
from migfd.devices.qemu_opts import opt_bool, opt_size, parse_opts
from migfd.errors import MigrationError

__all__ = ["from_options", "opt_bool", "opt_size", "parse_opts"]


def from_options(group: str, text: str) -> Device:
    """``group`` is "object", "netdev" or "chardev"; ``text`` its option string."""
    driver, opts = parse_opts(text)
    dev_id = opts.pop("id")
    transfer = opt_bool(opts, "backend-transfer")
    kind = DEVICE_KINDS.get((group, driver))
    if kind is None:
        raise MigrationError(f"-{group} {driver} is not supported")
    dev = kind.from_opts(dev_id, opts, transfer)
    if opts:
        raise MigrationError(f"-{group} {driver} '{dev_id}': unknown option '{next(iter(opts))}'")
    return dev
