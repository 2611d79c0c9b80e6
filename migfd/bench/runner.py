"""``migfd bench``: run the scenarios, write ``results.csv`` and ``metadata.json``.

The files are described in docs/RESULTS.md (the contract with the notebooks).
Rows are written and flushed one by one, so an interrupted run keeps what it
measured; metadata.json is written at the start and rewritten at the end.

For each scenario the runner walks the planned trials in order (fd-passing
and state copy alternate trial by trial) with a progress bar on stderr, and
adds rounds to a point until its median is precise, up to a cap
(:mod:`migfd.bench.adaptive`). A
trial's ``prepare`` (fresh source/destination pair) runs before its clock
starts; when a scenario allows it, the next trial is prepared while the
previous one is being verified and torn down, both off the clock, and the
previous one is always completely gone before the next migration starts. A
trial that fails, times out or raises becomes a row with ``ok=False`` and its
error, and the run goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from tqdm import tqdm

from migfd.bench.adaptive import Schedule
from migfd.bench.metadata import (
    FORMAT_VERSION, base_metadata, busy_processes, checkout_root, iso, meminfo, source_digest, utc_now,
    write_json,
)
from migfd.bench.registry import SCENARIO_NAMES, all_scenarios
from migfd.bench.scenario import BenchContext, Plan, Scenario, Trial, TrialSpec
from migfd.bench.timelines import TimelineWriter
from migfd.errors import MigrationError
from migfd.peers.qemu import QEMU_ENV, find_qemus, requested_qemus

#: results.csv columns, in order (docs/RESULTS.md)
COLUMNS = (
    "trial_id", "scenario", "mode", "variant", "backend", "ram_bytes", "n_fds", "dirty_rate_bytes_s", "live",
    "trial", "downtime_ns", "total_ns", "setup_ns", "bytes_sent", "device_state_bytes", "fds_passed",
    "fd_messages", "frames_sent", "frames_lost", "frames_duplicated", "max_gap_ns", "lines_sent",
    "lines_lost", "reconnects", "stop_resume_ns", "outage_ns", "outage_own_ns", "precopy_stall_ns",
    "release_ns", "switchover_silence_ns", "switchover_silence_own_ns", "observer_realtime", "accel",
    "value", "unit", "peer_version", "device_sections",
    "format_version", "ok", "error",
)


def default_out(start: dt.datetime) -> Path:
    base = checkout_root() or Path.cwd()
    return base / "benchmarks" / "results" / f"{start.strftime('%Y%m%dT%H%M%SZ')}-{socket.gethostname()}"


# -- results.csv ---------------------------------------------------------------


class ResultsWriter:
    def __init__(self, path: Path):
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=COLUMNS, extrasaction="ignore")
        self.writer.writeheader()
        self.file.flush()
        self.rows = 0
        self.failed = 0

    def write(self, row: dict) -> None:
        clean = {k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS}
        clean["ok"] = bool(row.get("ok"))
        clean["error"] = " ".join(str(row.get("error") or "").split())  # one line
        clean["format_version"] = FORMAT_VERSION  # every row: a row cut out of the file still says
        self.writer.writerow(clean)
        self.file.flush()
        self.rows += 1
        self.failed += not clean["ok"]

    def close(self) -> None:
        self.file.close()


def failed_row(spec: TrialSpec, step: str, exc: BaseException) -> dict:
    row = spec.row()
    if isinstance(exc, asyncio.TimeoutError):
        text = "timed out"
    else:
        text = str(exc) or type(exc).__name__
        if not isinstance(exc, (RuntimeError, OSError)) and type(exc).__name__ not in text:
            text = f"{type(exc).__name__}: {text}"
    row.update({"ok": False, "error": f"{step}: {text}"})
    return row


# -- running -------------------------------------------------------------------


class Run:
    def __init__(self, ctx: BenchContext, writer: ResultsWriter, debug: bool = False,
                 timelines: TimelineWriter | None = None):
        self.ctx = ctx
        self.writer = writer
        self.debug = debug
        self.timelines = timelines
        #: rows written per scenario, for trial ids ("ram-size-0042")
        self.row_counts: dict[str, int] = {}
        #: wall-clock seconds per step of the current scenario (where a run's time goes)
        self.step_s: dict[str, float] = {}
        #: the current scenario's trials, planned and added (migfd.bench.adaptive)
        self.schedule: Schedule | None = None

    def _account(self, step: str, t0: float) -> None:
        self.step_s[step] = self.step_s.get(step, 0.0) + time.monotonic() - t0

    def emit(self, rows: list[dict], bar: tqdm) -> None:
        for row in rows:
            n = self.row_counts.get(row["scenario"], 0)
            self.row_counts[row["scenario"]] = n + 1
            row["trial_id"] = f"{row['scenario']}-{n:04d}"
            self.writer.write(row)
            problem = self.timelines.write(row) if self.timelines is not None else None
            if problem:
                self.ctx.warn(problem)
            self.ctx.rows.append(row)
        bar.update(1)
        bar.set_postfix(failed=self.writer.failed, refresh=False)

    async def finish(self, trial: Trial, measured: Any) -> list[dict]:
        t0 = time.monotonic()
        try:
            return await asyncio.wait_for(trial.finish(measured), trial.timeouts()[2])
        except Exception as exc:
            self._trace(exc)
            return [failed_row(trial.spec, "check", exc)]
        finally:
            await self._cleanup(trial)
            self._account("finish", t0)

    async def _cleanup(self, trial: Trial) -> None:
        try:
            await asyncio.wait_for(trial.cleanup(), 60)
        except Exception as exc:
            self.ctx.warn(f"cleanup of a {trial.spec.scenario} trial failed: {exc}")

    def _trace(self, exc: BaseException) -> None:
        if self.debug:
            traceback.print_exception(exc, file=sys.stderr)

    async def scenario(self, scenario: Scenario, plan: Plan) -> None:
        ctx = self.ctx
        bar = tqdm(total=len(plan.specs), desc=f"{scenario.name:>11}", file=sys.stderr,
                   unit="trial", dynamic_ncols=True, leave=True)
        pending: asyncio.Task | None = None
        previous: TrialSpec | None = None
        # Trials beyond the plan until each point is precise (default mode only: --trials and
        # --quick fix the count); the schedule decides once a group's rows are all in.
        self.schedule = schedule = Schedule(plan.specs, ctx, adaptive=ctx.trials is None and not ctx.quick)
        try:
            while True:
                if pending is not None and schedule.group_done():
                    self.emit(await pending, bar)
                    pending = None
                spec = schedule.next()
                if spec is None:
                    break
                if bar.total != schedule.total:
                    bar.total = schedule.total
                    bar.refresh()
                trial = scenario.trial(spec, ctx)
                overlap = (pending is not None and previous is not None
                           and scenario.overlap(previous, spec, ctx))
                if pending is not None and not overlap:
                    self.emit(await pending, bar)
                    pending = None
                try:
                    prep_error: BaseException | None = None
                    t0 = time.monotonic()
                    try:
                        await asyncio.wait_for(trial.prepare(), trial.timeouts()[0])
                    except Exception as exc:
                        prep_error = exc
                    self._account("prepare", t0)
                    if pending is not None:
                        # The previous trial is verified and gone before this clock starts.
                        self.emit(await pending, bar)
                        pending = None
                    previous = spec
                    if prep_error is not None:
                        self._trace(prep_error)
                        await self._cleanup(trial)
                        self.emit([failed_row(spec, "start", prep_error)], bar)
                        continue
                    t0 = time.monotonic()
                    try:
                        measured = await asyncio.wait_for(trial.measure(), trial.timeouts()[1])
                    except Exception as exc:
                        self._account("measure", t0)
                        self._trace(exc)
                        await self._cleanup(trial)
                        self.emit([failed_row(spec, "migration", exc)], bar)
                        continue
                except BaseException:  # interrupted: leave no process behind
                    await self._cleanup(trial)
                    raise
                self._account("measure", t0)
                pending = asyncio.create_task(self.finish(trial, measured))
            if pending is not None:
                self.emit(await pending, bar)
                pending = None
        finally:
            if pending is not None:
                pending.cancel()
                try:
                    await pending
                except BaseException:
                    pass
            bar.close()


async def run_all(ctx: BenchContext, names: list[str], writer: ResultsWriter, meta: dict,
                  meta_path: Path, debug: bool, timelines: TimelineWriter | None = None) -> None:
    # SIGTERM ends the run as Ctrl-C does: the current trial's processes are
    # killed, namespaces and files removed, the metadata written.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    run = Run(ctx, writer, debug, timelines)
    for scenario in all_scenarios():
        if scenario.name not in names:
            continue
        info: dict[str, Any] = {"ran": False, "reason": None, "description": scenario.description}
        meta["scenarios"][scenario.name] = info
        reason = scenario.unavailable(ctx)
        if reason is not None:
            info["reason"] = reason
            print(f"migfd bench: {scenario.name}: skipped: {reason}", file=sys.stderr)
            write_json(meta_path, meta)
            continue
        plan = scenario.plan(ctx)
        info.update(plan.notes)
        if not plan.specs:
            info["reason"] = "nothing to run on this machine" + (
                f": {plan.notes['skipped_points'][0]['reason']}" if plan.notes.get("skipped_points") else "")
            print(f"migfd bench: {scenario.name}: skipped: {info['reason']}", file=sys.stderr)
            write_json(meta_path, meta)
            continue
        t0 = time.monotonic()
        rows_before, failed_before = writer.rows, writer.failed
        info["start"] = iso(utc_now())
        run.step_s = {}
        try:
            await scenario.setup(ctx)
            try:
                await run.scenario(scenario, plan)
            finally:
                await scenario.teardown(ctx)
            info["ran"] = True
        except Exception as exc:
            run._trace(exc)
            info["reason"] = f"scenario setup failed: {exc}"
            print(f"migfd bench: {scenario.name}: {info['reason']}", file=sys.stderr)
        info.update(scenario.metadata())
        if run.schedule is not None:
            info["trials_per_point"] = run.schedule.report()
            run.schedule = None
        info["end"] = iso(utc_now())
        info["duration_s"] = round(time.monotonic() - t0, 1)
        # prepare and finish of consecutive trials may overlap: the sum can exceed duration_s
        info["step_s"] = {k: round(v, 1) for k, v in run.step_s.items()}
        info["rows"] = writer.rows - rows_before
        info["failed_rows"] = writer.failed - failed_before
        meta["rows"], meta["failed_rows"] = writer.rows, writer.failed
        meta["warnings"] = dict(ctx.warnings)
        write_json(meta_path, meta)


def main(args: argparse.Namespace) -> int:
    """``migfd bench``; ``args`` has quick, scenarios, trials, out (see migfd.cli).

    Optional attributes for tests and experiments (no command-line flags):
    ``ram_sizes`` (list of bytes, replaces the RAM sizes of ram-size and
    qemu-peer), ``extra_params`` (dict added to every migfd migrate-set-parameters),
    ``debug`` (print tracebacks of failed trials). ``qemu`` (list of paths, the
    ``--qemu`` options) and ``$MIGFD_QEMU`` add QEMUs to qemu-peer.
    """
    quick = bool(getattr(args, "quick", False))
    trials = getattr(args, "trials", None)
    names = list(getattr(args, "scenarios", None) or SCENARIO_NAMES)
    unknown = [n for n in names if n not in SCENARIO_NAMES]
    if unknown:
        print(f"migfd bench: error: unknown scenario {unknown[0]!r} (choose from {', '.join(SCENARIO_NAMES)})",
              file=sys.stderr)
        return 2
    if trials is not None and trials < 1:
        print("migfd bench: error: --trials must be at least 1", file=sys.stderr)
        return 2
    names = [n for n in SCENARIO_NAMES if n in names]
    extra_qemus = requested_qemus(getattr(args, "qemu", None), os.environ.get(QEMU_ENV))
    try:
        qemus = find_qemus(extra_qemus)
    except MigrationError as exc:
        print(f"migfd bench: error: --qemu / ${QEMU_ENV}: {exc}", file=sys.stderr)
        return 2
    start = utc_now()
    out = Path(args.out) if getattr(args, "out", None) else default_out(start)
    if (out / "results.csv").exists():
        print(f"migfd bench: error: {out} already holds results.csv", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    meta = base_metadata(args, start, out, names)
    meta_path = out / "metadata.json"
    write_json(meta_path, meta)
    tmp = Path(tempfile.mkdtemp(prefix="migfd-bench-"))
    ctx = BenchContext(quick=quick, trials=trials, tmp=tmp, mem_available=meminfo("MemAvailable"),
                       extra_params=dict(getattr(args, "extra_params", None) or {}),
                       ram_sizes=getattr(args, "ram_sizes", None), qemus=extra_qemus)
    meta["options"]["qemu"] = extra_qemus
    meta["qemus"] = [q.to_json() for q in qemus]  # every QEMU this run may use: system's, then given
    if ctx.extra_params:
        meta["options"]["extra_params"] = ctx.extra_params
    if ctx.ram_sizes:
        meta["options"]["ram_sizes"] = ctx.ram_sizes
    writer = ResultsWriter(out / "results.csv")
    timelines = TimelineWriter(out)
    t0 = time.monotonic()
    print(f"migfd bench: writing {out}", file=sys.stderr)
    status = 0
    try:
        asyncio.run(run_all(ctx, names, writer, meta, meta_path, bool(getattr(args, "debug", False)),
                            timelines))
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        meta["interrupted"] = True
        status = 130 if isinstance(exc, KeyboardInterrupt) else 143
        print("migfd bench: interrupted", file=sys.stderr)
    finally:
        writer.close()
        timelines.close()
        shutil.rmtree(tmp, ignore_errors=True)
        end = utc_now()
        meta["end"] = iso(end)
        meta["loadavg_end"] = list(os.getloadavg())
        meta["busy_processes_end"] = busy_processes()
        meta["source_sha256_end"] = source_digest()
        if meta["source_sha256_end"] != meta["source_sha256"]:
            ctx.warn("migfd's source files changed while the run went on")
        meta["duration_s"] = round(time.monotonic() - t0, 1)
        meta["rows"], meta["failed_rows"] = writer.rows, writer.failed
        meta["warnings"] = dict(ctx.warnings)
        write_json(meta_path, meta)
    print(f"migfd bench: {writer.rows} rows, {writer.failed} failed, "
          f"{meta['duration_s']} s", file=sys.stderr)
    print(out)
    return status
