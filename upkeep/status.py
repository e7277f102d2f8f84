"""Row counts and job states of every table, for `neureg status` and notebooks.

The tables and their order come from ``stages.pipeline_tables`` (DataJoint's dependency graph), the same
registry ``neureg populate`` and the workers use: a table is listed here exactly when it is filled there.
"""

from __future__ import annotations

from datajoint import Job

from ..populate.stages import pipeline_tables


def table_counts(pipeline) -> dict[str, int]:
    """Full table name -> row count, every table of the pipeline (parts included), upstream first."""
    return {entry.table.full_table_name: len(entry.table()) for entry in pipeline_tables(pipeline)}


def job_states(pipeline) -> dict[str, dict]:
    """Full table name -> job counts (pending, reserved, success, error, ignore) of every auto-populated table."""
    states = {}
    for entry in pipeline_tables(pipeline):
        if entry.auto:
            progress = Job(entry.table()).progress()  # does not create a missing jobs table (lab accounts cannot)
            states[entry.table.full_table_name] = {k: v for k, v in progress.items() if k != "total"}
    return states


def skipped_scans(pipeline) -> list[str]:
    """One line per scan that gets no oracle statistics (and so nothing downstream), saying why."""
    exp = pipeline.experiment
    lines = []
    for key in exp.scans_without_usable_repeats().keys(order_by="KEY"):
        repeats = exp.Trial & key & "tier = 'oracle'"
        why = (
            f"all {len(repeats)} repeated trials have withheld responses (a competition scan's test tiers)"
            if repeats
            else "no image was shown more than once"
        )
        lines.append(
            f"scan {key['mouse']} / session {key['session']} / scan {key['scan_idx']}: no oracle statistics: {why}"
        )
    return lines
