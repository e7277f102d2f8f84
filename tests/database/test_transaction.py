"""The one transaction helper: steps that open their own transaction join an open one; a dry run rolls back."""

from __future__ import annotations

import pytest

from neureg.database.transaction import transaction


def test_a_transaction_takes_nested_steps_with_it_and_a_dry_run_rolls_back(pipeline):
    """Steps that open their own transaction join the outer one: all land, or none (an error, a dry run)."""
    seed, connection = pipeline.training.Seed, pipeline.training.schema.connection
    mine = seed & "seed >= 9000"

    def steps():
        seed.insert1({"seed": 9001})
        with transaction(connection):  # what ScanSet.create and training.plan do inside
            seed.insert1({"seed": 9002})

    with pytest.raises(KeyError):
        with transaction(connection):
            steps()
            raise KeyError("a fault after both steps")
    assert len(mine) == 0 and not connection.in_transaction
    with transaction(connection, commit=False):
        steps()
        assert len(mine) == 2
    assert len(mine) == 0 and not connection.in_transaction
    try:
        with transaction(connection):
            steps()
        assert sorted(mine.to_arrays("seed")) == [9001, 9002]
        with pytest.raises(Exception, match="Nested"):  # DataJoint's own nesting check is untouched
            with connection.transaction:
                connection.start_transaction()
    finally:
        mine.delete_quick()
