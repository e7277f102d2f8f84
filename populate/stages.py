"""The pipeline's tables and their order, read from DataJoint's own dependency graph; and ``populate_stage``.

``pipeline_tables`` is the one registry: the CLI (``neureg populate``, ``neureg status``), the demo, notebooks
and the workers all take the auto-populated tables and their order from it, so adding a table to a schema
module is all it takes for every one of them to fill it. A *stage* is a schema module of the pipeline
namespace (``pipeline.oracle``, ...); a table's stage is the module whose schema holds it.

The order is DataJoint's: the foreign keys of every schema (``conn.dependencies``, the graph behind
``dj.Diagram`` and ``Schema.list_tables``), with parts kept beside their masters. DataJoint's graph has
foreign keys only, and two tables wait for more than their foreign keys say: their ``key_source`` also
waits for another computed table (``oracle.ScanStability`` for the ``OracleSimilarity`` of every member
scan, ``similarity.SimilarityTarget`` for ``DataSimilarity``). Those edges are read from the SQL DataJoint
generates for each ``key_source`` (``QueryExpression.make_sql``), so one pass in this order fills them too.
Ties go to the namespace's stage order (experiment, oracle, predictive, ...), then to DataJoint's.
"""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass

import datajoint as dj
from datajoint.errors import DuplicateError

from ..database.connect import stage_modules

logger = logging.getLogger("neureg")


@dataclass(frozen=True)
class PipelineTable:
    """One table of the pipeline as the registry sees it: which stage holds it and whether populate fills it."""

    stage: str  # name of the schema module in the pipeline namespace
    table: type  # the table class
    auto: bool  # a dj.Computed / dj.Imported master: populate() fills it (parts are filled with their master)

    @property
    def name(self) -> str:
        """``stage.Class`` (``Class.Part`` for a part), as ``--table`` and the logs spell it."""
        return f"{self.stage}.{_qualified(self.table)}"


def _qualified(table: type) -> str:
    master = getattr(table, "master", None) if issubclass(table, dj.Part) else None
    return f"{master.__name__}.{table.__name__}" if master is not None else table.__name__


def _classes(modules: dict) -> tuple[dict, dict]:
    """full table name -> (stage, class) for every master and part declared in the modules; part -> master."""
    classes, master_of = {}, {}
    for stage, module in modules.items():
        database = module.schema.database
        for obj in vars(module).values():
            if not (isinstance(obj, type) and issubclass(obj, dj.Table) and not issubclass(obj, dj.Part)):
                continue
            if getattr(obj, "database", None) != database:  # imported from another stage, or not declared
                continue
            classes[obj.full_table_name] = (stage, obj)
            for part in vars(obj).values():
                if isinstance(part, type) and issubclass(part, dj.Part) and getattr(part, "master", None) is obj:
                    classes[part.full_table_name] = (stage, part)
                    master_of[part.full_table_name] = obj.full_table_name
    return classes, master_of


def pipeline_tables(pipeline) -> list[PipelineTable]:
    """Every table of the pipeline's schemas, upstream first (parts right after their master).

    The single source of which tables are computed and in what order they are filled; see the module notes.
    Tables in the database without a class in the namespace (left over from an older version) are skipped.
    """
    modules = stage_modules(pipeline)
    if not modules:
        return []
    connection = next(iter(modules.values())).schema.connection
    classes, master_of = _classes(modules)
    dependencies = connection.dependencies
    dependencies.load()  # reload: tables another process declared since count too
    order = [name for name in dependencies.topo_sort() if name in classes]
    position = {name: i for i, name in enumerate(order)}
    stage_rank = {stage: i for i, stage in enumerate(modules)}

    def master(name: str) -> str:
        return master_of.get(name, name)

    masters = [name for name in order if name not in master_of]
    edges = {name: set() for name in masters}  # upstream master -> downstream masters
    for name in order:
        for parent, _ in dependencies.parents(name):
            if parent in classes and master(parent) != master(name):
                edges[master(parent)].add(master(name))
    for name in masters:
        stage, table = classes[name]
        if issubclass(table, (dj.Computed, dj.Imported)):
            for upstream in _read_by_key_source(table, order, master):
                if upstream != name and not _reaches(edges, name, upstream):  # never close a cycle
                    edges[upstream].add(name)

    waiting = {name: 0 for name in masters}
    for downstream in edges.values():
        for name in downstream:
            waiting[name] += 1
    ready = [((stage_rank[classes[n][0]], position[n]), n) for n in masters if not waiting[n]]
    heapq.heapify(ready)
    parts = {}
    for name in order:
        if name in master_of:
            parts.setdefault(master_of[name], []).append(name)
    result = []
    while ready:
        _, name = heapq.heappop(ready)
        for member in (name, *parts.get(name, ())):
            stage, table = classes[member]
            auto = member == name and issubclass(table, (dj.Computed, dj.Imported))
            result.append(PipelineTable(stage, table, auto))
        for downstream in edges[name]:
            waiting[downstream] -= 1
            if not waiting[downstream]:
                heapq.heappush(ready, ((stage_rank[classes[downstream][0]], position[downstream]), downstream))
    return result


