"""The four robustness evaluations, each one call, with the settings function that is its config.

A robustness table fetches a network and its evaluation images, calls one ``*_evaluation`` function
here and stores what it returns. Each ``*_settings`` function's keyword arguments are that table's config
(defaults, value rules; its body checks rules across keys), validated by ``models.registry``. Images
are a fixed, seed-chosen subset of the test split (:func:`evaluation_subset`), the same for every network.
"""

from __future__ import annotations

import time
from typing import Annotated, Callable

import numpy as np
import torch

from ..registry import NonNegativeInt, PositiveInt, Rule, one_of
from . import attacks as atk
from . import corruptions as corr
from . import evaluation as rob

DEFAULT_SIGMAS = [float(s) for s in rob.default_noise_ladder()]
_SIGMA_LIST = Rule("a non-empty list of finite numbers >= 0",
                   lambda v: isinstance(v, list) and len(v) > 0 and all(
                       isinstance(s, (int, float)) and not isinstance(s, bool) and np.isfinite(s) and s >= 0 for s in v))
_HASH_LIST = Rule("a non-empty list of AttackConfig hashes (AttackConfig.add(...)['attack_hash'])",
                  lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(a, str) for a in v))
_EPSILON = Rule("a number in [0, 1000]", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                and 0 <= v <= 1e3)
_SEVERITIES = Rule(f"a non-empty list drawn from {list(corr.SEVERITIES)}",
                   lambda v: isinstance(v, list) and len(v) > 0 and set(v) <= set(corr.SEVERITIES))
_NAMES = Rule("a non-empty list of names", lambda v: isinstance(v, list) and len(v) > 0
              and all(isinstance(n, str) for n in v))


def evaluation_subset(n_available: int, n_images: int, seed: int) -> np.ndarray:
    """Sorted indices of a fixed, seed-chosen subset of a test split: the same images for every network."""
    if n_images > n_available:
        raise ValueError(f"asked for {n_images} evaluation images; the test split has {n_available}")
    return np.sort(np.random.default_rng(seed).permutation(n_available)[:n_images])


# ------------------------------------------------------------------------------------------ noise
def noise_settings(sigmas: Annotated[list, _SIGMA_LIST] = DEFAULT_SIGMAS, n_images: PositiveInt = 1000,
                   image_seed: NonNegativeInt = 0, noise_seed: NonNegativeInt = 0) -> None:
    """Gaussian-noise accuracy: one noise draw scaled to every sigma of the ladder (pixel units, [0, 1])."""


def noise_evaluation(model, images, labels, *, sigmas, noise_seed: int, device) -> dict:
    """Clean accuracy and accuracy at every sigma. A stochastic network's own noise is drawn from
    ``noise_seed`` too, so the row does not depend on what its worker computed before."""
    with rob.seeded_torch(noise_seed, torch.device(device)):
        accuracy = rob.noise_accuracy(model, images, labels, np.asarray(sigmas, dtype=float), seed=noise_seed,
                                      device=device)
        clean = rob.accuracy(model, images, labels, device=device)
    return {"clean_accuracy": float(clean), "levels": [(float(s), float(a)) for s, a in zip(sigmas, accuracy)]}


# ------------------------------------------------------------------------------- minimal perturbations
def perturbation_settings(attacks: Annotated[list, _HASH_LIST] = None, n_images: PositiveInt = 1000,
                          image_seed: NonNegativeInt = 0, eot_samples: PositiveInt = 8,
                          attack_seed: NonNegativeInt = 0, batch_size: PositiveInt = 128) -> None:
    """Which attacks (AttackConfig hashes) on how many images; the minimal perturbation is over all of them."""
    if not attacks:
        raise ValueError("attacks must be a non-empty list of AttackConfig hashes (AttackConfig.add(...)['attack_hash'])")


