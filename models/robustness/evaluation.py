"""Robustness numbers that need no search: noise accuracy, fixed-epsilon robust accuracy, EoT.

Every function takes a torch ``nn.Module`` mapping (N, 1, H, W) float images in [0, 1] to logits and
plain arrays (numpy or torch) of images and integer labels, and returns numpy values, so the DataJoint
tables that call them stay free of torch bookkeeping. Models are evaluated in ``eval()`` mode (their
previous mode is restored afterwards); stochastic networks such as VOneNet keep their noise on there,
which is why they must be attacked through :class:`ExpectationOverTransformation` (docs/science.md §8).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from ..runtime import DEFAULT_BATCH_SIZE, as_image_tensor, as_label_tensor, evaluation_mode, resolve_device

#: The perturbation budgets the field's leaderboards (RobustBench) report for CIFAR-10.
LEADERBOARD_EPSILONS = {"linf": 8 / 255, "l2": 0.5}

#: Fixed-epsilon budgets per dataset family (images in [0, 1]). CIFAR: the leaderboards' (RobustBench).
#: MNIST: the budgets MNIST robustness papers report (Linf 0.1 to 0.3 after Madry et al. 2018; L2 1.5 and
#: 2.0 after Schott et al. 2019 and Croce & Hein 2020). A CIFAR budget says nothing on MNIST: at Linf 8/255
#: an unregularized demo network keeps over 90% of its digits.
DATASET_EPSILONS = {"cifar": {"linf": (8 / 255,), "l2": (0.5,)}, "mnist": {"linf": (0.1, 0.2, 0.3), "l2": (1.5, 2.0)}}


def dataset_epsilons(dataset: str) -> dict[str, tuple[float, ...]]:
    """The fixed-epsilon budgets, by norm, for ``dataset`` (a Dataset row's name: cifar10, cifar100,
    mnist_demo, ...), chosen by the name's family (its leading letters)."""
    family = re.match(r"[a-z]*", str(dataset).lower()).group(0)
    if family not in DATASET_EPSILONS:
        raise ValueError(
            f"no fixed-epsilon budgets for dataset {dataset!r}; known families: {sorted(DATASET_EPSILONS)}"
        )
    return DATASET_EPSILONS[family]


# ---------------------------------------------------------------------------------------------------
# Gaussian-noise accuracy (paper Fig. 4A)
# ---------------------------------------------------------------------------------------------------


def default_noise_ladder() -> np.ndarray:
    """Noise standard deviations (pixel units, images in [0, 1]) for the Gaussian-noise curve.

    Denser at small sigma, where regularized and plain networks separate, and running to 0.4. A
    grayscale CIFAR-10 network trained without noise is expected near chance (10 %) by sigma 0.2 to
    0.3, when the clipped noise is as strong as the images' own contrast; this is an estimate, not a
    measurement in this repository (no trained baseline existed when it was written), so the ladder
    goes past it to pin the chance end. Extend it if a baseline is still above chance at the top;
    every caller may pass its own ladder.
    """
    return np.array([0.0, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3, 0.4])


