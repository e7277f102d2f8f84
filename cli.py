"""The `neureg` command: a thin layer over functions a notebook can call just as well."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_CONFLICT = 3
EXIT_CONFIG = 4


def _connect(args):
    from .connection import connect

    return connect(home=args.home, prefix=args.prefix)


def cmd_init(args) -> int:
    """`neureg init`: start or reach the database, declare every schema, and say where everything is."""
    from .connection import active_settings, describe_store
    from .populate.stages import stage_modules
    import datajoint as dj

    from .schemas._store import ensure_bucket

    pipeline = _connect(args)
    settings = active_settings()
    bucket = ensure_bucket()
    facts = {
        "backend": settings.backend, "server": f"{dj.config['database.backend']} at {dj.config['database.host']}",
        "home": str(settings.home), "store": describe_store(settings) + (f" ({bucket})" if bucket else ""),
        "schemas": [m.schema.database for m in stage_modules(pipeline).values()],
    }
    if args.json:
        print(json.dumps(facts, indent=1))
        return 0
    print(f"backend : {facts['backend']} ({facts['server']})")
    print(f"home    : {facts['home']}")
    print(f"store   : {facts['store']}")
    print(f"schemas : {', '.join(facts['schemas'])}")
    return 0


def cmd_ingest(args) -> int:
    """`neureg ingest`: validate and insert scan folders; exit 2 for a bad folder, 3 for one already ingested."""
    from .populate.ingest import ingest_folder
    from .scanfolder import ScanFolderError
    from .errors import ScanExistsError

    pipeline = _connect(args)
    failures, outcomes = 0, []
    for path in args.paths:
        try:
            key = ingest_folder(path, pipeline)
        except ScanFolderError as exc:
            print(f"error: not ingested: {exc}", file=sys.stderr)
            failures = failures or EXIT_BAD_INPUT
            outcomes.append({"path": str(path), "ingested": False, "error": str(exc)})
        except ScanExistsError as exc:
            print(f"error: not ingested: {path}: {exc}", file=sys.stderr)
            failures = failures or EXIT_CONFLICT
            outcomes.append({"path": str(path), "ingested": False, "error": str(exc), "exists": True})
        else:
            outcomes.append({"path": str(path), "ingested": True, "key": key})
            if not args.json:
                print(f"ingested {path} as {key['mouse']} / session {key['session']} / scan {key['scan_idx']}")
    if args.json:
        print(json.dumps(outcomes, indent=1))
    return failures


def cmd_status(args) -> int:
    """`neureg status`: row counts and job states of every table, in the order the workers fill them."""
    from .populate.status import job_states, skipped_scans, table_counts

    pipeline = _connect(args)
    counts = table_counts(pipeline)
    if args.json:
        print(json.dumps(counts, indent=1, sort_keys=False))
        return 0
    jobs = job_states(pipeline)
    width = max(len(name) for name in counts) if counts else 10
    print(f"{'table'.ljust(width)}  {'rows':>8}  jobs (pending/reserved/success/error/ignore)")
    for name, count in counts.items():
        state = jobs.get(name)
        job_text = "/".join(str(state[k]) for k in ("pending", "reserved", "success", "error", "ignore")) if state else ""
        print(f"{name.ljust(width)}  {count:>8}  {job_text}")
    for line in skipped_scans(pipeline):
        print(line)
    return 0


def cmd_demo(args) -> int:
    """`neureg demo`: the whole chain on a small simulated cohort (its environment settings checked first)."""
    from .models.runtime import Runtime
    from .populate.demo import demo_processes, run_demo

    try:
        demo_processes()
        Runtime.from_env()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_demo(pipeline=_connect(args), out=args.out, fast=args.fast)


def cmd_simulate(args) -> int:
    """`neureg simulate`: write a simulated cohort as scan folders, to try the pipeline without a lab's data."""
    from .populate.simulate import simulate_cohort

    folders = simulate_cohort(
        args.out, n_mice=args.mice, n_days=args.days, scans_per_day=args.scans_per_day, n_units=args.units,
        n_images=args.images, n_oracle=args.oracle_images, n_repeats=args.repeats, seed=args.seed,
    )
    if args.json:
        print(json.dumps({"folders": [str(f) for f in folders], "ground_truth": str(Path(args.out) / "ground_truth")},
                         indent=1))
        return 0
    for folder in folders:
        print(folder)
    print(f"simulated {len(folders)} scan folder(s); ground truth in {Path(args.out) / 'ground_truth'}", file=sys.stderr)
    return 0


