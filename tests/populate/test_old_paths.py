"""Old import paths that notebooks used keep working for one release, with a deprecation warning."""

from __future__ import annotations

import importlib
import sys

import pytest


def test_the_old_status_module_warns_and_hands_out_the_same_functions():
    sys.modules.pop("neureg.populate.status", None)
    with pytest.warns(DeprecationWarning, match=r"neureg\.upkeep\.status"):
        old = importlib.import_module("neureg.populate.status")
    from neureg.upkeep import status

    assert (old.table_counts, old.job_states, old.skipped_scans) == (
        status.table_counts,
        status.job_states,
        status.skipped_scans,
    )