@torch.no_grad()
def noise_accuracy(
    model: nn.Module,
    images,
    labels,
    sigmas,
    seed: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Accuracy on ``clip(x + sigma * z, 0, 1)`` for every sigma, ``z ~ N(0, 1)`` per pixel: (S,), or (S, K)
    for a model answering for K networks at once (``group.py``).

    One noise draw ``z`` (from ``seed``, generated on the CPU so the result does not depend on the
    device or the batch size) is shared by all sigmas: common random numbers make the curve smooth in
    sigma and make sigma = 0 exactly the clean accuracy. The model's own stochasticity (VOneNet noise)
    is not seeded here; it comes from torch's global generator.
    """
    x = as_image_tensor(images)
    y = as_label_tensor(labels, len(x))
    sigmas = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    if len(x) == 0:
        raise ValueError("noise accuracy of zero images is undefined")
    if np.any(~np.isfinite(sigmas)) or np.any(sigmas < 0):
        raise ValueError(f"sigmas must be finite and >= 0, got {sigmas}")
    device = resolve_device(model, device)
    unit_noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(seed)))
    correct = None
    with evaluation_mode(model):
        for start in range(0, len(x), batch_size):
            clean = x[start : start + batch_size].to(device)
            noise = unit_noise[start : start + batch_size].to(device)
            target = y[start : start + batch_size].to(device)
            for k, sigma in enumerate(sigmas):
                noisy = (clean + float(sigma) * noise).clamp_(0.0, 1.0)
                predicted = model(noisy).argmax(dim=-1)  # (B,), or (B, K) for K networks at once
                hits = (predicted == target.view(-1, *[1] * (predicted.ndim - 1))).sum(dim=0).cpu().numpy()
                if correct is None:
                    correct = np.zeros((len(sigmas), *hits.shape))
                correct[k] += hits
    return correct / len(x)


# ---------------------------------------------------------------------------------------------------
# stochastic networks
# ---------------------------------------------------------------------------------------------------


class ExpectationOverTransformation(nn.Module):
    """Averages a stochastic network over ``n_samples`` forward passes so gradients see its mean.

    Attacking one noisy forward pass overestimates robustness (the gradient is that of one random
    draw: Athalye et al. 2018, "obfuscated gradients"); the average's gradient is the expected one.
    ``average="logits"`` returns the mean logits; ``average="softmax"`` returns the log of the mean
    class probabilities, which is a valid logit vector (its softmax is the mean softmax) and so plugs
    into cross-entropy and arg-max like any model output. For a deterministic network the logits
    average is the network itself. The draws run as one batch (``n_samples`` copies of the images, each
    copy its own noise), so a draw costs one kernel's share instead of one sequential pass; memory grows
    ``n_samples``-fold, which the caller's batch size accounts for.
    """

    def __init__(self, model: nn.Module, n_samples: int, average: str = "logits"):
        super().__init__()
        if int(n_samples) != n_samples or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        if average not in ("logits", "softmax"):
            raise ValueError(f"average must be 'logits' or 'softmax', got {average!r}")
        self.model = model
        self.n_samples = int(n_samples)
        self.average = average

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.n_samples
        draws = self.model(x.repeat(n, *[1] * (x.ndim - 1)))  # copy k of image i is row k * len(x) + i
        draws = draws.view(n, len(x), *draws.shape[1:])
        if self.average == "logits":
            return draws.mean(dim=0)
        return torch.logsumexp(torch.log_softmax(draws, dim=-1), dim=0) - math.log(n)


class ReducedPrecision(nn.Module):
    """The model run under autocast to ``dtype`` (bfloat16 on CUDA: tensor cores), its logits returned in
    float32. What an attack follows when the worker asks for bf16 (``NEUREG_AMP``); a verdict never uses
    it: every adversarial counts only if the float32 model (its EoT vote, for a stochastic one) misclassifies
    it, so reduced precision can make an attack weaker, never a distance smaller than it is."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x).float()


def gradient_model(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """The module an attack takes gradients of: ``model`` itself (float32), or under autocast to ``dtype``."""
    return model if dtype is None else ReducedPrecision(model, dtype).train(model.training)


@torch.no_grad()
def is_stochastic(model: nn.Module, images, device: str | torch.device | None = None) -> bool:
    """True when two evaluation-mode forward passes on the same images give different logits."""
    x = as_image_tensor(images).to(resolve_device(model, device))
    with evaluation_mode(model):
        return not torch.equal(model(x), model(x))


def attackable_model(
    model: nn.Module, probe_images, eot_samples: int | None, device: str | torch.device | None = None
) -> nn.Module:
    """The network an attack should see: the model itself, or its EoT average when it is stochastic.

    Refuses to attack a stochastic network without EoT, because the resulting numbers would look
    like robustness while measuring gradient noise.
    """
    if eot_samples is None:
        if is_stochastic(model, probe_images[:8], device):
            raise ValueError(
                "the model is stochastic (two forward passes differ); attack it with expectation "
                "over transformation: pass eot_samples"
            )
        return model
    return ExpectationOverTransformation(model, eot_samples).train(model.training)


#: Draws of a stochastic network's EoT average that vote on whether a point is misclassified (majority): the
#: one judge of every attack on a stochastic network, minimal-norm and fixed-epsilon alike.
VOTES = 25


@torch.no_grad()
def misclassified(model: nn.Module, points: torch.Tensor, y: torch.Tensor, votes: int = 1) -> torch.Tensor:
    """Which points a majority of ``votes`` forward passes misclassify (one pass: the model's answer).

    A point leaves the vote once its majority is settled (``votes // 2 + 1`` agreeing passes), so the
    outcome is that of all ``votes`` passes at about half their cost for points far from the boundary."""
    need = votes // 2 + 1
    wrong = torch.zeros(len(points), dtype=torch.int64, device=points.device)
    right = torch.zeros_like(wrong)
    undecided = torch.ones(len(points), dtype=torch.bool, device=points.device)
    for _ in range(votes):
        index = undecided.nonzero().flatten()
        if len(index) == 0:
            break
        missed = (model(points[index]).argmax(dim=1) != y[index]).long()
        wrong[index] += missed
        right[index] += 1 - missed
        undecided = (wrong < need) & (right < need)
    return wrong >= need


def misclassified_in_batches(model: nn.Module, points, labels, votes: int, batch_size: int, device) -> torch.Tensor:
    """``misclassified`` over CPU tensors of any length, ``batch_size`` points at a time: a (N,) bool CPU tensor."""
    out = [
        misclassified(model, points[i : i + batch_size].to(device), labels[i : i + batch_size].to(device), votes).cpu()
        for i in range(0, len(points), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


#: Images per minimal-perturbation attack call on the CPU: what every CPU row was computed with.
CPU_ATTACK_BATCH = 128


@contextlib.contextmanager
def seeded_torch(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's global generators (which foolbox draws from) without disturbing the caller's."""
    if seed is None:
        yield
        return
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(int(seed))
        yield


# ---------------------------------------------------------------------------------------------------
# fixed-epsilon robust accuracy (the leaderboard number)
# ---------------------------------------------------------------------------------------------------


def fixed_epsilon_inputs(images, labels, norm: str, epsilon: float | None):
    """Checked inputs of a fixed-epsilon attack (PGD or AutoAttack): (images, labels, epsilon).

    ``epsilon`` None means the leaderboard budget of ``norm``.
    """
    if norm not in LEADERBOARD_EPSILONS:
        raise ValueError(f"norm must be one of {sorted(LEADERBOARD_EPSILONS)}, got {norm!r}")
    epsilon = LEADERBOARD_EPSILONS[norm] if epsilon is None else float(epsilon)
    if not np.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
    x = as_image_tensor(images)
    y = as_label_tensor(labels, len(x))
    if len(x) == 0:
        raise ValueError("robust accuracy of zero images is undefined")
    return x, y, epsilon


def robust_accuracy(
    model: nn.Module,
    images,
    labels,
    norm: str,
    epsilon: float | None = None,
    steps: int = 40,
    rel_stepsize: float | None = None,
    restarts: int = 1,
    eot_samples: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    seed: int | None = 0,
    gradient_dtype: torch.dtype | None = None,
) -> float:
    """Fraction of images still correctly classified after a PGD attack of size ``epsilon``.

    AutoAttack, the leaderboards' ensemble, is ``autoattack.autoattack_robust_accuracy`` (the robustness
    protocol chooses between the two by its ``method``).

    ``norm`` is "linf" or "l2"; ``epsilon`` defaults to the leaderboard budget (Linf 8/255, L2 0.5).
    The attack is foolbox's PGD with a random start, ``steps`` steps of ``rel_stepsize * epsilon``
    (default 2.5 / steps, Madry et al.'s rule, so the steps can cross the ball and back) and
    ``restarts`` independent random starts; an image counts as robust only if it is clean-correct
    and no restart fools the model. PGD is an upper bound on the true robust accuracy, and a weaker
    one than the AutoAttack ensemble the leaderboards run; the number is comparable between our
    conditions, not with RobustBench entries. Stochastic models need ``eot_samples``: the attack follows
    the EoT average's gradient, and every verdict (clean and attacked) is the majority of ``VOTES`` draws
    of that average, the judge the minimal perturbations use. ``gradient_dtype`` (bf16 on CUDA under
    ``NEUREG_AMP``): the precision of PGD's gradients only; the verdicts are float32.
    """
    x, y, epsilon = fixed_epsilon_inputs(images, labels, norm, epsilon)
    if int(steps) != steps or steps < 1 or int(restarts) != restarts or restarts < 1:
        raise ValueError(f"steps and restarts must be positive integers, got {steps}, {restarts}")
    device = resolve_device(model, device)
    with evaluation_mode(model), seeded_torch(seed, device):
        target = attackable_model(model, x, eot_samples, device)
        votes = 1 if eot_samples is None else VOTES
        wrong = misclassified_in_batches(target, x, y, votes, batch_size, device)
        broken = pgd_breaks(
            target, x, y, norm, epsilon, steps, rel_stepsize, restarts, votes, batch_size, device, wrong
        )
    return float((~wrong & ~broken).float().mean())


def pgd_breaks(
    target: nn.Module,
    x,
    y,
    norm: str,
    epsilon: float,
    steps: int,
    rel_stepsize,
    restarts: int,
    votes: int,
    batch_size: int,
    device,
    settled: torch.Tensor | None = None,
    gradient_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Which images (CPU tensors ``x``, ``y``) some restart of foolbox's PGD moves to a point ``target``
    misclassifies (by a majority of ``votes`` passes): a (N,) bool CPU tensor. ``target`` is the network, or
    its EoT average for a stochastic one; the caller seeds torch and sets evaluation mode. Images marked in
    ``settled`` (already misclassified) need no attack: a batch of only those, or a restart after every
    image of its batch is settled or broken, is skipped (and draws no random start). ``gradient_dtype``: the
    precision PGD's gradients are taken in (``gradient_model``); the verdicts are float32."""
    import foolbox as fb

    rel_stepsize = 2.5 / steps if rel_stepsize is None else float(rel_stepsize)
    attack_class = fb.attacks.LinfPGD if norm == "linf" else fb.attacks.L2PGD
    attack = attack_class(steps=int(steps), rel_stepsize=rel_stepsize, random_start=True)
    fmodel = fb.PyTorchModel(gradient_model(target, gradient_dtype), bounds=(0.0, 1.0), device=device)
    settled = torch.zeros(len(x), dtype=torch.bool) if settled is None else settled
    broken = torch.zeros(len(x), dtype=torch.bool)
    if epsilon == 0:
        return broken
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        done = settled[start : start + batch_size].clone()
        for _ in range(int(restarts)):
            if done.all():
                break
            _, clipped, _ = attack(fmodel, xb, yb, epsilons=epsilon)
            hit = misclassified(target, clipped, yb, votes).cpu()
            broken[start : start + len(xb)] |= hit & ~settled[start : start + len(xb)]
            done |= hit
    return broken
