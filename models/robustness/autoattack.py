"""Fixed-epsilon robust accuracy with AutoAttack (Croce & Hein 2020), the number leaderboards report.

Wraps ``pyautoattack`` 0.2.0, a packaging of the reference implementation whose interface differs from
upstream's: keyword-only ``batch_size=`` and a returned pair ``(x_adv, y_adv)``. Version ``standard``
(APGD-CE, APGD-T, FAB-T, Square) is for deterministic networks; version ``rand`` (APGD-CE and APGD-DLR
with 20-sample expectation over transformation) for stochastic ones such as VOne networks with noise.

Every adversarial is checked here rather than trusted: it must lie in [0, 1] and within ``epsilon`` of
its image (plus float slack), and an image counts as robust only if the model classifies it correctly
both clean and after the attack.

Stochastic models are judged as the minimal perturbations judge them: a point is misclassified when a
majority of ``VOTES`` draws of the EoT average misclassify it. AutoAttack itself decides on one noisy
forward pass, and stops attacking an image as soon as one draw misclassifies its current point (so does
the reference code it packages), often a point the EoT average still classifies correctly. Such an image was saved by
one lucky draw, not by the network. And on noisy logits AutoAttack's own steps can fail where PGD on the
EoT average succeeds (its step-size control reads the noise). So every image the vote still calls correct
after AutoAttack is attacked again, by PGD on the EoT average judged by the same vote
(``evaluation.pgd_breaks``, ``REATTACK_STEPS``), and counts as robust only if both attacks fail.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..runtime import DEFAULT_BATCH_SIZE, evaluation_mode, resolve_device
from .evaluation import (
    VOTES,
    attackable_model,
    fixed_epsilon_inputs,
    gradient_model,
    misclassified_in_batches,
    pgd_breaks,
    seeded_torch,
)

VERSIONS = ("standard", "rand")
logger = logging.getLogger("neureg")
_NORM_NAMES = {"linf": "Linf", "l2": "L2"}
#: Steps of the PGD that attacks again an image one lucky noise draw saved from AutoAttack (module notes).
REATTACK_STEPS = 100
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
    gradient_dtype: torch.dtype | None = None,
) -> float:
    """Fraction of images that AutoAttack at ``epsilon`` (default: the leaderboard budget) cannot flip.

    ``eot_samples`` (stochastic models): the EoT average the verdicts vote with, and through which every
    image still standing after AutoAttack is attacked again (module notes). ``gradient_dtype`` (bf16 on CUDA
    under ``NEUREG_AMP``): the precision AutoAttack runs the model in; the verdicts are float32.
    """
    from pyautoattack import AutoAttack

    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    x, y, epsilon = fixed_epsilon_inputs(images, labels, norm, epsilon)
    device = resolve_device(model, device)
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    votes = 1 if eot_samples is None else VOTES
    with evaluation_mode(model), seeded_torch(seed, device):
        judge = attackable_model(model, x, eot_samples, device)
        clean_ok = ~misclassified_in_batches(judge, x, y, votes, batch_size, device)
        if epsilon == 0:
            return float(clean_ok.float().mean())
        attacked = gradient_model(model, gradient_dtype)  # AutoAttack's own steps; the verdicts are float32
        attack = AutoAttack(attacked, device=device, eps=epsilon, norm=_NORM_NAMES[norm], version=version, seed=seed)
        attack.verbose = False
        # The standard version targets the 9 runner-up classes: fewer when the task has fewer classes.
        with torch.no_grad():
            n_classes = int(judge(x[:1].to(device)).shape[1])
        attack.apgd_targeted.n_target_classes = attack.fab.n_target_classes = min(9, n_classes - 1)
        x_adv, y_adv = attack.run_standard_evaluation(x.to(device), y.to(device), batch_size=batch_size)
        x_adv = x_adv.detach().to("cpu", torch.float32)
        broken = misclassified_in_batches(judge, x_adv.clamp(0, 1), y, votes, batch_size, device)
        if eot_samples is not None:
            broken |= _attack_survivors_again(
                judge, x, y, clean_ok & ~broken, y_adv.cpu() != y, norm, epsilon, batch_size, device, gradient_dtype
            )
    _check_inside_budget(x, x_adv, norm, epsilon)
    return float((clean_ok & ~broken).float().mean())


def _attack_survivors_again(
    judge, x, y, survivors, claimed, norm, epsilon, batch_size, device, gradient_dtype
) -> torch.Tensor:
    """Which of a stochastic network's ``survivors`` of AutoAttack (images the vote still calls correct) PGD on
    the EoT average breaks, by the same vote: a (N,) bool CPU tensor (False outside the survivors). Two kinds
    survive: those AutoAttack stopped on at a point one draw misclassified (``claimed``: saved by luck), and
    those its single-draw steps never broke (on noisy logits APGD's step-size control reads noise)."""
    broken = torch.zeros(len(x), dtype=torch.bool)
    index = survivors.nonzero().flatten()
    if len(index):
        broken[index] = pgd_breaks(
            judge,
            x[index],
            y[index],
            norm,
            epsilon,
            REATTACK_STEPS,
            None,
            1,
            VOTES,
            batch_size,
            device,
            None,
            gradient_dtype,
        )
    logger.info(
        "AutoAttack on a stochastic network: %d of %d images survived the EoT vote (%d of them saved by one lucky "
        "draw); PGD-%d on the EoT average broke %d",
        len(index),
        len(x),
        int((survivors & claimed).sum()),
        REATTACK_STEPS,
        int(broken.sum()),
    )
    return broken


def _check_inside_budget(x, x_adv, norm: str, epsilon: float) -> None:
    """AutoAttack's points are checked, not trusted: inside the epsilon ball (plus float slack) and the box."""
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    valid = (size <= epsilon + EPSILON_SLACK) & (x_adv >= 0).flatten(1).all(1) & (x_adv <= 1).flatten(1).all(1)
    if not bool(valid.all()):
        raise RuntimeError(
            f"AutoAttack returned {int((~valid).sum())} adversarial(s) outside the "
            f"{norm} ball of {epsilon} or the [0, 1] box"
        )
