"""Deprecated alias of :mod:`neureg.upkeep.status` (its old place, which notebooks import); removed in 0.3."""

import warnings

from ..upkeep.status import job_states, skipped_scans, table_counts  # noqa: F401 - the names it used to hold

warnings.warn(
    "neureg.populate.status moved to neureg.upkeep.status; the old path goes in neureg 0.3",
    DeprecationWarning,
    stacklevel=2,
)