def cmd_populate(args) -> int:
    """`neureg populate`: fill the computed tables of some stages in this process, in dependency order."""
    from .populate.stages import populate_stage
    from .populate.status import skipped_scans

    pipeline = _connect(args)
    try:
        summary = populate_stage(pipeline, args.stage or None, reserve_jobs=args.reserve_jobs,
                                 display_progress=True, suppress_errors=args.keep_going)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    failed = sum(len(result["errors"]) for result in summary.values())
    if args.json:
        print(json.dumps({table: {"new_rows": r["new_rows"], "seconds": r["seconds"], "errors": [str(e) for e in r["errors"]]}
                          for table, r in summary.items()}, indent=1))
    for table, result in summary.items():
        if not args.json:
            print(f"{table}: +{result['new_rows']} rows in {result['seconds']} s")
        for error in result["errors"]:
            print(f"  error: {error}", file=sys.stderr)
    for line in skipped_scans(pipeline):
        print(line, file=sys.stderr)
    return 1 if failed else 0


def cmd_gc(args) -> int:
    """`neureg gc`: report (and with --delete remove) store files no row references, older than --min-age-hours."""
    from .populate.storegc import collect_orphans

    pipeline = _connect(args)
    try:
        found = collect_orphans(pipeline, delete=args.delete, min_age_hours=args.min_age_hours)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps(found, indent=1))
        return 0
    for path in found["old"]:
        print(f"{'deleted' if args.delete else 'orphan'}  {path}")
    for path in found["recent"]:
        print(f"kept    {path}  (younger than {args.min_age_hours:g} h: an ingest may still be writing it)")
    verb = f"deleted {found['deleted']}" if args.delete else f"{len(found['old'])} could be deleted (--delete)"
    print(f"{len(found['old']) + len(found['recent'])} orphaned file(s); {verb}, {found['bytes'] / 2**20:.1f} MB",
          file=sys.stderr)
    return 0


def cmd_scanset(args) -> int:
    """`neureg scanset`: register the scan sets that ScanStability and SimilarityTarget are computed for."""
    from .populate.scansets import register_all, register_oracle_groups

    pipeline = _connect(args)
    try:
        sets = register_all(pipeline) if args.all else register_oracle_groups(pipeline)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps(sets, indent=1, default=str))
        return 0
    for s in sets:
        state = "registered" if s["new"] else "already registered"
        print(f"scan_set {s['scan_set']}: {s['n_scans']} scans, {state} ({s['note']})")
        for member in s["members"]:
            print("  " + " ".join(f"{k}={v}" for k, v in member.items()))
    if not sets:
        print("no group of two or more scans shares its oracle images: no scan set registered", file=sys.stderr)
    return 0


