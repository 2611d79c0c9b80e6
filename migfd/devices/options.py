"""QEMU's option syntax for the devices of a migfd VM, and the device each option string builds.

``from_options("object", "memory-backend-memfd,id=ram0,size=64M")`` is what
``-object memory-backend-memfd,id=ram0,size=64M`` does on a VM's command line.
"""

from __future__ import annotations

from migfd.devices.base import Device
from migfd.devices.chardev import ChardevSocket
from migfd.devices.memfd import MemoryBackendMemfd
from migfd.devices.tap import TapNetdev
from migfd.errors import MigrationError
from migfd.units import GiB, KiB, MiB

__all__ = ["from_options", "opt_bool", "opt_size", "parse_opts"]

_SIZE_SUFFIXES = {"k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}


def parse_opts(text: str) -> tuple[str, dict[str, str]]:
    """QEMU's option syntax: ``driver,key=value,...`` -> (driver, {key: value})."""
    parts = text.split(",")
    driver, opts = parts[0], {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep:
            raise MigrationError(f"option '{part}' of '{text}' lacks a value")
        opts[key] = value
    if not driver or "id" not in opts:
        raise MigrationError(f"'{text}' needs a driver and an id")
    return driver, opts


def opt_bool(opts: dict[str, str], key: str, default: bool = False) -> bool:
    """Take ``key`` out of ``opts`` as QEMU's on/off (also yes/no, true/false)."""
    value = opts.pop(key, None)
    if value is None:
        return default
    if value in ("on", "yes", "true"):
        return True
    if value in ("off", "no", "false"):
        return False
    raise MigrationError(f"'{key}' takes on or off, not '{value}'")


def opt_size(text: str) -> int:
    """QEMU sizes: 64M, 1G, 4096, 2k."""
    t = text.strip().lower().removesuffix("b")
    mult = _SIZE_SUFFIXES.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in _SIZE_SUFFIXES else t
    try:
        return int(number) * mult
    except ValueError:
        raise MigrationError(f"'{text}' is not a size") from None


def from_options(group: str, text: str) -> Device:
    """``group`` is "object", "netdev" or "chardev"; ``text`` its option string."""
    driver, opts = parse_opts(text)
    dev_id = opts.pop("id")
    transfer = opt_bool(opts, "backend-transfer")
    if group == "object" and driver == "memory-backend-memfd":
        if "size" not in opts:
            raise MigrationError(f"memory-backend-memfd '{dev_id}' needs size=")
        dev: Device = MemoryBackendMemfd(dev_id, opt_size(opts.pop("size")), transfer,
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
