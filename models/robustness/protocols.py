"""The four robustness evaluations, each one call whose keyword arguments are its table's config.

A robustness table fetches a network and its dataset's test split, calls one ``*_evaluation`` function here
with the row's config and stores what it returns. Each function's keyword arguments with defaults *are*
that table's config (defaults, value rules; ``models.registry``): the config table validates against the
same signature the table calls, so there is no second list of keys. Rules across keys are the function's
``config_rules`` (:func:`~neureg.models.registry.config_rules`). Images are a fixed, seed-chosen subset
of the test split (:func:`evaluation_subset`, ``n_images`` and ``image_seed``), the same for every network.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated

import numpy as np
import torch

from ..registry import NonNegativeInt, PositiveInt, Rule, config_history, config_rules, one_of
from ..runtime import DEFAULT_BATCH_SIZE, accuracy, memory_batch_size
from .attacks import minimal_perturbations, with_cross_checks
from .autoattack import autoattack_robust_accuracy
from .corruptions import CORRUPTIONS, SEVERITIES, corruption_accuracy, load_cifar10c
from .evaluation import (
    CPU_ATTACK_BATCH,
    ExpectationOverTransformation,
    attackable_model,
    default_noise_ladder,
    is_stochastic,
    noise_accuracy,
    robust_accuracy,
    seeded_torch,
)
from .group import NetworkGroup, group_minimal_perturbations

DEFAULT_SIGMAS = [float(s) for s in default_noise_ladder()]
_SIGMA_LIST = Rule(
    "a non-empty list of finite numbers >= 0",
    lambda v: (
        isinstance(v, list)
        and len(v) > 0
        and all(isinstance(s, (int, float)) and not isinstance(s, bool) and np.isfinite(s) and s >= 0 for s in v)
    ),
)
_HASH_LIST = Rule(
    "a non-empty list of AttackConfig hashes (AttackConfig.add(...)['attack_hash'])",
    lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(a, str) for a in v),
)
_HASHES = Rule(
    "a list of AttackConfig hashes (AttackConfig.add(...)['attack_hash']), possibly empty",
    lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v),
)
_EPSILON = Rule(
    "a number in [0, 1000]", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1e3
)
_SEVERITIES = Rule(
    f"a non-empty list drawn from {list(SEVERITIES)}",
    lambda v: isinstance(v, list) and len(v) > 0 and set(v) <= set(SEVERITIES),
)
_NAMES = Rule(
    "a non-empty list of names", lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(n, str) for n in v)
)


def _forward(model):
    """The module to run: the model, or a network group's shared-input view (``group.py``)."""
    return model.shared if isinstance(model, NetworkGroup) else model


def _scored(model, images, device, eot_samples: int):
    """The module accuracy is taken of: a group's shared-input view, the network, or (``eot_samples`` > 1, a
    stochastic network) its EoT average, whose draws run as one batch. Groups hold no stochastic networks."""
    net = _forward(model)
    if eot_samples > 1 and not isinstance(model, NetworkGroup) and is_stochastic(net, images[:8], device):
        return ExpectationOverTransformation(net, eot_samples)
    return net


def _forward_batch(scored, images, device, batch_size: int | None) -> int:
    """Images per forward of ``scored`` (what ``_scored`` returned): ``batch_size``, or when None from the
    device's memory (``runtime.memory_batch_size``; on the CPU the 256 every CPU row was computed with)."""
    return batch_size or memory_batch_size(
        scored, images.shape[1:], len(images), device, cpu_batch=DEFAULT_BATCH_SIZE, gradient=False
    )


def _column(values, k):
    """Network k's numbers out of a group's (..., K) array; the values themselves for one network."""
    return values if k is None else np.asarray(values)[..., k]


def _per_network(model, build: Callable):
    """``build(None)`` for one network; for a ``NetworkGroup`` the list of ``build(k)``, one per network.

    Every evaluation below takes a network or a group: a group returns each network's result, in order,
    equal to what that network gives alone (``group.py``)."""
    return [build(k) for k in range(model.k)] if isinstance(model, NetworkGroup) else build(None)


