"""Commands that compute and report: populate, plan, report, demo."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from ..errors import EXIT_FAILED
from .common import add_command, connect_from, print_json, refuse


def cmd_populate(args) -> int:
    """`neureg populate`: fill the computed tables of some stages in this process, in dependency order."""
    from ..populate.stages import populate_stage
    from ..upkeep.status import skipped_scans

    refused = _group_setting(args)
    if refused is not None:
        return refused
    pipeline = connect_from(args)
    try:
        summary = populate_stage(
            pipeline,
            args.stage or None,
            reserve_jobs=args.reserve_jobs,
            display_progress=True,
            suppress_errors=args.keep_going,
        )
    except ValueError as exc:
        return refuse(exc)
    failed = sum(len(result["errors"]) for result in summary.values())
    if args.json:
        print_json(
            {
                table: {"new_rows": r["new_rows"], "seconds": r["seconds"], "errors": [str(e) for e in r["errors"]]}
                for table, r in summary.items()
            }
        )
    for table, result in summary.items():
        if not args.json:
            print(f"{table}: +{result['new_rows']} rows in {result['seconds']} s")
        for error in result["errors"]:
            print(f"  error: {error}", file=sys.stderr)
    for line in skipped_scans(pipeline):
        print(line, file=sys.stderr)
    return EXIT_FAILED if failed else 0


def _group_setting(args) -> int | None:
    """``--group K`` as the NEUREG_GROUP of this process and its children; exit 2 if it is not a group size."""
    from ..models.runtime import group_from_text

    if getattr(args, "group", None) is None:
        return None
    try:
        group_from_text(args.group, "--group")
    except ValueError as exc:
        return refuse(exc)
    os.environ["NEUREG_GROUP"] = args.group.strip()
    return None


def cmd_plan(args) -> int:
    """`neureg plan paper`: register Li et al. 2019's whole experiment on the ingested scans, for the workers to run.

    paper: Li et al. 2019 on every ingested scan (predictor at image scale 0.25; targets neural_model,
    neural_data, shuffle, pixel, pixel_threshold; conditions None, Shuffle, Neural, Pixel, VOne on grayscale
    CIFAR-10, read from the python version's folder, which neureg never downloads; the standard robustness
    evaluation), in one transaction. Rerunning is harmless; after ingesting more scans, rerun it to plan the
    experiment again over a new set of every scan."""
    from ..experiments.paper import describe, plan_paper
    from ..upkeep.status import skipped_scans

    pipeline = connect_from(args)
    try:
        items = plan_paper(pipeline, args.cifar, seeds=args.seeds, dry_run=args.dry_run)
    except ValueError as exc:  # PlanError, or a config refused: nothing was written
        return refuse(exc)
    if args.json:
        print_json(items)
    else:
        print(describe(items, dry_run=args.dry_run))
    for line in skipped_scans(pipeline):  # left out of the scan set: say why
        print(line, file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    """`neureg report`: write the figures of one part of the analysis from the database (robustness: also the
    results table as CSV and Markdown)."""
    try:
        restriction = _restriction(args.restrict, args.what)
    except ValueError as exc:
        return refuse(exc)
    pipeline = connect_from(args)
    from ..database.connect import figures_folder

    module = importlib.import_module(f"neureg.reports.{args.what}")
    try:
        extra = [restriction] if restriction else []
        out = Path(args.out) if args.out else figures_folder()
        paths = getattr(module, f"{args.what}_figures")(pipeline, out, *extra)
    except ValueError as exc:
        return refuse(exc)
    except LookupError as exc:
        return refuse(exc, EXIT_FAILED)
    if args.json:
        print_json([str(p) for p in paths])
        return 0
    for path in paths:
        print(path)
    return 0


def _restriction(pairs: list[str], what: str) -> dict:
    """``--restrict ATTR=VALUE`` options as one dict restriction (integers as integers)."""
    if pairs and what != "robustness":
        raise ValueError(f"--restrict applies to the robustness report, not {what}")
    restriction = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--restrict {pair!r}: expected ATTRIBUTE=VALUE, e.g. seed=0 or condition=None")
        restriction[name.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value
    return restriction


def cmd_demo(args) -> int:
    """`neureg demo`: the whole chain on a small simulated cohort (its environment settings checked first).

    Its scan folders and figures go under --out, by default demo/ (demo_fast/ with --fast) in the home
    (--home, else NEUREG_HOME, else the per-user data folder)."""
    from ..experiments.demo import demo_processes, run_demo
    from ..models.runtime import Runtime

    refused = _group_setting(args)
    if refused is not None:
        return refused
    try:
        demo_processes()
        Runtime.from_env()
    except ValueError as exc:
        return refuse(exc)
    return run_demo(pipeline=connect_from(args), out=args.out, fast=args.fast)


GROUP_HELP = "train up to K compatible networks as one fused model (default: NEUREG_GROUP, else auto; 1 on the CPU)"


def register(sub) -> None:
    """Add populate, plan, report and demo."""
    p = add_command(sub, cmd_populate, "fill the computed tables of one stage, or of all, in this process")
    p.add_argument("--stage", action="append", metavar="NAME", help="stage to populate (repeatable; default: all)")
    p.add_argument("--reserve-jobs", action="store_true", help="coordinate with other processes through job tables")
    p.add_argument("--keep-going", action="store_true", help="record failing keys and go on (exit status 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object: table -> new_rows, seconds, errors")
    p.add_argument("--group", metavar="K", help=GROUP_HELP)

    p = add_command(sub, cmd_plan, "register a whole experiment: configs, scan set, targets, plans, seeds, robustness")
    p.add_argument("what", choices=["paper"], help="which experiment")
    p.add_argument(
        "--cifar", required=True, metavar="PATH", help="folder holding cifar-10-batches-py/ (never downloaded)"
    )
    p.add_argument("--seeds", type=int, default=5, metavar="N", help="training seeds 0..N-1 (default 5, as the paper)")
    p.add_argument("--dry-run", action="store_true", help="list what would be added, 'new' or 'exists'; write nothing")
    p.add_argument("--json", action="store_true", help="print the list as JSON (table, key, label, status)")

    p = add_command(sub, cmd_report, "write figures (PNG) from the database")
    p.add_argument("what", choices=["oracle", "similarity", "robustness"], help="which figures")
    p.add_argument(
        "--out", help="folder for the figures and tables (default: NEUREG_FIGURES, else figures/ in the home)"
    )
    p.add_argument("--json", action="store_true", help="print the written files as one JSON list")
    p.add_argument(
        "--restrict",
        action="append",
        default=[],
        metavar="ATTR=VALUE",
        help="robustness: only networks with this attribute value (repeatable, all must hold): a plan's "
        "dataset, network_hash, train_hash, regularizer_hash, a seed, a condition, a scan_set",
    )

    p = add_command(sub, cmd_demo, "the main job: simulate a small cohort and run the pipeline on it")
    p.add_argument("--out", type=Path, help="folder for the scan folders and figures (default: HOME/demo)")
    p.add_argument("--fast", action="store_true", help="smallest sizes (what the tests run)")
    p.add_argument("--group", metavar="K", help=GROUP_HELP)