def _read_by_key_source(table, names, master) -> set[str]:
    """Masters of the pipeline tables (or of their parts) whose full names appear in the table's ``key_source`` SQL.

    Full names are quoted (``"db"."name"`` or ```db`.`name```), so a name cannot match inside another.
    """
    sql = table().key_source.make_sql()
    return {master(name) for name in names if name in sql}


def _reaches(edges: dict, start: str, goal: str) -> bool:
    seen, todo = {start}, [start]
    while todo:
        for nxt in edges[todo.pop()]:
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False


def stage_tables(pipeline, stages=None) -> list:
    """Auto-populated table classes of the chosen stages (all by default), upstream first."""
    entries = [entry for entry in pipeline_tables(pipeline) if entry.auto]
    known = list(dict.fromkeys(entry.stage for entry in entries))
    stages = list(stages) if stages else known
    unknown = [s for s in stages if s not in known]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages with computed tables: {known}")
    return [entry.table for entry in entries if entry.stage in stages]


def restriction_for(table, keys) -> list[dict] | None:
    """The keys (dicts) that apply to the table: those all of whose attributes its key source has.

    A scan key applies to every table keyed by scans (and more); a key naming a config the table does not
    use (a noise config, for the attack table) does not apply, rather than shrinking to its other
    attributes and so letting every config of that network run. DataJoint would treat a dict sharing no
    attribute as no restriction at all. Returns None when no key applies: the table is then skipped.
    """
    names = set(table().key_source.primary_key)
    applying = [dict(key) for key in keys if key and set(key) <= names]
    return applying or None


def populate_stage(
    pipeline,
    stages=None,
    *,
    reserve_jobs: bool = False,
    display_progress: bool = False,
    suppress_errors: bool = False,
    keys=None,
) -> dict[str, dict]:
    """Run ``populate()`` for every table of the stages in dependency order; return per-table summaries.

    The one way to fill tables in a process (CLI, demo, notebooks). A table that computes several keys at
    once (``groups.py``: training) does so in groups of the worker's size (``NEUREG_GROUP``) when that
    is more than one. ``keys`` (a list of dicts) limits the
    work: each table gets the keys all of whose attributes it has (see ``restriction_for``); tables none
    of them apply to are skipped. Scan sets are not registered here: see ``neureg scanset``.
    """
    from ..models.runtime import Runtime
    from .groups import groupable, pending_groups, populate_in_groups

    runtime = Runtime.from_env()  # a mistyped NEUREG_* execution setting: ValueError now, not in every make
    summary = {}
    for table in stage_tables(pipeline, stages):
        restriction = () if keys is None else (restriction_for(table, keys),)
        if restriction == (None,):
            continue
        before = len(table())
        start = time.perf_counter()
        groups = pending_groups(table, restriction, runtime) if groupable(table) else []
        if any(len(g) > 1 for g in groups):
            result = populate_in_groups(table, groups, reserve_jobs=reserve_jobs, suppress_errors=suppress_errors)
        else:
            result = populate_beside_others(
                table,
                restriction,
                reserve_jobs=reserve_jobs,
                display_progress=display_progress,
                suppress_errors=suppress_errors,
            )
        seconds = time.perf_counter() - start
        errors = result.get("error_list", []) if isinstance(result, dict) else []
        errors = [e for e in errors if not _done_by_another(table, e)]
        summary[table.full_table_name] = {
            "new_rows": len(table()) - before,
            "seconds": round(seconds, 2),
            "errors": errors,
        }
        logger.info("%s: %d new rows in %.1f s", table.__name__, len(table()) - before, seconds)
    return summary


def populate_beside_others(table, restriction, **options):
    """``table.populate`` that yields to a concurrent ``neureg populate`` of the same table.

    Without job reservation two processes may compute one key at once; the later insert then fails as a
    duplicate once the other commits, and DataJoint stops the whole populate. The key is done, by the
    other process: populate again, which skips it, until a run ends without such a collision.
    """
    for _ in range(max(1, len(table.key_source)) + 1):
        try:
            return table.populate(*restriction, **options)
        except DuplicateError:
            logger.info("%s: a key was filled by another process meanwhile; going on with the rest", table.__name__)
    return table.populate(*restriction, **options)


def _done_by_another(table, error) -> bool:
    """A suppressed error that is only another process having filled the key first."""
    key, message = (error[0], str(error[1])) if isinstance(error, tuple) and len(error) == 2 else (None, "")
    return message.startswith("DuplicateError") and key is not None and bool(table & key)