def evaluation_subset(n_available: int, n_images: int, seed: int) -> np.ndarray:
    """Sorted indices of a fixed, seed-chosen subset of a test split: the same images for every network."""
    if n_images > n_available:
        raise ValueError(f"asked for {n_images} evaluation images; the test split has {n_available}")
    return np.sort(np.random.default_rng(seed).permutation(n_available)[:n_images])


def _subset(images, labels, n_images: int, image_seed: int):
    index = evaluation_subset(len(labels), n_images, image_seed)
    return np.asarray(images)[index], np.asarray(labels)[index]


# ------------------------------------------------------------------------------------------ noise
@config_history(added={"eot_samples": 1})
@config_rules()
def noise_evaluation(
    model,
    test_images,
    test_labels,
    *,
    device,
    sigmas: Annotated[list[float], _SIGMA_LIST] = DEFAULT_SIGMAS,
    n_images: PositiveInt = 1000,
    image_seed: NonNegativeInt = 0,
    noise_seed: NonNegativeInt = 0,
    eot_samples: PositiveInt = 1,
    batch_size: int | None,
) -> dict:
    """Gaussian-noise accuracy: clean accuracy and accuracy at every sigma of the ladder (pixel units, [0, 1]),
    one noise draw scaled to every sigma. A stochastic network's own noise is drawn from ``noise_seed`` too,
    so the row does not depend on what its worker computed before; ``eot_samples`` 1 scores it as it runs
    (one draw per image), n > 1 scores its EoT average over n draws (run as one batch). ``batch_size``
    (images per forward, an execution setting) None: from the device's memory (``_forward_batch``)."""
    images, labels = _subset(test_images, test_labels, n_images, image_seed)
    net = _scored(model, images, device, eot_samples)
    batch = _forward_batch(net, images, device, batch_size)
    with seeded_torch(noise_seed, torch.device(device)):
        sigma = np.asarray(sigmas, dtype=float)
        levels = noise_accuracy(net, images, labels, sigma, seed=noise_seed, batch_size=batch, device=device)
        clean = accuracy(net, images, labels, batch, device=device)
    return _per_network(
        model,
        lambda k: {
            "n_images": len(labels),
            "clean_accuracy": float(_column(clean, k)),
            "levels": [(float(s), float(a)) for s, a in zip(sigmas, _column(levels, k))],
        },
    )


# ------------------------------------------------------------------------------- minimal perturbations
def _perturbation_rules(*, attacks, cross_checks, **_) -> None:
    if not attacks:
        raise ValueError(
            "attacks must be a non-empty list of AttackConfig hashes (AttackConfig.add(...)['attack_hash'])"
        )
    both = sorted(set(attacks) & set(cross_checks))
    if both:
        raise ValueError(f"attack(s) {both} are both primary attacks and cross-checks; name each once")


