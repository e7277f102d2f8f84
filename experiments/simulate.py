"""Simulated cohorts as ordinary scan folders, with the simulator's truth beside them.

The V1 model itself is pure numpy (``models/neural/simulator.py`` and its neighbours); this module is
the file side: it lays the simulated scans out in the ingestion format, so ``neureg ingest`` reads them
like any lab's recordings, and keeps the ground truth where ingestion never looks.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import fields
from pathlib import Path

import numpy as np

from ..ingestion.folder import assign_tiers, write_scan_folder
from ..models.digests import image_hash
from ..models.neural.receptive_fields import UnitPopulation
from ..models.neural.simulator import SimulatedScan, check_sizes, simulate_scan
from ..models.neural.stimuli import natural_image_set
from .cohort import COHORT_DEFAULTS

GROUND_TRUTH_DIR = "ground_truth"
FIRST_SESSION = _dt.date(2024, 1, 8)


def _scan_seed(seed: int, mouse: int, day: int, scan: int) -> int:
    """A scan's own seed, a stable function of the cohort seed and its place in the cohort."""
    digest = hashlib.sha256(f"neureg-sim/{seed}/{mouse}/{day}/{scan}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def simulate_cohort(out: Path | str, **sizes: int) -> list[Path]:
    """Write ``n_mice * n_days * scans_per_day`` scan folders under ``out`` and their truth beside them.

    ``sizes`` are :data:`COHORT_DEFAULTS`' keys (``n_mice``, ``n_days``, ``scans_per_day``, ``n_units``,
    ``n_images``, ``n_oracle``, ``n_repeats``, ``seed``); what is not given takes its default there.

    All scans share one image set (``natural_image_set(n_images, seed)``) and its oracle images; each has
    its own units, behaviour and noise. Folders are ``out/sim_m<k>_<date>_scan<s>``; tiers mark repeated
    trials "oracle" and split the rest train/validation by image hash exactly as ingestion does. Ground
    truth goes to ``out/ground_truth/<folder name>.npz`` (never inside a scan folder, so it is never
    ingested) and the pixels once to ``out/ground_truth/images.npy``.
    """
    unknown = sorted(set(sizes) - set(COHORT_DEFAULTS))
    if unknown:
        raise TypeError(f"simulate_cohort: unknown size(s) {unknown}; known: {sorted(COHORT_DEFAULTS)}")
    sizes = {**COHORT_DEFAULTS, **sizes}
    n_mice, n_days, scans_per_day, seed = sizes["n_mice"], sizes["n_days"], sizes["scans_per_day"], sizes["seed"]
    n_units, n_images, n_oracle, n_repeats = (sizes[k] for k in ("n_units", "n_images", "n_oracle", "n_repeats"))
    for name, value in (("n_mice", n_mice), ("n_days", n_days), ("scans_per_day", scans_per_day)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    check_sizes(n_units, n_images, n_oracle, n_repeats)
    out = Path(out)
    truth_dir = out / GROUND_TRUTH_DIR
    truth_dir.mkdir(parents=True, exist_ok=True)
    images = natural_image_set(n_images, seed)
    hashes = np.array([image_hash(im) for im in images])
    np.save(truth_dir / "images.npy", images)
    folders = []
    for mouse in range(1, n_mice + 1):
        for day in range(n_days):
            session = FIRST_SESSION + _dt.timedelta(days=day)
            for scan_idx in range(1, scans_per_day + 1):
                scan_seed = _scan_seed(seed, mouse, day, scan_idx)
                sim = simulate_scan(
                    n_units, n_oracle=n_oracle, n_repeats=n_repeats, seed=scan_seed, images=images, image_seed=seed
                )
                name = f"sim_m{mouse}_session{day + 1}_scan{scan_idx}"
                meta = {
                    "mouse": f"sim_m{mouse}",
                    "session": day + 1,
                    "date": session.isoformat(),
                    "scan": scan_idx,
                    "area": "V1",
                    "depth": 250.0,
                    "frame_rate": 7.5,
                    "notes": f"neureg simulator, cohort seed {seed}, scan seed {scan_seed}",
                }
                trial_hashes = hashes[sim.trial_image].tolist()
                folder = write_scan_folder(
                    out / name,
                    meta,
                    images[sim.trial_image],
                    sim.responses,
                    sim.behavior,
                    sim.pupil_center,
                    frame_image_id=sim.trial_image,
                    unit_ids=sim.unit_ids,
                    cell_motor_coordinates=sim.cell_motor_coordinates,
                    tiers=assign_tiers(trial_hashes),
                    areas=np.full(sim.n_units, "V1"),
                    start_time=np.arange(sim.n_trials, dtype=float),
                    duration=np.full(sim.n_trials, 0.5),
                )
                _save_truth(truth_dir / f"{name}.npz", sim, hashes)
                folders.append(folder)
    return folders


def _save_truth(path: Path, sim: SimulatedScan, hashes: np.ndarray) -> None:
    population = {f"rf_{f.name}": getattr(sim.population, f.name) for f in fields(UnitPopulation)}
    np.savez(
        path,
        true_rates=sim.true_rates,
        signal_var=sim.signal_var,
        noise_var=sim.noise_var,
        true_snr=sim.true_snr,
        unit_ids=sim.unit_ids,
        image_hash=hashes,
        frame_image_id=np.arange(len(hashes), dtype=np.int64),
        is_oracle=np.arange(len(hashes)) < sim.n_oracle,
        trial_shift=sim.trial_shift,
        shift_per_pupil=sim.shift_per_pupil,
        eye_rest=sim.eye_rest,
        mean_behavior=sim.mean_behavior,
        seed=sim.seed,
        image_seed=sim.image_seed,
        **population,
    )


def load_ground_truth(scan_folder: Path | str) -> dict[str, np.ndarray]:
    """The truth written beside ``scan_folder`` by ``simulate_cohort``: a dict of arrays (see ``_save_truth``).

    Rows of ``true_rates`` follow ``image_hash`` / ``frame_image_id`` (the ingested image ids); columns follow
    ``unit_ids``. ``rf_*`` are the UnitPopulation parameters.
    """
    folder = Path(scan_folder)
    path = folder.parent / GROUND_TRUTH_DIR / f"{folder.name}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"no ground truth for {folder} (expected {path}); only simulated cohorts have one")
    with np.load(path) as data:
        return {key: data[key] for key in data.files}
