"""Two ingests of one scan at once: one sealed, complete scan lands; the other is refused (exit 3) and removes
none of the first one's blocks, even when it gives up on a lock wait timeout while the first still runs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from neureg.ingestion.folder import read_scan_folder
from neureg.upkeep.verify import verify_store

HELPER = Path(__file__).with_name("race_helper.py")


def _start(env, *args):
    return subprocess.Popen(
        [sys.executable, str(HELPER), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_losing_ingest_never_deletes_the_winners_blocks(
    pipeline, tmp_path, scan_folder_factory, unique_mouse, subprocess_env
):
    exp = pipeline.experiment
    folder = scan_folder_factory(tmp_path / "scan", mouse=unique_mouse, seed=31)
    flag = tmp_path / "go"
    first = _start(subprocess_env, "hold", folder, flag)
    deadline = time.monotonic() + 120
    while not Path(f"{flag}.ready").exists():
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first ingest never reached its seal"
        time.sleep(0.1)
    blocks = sorted((pipeline.home / "store").rglob(f"mouse={unique_mouse}/**/*.npy"))
    assert blocks, "the first ingest wrote its blocks before sealing"

    second = _start(subprocess_env, "race", folder, flag)  # held past its 2 s lock wait timeout
    out, err = second.communicate(timeout=120)
    assert second.returncode == 3, out + err
    assert "is being ingested by another process right now" in err or "already in the database" in err
    assert all(path.exists() for path in blocks), "the losing ingest deleted the first one's blocks"

    flag.write_text("go")
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, out + err
    key = {"mouse": unique_mouse, "session": 1, "scan_idx": 1}
    assert exp.Ingestion & key, "the first ingest is sealed"
    expected = read_scan_folder(folder).responses
    np.testing.assert_array_equal(exp.load_responses(key, include_withheld=True), expected)
    report = verify_store(pipeline)
    assert not [d for d in report["damaged"] if unique_mouse in str(d)]

    third = _start(subprocess_env, "race", folder, flag)  # after the commit: plainly refused as existing
    out, err = third.communicate(timeout=120)
    assert third.returncode == 3 and "already in the database" in err, out + err
