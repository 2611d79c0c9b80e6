#!/usr/bin/env python3
"""How fast the KVM guest dirties RAM, with and without KVM's dirty log on (a measurement, not a test).

One spinning vCPU stamps a working set as fast as it can (the asked rate far above
what it reaches); for each phase it prints stamps a second as MiB/s. With the log on,
the VMM syncs it every --sync-ms, as precopy does between passes: every page dirtied
again after a sync costs the guest a write-protection fault, which under nested KVM
is what limits the rate the log sustains.

    .venv/bin/python tools/kvm-dirty-rate.py --ram 1G --seconds 3
"""

from __future__ import annotations

import argparse
import time

from migfd.accel.base import GuestConfig
from migfd.accel.vcpu import KvmAccelerator
from migfd.devices.base import RunControl
from migfd.devices.memfd import PAGE, MemoryBackendMemfd
from migfd.devices.options import opt_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ram", default="1G", help="RAM backend size (the working set is all of it)")
    p.add_argument("--rate", default="64G", help="the rate asked for, bytes a second (default: beyond reach)")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--sync-ms", type=float, default=100.0, help="dirty-log sync period while logging")
    args = p.parse_args()
    ram = MemoryBackendMemfd("ram0", opt_size(args.ram))
    ram.open_backend()
    accel = KvmAccelerator(GuestConfig(dirty_rate_bytes_s=opt_size(args.rate)))
    ctl = RunControl()
    try:
        accel.attach([ram])
        accel.setup_firmware()
        accel.start(ctl)
        ctl.resume()
        # One pass over the working set first: under nested KVM the first write to each
        # page faults in its mapping, at about the cost of a dirty-log fault.
        deadline = time.monotonic() + 120
        while ram.guest_stamps() < accel.working_set_pages and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"working set {accel.working_set_pages * PAGE >> 20} MiB, first pass done")
        for logging in (False, True, False):
            if logging:
                ram.start_dirty_log()
                ram.sync_dirty_bitmap()
            stamps0, t0 = ram.guest_stamps(), time.monotonic()
            logged = 0
            while time.monotonic() - t0 < args.seconds:
                time.sleep(args.sync_ms / 1000)
                if logging:
                    logged += len(ram.sync_dirty_bitmap())
            rate = (ram.guest_stamps() - stamps0) * PAGE / (time.monotonic() - t0) / 2**20
            extra = f", {logged * PAGE / args.seconds / 2**20:.0f} MiB/s of logged pages" if logging else ""
            print(f"dirty log {'on ' if logging else 'off'}: {rate:8.1f} MiB/s stamped{extra}")
            if logging:
                ram.stop_dirty_log()
    finally:
        ctl.close()
        accel.close()
        ram.close()


if __name__ == "__main__":
    main()