@config_history(added={"cross_checks": [], "cross_check_images": 100}, retired={"batch_size": 128})
@config_rules(_perturbation_rules)
def perturbation_evaluation(
    model,
    test_images,
    test_labels,
    attack_configs: list[dict],
    cross_check_configs: list[dict],
    *,
    device,
    attacks: Annotated[list, _HASH_LIST] = None,
    cross_checks: Annotated[list, _HASHES] = (),
    cross_check_images: PositiveInt = 100,
    n_images: PositiveInt = 1000,
    image_seed: NonNegativeInt = 0,
    eot_samples: PositiveInt = 8,
    attack_seed: NonNegativeInt = 0,
    batch_size: int | None,
    gradient_dtype: torch.dtype | None,
    progress: Callable[[str], None] | None,
) -> dict:
    """The primary attacks (``attack_configs``, the AttackConfig rows of the hashes ``attacks``) on every
    image, and the cross-checks (``cross_check_configs``, of ``cross_checks``) on the first
    ``cross_check_images`` of them; each image's minimal perturbation is over every attack that ran on it
    (``MinimalPerturbations.summary``), with the labels attacked. The summary's ``attacks`` say how many
    images each attack ran on and how often a cross-check beat the primary set.

    A stochastic network (VOneNet noise) is attacked through its EoT average over ``eot_samples`` passes.
    ``batch_size`` (images per attack call, an execution setting) None: from the device's memory
    (``runtime.memory_batch_size``). ``gradient_dtype`` (execution too): the precision the gradient attacks
    follow, bf16 on CUDA under ``NEUREG_AMP``; every distance is verified on the float32 model.
    """
    images, labels = _subset(test_images, test_labels, n_images, image_seed)
    batch_size = batch_size or _attack_batch(model, images, device, eot_samples, CPU_ATTACK_BATCH)
    start = time.perf_counter()
    hashes = list(attacks) + list(cross_checks)
    m = min(cross_check_images, len(labels))

    def run(x, y, configs):
        return _minimal(model, x, y, configs, device, eot_samples, batch_size, attack_seed, progress, gradient_dtype)

    results = run(images, labels, attack_configs)
    if cross_check_configs:
        checks = run(images[:m], labels[:m], cross_check_configs)
        results = _per_network(model, lambda k: with_cross_checks(_column_of(results, k), _column_of(checks, k)))
    stochastic = not isinstance(model, NetworkGroup) and results.stochastic
    seconds = (time.perf_counter() - start) / (model.k if isinstance(model, NetworkGroup) else 1)
    return _per_network(
        model,
        lambda k: {
            **_column_of(results, k).summary(hashes),
            "stochastic": stochastic,
            "labels": [int(y) for y in labels],
            "attack_seconds": seconds,  # a group's time is shared among its networks
        },
    )


