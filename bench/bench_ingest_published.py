"""Ingest a full-size Sensorium-layout scan from its folder and from its zip.

    python bench/bench_ingest_published.py [--trials 6000] [--units 8000] [--height 144 --width 256]

Writes a folder in the published layout (float32 (1, 144, 256) images holding 0..255, trial files in
random order, 100 test images x 10 repeats, no scan.json) and its zip, then ingests each in a fresh
process on the embedded database. Prints seconds, the ingesting process's peak memory against the
response matrix, and the store and database size the scan takes. Goals (issue on published datasets):
<= 60 s each, peak <= 2x the response matrix + one image batch.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import resource
import shutil
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np


def write_published(root: Path, trials: int, units: int, height: int, width: int) -> Path:
    """The Sensorium folder layout, random data, written one trial at a time."""
    rng = np.random.default_rng(0)
    n_distinct = trials - 900
    frame_ids = rng.permutation(np.concatenate([np.arange(100, n_distinct), np.repeat(np.arange(100), 10)]))
    folder = root / "static99999-3-7-GrayImageNet-0123456789abcdef0123456789abcdef"
    for sub in ("images", "responses", "behavior", "pupil_center"):
        (folder / "data" / sub).mkdir(parents=True)
    for sub in ("trials", "neurons"):
        (folder / "meta" / sub).mkdir(parents=True)
    image_seed = np.random.SeedSequence(1)
    for trial, frame in enumerate(frame_ids):
        pixels = np.random.default_rng([image_seed.entropy, int(frame)]).integers(0, 256, (1, height, width))
        np.save(folder / f"data/images/{trial}.npy", pixels.astype(np.float32))
        np.save(folder / f"data/responses/{trial}.npy", rng.gamma(2.0, 1.0, units).astype(np.float32))
        np.save(folder / f"data/behavior/{trial}.npy", rng.normal(size=3).astype(np.float32))
        np.save(folder / f"data/pupil_center/{trial}.npy", rng.normal(size=2).astype(np.float32))
    tiers = np.where(frame_ids < 100, "test", np.where(rng.random(trials) < 0.1, "validation", "train"))
    meta = {
        "trials/tiers": tiers,
        "trials/frame_image_id": frame_ids,
        "trials/trial_idx": rng.permutation(trials),
        "trials/animal_id": np.full(trials, 99999),
        "trials/session": np.full(trials, 3),
        "trials/scan_idx": np.full(trials, 7),
        "neurons/unit_ids": np.arange(1, units + 1),
        "neurons/area": np.full(units, "V1"),
        "neurons/layer": np.full(units, "L2/3"),
        "neurons/cell_motor_coordinates": rng.uniform(0, 500, (units, 3)),
    }
    for name, values in meta.items():
        np.save(folder / f"meta/{name}.npy", values)
    return folder


def zip_folder(folder: Path) -> Path:
    archive = folder.parent / f"{folder.name}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for path in sorted(folder.rglob("*")):
            z.write(path, path.relative_to(folder.parent))
    return archive


def _ingest(path: str, home: str, prefix: str, out) -> None:
    import neureg
    from neureg.ingestion import ingest_folder

    pipe = neureg.connect(home=home, prefix=prefix, backend="embedded")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # torch, numpy, DataJoint loaded
    start = time.perf_counter()
    ingest_folder(path, pipe)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.put((time.perf_counter() - start, peak - baseline, baseline))


def ingest_in_child(path: Path, home: Path, prefix: str) -> tuple[float, float, float]:
    """(seconds, peak RSS growth during the ingest MB, RSS before it MB) of one ingest in a fresh process."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_ingest, args=(str(path), str(home), prefix, out))
    child.start()
    result = out.get()
    child.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6000)
    parser.add_argument("--units", type=int, default=8000)
    parser.add_argument("--height", type=int, default=144)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="neureg_bench_published_"))
    try:
        t = time.perf_counter()
        folder = write_published(work, args.trials, args.units, args.height, args.width)
        images_mb = args.trials * args.height * args.width * 4 / 2**20
        print(
            f"wrote {folder.name}: {args.trials} trials, float32 images {images_mb:.0f} MB, "
            f"in {time.perf_counter() - t:.0f} s"
        )
        t = time.perf_counter()
        archive = zip_folder(folder)
        print(f"zipped: {archive.stat().st_size / 2**20:.0f} MB in {time.perf_counter() - t:.0f} s")
        responses_mb = args.trials * args.units * 4 / 2**20
        batch_mb = args.height * args.width * 4 / 2**20
        home = work / "home"
        for label, path in (("folder", folder), ("zip", archive)):
            prefix = f"b{hashlib.md5(label.encode()).hexdigest()[:6]}_"
            seconds, growth, baseline = ingest_in_child(path, home, prefix)
            print(
                f"ingest from {label}: {seconds:.1f} s; peak memory {growth:.0f} MB above the {baseline:.0f} MB "
                f"the process held before (libraries) = {growth / responses_mb:.2f}x the response matrix "
                f"({responses_mb:.0f} MB; one float32 image {batch_mb:.2f} MB)"
            )
        store = subprocess.run(["du", "-sm", str(home / "store")], capture_output=True, text=True).stdout.split()[0]
        pgdata = subprocess.run(["du", "-sm", str(home / "pgdata")], capture_output=True, text=True).stdout.split()[0]
        print(
            f"after both ingests (two schema prefixes, each holding the scan once): store {store} MB, "
            f"database files {pgdata} MB, i.e. about {int(store) / 2:.0f} MB of store per scan"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
