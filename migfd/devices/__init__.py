"""The backends of a migfd VM: memfd RAM, TAP netdev, socket chardev.

``from_options`` builds a device from QEMU's option syntax, so a VM's command
line reads like QEMU's (``-object memory-backend-memfd,id=ram0,size=64M``).
"""

from __future__ import annotations

from migfd.devices.base import Device, RunControl
from migfd.devices.chardev import ChardevSocket
from migfd.devices.memfd import MemoryBackendMemfd
from migfd.devices.options import from_options
from migfd.devices.tap import TapNetdev

__all__ = ["ChardevSocket", "Device", "MemoryBackendMemfd", "RunControl", "TapNetdev",
           "from_options"]
