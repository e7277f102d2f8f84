"""What the worker keeps in DataJoint's jobs rows beyond its API (populate/worker_jobs.py): attempt tags."""

from __future__ import annotations

from neureg.populate.worker_jobs import attempts_recorded, tag_message


def test_attempt_tags():
    assert attempts_recorded("", "pending") == 0 and attempts_recorded("ValueError: x", "error") == 1
    tagged = tag_message("ValueError: x", 2, 3)
    assert tagged == "[attempt 2 of 3] ValueError: x" and attempts_recorded(tagged, "pending") == 2
    assert tag_message(tagged, 3, 3) == "[attempt 3 of 3] ValueError: x"  # re-tagging replaces the tag
    assert len(tag_message("x" * 5000, 1, 3)) == 2047