def cmd_plan(args) -> int:
    """`neureg plan paper`: register Li et al. 2019's whole experiment on the ingested scans, for the workers to run."""
    from .populate.plan import describe, plan_paper
    from .populate.status import skipped_scans

    pipeline = _connect(args)
    try:
        items = plan_paper(pipeline, args.cifar, seeds=args.seeds, dry_run=args.dry_run)
    except ValueError as exc:  # PlanError, or a config refused: nothing was written
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(items, indent=1, default=str) if args.json else describe(items, dry_run=args.dry_run))
    for line in skipped_scans(pipeline):  # left out of the scan set: say why
        print(line, file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    """`neureg report`: write the figures of one part of the analysis from the database."""
    import importlib

    pipeline = _connect(args)
    module = importlib.import_module(f"neureg.reports.{args.what}")
    try:
        paths = getattr(module, f"{args.what}_figures")(pipeline, Path(args.out))
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([str(p) for p in paths], indent=1))
        return 0
    for path in paths:
        print(path)
    return 0


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The `neureg` argument parser (a function, so tests can list every command and its help)."""
    parser = argparse.ArgumentParser(
        prog="neureg",
        description="Brain-regularized robust vision models: mouse V1 scans -> similarity targets -> "
        "regularized CNNs -> robustness scores, on a DataJoint database.",
    )
    parser.add_argument("--home", help="data directory for the embedded database and store (env NEUREG_HOME)")
    parser.add_argument("--prefix", help="schema name prefix (env NEUREG_PREFIX, default 'neureg_')")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at debug level")
    parser.add_argument("--version", action="version", version=f"neureg {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="start or reach the database and declare every schema (and an S3 store's bucket)")
    p.add_argument("--json", action="store_true", help="print one JSON object: backend, server, home, store, schemas")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("ingest", help="validate scan folder(s) and insert each in one transaction")
    p.add_argument("paths", nargs="+", metavar="PATH", help="scan folder (data/, meta/, optional scan.json) or its .zip")
    p.add_argument("--json", action="store_true", help="print one JSON list: path, ingested, key or error")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("status", help="tables, row counts and job states")
    p.add_argument("--json", action="store_true", help="print one JSON object: full table name -> row count")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("simulate", help="write a simulated mouse V1 cohort as scan folders (+ ground truth)")
    p.add_argument("out", type=Path, metavar="OUT", help="folder to write the scan folders into")
    p.add_argument("--mice", type=int, default=2, help="number of mice (default 2)")
    p.add_argument("--days", type=int, default=1, help="recording days per mouse (default 1)")
    p.add_argument("--scans-per-day", type=int, default=2, help="scans per day (default 2)")
    p.add_argument("--units", type=int, default=1000, help="units per scan (default 1000)")
    p.add_argument("--images", type=int, default=1100, help="distinct images, oracle ones included (default 1100)")
    p.add_argument("--oracle-images", type=int, default=100, help="images shown repeatedly (default 100)")
    p.add_argument("--repeats", type=int, default=10, help="repeats of each oracle image (default 10)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object: folders, ground_truth")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("populate", help="fill the computed tables of one stage, or of all, in this process")
    p.add_argument("--stage", action="append", metavar="NAME", help="stage to populate (repeatable; default: all)")
    p.add_argument("--reserve-jobs", action="store_true", help="coordinate with other processes through job tables")
    p.add_argument("--keep-going", action="store_true", help="record failing keys and go on (exit status 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object: table -> new_rows, seconds, errors")
    p.set_defaults(func=cmd_populate)

    p = sub.add_parser("gc", help="find (and --delete) object-store files that no row references",
                       description="Orphans come from killed ingests, full disks and deleted rows. Files younger "
                       "than --min-age-hours are only reported: an ingest still running may own them.")
    p.add_argument("--delete", action="store_true", help="remove the orphans older than --min-age-hours")
    p.add_argument("--min-age-hours", type=float, default=24.0, metavar="H", help="default 24")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser(
        "scanset", help="register scan sets (what scan-stability and similarity targets are computed over)",
        description="Register experiment.ScanSet rows explicitly; nothing else creates them. Registering the "
        "same scans again is harmless: the existing set is reported.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--oracle-groups", action="store_true",
                       help="one set per group of two or more scans shown exactly the same oracle images")
    which.add_argument("--all", action="store_true", help="one set of every ingested scan")
    p.add_argument("--json", action="store_true", help="print the sets as JSON (key, size, note, new, members)")
    p.set_defaults(func=cmd_scanset)

    p = sub.add_parser(
        "plan", help="register a whole experiment (configs, scan set, targets, training plans, seeds, robustness)",
        description="paper: Li et al. 2019 on every ingested scan (predictor at image scale 0.25; targets neural_model, "
        "neural_data, shuffle, pixel, pixel_threshold; conditions None, Shuffle, Neural, Pixel, VOne on grayscale "
        "CIFAR-10; the standard robustness evaluation), in one transaction. Rerunning is harmless; after ingesting "
        "more scans, rerun it to plan the experiment again over a new set of every scan.",
    )
    p.add_argument("what", choices=["paper"], help="which experiment")
    p.add_argument("--cifar", required=True, metavar="PATH",
                   help="folder holding cifar-10-batches-py/ (the python version; neureg never downloads it)")
    p.add_argument("--seeds", type=int, default=5, metavar="N", help="training seeds 0..N-1 (default 5, as the paper)")
    p.add_argument("--dry-run", action="store_true", help="list what would be added, each 'new' or 'exists'; write nothing")
    p.add_argument("--json", action="store_true", help="print the list as JSON (table, key, label, status)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("report", help="write figures (PNG) from the database")
    p.add_argument("what", choices=["oracle", "similarity", "robustness"], help="which figures (robustness: also the results table as CSV and Markdown)")
    p.add_argument("--out", default="neureg_figures", help="folder for the PNGs (default ./neureg_figures)")
    p.add_argument("--json", action="store_true", help="print the written files as one JSON list")
    p.set_defaults(func=cmd_report)

    from . import completion
    from .populate import accounts, verify, worker_cli
    from .reports import diagram

    worker_cli.register_cli(sub)
    accounts.register_cli(sub)
    verify.register_cli(sub)
    diagram.register_cli(sub)
    completion.register_cli(sub)

    p = sub.add_parser("demo", help="the main job: simulate a small cohort and run the pipeline on it")
    p.add_argument("--out", type=Path, help="where to write the demo's scan folders and figures")
    p.add_argument("--fast", action="store_true", help="smallest sizes (what the tests run)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    """The `neureg` entry point: parse, log to stderr, run the command; configuration faults exit 4."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for commands that start copies of themselves
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    from .connection import ConfigurationError, quiet_datajoint

    quiet_datajoint(verbose=args.verbose)

    try:
        return args.func(args) or 0
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:  # noqa: BLE001 - the faults a lab meets get one line, not a traceback
        message = fault_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1


def fault_message(exc: BaseException) -> str | None:
    """One line for an environment fault (database gone, disk full), or None for a bug (keep the traceback).

    Every write is transactional, so after such a fault nothing is half-written; the command can be rerun.
    """
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"no space left on the device{where}; nothing was half-written, free space and rerun"
    names = {cls.__name__ for cls in type(exc).__mro__}
    modules = {cls.__module__.split(".")[0] for cls in type(exc).__mro__}
    lost = ("OperationalError" in names or "InterfaceError" in names or "LostConnectionError" in names)
    if lost and modules & {"psycopg2", "pymysql", "datajoint"}:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (f"lost the database server ({first}); nothing was half-written, rerun when it is back "
                "(the embedded server restarts with the next command)")
    return None


if __name__ == "__main__":
    sys.exit(main())
