"""Fixed-epsilon robust accuracy of a stochastic network, judged as the minimal perturbations judge it.

The model is linear with Gaussian noise on its logits, so the truth is known: the EoT average is the linear
model, and an image is robust at Linf epsilon exactly when every runner-up margin over the L1 norm of the
weight difference exceeds epsilon (images sit far from the [0, 1] walls, so the box never binds).
"""

import logging

import numpy as np
import pytest
import torch
from torch import nn

from neureg.models.robustness.autoattack import autoattack_robust_accuracy
from neureg.models.robustness.evaluation import ExpectationOverTransformation, robust_accuracy

N_CLASSES, SIDE, EPSILON, NOISE, EOT = 4, 4, 0.18, 6.0, 8


class NoisyLinear(nn.Module):
    """Logits ``W x`` plus N(0, noise^2) on every logit of every call."""

    def __init__(self, weight: torch.Tensor, noise: float):
        super().__init__()
        self.weight, self.noise = weight, noise

    def forward(self, x):
        logits = x.flatten(1) @ self.weight.T
        return logits + self.noise * torch.randn_like(logits)


@pytest.fixture(scope="module")
def task():
    """60 images whose Linf distance to the mean model's boundary is well below or well above EPSILON (none
    within [0.6, 1.5] x EPSILON, where a finite vote could go either way), and the true robust share."""
    rng = np.random.default_rng(0)
    weight = torch.tensor(3 * rng.standard_normal((N_CLASSES, SIDE * SIDE)), dtype=torch.float32)
    images, labels, distances = [], [], []
    while len(images) < 60:
        x = torch.tensor(rng.uniform(0.3, 0.7, SIDE * SIDE), dtype=torch.float32)
        logits = weight @ x
        y = int(logits.argmax())
        distance = min(
            float((logits[y] - logits[j]) / (weight[y] - weight[j]).abs().sum()) for j in range(N_CLASSES) if j != y
        )
        if distance < 0.6 * EPSILON or distance > 1.5 * EPSILON:
            images.append(x.view(1, SIDE, SIDE))
            labels.append(y)
            distances.append(distance)
    truth = float(np.mean(np.array(distances) > EPSILON))
    assert 0.1 < truth < 0.9  # both kinds of image are there
    return weight, torch.stack(images), torch.tensor(labels), truth


def test_single_draw_judging_overstates_and_the_vote_does_not(task):
    from pyautoattack import AutoAttack

    weight, x, y, truth = task
    model = NoisyLinear(weight, NOISE)
    # what AutoAttack's own verdicts give when its points are then judged by one EoT evaluation
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    torch.manual_seed(0)
    attack = AutoAttack(model, device="cpu", eps=EPSILON, norm="Linf", version="rand", seed=0)
    attack.verbose = False
    x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=256)
    judge = ExpectationOverTransformation(model, EOT)
    with torch.no_grad():
        single = float(((judge(x).argmax(1) == y) & (judge(x_adv).argmax(1) == y)).float().mean())
    assert single > truth + 0.2, (single, truth)  # images one lucky draw saved, counted robust

    fixed = autoattack_robust_accuracy(model, x, y, "linf", EPSILON, version="rand", eot_samples=EOT, seed=0)
    assert fixed == pytest.approx(truth, abs=1 / 60), (fixed, truth)
    pgd = robust_accuracy(model, x, y, "linf", EPSILON, steps=40, eot_samples=EOT, seed=0)
    assert pgd == pytest.approx(truth, abs=1 / 60), (pgd, truth)


def test_deterministic_linear_model_gives_the_truth(task):
    weight, x, y, truth = task
    model = NoisyLinear(weight, 0.0)
    assert autoattack_robust_accuracy(model, x, y, "linf", EPSILON, seed=0) == pytest.approx(truth)
    assert robust_accuracy(model, x, y, "linf", EPSILON, steps=40, seed=0) == pytest.approx(truth)
