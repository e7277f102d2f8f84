"""Fixed-epsilon robust accuracy with AutoAttack (Croce & Hein 2020), the number leaderboards report.

Wraps ``pyautoattack`` 0.2.0, a packaging of the reference implementation whose interface differs from
upstream's: keyword-only ``batch_size=`` and a returned pair ``(x_adv, y_adv)``. Version ``standard``
(APGD-CE, APGD-T, FAB-T, Square) is for deterministic networks; version ``rand`` (APGD-CE and APGD-DLR
with 20-sample expectation over transformation) for stochastic ones such as VOne networks with noise.

Every adversarial is checked here rather than trusted: it must lie in [0, 1] and within ``epsilon`` of
its image (plus float slack), and an image counts as robust only if the model classifies it correctly
both clean and after the attack. For a stochastic model that check uses the EoT-averaged model.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..runtime import DEFAULT_BATCH_SIZE, evaluation_mode, predict_labels, resolve_device
from .evaluation import attackable_model, fixed_epsilon_inputs, seeded_torch

VERSIONS = ("standard", "rand")
_NORM_NAMES = {"linf": "Linf", "l2": "L2"}
#: Slack allowed between AutoAttack's perturbation size and epsilon (its projections are float32).
EPSILON_SLACK = 1e-5


def autoattack_robust_accuracy(
    model: nn.Module,
    images,
    labels,
    norm: str,
    epsilon: float | None = None,
    version: str = "standard",
    eot_samples: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    seed: int | None = 0,
) -> float:
    """Fraction of images that AutoAttack at ``epsilon`` (default: the leaderboard budget) cannot flip.

    ``eot_samples`` (stochastic models) sets how many draws the final robust/clean check averages over.
    """
    from pyautoattack import AutoAttack

    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    x, y, epsilon = fixed_epsilon_inputs(images, labels, norm, epsilon)
    device = resolve_device(model, device)
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    with evaluation_mode(model), seeded_torch(seed, device):
        judge = attackable_model(model, x, eot_samples, device)
        clean_ok = predict_labels(judge, x, batch_size, device) == y.numpy()
        if epsilon == 0:
            return float(clean_ok.mean())
        attack = AutoAttack(model, device=device, eps=epsilon, norm=_NORM_NAMES[norm], version=version, seed=seed)
        attack.verbose = False
        # The standard version targets the 9 runner-up classes: fewer when the task has fewer classes.
        with torch.no_grad():
            n_classes = int(judge(x[:1].to(device)).shape[1])
        attack.apgd_targeted.n_target_classes = attack.fab.n_target_classes = min(9, n_classes - 1)
        x_adv, _ = attack.run_standard_evaluation(x.to(device), y.to(device), batch_size=batch_size)
        x_adv = x_adv.detach().to("cpu", torch.float32)
        adv_ok = predict_labels(judge, x_adv.clamp(0, 1), batch_size, device) == y.numpy()
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    valid = (size <= epsilon + EPSILON_SLACK) & (x_adv >= 0).flatten(1).all(1) & (x_adv <= 1).flatten(1).all(1)
    if not bool(valid.all()):
        raise RuntimeError(
            f"AutoAttack returned {int((~valid).sum())} adversarial(s) outside the "
            f"{norm} ball of {epsilon} or the [0, 1] box"
        )
    return float((clean_ok & adv_ok).mean())
