"""Ingest a simulated 6000-trial x 8000-unit scan and load its response matrix back.

    python bench/bench_ingest.py [--trials 6000] [--units 8000] [--backend embedded|server]

Prints seconds for validate+insert and for loading the matrix, and peak memory above the baseline
(goal: ingest <= 30 s, peak <= 2x the response data, load <= 5 s).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_folder(folder: Path, trials: int, units: int) -> None:
    from neureg.ingestion.folder import write_scan_folder

    rng = np.random.default_rng(0)
    n_images = trials - 900  # 100 oracle images x 10 repeats
    frame_ids = rng.permutation(np.concatenate([np.arange(100, n_images), np.repeat(np.arange(100), 10)]))
    images = rng.integers(0, 256, (n_images, 36, 64), dtype=np.uint8)
    write_scan_folder(
        folder,
        {"mouse": "bench", "session": 1, "date": "2026-11-21", "scan": 1, "area": "V1"},
        images=images[frame_ids],
        responses=rng.gamma(2.0, 1.0, (trials, units)).astype(np.float32),
        behavior=rng.normal(size=(trials, 3)),
        pupil_center=rng.normal(size=(trials, 2)),
        frame_image_id=frame_ids,
        unit_ids=np.arange(units),
        cell_motor_coordinates=rng.uniform(0, 500, (units, 3)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6000)
    parser.add_argument("--units", type=int, default=8000)
    parser.add_argument("--backend", default="embedded", choices=["embedded", "server"])
    args = parser.parse_args()

    import neureg
    from neureg.ingestion import ingest_folder

    work = Path(tempfile.mkdtemp(prefix="neureg_bench_"))
    t = time.perf_counter()
    # Written in a child process so that generating the data does not count in this process's peak memory.
    writer = multiprocessing.get_context("fork").Process(
        target=write_folder, args=(work / "scan", args.trials, args.units)
    )
    writer.start()
    writer.join()
    print(f"wrote scan folder in {time.perf_counter() - t:.1f} s")
    data_mb = args.trials * args.units * 4 / 2**20

    pipe = neureg.connect(home=work / "home", prefix=f"bench{int(time.time())}_", backend=args.backend)
    baseline = rss_mb()
    t = time.perf_counter()
    key = ingest_folder(work / "scan", pipe)
    ingest_s = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    matrix = pipe.experiment.load_responses(key)
    load_s = time.perf_counter() - t
    assert matrix.shape == (args.trials, args.units)
    print(f"responses: {data_mb:.0f} MB ({args.trials} trials x {args.units} units, float32)")
    print(
        f"ingest (validate + insert): {ingest_s:.1f} s; peak RSS {peak:.0f} MB, baseline {baseline:.0f} MB, "
        f"above baseline {peak - baseline:.0f} MB = {(peak - baseline) / data_mb:.2f}x the data"
    )
    print(f"load response matrix: {load_s:.2f} s")
    for stage in reversed(list(vars(pipe).values())):
        if hasattr(stage, "schema"):
            stage.schema.drop(prompt=False)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
