"""Commands about the data and where it lives: init, ingest, status, simulate, scanset, gc, verify, diagram."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import EXIT_BAD_INPUT, EXIT_CONFLICT, EXIT_FAILED, ScanExistsError, ScanFolderError, StoreReferenceError
from .common import add_command, connect_from, print_json, refuse

#: `neureg simulate`'s sizes: option, simulate_cohort's argument (COHORT_DEFAULTS has its default), what it counts.
COHORT_OPTIONS = (
    ("--mice", "n_mice", "number of mice"),
    ("--days", "n_days", "recording days per mouse"),
    ("--scans-per-day", "scans_per_day", "scans per day"),
    ("--units", "n_units", "units per scan"),
    ("--images", "n_images", "distinct images, oracle ones included"),
    ("--oracle-images", "n_oracle", "images shown repeatedly"),
    ("--repeats", "n_repeats", "repeats of each oracle image"),
    ("--seed", "seed", "cohort seed"),
)


def cmd_init(args) -> int:
    """`neureg init`: start or reach the database, declare every schema, and say where everything is."""
    import datajoint as dj

    from ..database.connect import active_settings
    from ..database.store import describe_store, ensure_bucket

    pipeline = connect_from(args)
    settings = active_settings()
    bucket = ensure_bucket()
    facts = {
        "backend": settings.backend,
        "server": f"{dj.config['database.backend']} at {dj.config['database.host']}",
        "home": str(settings.home),
        "store": describe_store(settings) + (f" ({bucket})" if bucket else ""),
        "schemas": [m.schema.database for m in pipeline.modules().values()],
    }
    if args.json:
        print_json(facts)
        return 0
    print(f"backend : {facts['backend']} ({facts['server']})")
    print(f"home    : {facts['home']}")
    print(f"store   : {facts['store']}")
    print(f"schemas : {', '.join(facts['schemas'])}")
    return 0


def cmd_ingest(args) -> int:
    """`neureg ingest`: validate and insert scan folders; exit 2 for a bad folder, 3 for one already ingested."""
    from ..ingestion import ingest_folder

    pipeline = connect_from(args)
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
        print_json(outcomes)
    return failures


def cmd_status(args) -> int:
    """`neureg status`: row counts and job states of every table, in the order the workers fill them."""
    from ..upkeep.status import job_states, skipped_scans, table_counts

    pipeline = connect_from(args)
    counts = table_counts(pipeline)
    if args.json:
        print_json(counts)
        return 0
    jobs = job_states(pipeline)
    width = max(len(name) for name in counts) if counts else 10
    print(f"{'table'.ljust(width)}  {'rows':>8}  jobs (pending/reserved/success/error/ignore)")
    for name, count in counts.items():
        state = jobs.get(name)
        states = ("pending", "reserved", "success", "error", "ignore")
        job_text = "/".join(str(state[k]) for k in states) if state else ""
        print(f"{name.ljust(width)}  {count:>8}  {job_text}")
    for line in skipped_scans(pipeline):
        print(line)
    return 0


def cmd_simulate(args) -> int:
    """`neureg simulate`: write a simulated cohort as scan folders, to try the pipeline without a lab's data."""
    from ..experiments.simulate import simulate_cohort

    folders = simulate_cohort(args.out, **{dest: getattr(args, dest) for _, dest, _ in COHORT_OPTIONS})
    truth = Path(args.out) / "ground_truth"
    if args.json:
        print_json({"folders": [str(f) for f in folders], "ground_truth": str(truth)})
        return 0
    for folder in folders:
        print(folder)
    print(f"simulated {len(folders)} scan folder(s); ground truth in {truth}", file=sys.stderr)
    return 0


def cmd_scanset(args) -> int:
    """`neureg scanset`: register the scan sets that ScanStability and SimilarityTarget are computed for.

    Registers experiment.ScanSet rows explicitly; nothing else creates them. Registering the same scans again
    is harmless: the existing set is reported. --oracle-groups: one set per group of two or more scans shown
    exactly the same oracle images."""
    from ..upkeep.scansets import register_all, register_oracle_groups

    pipeline = connect_from(args)
    try:
        sets = register_all(pipeline) if args.all else register_oracle_groups(pipeline)
    except ValueError as exc:
        return refuse(exc)
    if args.json:
        print_json(sets)
        return 0
    for s in sets:
        state = "registered" if s["new"] else "already registered"
        print(f"scan_set {s['scan_set']}: {s['n_scans']} scans, {state} ({s['note']})")
        for member in s["members"]:
            print("  " + " ".join(f"{k}={v}" for k, v in member.items()))
    if not sets:
        print("no group of two or more scans shares its oracle images: no scan set registered", file=sys.stderr)
    return 0


