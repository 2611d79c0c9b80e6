"""``migfd vm``: the command line, building the VM from it, serving QMP until ``quit``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from migfd.accel import ACCELERATORS, GuestConfig, create
from migfd.devices import Device, from_options
from migfd.devices.options import opt_size
from migfd.errors import MigrationError
from migfd.qmp import QMPServer
from migfd.transport import parse_uri
from migfd.vm.machine import DEFAULT_MACHINE, VM
from migfd.vm.monitor import Monitor

log = logging.getLogger("migfd.vm")

GIL_SWITCH_INTERVAL_S = 0.0002
#: defaults of --accel and --guest-duty from the environment: a test suite or a benchmark
#: sets them once for every VM it starts
ENV_ACCEL = "MIGFD_ACCEL"
ENV_GUEST_DUTY = "MIGFD_GUEST_DUTY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="migfd-vm")
    p.add_argument("--qmp", required=True, help="unix:PATH of the QMP monitor")
    p.add_argument("--incoming", help="URI to receive a migration on, or 'defer'")
    p.add_argument("--machine", default=DEFAULT_MACHINE)
    p.add_argument("--object", action="append", default=[], metavar="memory-backend-memfd,...")
    p.add_argument("--netdev", action="append", default=[], metavar="tap,...")
    p.add_argument("--chardev", action="append", default=[], metavar="socket,...")
    p.add_argument("--dirty-rate", type=int, default=0, metavar="BYTES_PER_S",
                   help="how fast the guest dirties RAM")
    p.add_argument("--accel", choices=ACCELERATORS, default=os.environ.get(ENV_ACCEL) or None,
                   help="who runs the guest: kvm (the default; falls back to thread, with the "
                        f"reason in x-query-guest, where /dev/kvm does not work) or thread; "
                        f"default from ${ENV_ACCEL}")
    p.add_argument("--smp", type=int, default=1, metavar="N", help="vCPUs (kvm)")
    p.add_argument("--guest-duty", type=float, default=float(os.environ.get(ENV_GUEST_DUTY) or 1.0),
                   metavar="FRACTION",
                   help="the part of each period a vCPU runs; the rest it idles in the VMM (kvm; "
                        "default 1: it spins, holding a core, as QEMU's counting guest does; "
                        f"default from ${ENV_GUEST_DUTY})")
    p.add_argument("--guest-duty-period-us", type=int, default=1000, metavar="US",
                   help="the duty cycle's period (kvm)")
    p.add_argument("--guest-working-set", default="0", metavar="SIZE",
                   help="how much of the first RAM backend the guest stamps, from its first data "
                        "page (kvm; default 0: all of it below 4 GiB)")


def build_vm(args: argparse.Namespace) -> VM:
    devices: list[Device] = []
    for group in ("object", "netdev", "chardev"):
        for text in getattr(args, group):
            devices.append(from_options(group, text))
    config = GuestConfig(smp=args.smp, dirty_rate_bytes_s=args.dirty_rate,
                         working_set_bytes=opt_size(args.guest_working_set), duty=args.guest_duty,
                         duty_period_us=args.guest_duty_period_us)
    accel = create(args.accel, config)  # a fallback to threads says why in the log
    try:
        return VM(args.name, devices, machine=args.machine, incoming=args.incoming is not None,
                  accel=accel)
    except BaseException:
        accel.close()
        raise


def run(args: argparse.Namespace) -> int:
    """``migfd vm``: serve QMP until ``quit`` or SIGTERM."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.name} %(name)s: %(message)s")
    qmp = parse_uri(args.qmp)
    if not hasattr(qmp, "path") or not args.qmp.startswith("unix:"):
        raise MigrationError("--qmp takes unix:PATH")
    # The migration thread, the QMP loop and the guest threads share the GIL;
    # a thread woken by the kernel (the PONG, the EOF) would otherwise wait up
    # to the default 5 ms switch interval for it, which is downtime.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    vm = build_vm(args)
    try:
        if args.incoming is None:
            vm.boot()
        return asyncio.run(_serve(vm, qmp.path, args.incoming))  # type: ignore[union-attr]
    finally:
        vm.shutdown()


async def _serve(vm: VM, qmp_path: str, incoming: str | None) -> int:
    server = QMPServer(qmp_path)
    Monitor(vm).register(server)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_close)
    if incoming not in (None, "defer"):
        vm.start_incoming(parse_uri(incoming))
    await server.wait_closed()
    return 0
