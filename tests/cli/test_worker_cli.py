"""`neureg worker`'s command line: the durations --time-limit reads, and the options turned into WorkerOptions."""

from __future__ import annotations

import argparse

import pytest

from neureg.cli.worker import duration, options_from_args, register
from neureg.populate.worker import WorkerOptions


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("3600", 3600),
        ("0.5", 0.5),
        ("90s", 90),
        ("90m", 5400),
        ("4h", 14400),
        ("2d", 172800),
        ("05:30", 330),
        ("04:00:00", 14400),
        ("1-12:00:00", 129600),
        ("1-04", 100800),
        ("1-04:30", 102600),
    ],
)
def test_time_limit_reads_seconds_units_and_slurm_durations(text, seconds):
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["", "x", "-5", "0", "00:00", "1:2:3:4", "4 h", "1-"])
def test_bad_time_limits_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        duration(text)


def test_worker_and_accounts_commands_have_help():
    from neureg.cli import accounts

    parser = argparse.ArgumentParser(prog="neureg")
    subparsers = parser.add_subparsers(dest="command")
    register(subparsers)
    accounts.register(subparsers)
    for command in ("worker", "accounts"):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([command, "--help"])
        assert exit_.value.code == 0
    args = parser.parse_args(["worker", "--stage", "oracle", "--stage", "training", "--once", "--orphan-timeout", "5"])
    assert options_from_args(args) == WorkerOptions(stages=["oracle", "training"], once=True, orphan_timeout=5)
