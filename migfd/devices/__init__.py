"""The backends of a migfd VM: memfd RAM, TAP netdev, socket chardev.

``from_options`` builds a device from QEMU's option syntax, so a VM's command
line reads like QEMU's (``-object memory-backend-memfd,id=ram0,size=64M``).
Each device kind is one module that registers itself (``@register_device``);
every module of this package is imported here, so a new kind needs no other
line anywhere.
"""

from __future__ import annotations

import importlib
import pkgutil

from migfd.devices.base import DEVICE_KINDS, Device, RunControl, register_device
from migfd.devices.chardev import ChardevSocket
from migfd.devices.memfd import MemoryBackendMemfd
from migfd.devices.options import from_options
from migfd.devices.tap import TapNetdev

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DEVICE_KINDS", "ChardevSocket", "Device", "MemoryBackendMemfd", "RunControl", "TapNetdev",
           "from_options", "register_device"]
