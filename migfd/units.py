"""Binary size units, as QEMU's command line and the benchmark's sizes use them."""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
