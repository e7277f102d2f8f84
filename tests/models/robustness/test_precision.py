"""Attacks may follow reduced-precision gradients (bf16 under NEUREG_AMP on CUDA); verdicts stay float32.

A model that answers differently under autocast shows which precision decides: under autocast it calls
every image class 0, in float32 it is an honest linear classifier. An attack that trusted the reduced
precision would report every image of another class broken at distance ~0.
"""

import numpy as np
import pytest
import torch
from torch import nn

from neureg.models.robustness.attacks import minimal_perturbations
from neureg.models.robustness.autoattack import autoattack_robust_accuracy
from neureg.models.robustness.evaluation import ReducedPrecision, robust_accuracy


class TwoFaced(nn.Module):
    """A 4-class linear model that, under autocast, adds a large logit to class 0."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 4)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(4, 16) * 4)
            self.linear.bias.zero_()

    def forward(self, x):
        logits = self.linear(x.flatten(1).float())
        if torch.is_autocast_enabled(x.device.type):
            logits = logits + torch.tensor([100.0, 0.0, 0.0, 0.0], device=x.device)
        return logits


@pytest.fixture(scope="module")
def task():
    """Images whose class is their brightest of the first four pixels (margins 0.4 at least)."""
    rng = np.random.default_rng(0)
    labels = np.arange(24) % 4
    x = np.full((24, 16), 0.3, dtype=np.float32)
    x[np.arange(24), labels] = 0.7 + 0.2 * rng.random(24)
    return TwoFaced().eval(), torch.tensor(x).view(24, 1, 4, 4), torch.tensor(labels)


def test_reduced_precision_runs_the_model_under_autocast(task):
    model, x, _ = task
    assert (model(x).argmax(1) == torch.arange(24) % 4).all()
    reduced = ReducedPrecision(model, torch.bfloat16)(x)
    assert reduced.dtype == torch.float32 and (reduced.argmax(1) == 0).all()


def test_a_distance_counts_only_if_the_float32_model_is_fooled(task):
    model, x, y = task
    config = [{"attack": "linf_fmn", "steps": 30}]
    exact = minimal_perturbations(model, x, y, config, batch_size=24).distances[0]
    reduced = minimal_perturbations(model, x, y, config, batch_size=24, gradient_dtype=torch.bfloat16).distances[0]
    others = (y != 0).numpy()
    found = np.isfinite(exact)
    assert found[others].mean() > 0.8 and (exact[found] > 0.1).all()  # margins of at least 0.4 / 2 per pixel
    # Under autocast every image looks like class 0: the others look broken from the start and are refused
    # (the float32 model still classifies them correctly), and class 0 cannot be moved (a weaker attack).
    assert np.isinf(reduced).all()


def test_fixed_epsilon_verdicts_are_float32(task):
    model, x, y = task
    eps = 0.05  # below every margin: the float32 model keeps every image
    assert robust_accuracy(model, x, y, "linf", eps, steps=10) == 1.0
    assert robust_accuracy(model, x, y, "linf", eps, steps=10, gradient_dtype=torch.bfloat16) == 1.0
    assert autoattack_robust_accuracy(model, x, y, "linf", eps, gradient_dtype=torch.bfloat16) == 1.0
