"""`neureg worker` on the command line: its options (shared with the test and benchmark entry points that run
the real ``Worker``), the durations ``--time-limit`` reads, and the command itself. The worker's loop is
``worker.py``; this module only turns a command line into ``WorkerOptions`` and starts it.
"""

from __future__ import annotations

import argparse
import re

from .worker import Worker, WorkerOptions


def duration(text: str) -> float:
    """Seconds from ``3600``, ``90s``, ``90m``, ``4h``, ``2d``, ``MM:SS``, ``HH:MM:SS`` or ``D-HH:MM:SS``: plain
    numbers are seconds (not SLURM's minutes), the colon forms are SLURM's ``--time``."""
    text = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text)
    if match:
        seconds = float(match[1]) * units[match[2] or "s"]
    else:
        match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
        if not match or (match[1] is None and match[3] is None):
            raise argparse.ArgumentTypeError(f"{text!r} is not a duration (3600, 90m, 4h, 04:00:00, 1-12:00:00)")
        parts = [int(p) for p in match.groups()[1:] if p is not None]
        if match[1] is not None:  # D-HH[:MM[:SS]]
            hours, minutes, secs = (parts + [0, 0])[:3]
        else:  # MM:SS or HH:MM:SS
            hours, minutes, secs = ([0] + parts) if len(parts) == 2 else parts
        seconds = int(match[1] or 0) * 86400 + hours * 3600 + minutes * 60 + secs
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the time limit must be positive")
    return seconds


def add_worker_arguments(parser) -> None:
    """The options of `neureg worker`, shared with the test and benchmark entry points that run the real Worker."""
    parser.add_argument("--stage", action="append", metavar="NAME",
                        help="only this stage's tables (repeatable; default: all)")
    parser.add_argument("--table", action="append", metavar="NAME",
                        help="only this computed table, e.g. OracleStats or oracle.OracleStats (repeatable)")
    parser.add_argument("--once", action="store_true",
                        help="one sweep over the tables, then exit (status 1 if a job failed): for cron and tests")
    parser.add_argument("--idle-sleep", type=float, default=30.0, metavar="S",
                        help="seconds to wait before the next sweep when there was nothing to do (default 30)")
    parser.add_argument("--time-limit", type=duration, metavar="T",
                        help="stop after T (seconds, or 90m, 4h, 04:00:00, 1-12:00:00 as SLURM writes it): the job "
                        "running then goes back to pending and the worker exits 0. For a SLURM task, T a few minutes "
                        "short of its --time")
    parser.add_argument("--orphan-timeout", type=int, default=300, metavar="S",
                        help="give a reserved job to another worker when its worker has not been seen for S seconds "
                        "(workers beat every S/4 s; default 300). Jobs reserved by plain populate(reserve_jobs=True) "
                        "do not beat: make S longer than such jobs run")
    parser.add_argument("--max-retries", type=int, default=2, metavar="N",
                        help="retry a failed job up to N times (default 2), waiting --retry-delay, then doubling")
    parser.add_argument("--retry-delay", type=int, default=300, metavar="S",
                        help="seconds before the first retry (default 300)")
    parser.add_argument("--per-gpu", type=int, default=1, metavar="K",
                        help="run K worker processes on this device (they share its GPU; see README for MPS). "
                        "Default 1")
    parser.add_argument("--device", metavar="DEV",
                        help="torch device, e.g. cuda:1 or cpu (sets NEUREG_DEVICE; default: NEUREG_DEVICE, else the "
                        "first GPU in CUDA_VISIBLE_DEVICES, else cpu)")


def options_from_args(args) -> WorkerOptions:
    """Parsed ``add_worker_arguments`` options as ``WorkerOptions`` (raises ValueError on bad values)."""
    return WorkerOptions(
        stages=args.stage, tables=args.table, once=args.once, idle_sleep=args.idle_sleep, time_limit=args.time_limit,
        orphan_timeout=args.orphan_timeout, max_retries=args.max_retries, retry_delay=args.retry_delay,
    )


def cmd_worker(args) -> int:
    """`neureg worker`: check the options, connect, pick the device, run until stopped (or ``--per-gpu`` copies)."""
    import sys

    from ..connection import STAGES, connect

    if args.per_gpu < 1:
        print(f"error: --per-gpu must be at least 1, got {args.per_gpu}", file=sys.stderr)
        return 2
    if args.per_gpu > 1:
        from .supervisor import run_copies

        return run_copies(args.argv, args.per_gpu)
    try:
        options = options_from_args(args)
        unknown = [s for s in options.stages or () if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages: {list(STAGES)}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    pipeline = connect(home=getattr(args, "home", None), prefix=getattr(args, "prefix", None))
    import datajoint as dj

    dj.config["safemode"] = False  # a worker has no one to answer DataJoint's delete prompt
    from ..models.runtime import Runtime
    from .devices import select_device

    select_device(args.device)
    try:
        Runtime.from_env()  # a mistyped NEUREG_* execution setting is refused here, not in every job
        worker = Worker(pipeline, options)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return worker.run()


def register_cli(subparsers) -> None:
    """Add the ``worker`` command to neureg's subparsers."""
    p = subparsers.add_parser(
        "worker", help="fill computed tables forever (or --once), coordinated with other workers",
        description="Sweep the computed tables upstream first, computing each pending key once across all "
        "workers. New scans are picked up at the next sweep; jobs of dead workers are reclaimed after "
        "--orphan-timeout; failed jobs are retried --max-retries times. SIGTERM/SIGINT put the running job "
        "back to pending and exit 0. The database connection is re-established after a server restart.",
    )
    add_worker_arguments(p)
    p.set_defaults(func=cmd_worker)
