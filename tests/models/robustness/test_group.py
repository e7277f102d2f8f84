"""Networks evaluated as one fused group give each network's numbers alone (models/robustness/group.py).

Checked in float64, where grouped and dense kernels agree to about 1e-15 (tests/models/vision/test_group.py
measures it for training): every accuracy equal, every attack distance within 1e-9 relative, the same
attacked images and the same attack credited per image. A group that mixed networks up, attacked the wrong
rows, or kept a filler row's outcome would be off by far more. In float32 the accuracies of these networks
come out equal as well (an arg-max flips only at a near tie).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neureg.models.robustness import protocols
from neureg.models.robustness.group import NetworkGroup
from neureg.models.runtime import Runtime
from neureg.models.vision.datasets import ClassificationData, load_mnist_demo
from neureg.models.vision.group import Member, train_group
from neureg.models.vision.networks import build_network

NET = {"arch": "resnet18", "width": 0.0625}
TRAIN = {"epochs": 2, "batch_size": 32, "lr": 0.05}


def _digits(dtype) -> ClassificationData:
    """640 training and 200 test digits of the MNIST demo set (2 epochs reach 70-95% here)."""
    d = load_mnist_demo()
    return ClassificationData(
        d.name, d.train_x[:640].astype(dtype), d.train_y[:640], d.test_x[:200].astype(dtype), d.test_y[:200], 10
    )


def _networks(dtype) -> tuple[list, ClassificationData]:
    """Three networks of one architecture trained from three seeds (they differ: a mix-up would show)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        data = _digits(np.float64 if dtype == torch.float64 else np.float32)
        results = train_group([Member(NET, TRAIN, {"alpha": 0.0}, seed=s) for s in (1, 2, 3)], data, Runtime())
        models = []
        for result in results:
            model = build_network({**NET, "n_classes": 10})
            model.load_state_dict(result.state_dict)
            models.append(model.eval())
        return models, data
    finally:
        torch.set_default_dtype(saved)


@pytest.fixture(scope="module")
def trained64():
    """The three networks in float64, trained once for the module."""
    return _networks(torch.float64)


def test_noise_and_corruption_accuracy_of_a_group_equal_each_network_alone(trained64, float64):
    models, data = trained64
    group = NetworkGroup(models, "cpu", probe=data.test_x[:8])
    config = dict(sigmas=[0.0, 0.2, 0.5, 1.0], n_images=60)
    together = protocols.noise_evaluation(group, data.test_x, data.test_y, device="cpu", batch_size=None, **config)
    alone = [
        protocols.noise_evaluation(m, data.test_x, data.test_y, device="cpu", batch_size=None, **config) for m in models
    ]
    assert together == alone
    assert len({r["clean_accuracy"] for r in alone}) > 1 or len({str(r["levels"]) for r in alone}) > 1, "distinct"
    config = dict(corruptions=["gaussian_noise", "contrast", "jpeg_compression"], severities=[1, 5], n_images=50)
    together = protocols.corruption_evaluation(group, data.test_x, data.test_y, device="cpu", batch_size=None, **config)
    alone = [
        protocols.corruption_evaluation(m, data.test_x, data.test_y, device="cpu", batch_size=None, **config)
        for m in models
    ]
    assert together == alone


def test_float32_group_accuracies_equal_alone():
    models, data = _networks(torch.float32)
    group = NetworkGroup(models, "cpu")
    together = protocols.noise_evaluation(group, data.test_x, data.test_y, device="cpu", batch_size=None, n_images=64)
    alone = [
        protocols.noise_evaluation(m, data.test_x, data.test_y, device="cpu", batch_size=None, n_images=64)
        for m in models
    ]
    assert together == alone


def test_attacks_on_a_group_find_what_each_network_alone_finds(trained64, float64):
    """FMN Linf and DDN on interleaved batches (batch 5 per network, so batches end unevenly and fillers
    occur), the PGD search per network: each network's distances, attack credits and clean results."""
    models, data = trained64
    group = NetworkGroup(models, "cpu")
    attacks = [
        {"attack": "linf_fmn", "steps": 20},
        {"attack": "l2_ddn", "steps": 20},
        {"attack": "linf_pgd", "steps": 3, "search_steps": 2},
    ]
    config = dict(
        attacks=["fmn", "ddn"],
        cross_checks=["pgd"],
        cross_check_images=10,
        n_images=24,
        batch_size=5,
        gradient_dtype=None,
        progress=None,
    )

    def run(net):
        return protocols.perturbation_evaluation(
            net, data.test_x, data.test_y, attacks[:2], attacks[2:], device="cpu", **config
        )

    together = run(group)
    for model, grouped in zip(models, together):
        single = run(model)
        assert grouped["labels"] == single["labels"] and grouped["clean_accuracy"] == single["clean_accuracy"]
        for a, b in zip(single["images"], grouped["images"]):
            assert a["clean_correct"] == b["clean_correct"]
            assert a["linf_attack"] == b["linf_attack"] and a["l2_attack"] == b["l2_attack"]
            for norm in ("linf", "l2"):
                assert (a[norm] is None) == (b[norm] is None)
                if a[norm] is not None:
                    assert b[norm] == pytest.approx(a[norm], rel=1e-9, abs=1e-12)
        for a, b in zip(single["attacks"], grouped["attacks"]):
            assert (a["success_rate"], a["n_images"], a["beat_primary"]) == (
                b["success_rate"],
                b["n_images"],
                b["beat_primary"],
            )
        assert [a["n_images"] for a in single["attacks"]][2] <= 10 and single["attacks"][0]["beat_primary"] is None
    medians = {r["medians"]["median_linf"] for r in together}
    assert len(medians) == 3 and min(medians) > 0, "the three networks differ, so a mix-up would show"


def test_stochastic_networks_are_not_grouped():
    vone = build_network({"arch": "vone_resnet18", "width": 0.0625, "n_classes": 10}).eval()
    data = _digits(np.float32)
    with pytest.raises(ValueError, match="stochastic networks"):
        NetworkGroup([vone, vone], "cpu", probe=data.test_x[:8])
