"""QEMU's option syntax (``driver,key=value,...``), on/off and sizes: what every device kind parses its options with."""

from __future__ import annotations

from migfd.errors import MigrationError
from migfd.units import GiB, KiB, MiB

__all__ = ["opt_bool", "opt_size", "parse_opts"]

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
