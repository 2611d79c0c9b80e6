"""The backends of a migfd VM: memfd RAM, TAP netdev, socket chardev.

``from_options`` builds a device from QEMU's option syntax, so a VM's command
line reads like QEMU's (``-object memory-backend-memfd,id=ram0,size=64M``).
"""

from __future__ import annotations

from migfd.devices.base import Device, RunControl, opt_bool, opt_size, parse_opts
from migfd.devices.chardev import ChardevSocket
from migfd.devices.memfd import MemoryBackendMemfd
from migfd.devices.tap import TapNetdev
from migfd.errors import MigrationError

__all__ = ["ChardevSocket", "Device", "MemoryBackendMemfd", "RunControl", "TapNetdev",
           "from_options"]


def from_options(group: str, text: str, *, dirty_rate_bytes_s: int = 0) -> Device:
    """``group`` is "object", "netdev" or "chardev"; ``text`` its option string."""
    driver, opts = parse_opts(text)
    dev_id = opts.pop("id")
    transfer = opt_bool(opts, "backend-transfer")
    if group == "object" and driver == "memory-backend-memfd":
        if "size" not in opts:
            raise MigrationError(f"memory-backend-memfd '{dev_id}' needs size=")
        dev: Device = MemoryBackendMemfd(dev_id, opt_size(opts.pop("size")), transfer,
                                         dirty_rate_bytes_s=dirty_rate_bytes_s,
                                         prefill=opt_bool(opts, "fill"))
    elif group == "netdev" and driver == "tap":
        if "ifname" not in opts:
            raise MigrationError(f"netdev tap '{dev_id}' needs ifname=")
        queues = opts.pop("queues", "1")
        if not queues.isdigit():
            raise MigrationError(f"netdev tap '{dev_id}': queues={queues} is not a number")
        dev = TapNetdev(dev_id, opts.pop("ifname"), int(queues), opt_bool(opts, "vnet_hdr"), transfer)
    elif group == "chardev" and driver == "socket":
        if "path" not in opts:
            raise MigrationError(f"chardev socket '{dev_id}' needs path=")
        if not opt_bool(opts, "server", False):
            raise MigrationError(f"chardev socket '{dev_id}': only server=on is supported")
        opt_bool(opts, "wait", False)
        dev = ChardevSocket(dev_id, opts.pop("path"), transfer)
    else:
        raise MigrationError(f"-{group} {driver} is not supported")
    if opts:
        raise MigrationError(f"-{group} {driver} '{dev_id}': unknown option '{next(iter(opts))}'")
    return dev