def perturbation_evaluation(model, images, labels, attack_configs: list[dict], attack_ids: list[str], *,
                            eot_samples: int, batch_size: int, attack_seed: int, device,
                            progress: Callable[[str], None] | None = None) -> dict:
    """Every attack on every image; the summary a table keeps (``MinimalPerturbations.summary``).

    A stochastic network (VOneNet noise) is attacked through its EoT average over ``eot_samples`` passes.
    """
    stochastic = rob.is_stochastic(model, images[:8], device)
    start = time.perf_counter()
    result = atk.minimal_perturbations(model, images, labels, attack_configs, device=device,
                                       eot_samples=eot_samples if stochastic else None, batch_size=batch_size,
                                       seed=attack_seed, progress=progress)
    return {**result.summary(attack_ids), "stochastic": bool(stochastic),
            "attack_seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------- fixed epsilon
def robust_settings(method: Annotated[str, one_of("pgd", "autoattack")] = "pgd",
                    norm: Annotated[str, one_of("linf", "l2")] = "linf",
                    epsilon: Annotated[float, _EPSILON] = 8 / 255, steps: PositiveInt = 40,
                    restarts: PositiveInt = 1, n_images: PositiveInt = 1000, image_seed: NonNegativeInt = 0,
                    eot_samples: PositiveInt = 8, attack_seed: NonNegativeInt = 0) -> None:
    """Fixed-epsilon robust accuracy: Foolbox PGD (``steps``, ``restarts``), or AutoAttack, the leaderboards'
    number (standard, or rand with EoT for stochastic networks; steps and restarts unused)."""


def robust_evaluation(model, images, labels, *, method: str, norm: str, epsilon: float, steps: int,
                      restarts: int, eot_samples: int, attack_seed: int, device) -> dict:
    """Robust accuracy, and the clean accuracy of the same (EoT-averaged, for a noisy network) model."""
    eot = eot_samples if rob.is_stochastic(model, images[:8], device) else None
    robust = rob.robust_accuracy(model, images, labels, norm, epsilon, steps=steps, restarts=restarts,
                                 eot_samples=eot, device=device, seed=attack_seed, method=method)
    with rob.seeded_torch(attack_seed, torch.device(device)):
        clean = rob.accuracy(rob.attackable_model(model, images, eot, device), images, labels, device=device)
    return {"clean_accuracy": float(clean), "robust_accuracy": float(robust)}


# ----------------------------------------------------------------------------------- corruptions
def corruption_settings(source: Annotated[str, one_of("builtin", "cifar10c")] = "builtin", path: str = "",
                        corruptions: Annotated[list, _NAMES] = list(corr.CORRUPTIONS),
                        severities: Annotated[list, _SEVERITIES] = list(corr.SEVERITIES),
                        n_images: PositiveInt = 1000, image_seed: NonNegativeInt = 0,
                        corruption_seed: NonNegativeInt = 0) -> None:
    """Common corruptions: computed here ('builtin') or read from CIFAR-10-C files ('cifar10c', grayscale)."""
    if source == "cifar10c" and not path:
        raise ValueError("source 'cifar10c' needs 'path': the extracted CIFAR-10-C folder")
    unknown = sorted(set(corruptions) - set(corr.CORRUPTIONS))
    if source == "builtin" and unknown:
        raise ValueError(f"unknown corruption(s) {unknown}; built in: {sorted(corr.CORRUPTIONS)}")


def corruption_evaluation(model, images, labels, *, source: str, path: str, corruptions: list[str],
                          severities: list[int], n_images: int, image_seed: int, corruption_seed: int,
                          device) -> dict:
    """Accuracy per corruption and severity, their mean, and the clean accuracy on the same images
    (a stochastic network's noise drawn from ``corruption_seed``, as the corruptions are)."""
    with rob.seeded_torch(corruption_seed, torch.device(device)):
        levels = []
        for name in corruptions:
            for severity in severities:
                if source == "builtin":
                    acc = corr.corruption_accuracy(model, images, labels, name, severity, seed=corruption_seed,
                                                   device=device)
                else:
                    x, y = corr.load_cifar10c(path, name, severity)
                    pick = evaluation_subset(len(y), min(n_images, len(y)), image_seed)
                    acc = rob.accuracy(model, x[pick], y[pick], device=device)
                levels.append((name, int(severity), float(acc)))
        return {"clean_accuracy": float(rob.accuracy(model, images, labels, device=device)),
                "mean_accuracy": float(np.mean([acc for _, _, acc in levels])), "levels": levels}
