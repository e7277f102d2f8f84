"""`neureg worker` on the command line: its options (shared with the test and benchmark entry points that run
the real ``Worker``), the durations ``--time-limit`` reads, and the command itself. The worker's loop is
``populate/worker.py``; this module only turns a command line into ``WorkerOptions`` and starts it.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import fields

from ..errors import EXIT_BAD_INPUT
from ..populate.worker import Worker, WorkerOptions
from .common import add_command, connect_from, refuse


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
    add = parser.add_argument
    add("--stage", action="append", metavar="NAME", dest="stages", help="only this stage's tables (repeatable)")
    add("--table", action="append", metavar="NAME", dest="tables", help="only this table, e.g. oracle.OracleStats")
    add("--once", action="store_true", help="one sweep over the tables, then exit (1 if a job failed)")
    add("--idle-sleep", type=float, default=30.0, metavar="S", help="seconds between idle sweeps (default 30)")
    add("--time-limit", type=duration, metavar="T", help="stop after T: 3600, 90m, 4h, 04:00:00 or 1-12:00:00")
    add("--orphan-timeout", type=int, default=300, metavar="S", help="reclaim jobs of workers unseen for S s")
    add("--max-retries", type=int, default=2, metavar="N", help="retry a failed job up to N times (default 2)")
    add("--retry-delay", type=int, default=300, metavar="S", help="seconds before the first retry, then doubling")
    add("--per-gpu", type=int, default=1, metavar="K", help="run K worker processes on this device (default 1)")
    add("--device", metavar="DEV", help="torch device, e.g. cuda:1 or cpu (default: NEUREG_DEVICE, else a GPU)")
    add(
        "--group",
        metavar="K",
        help="train up to K compatible networks as one fused model (default: NEUREG_GROUP, else auto)",
    )


def options_from_args(args) -> WorkerOptions:
    """Parsed ``add_worker_arguments`` options as ``WorkerOptions`` (raises ValueError on bad values)."""
    return WorkerOptions(**{option.name: getattr(args, option.name) for option in fields(WorkerOptions)})


def cmd_worker(args) -> int:
    """`neureg worker`: check the options, connect, pick the device, run until stopped (or ``--per-gpu`` copies).

    Sweeps the computed tables upstream first, computing each pending key once across all workers. New scans
    are picked up at the next sweep; jobs of workers not seen for --orphan-timeout seconds are reclaimed
    (workers beat every S/4 s; jobs reserved by plain populate(reserve_jobs=True) do not beat, so make S
    longer than they run); failed jobs are retried --max-retries times, waiting --retry-delay, then twice as
    long. SIGTERM/SIGINT put the running job back to pending and exit 0, and so does --time-limit when its
    time is up (plain numbers are seconds; the colon forms are SLURM's --time: give a SLURM task a few
    minutes less than its --time). --per-gpu K runs K worker processes sharing the device (see the README for
    MPS); --device sets NEUREG_DEVICE (default: it, else the first GPU in CUDA_VISIBLE_DEVICES, else cpu).
    --group K trains up to K compatible pending networks (one dataset, architecture and schedule) as one
    fused model, each stored in its own transaction as it finishes (default NEUREG_GROUP, else auto: 1 on
    the CPU, 4-8 on a GPU; it never changes a stored number).
    The database connection is re-established after a server restart."""
    from ..database.connect import STAGES

    if args.per_gpu < 1:
        return refuse(f"--per-gpu must be at least 1, got {args.per_gpu}")
    if args.per_gpu > 1:
        from ..populate.supervisor import run_copies

        return run_copies(args.argv, args.per_gpu)
    try:
        options = options_from_args(args)
        unknown = [s for s in options.stages or () if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages: {list(STAGES)}")
    except ValueError as exc:
        return refuse(exc)
    pipeline = connect_from(args)
    import datajoint as dj

    dj.config["safemode"] = False  # a worker has no one to answer DataJoint's delete prompt
    from ..populate.devices import select_device

    try:
        select_device(args.device)  # the one device choice; a mistyped NEUREG_* setting is refused here too
        worker = Worker(pipeline, options)
    except ValueError as exc:
        return refuse(exc, EXIT_BAD_INPUT)
    return worker.run()


def register(sub) -> None:
    """Add the ``worker`` command."""
    add_worker_arguments(add_command(sub, cmd_worker, "fill computed tables forever (or --once), beside other workers"))