def cmd_gc(args) -> int:
    """`neureg gc`: report (and with --delete remove) store files no row references, older than --min-age-hours.

    Orphans come from killed ingests, full disks and deleted rows. Files younger than --min-age-hours are only
    reported: an ingest still running may own them."""
    from ..upkeep.gc import collect_orphans

    def announce(paths, total: int) -> None:
        for path in paths:
            print(f"deleting {path}", file=sys.stderr)
        print(f"deleting {len(paths)} orphaned file(s), {total / 2**20:.1f} MB", file=sys.stderr)

    pipeline = connect_from(args)
    try:
        found = collect_orphans(pipeline, delete=args.delete, min_age_hours=args.min_age_hours, announce=announce)
    except ValueError as exc:
        return refuse(exc)
    except StoreReferenceError as exc:
        print(f"error: gc deletes nothing while a reference is in doubt: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except PermissionError as exc:
        print(
            f"error: the object store refused a deletion ({exc}): gc deletes with a worker's or the "
            "administrator's store keys (docs/security.md, Roles); rerun with those",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if args.json:
        print_json(found)
        return 0
    for path in found["old"]:
        print(f"{'deleted' if args.delete else 'orphan'}  {path}")
    for path in found["recent"]:
        print(f"kept    {path}  (younger than {args.min_age_hours:g} h: an ingest may still be writing it)")
    verb = f"deleted {found['deleted']}" if args.delete else f"{len(found['old'])} could be deleted (--delete)"
    print(
        f"{len(found['old']) + len(found['recent'])} orphaned file(s); {verb}, {found['bytes'] / 2**20:.1f} MB",
        file=sys.stderr,
    )
    return 0


def cmd_verify(args) -> int:
    """`neureg verify`: exit 0 when every stored array matches its hash, 1 when any is damaged (listed).

    Reads every array in the object store back and compares its shape and SHA-256 with what the database
    recorded; lists each damaged one (table, key, file, fault). A stage would refuse the same arrays.
    Orphaned files are `neureg gc`'s."""
    from ..upkeep.verify import verify_store

    pipeline = connect_from(args)
    start = time.perf_counter()

    def progress(name: str, n: int) -> None:
        if not args.json:
            print(f"  {name}: {n} array(s)", file=sys.stderr, flush=True)

    report = verify_store(pipeline, progress)
    report["seconds"] = round(time.perf_counter() - start, 1)
    if args.json:
        print_json(report)
    else:
        for d in report["damaged"]:
            print(f"damaged  {d['table']}.{d['attribute']} {d['key']}: {d['fault']} ({d['path']})")
        print(
            f"{report['checked']} stored array(s) checked ({report['bytes'] / 2**20:.1f} MB) in "
            f"{report['seconds']} s; {len(report['damaged'])} damaged",
            file=sys.stderr,
        )
    return EXIT_FAILED if report["damaged"] else 0


def cmd_diagram(args) -> int:
    """`neureg diagram [OUT]`: write the pipeline's diagram; exit 2 for a format this machine cannot write.

    DataJoint's diagram of every neureg schema: tables, parts and foreign keys. .mmd (Mermaid) needs nothing;
    .svg and .png need Graphviz's dot program."""
    from ..reports.diagram import save_diagram

    pipeline = connect_from(args)
    try:
        path = save_diagram(pipeline, args.out)
    except ValueError as exc:
        return refuse(exc)
    if args.json:
        print_json({"diagram": str(path), "format": path.suffix.lstrip(".")})
    else:
        print(path)
    return 0


def register(sub) -> None:
    """Add init, ingest, status, simulate, scanset, gc, verify and diagram."""
    p = add_command(sub, cmd_init, "start or reach the database, declare every schema (and an S3 store's bucket)")
    p.add_argument("--json", action="store_true", help="print one JSON object: backend, server, home, store, schemas")

    p = add_command(sub, cmd_ingest, "validate scan folder(s) and insert each in one transaction")
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="scan folder (data/, meta/, optional scan.json) or its .zip"
    )
    p.add_argument("--json", action="store_true", help="print one JSON list: path, ingested, key or error")

    p = add_command(sub, cmd_status, "tables, row counts and job states")
    p.add_argument("--json", action="store_true", help="print one JSON object: full table name -> row count")

    p = add_command(sub, cmd_simulate, "write a simulated mouse V1 cohort as scan folders (+ ground truth)")
    p.add_argument("out", type=Path, metavar="OUT", help="folder to write the scan folders into")
    from ..experiments.cohort import COHORT_DEFAULTS

    for flag, dest, what in COHORT_OPTIONS:
        default = COHORT_DEFAULTS[dest]
        p.add_argument(flag, dest=dest, type=int, default=default, metavar="N", help=f"{what} (default {default})")
    p.add_argument("--json", action="store_true", help="print one JSON object: folders, ground_truth")

    p = add_command(sub, cmd_scanset, "register scan sets (what stability and similarity targets are computed over)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--oracle-groups", action="store_true", help="one set per group of scans shown the same oracle")
    which.add_argument("--all", action="store_true", help="one set of every ingested scan")
    p.add_argument("--json", action="store_true", help="print the sets as JSON (key, size, note, new, members)")

    p = add_command(sub, cmd_gc, "find (and --delete) object-store files that no row references")
    p.add_argument("--delete", action="store_true", help="remove the orphans older than --min-age-hours")
    p.add_argument("--min-age-hours", type=float, default=24.0, metavar="H", help="default 24")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = add_command(sub, cmd_verify, "check every stored array against the SHA-256 recorded at insert")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = add_command(sub, cmd_diagram, "write the pipeline's DataJoint diagram (.mmd, .svg, .png)")
    p.add_argument(
        "out",
        nargs="?",
        type=Path,
        default=Path("neureg-pipeline.mmd"),
        help="output file; its suffix picks the format (default neureg-pipeline.mmd)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object: diagram, format")