def _attack_batch(model, images, device, eot_samples: int, cpu_batch: int) -> int:
    """Images per attack call for ``model`` (a group's: per network) on ``device`` (``memory_batch_size``)."""
    shape, n = images.shape[1:], len(images)
    if torch.device(device).type != "cuda":  # the CPU's fixed batch: no model to probe
        return memory_batch_size(model, shape, n, device, cpu_batch=cpu_batch, gradient=True)
    single = model.models[0] if isinstance(model, NetworkGroup) else model
    if is_stochastic(single, images[:8], device):
        single = ExpectationOverTransformation(single, eot_samples)
    batch = memory_batch_size(single, shape, n, device, cpu_batch=cpu_batch, gradient=True)
    return max(1, batch // model.k) if isinstance(model, NetworkGroup) else batch


def _column_of(results, k):
    """Network k's result out of a group's list; the result itself for one network."""
    return results if k is None else results[k]


def _minimal(model, images, labels, configs, device, eot_samples, batch_size, seed, progress, gradient_dtype):
    """``minimal_perturbations`` of one network (EoT for a stochastic one), or of every network of a group."""
    if isinstance(model, NetworkGroup):
        return group_minimal_perturbations(model, images, labels, configs, progress, batch_size, seed, gradient_dtype)
    stochastic = is_stochastic(model, images[:8], device)
    return minimal_perturbations(
        model,
        images,
        labels,
        configs,
        device=device,
        eot_samples=eot_samples if stochastic else None,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        gradient_dtype=gradient_dtype,
    )


# ---------------------------------------------------------------------------------- fixed epsilon
@config_rules()
def robust_evaluation(
    model,
    test_images,
    test_labels,
    *,
    device,
    method: Annotated[str, one_of("pgd", "autoattack")] = "pgd",
    norm: Annotated[str, one_of("linf", "l2")] = "linf",
    epsilon: Annotated[float, _EPSILON] = 8 / 255,
    steps: PositiveInt = 40,
    restarts: PositiveInt = 1,
    n_images: PositiveInt = 1000,
    image_seed: NonNegativeInt = 0,
    eot_samples: PositiveInt = 8,
    attack_seed: NonNegativeInt = 0,
    batch_size: int | None,
    gradient_dtype: torch.dtype | None,
) -> dict:
    """Fixed-epsilon robust accuracy: Foolbox PGD (``steps``, ``restarts``), or AutoAttack, the leaderboards'
    number (standard, or rand with EoT for stochastic networks; steps and restarts unused); and the clean
    accuracy of the same (EoT-averaged, for a noisy network) model. ``batch_size``: images per attack call
    (execution, not config; None: from the device's memory, 256 on the CPU as always); ``gradient_dtype``:
    the precision of the attack's steps (execution; the verdicts are float32)."""
    images, labels = _subset(test_images, test_labels, n_images, image_seed)
    eot = eot_samples if is_stochastic(model, images[:8], device) else None
    batch_size = batch_size or _attack_batch(model, images, device, eot_samples, DEFAULT_BATCH_SIZE)
    if method == "autoattack":  # version rand (EoT) for a stochastic network, standard otherwise
        version = "rand" if eot else "standard"
        robust = autoattack_robust_accuracy(
            model, images, labels, norm, epsilon, version, eot, batch_size, device, attack_seed, gradient_dtype
        )
    else:
        robust = robust_accuracy(
            model,
            images,
            labels,
            norm,
            epsilon,
            steps=steps,
            restarts=restarts,
            eot_samples=eot,
            batch_size=batch_size,
            device=device,
            seed=attack_seed,
            gradient_dtype=gradient_dtype,
        )
    with seeded_torch(attack_seed, torch.device(device)):
        clean = accuracy(attackable_model(model, images, eot, device), images, labels, batch_size, device=device)
    return {"n_images": len(labels), "clean_accuracy": float(clean), "robust_accuracy": float(robust)}


# ----------------------------------------------------------------------------------- corruptions
def _corruption_rules(*, source, path, corruptions, **_) -> None:
    if source == "cifar10c" and not path:
        raise ValueError("source 'cifar10c' needs 'path': the extracted CIFAR-10-C folder")
    unknown = sorted(set(corruptions) - set(CORRUPTIONS))
    if source == "builtin" and unknown:
        raise ValueError(f"unknown corruption(s) {unknown}; built in: {sorted(CORRUPTIONS)}")


@config_history(added={"eot_samples": 1})
@config_rules(_corruption_rules)
def corruption_evaluation(
    model,
    test_images,
    test_labels,
    *,
    device,
    source: Annotated[str, one_of("builtin", "cifar10c")] = "builtin",
    path: str = "",
    corruptions: Annotated[list, _NAMES] = tuple(CORRUPTIONS),
    severities: Annotated[list[int], _SEVERITIES] = tuple(SEVERITIES),
    n_images: PositiveInt = 1000,
    image_seed: NonNegativeInt = 0,
    corruption_seed: NonNegativeInt = 0,
    eot_samples: PositiveInt = 1,
    batch_size: int | None,
) -> dict:
    """Common corruptions, computed here ('builtin') or read from CIFAR-10-C files ('cifar10c', grayscale):
    accuracy per corruption and severity, their mean, and the clean accuracy on the same images (a stochastic
    network's noise drawn from ``corruption_seed``, as the corruptions are; ``eot_samples`` and ``batch_size``
    as for noise)."""
    images, labels = _subset(test_images, test_labels, n_images, image_seed)
    net = _scored(model, images, device, eot_samples)
    batch = _forward_batch(net, images, device, batch_size)
    with seeded_torch(corruption_seed, torch.device(device)):
        levels = []
        for name in corruptions:
            for severity in severities:
                if source == "builtin":
                    acc = corruption_accuracy(net, images, labels, name, severity, corruption_seed, batch, device)
                else:
                    x, y = load_cifar10c(path, name, severity)
                    pick = evaluation_subset(len(y), min(n_images, len(y)), image_seed)
                    acc = accuracy(net, x[pick], y[pick], batch, device=device)
                levels.append((name, int(severity), acc))
        clean = accuracy(net, images, labels, batch, device=device)
    return _per_network(
        model,
        lambda k: {
            "n_images": len(labels),
            "clean_accuracy": float(_column(clean, k)),
            "mean_accuracy": float(np.mean([_column(acc, k) for _, _, acc in levels])),
            "levels": [(name, severity, float(_column(acc, k))) for name, severity, acc in levels],
        },
    )
