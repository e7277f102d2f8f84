"""Fixtures of the ingestion tests: our scan folders rewritten in the published Sensorium / Lurz layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def publish_scan(
    source,
    out,
    animal,
    session,
    scan,
    *,
    images_as=np.float32,
    image_gain=1.0,
    final_test=0,
    withhold=(),
    hashed_trial_idx=False,
    layer="L2/3",
    seed=0,
):
    """Rewrite one of our scan folders (``source``) exactly in the published Sensorium / Lurz layout.

    The folder is ``static{animal}-{session}-{scan}-GrayImageNet-<hash>`` with no scan.json; trial files
    are renumbered in random order (``meta/trials/trial_idx.npy`` keeps the real order: ints, or 32-hex
    strings with ``hashed_trial_idx``); repeated images are tier 'test'; the first ``final_test`` repeated
    images become 'final_test'; the tiers in ``withhold`` get all-zero responses, as competition scans
    publish them. Images are (1, H, W) of ``images_as`` (float32 holding 0..255 by default), times
    ``image_gain`` (a gain that is not a whole number gives the older sets' non-integral values).
    """
    import hashlib
    import json

    source, rng = Path(source), np.random.default_rng(seed)
    frame_ids = np.load(source / "meta/trials/frame_image_id.npy")
    n = frame_ids.size
    order = rng.permutation(n)  # file i holds presentation order[i]
    digest = hashlib.md5(f"{animal}-{session}-{scan}".encode()).hexdigest()
    root = Path(out) / f"static{animal}-{session}-{scan}-GrayImageNet-{digest}"
    for sub in (
        "data/images",
        "data/responses",
        "data/behavior",
        "data/pupil_center",
        "meta/trials",
        "meta/neurons",
        "meta/statistics/responses/all",
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids, counts = np.unique(frame_ids, return_counts=True)
    repeated = ids[counts > 1]
    tiers = np.array(["train" if rng.random() > 0.1 else "validation" for _ in range(n)], dtype="<U10")
    tiers[np.isin(frame_ids, repeated)] = "test"
    tiers[np.isin(frame_ids, repeated[:final_test])] = "final_test"
    responses = []
    for i, t in enumerate(order):
        image = np.load(source / f"data/images/{t}.npy").reshape(1, *np.load(source / "data/images/0.npy").shape[-2:])
        np.save(root / f"data/images/{i}.npy", (image.astype(np.float64) * image_gain).astype(images_as))
        response = np.load(source / f"data/responses/{t}.npy").astype(np.float32)
        response = np.zeros_like(response) if tiers[t] in withhold else response
        responses.append(response)
        np.save(root / f"data/responses/{i}.npy", response)
        np.save(root / f"data/behavior/{i}.npy", np.load(source / f"data/behavior/{t}.npy").astype(np.float32))
        np.save(root / f"data/pupil_center/{i}.npy", np.load(source / f"data/pupil_center/{t}.npy").astype(np.float32))
    trial_idx = (
        np.array([hashlib.md5(f"{digest}{t}".encode()).hexdigest() for t in order])
        if hashed_trial_idx
        else order.astype(np.int64)
    )
    unit_ids = np.load(source / "meta/neurons/unit_ids.npy")
    trials = {
        "tiers": tiers[order],
        "frame_image_id": frame_ids[order],
        "trial_idx": trial_idx,
        "animal_id": np.full(n, animal),
        "session": np.full(n, session),
        "scan_idx": np.full(n, scan),
        "condition_hash": np.array([f"c{f}" for f in frame_ids[order]]),
        "frame_image_class": np.full(n, "imagenet"),
    }
    neurons = {
        "unit_ids": unit_ids,
        "animal_ids": np.full(unit_ids.size, animal),
        "sessions": np.full(unit_ids.size, session),
        "scan_idx": np.full(unit_ids.size, scan),
        "area": np.full(unit_ids.size, "V1"),
        "layer": np.full(unit_ids.size, layer),
        "cell_motor_coordinates": np.load(source / "meta/neurons/cell_motor_coordinates.npy"),
    }
    for name, values in trials.items():
        np.save(root / f"meta/trials/{name}.npy", values)
    for name, values in neurons.items():
        np.save(root / f"meta/neurons/{name}.npy", values)
    np.save(root / "meta/statistics/responses/all/mean.npy", np.mean(responses, axis=0))
    (root / "config.json").write_text(json.dumps({"links": {}}))  # what neuralpredictors' loader leaves behind
    return root


@pytest.fixture
def publish_scan_factory():
    """``publish_scan`` as a fixture: our scan folders rewritten in the published Sensorium layout."""
    return publish_scan
