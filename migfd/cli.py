"""The ``migfd`` command: inspect a saved stream, run a VM process, benchmark, report, compare.

Every expected failure is a :class:`~migfd.errors.MigrationError`; it reaches
the user as one line on stderr and a non-zero exit, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from migfd.errors import MigrationError
from migfd.threads import name_new_threads

# Each subcommand imports its own stack when it runs: ``migfd vm`` (started for
# every trial of the benchmark) must not load pandas, matplotlib or the runner,
# and ``migfd inspect`` needs nothing but the codec.

def _cmd_inspect(args: argparse.Namespace) -> int:
    from migfd.stream.inspect import format_summary, inspect_stream

    summary = inspect_stream(args.path)
    if args.json:
        json.dump(summary.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_summary(summary))
    return 0


def _cmd_vm(args: argparse.Namespace) -> int:
    from migfd.vm import run

    return run(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from migfd.bench.runner import main

    return main(args)


def _parameter(text: str) -> tuple[str, object]:
    """``NAME=JSON`` of ``--set-parameter``: a QMP parameter name and its value."""
    name, sep, value = text.partition("=")
    try:
        if not (name and sep):
            raise ValueError
        return name, json.loads(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=JSON (e.g. x-multifd-packets=true), not {text!r}") from None


def _cmd_report(args: argparse.Namespace) -> int:
    from migfd.results.report import main

    return main(args)


def _cmd_observe(args: argparse.Namespace) -> int:
    from migfd.peers.observe import main, stop_on_sigterm

    stop_on_sigterm()
    return main(args)


def _cmd_compare(args: argparse.Namespace) -> int:
    from migfd.results.compare import main

    try:
        return main(args)
    except MigrationError as exc:
        # bad input is a usage error, as argparse's own: status 2
        print(f"migfd compare: error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="migfd", description="Study fd-passing (backend-transfer) live migration from real runs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show what a saved migration stream holds")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_inspect)

    from migfd.vm import add_arguments

    p = sub.add_parser("vm", help="run one VM process with a QMP monitor")
    add_arguments(p)
    p.set_defaults(func=_cmd_vm)

    p = sub.add_parser("bench", help="benchmark fd-passing against state copying")
    p.add_argument("--quick", action="store_true", help="small sizes and few trials (minutes)")
    p.add_argument("--scenario", action="append", dest="scenarios", metavar="NAME",
                   help="run only this scenario (repeatable)")
    p.add_argument("--trials", type=int, help="trials per point and mode")
    p.add_argument("--qemu", action="append", metavar="PATH",
                   help="a QEMU binary for qemu-peer beside the system's (repeatable; also $MIGFD_QEMU, "
                        "colon-separated)")
    p.add_argument("--out", help="output directory (default benchmarks/results/<UTC>-<host>/)")
    p.add_argument("--set-parameter", action="append", dest="extra_params", metavar="NAME=JSON",
                   type=_parameter, help="add to every migfd migrate-set-parameters, e.g. "
                                         "x-multifd-packets=true (repeatable; recorded in the run's metadata)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("report", help="run the benchmark and write an HTML report")
    p.add_argument("--results", help="use this results directory instead of running the benchmark")
    p.add_argument("--quick", action="store_true", help="run the benchmark in quick mode")
    p.add_argument("--out", help="report directory (default reports/<UTC>-<host>/)")
    p.set_defaults(func=_cmd_report)

    from migfd.peers.observe import add_arguments as observe_arguments

    p = sub.add_parser("observe", help="watch a running guest's progress counter from outside; print each outage",
                       description="Maps the guest RAM of a running migfd VM or QEMU and reads its progress "
                                   "counter; every silence (the guest not running anywhere) is printed as it ends.")
    observe_arguments(p)
    p.set_defaults(func=_cmd_observe)

    p = sub.add_parser("compare", help="compare two runs: ratios NEW/BASE with intervals and verdicts",
                       description="BASE and NEW are results directories or HTML reports of `migfd report`.")
    p.add_argument("base", metavar="BASE")
    p.add_argument("new", metavar="NEW")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object {"base": ..., "new": ..., "changes": [...]}')
    p.add_argument("--out", metavar="DIR", help="also write DIR/index.html (forest plot, metadata differences)")
    p.set_defaults(func=_cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    name_new_threads()  # the benchmark's clients and probes by name in top -H, perf and ftrace
    try:
        return args.func(args)
    except MigrationError as exc:
        print(f"migfd {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away (``| head``): not an error of ours.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
