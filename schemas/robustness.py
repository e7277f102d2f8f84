"""robustness: how much noise, adversarial perturbation and corruption each trained network withstands.

Four computed tables, each keyed by a TrainedNetwork and a config row, so every score names the exact
network (and through it data, target, configs, seed) and the evaluation settings behind it. Evaluation
images are a fixed, seed-chosen subset of the dataset's test split. Stochastic networks (VOneNet noise)
are attacked through expectation over transformation with their noise on.
"""

from __future__ import annotations

import logging
import time

import datajoint as dj
import numpy as np
import torch

from ..models.robustness import attacks as atk
from ..models.robustness import corruptions as corr
from ..models.robustness import evaluation as rob
from ..models.runtime import default_device
from . import training
from ._config import ConfigTable

logger = logging.getLogger("neureg")
schema = dj.Schema()
POPULATE_ORDER = ("NoiseAccuracy", "MinimalPerturbation", "RobustAccuracy", "CorruptionAccuracy")


def activate(prefix: str = "neureg_", *, create_tables: bool = True) -> None:
    schema.activate(f"{prefix}robustness", create_tables=create_tables)


def evaluation_images(key: dict, n_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed subset of the network's test split: the same images for every network and condition."""
    dataset = training.Dataset.load(key)
    n = len(dataset.test_y)
    if n_images > n:
        raise ValueError(f"asked for {n_images} evaluation images; the {dataset.name} test split has {n}")
    index = np.sort(np.random.default_rng(seed).permutation(n)[:n_images])
    return dataset.test_x[index], dataset.test_y[index]


def _network(key: dict):
    device = default_device()
    model = (training.TrainedNetwork & key).load_model(device)
    return model, device


def _positive_int(config: dict, name: str) -> None:
    value = config[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# ------------------------------------------------------------------------------------------ noise
def default_noise_config() -> dict:
    return {"sigmas": rob.default_noise_ladder().tolist(), "n_images": 1000, "image_seed": 0, "noise_seed": 0}


def _validate_noise(config: dict) -> None:
    _positive_int(config, "n_images")
    sigmas = np.asarray(config["sigmas"], dtype=float)
    if sigmas.ndim != 1 or sigmas.size == 0 or np.any(~np.isfinite(sigmas)) or np.any(sigmas < 0):
        raise ValueError(f"sigmas must be a non-empty list of finite numbers >= 0, got {config['sigmas']!r}")


@schema
class NoiseConfig(ConfigTable, dj.Lookup):
    definition = """
    noise_hash           : char(32)
    ---
    noise_config         : json
    noise_label = ''     : varchar(64)
    """
    config_name = "noise"
    default_config = staticmethod(default_noise_config)
    validate_config = staticmethod(_validate_noise)


@schema
class NoiseAccuracy(dj.Computed):
    definition = """
    -> training.TrainedNetwork
    -> NoiseConfig
    ---
    n_images             : int32
    clean_accuracy       : float64
    """

    class Level(dj.Part):
        definition = """
        -> master
        level            : int16                    # index on the ladder
        ---
        sigma            : float64                  # noise std, images in [0, 1]
        accuracy         : float64
        """

    def make(self, key):
        config = NoiseConfig.config_of(key)
        images, labels = evaluation_images(key, config["n_images"], config["image_seed"])
        model, device = _network(key)
        sigmas = np.asarray(config["sigmas"], dtype=float)
        accuracy = rob.noise_accuracy(model, images, labels, sigmas, seed=config["noise_seed"], device=device)
        clean = rob.accuracy(model, images, labels, device=device)
        self.insert1(dict(key, n_images=len(labels), clean_accuracy=float(clean)))
        self.Level.insert(
            dict(key, level=i, sigma=float(s), accuracy=float(a)) for i, (s, a) in enumerate(zip(sigmas, accuracy))
        )


# ------------------------------------------------------------------------------------ adversarial
@schema
class AttackConfig(ConfigTable, dj.Lookup):
    """One attack and its hyper-parameters (models.attacks.ATTACKS lists them with their defaults)."""

    definition = """
    attack_hash          : char(32)
    ---
    attack_config        : json
    attack_label = ''    : varchar(64)
    """
    config_name = "attack"

    @staticmethod
    def default_config() -> dict:
        return {"attack": "linf_pgd"}

    @classmethod
    def complete(cls, config=None, **overrides) -> dict:
        given = {**(config or {}), **overrides}
        if "attack" not in given:
            raise ValueError(f"an attack config names its 'attack', one of {sorted(atk.ATTACKS)}")
        return atk.validate_attack_config(given)


def default_perturbation_config() -> dict:
    return {"attacks": [], "n_images": 1000, "image_seed": 0, "eot_samples": 8, "attack_seed": 0, "batch_size": 128}


def _validate_perturbation(config: dict) -> None:
    for name in ("n_images", "eot_samples", "batch_size"):
        _positive_int(config, name)
    attacks = config["attacks"]
    if not isinstance(attacks, list) or not attacks or not all(isinstance(a, str) for a in attacks):
        raise ValueError("attacks must be a non-empty list of AttackConfig hashes (AttackConfig.add(...)['attack_hash'])")


@schema
class PerturbationConfig(ConfigTable, dj.Lookup):
    """Which attacks (AttackConfig hashes) on how many images: the minimal perturbation is over all of them."""

    definition = """
    perturbation_hash    : char(32)
    ---
    perturbation_config  : json
    perturbation_label = '' : varchar(64)
    """
    config_name = "perturbation"
    default_config = staticmethod(default_perturbation_config)
    validate_config = staticmethod(_validate_perturbation)

    @classmethod
    def complete(cls, config=None, **overrides) -> dict:
        full = super().complete(config, **overrides)
        full["attacks"] = sorted(set(full["attacks"]))
        missing = [h for h in full["attacks"] if not (AttackConfig & {"attack_hash": h})]
        if missing:
            raise ValueError(f"attack hashes not in AttackConfig: {missing}")
        return full


@schema
class MinimalPerturbation(dj.Computed):
    """Per image, the smallest verified adversarial perturbation over attacks; the median is the score."""

    definition = """
    -> training.TrainedNetwork
    -> PerturbationConfig
    ---
    n_images             : int32
    clean_accuracy       : float64
    median_linf = null   : float64                  # null: no Linf attack configured, or most images unbroken
    median_l2 = null     : float64
    stochastic           : bool                     # attacked through EoT with noise on
    attack_seconds       : float64
    """

    class Image(dj.Part):
        definition = """
        -> master
        image_index      : int32                    # position in the evaluation subset
        ---
        label            : int16
        clean_correct    : bool
        linf = null      : float64                  # min over Linf attacks; null: none succeeded
        l2 = null        : float64
        linf_attack = '' : char(32)                 # attack_hash that achieved it
        l2_attack = ''   : char(32)
        """

    class Attack(dj.Part):
        definition = """
        -> master
        -> AttackConfig
        ---
        median_distance = null : float64            # this attack alone; null: it broke fewer than half
        success_rate     : float64                  # share of correctly classified images it flipped
        """

    def make_fetch(self, key):
        config = PerturbationConfig.config_of(key)
        attack_configs = [AttackConfig.config_of({"attack_hash": h}) for h in config["attacks"]]
        return config, attack_configs

    def make_compute(self, key, config, attack_configs):
        images, labels = evaluation_images(key, config["n_images"], config["image_seed"])
        model, device = _network(key)
        stochastic = rob.is_stochastic(model, images[:8], device)
        start = time.perf_counter()
        result = atk.minimal_perturbations(
            model, images, labels, attack_configs, device=device, eot_samples=config["eot_samples"] if stochastic else None,
            batch_size=config["batch_size"], seed=config["attack_seed"], progress=lambda msg: logger.info("  %s", msg),
        )
        return result, labels, stochastic, time.perf_counter() - start

    def make_insert(self, key, result, labels, stochastic, seconds):
        config = PerturbationConfig.config_of(key)
        medians, best = {}, {}
        for norm in ("linf", "l2"):
            if norm in result.norms:
                distance, index = result.best(norm)
                best[norm] = (distance, index)
                medians[f"median_{norm}"] = _finite_or_null(result.median(norm))
        self.insert1(dict(key, n_images=len(labels), clean_accuracy=float(result.clean_correct.mean()),
                          stochastic=bool(stochastic), attack_seconds=float(seconds), **medians))
        hashes = config["attacks"]
        rows = []
        for i, label in enumerate(labels):
            row = dict(key, image_index=i, label=int(label), clean_correct=bool(result.clean_correct[i]))
            for norm, (distance, index) in best.items():
                row[norm] = _finite_or_null(distance[i])
                row[f"{norm}_attack"] = hashes[index[i]] if index[i] >= 0 else ""
            rows.append(row)
        self.Image.insert(rows)
        correct = result.clean_correct
        self.Attack.insert(
            dict(key, attack_hash=h, median_distance=_finite_or_null(atk.median_perturbation(result.distances[c])),
                 success_rate=float(np.isfinite(result.distances[c][correct]).mean()) if correct.any() else 0.0)
            for c, h in enumerate(hashes)
        )


def _finite_or_null(value) -> float | None:
    """Databases store no infinity (MySQL refuses it): 'no attack succeeded' is stored as null.

    In a median, a failed image still counts as larger than every found distance (``median_perturbation``).
    """
    value = float(value)
    return value if np.isfinite(value) else None


# ---------------------------------------------------------------------------------- fixed epsilon
def default_robust_config() -> dict:
    # method "pgd": foolbox PGD (steps, restarts); "autoattack": AutoAttack standard, or rand (EoT) for
    # stochastic networks (steps and restarts unused).
    return {"method": "pgd", "norm": "linf", "epsilon": 8 / 255, "steps": 40, "restarts": 1, "n_images": 1000,
            "image_seed": 0, "eot_samples": 8, "attack_seed": 0}


def _validate_robust(config: dict) -> None:
    if config["method"] not in ("pgd", "autoattack"):
        raise ValueError(f"method must be 'pgd' or 'autoattack', got {config['method']!r}")
    if config["norm"] not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {config['norm']!r}")
    if not isinstance(config["epsilon"], (int, float)) or not 0 <= config["epsilon"] <= 1e3:
        raise ValueError(f"epsilon must be a number >= 0, got {config['epsilon']!r}")
    for name in ("steps", "restarts", "n_images", "eot_samples"):
        _positive_int(config, name)


@schema
class RobustConfig(ConfigTable, dj.Lookup):
    """Fixed-epsilon attack settings (PGD or AutoAttack): Linf 8/255 and L2 0.5 are what leaderboards report."""

    definition = """
    robust_hash          : char(32)
    ---
    robust_config        : json
    robust_label = ''    : varchar(64)
    """
    config_name = "robust"
    default_config = staticmethod(default_robust_config)
    validate_config = staticmethod(_validate_robust)


@schema
class RobustAccuracy(dj.Computed):
    definition = """
    -> training.TrainedNetwork
    -> RobustConfig
    ---
    n_images             : int32
    clean_accuracy       : float64
    robust_accuracy      : float64
    """

    def make(self, key):
        config = RobustConfig.config_of(key)
        images, labels = evaluation_images(key, config["n_images"], config["image_seed"])
        model, device = _network(key)
        eot = config["eot_samples"] if rob.is_stochastic(model, images[:8], device) else None
        robust = rob.robust_accuracy(model, images, labels, config["norm"], config["epsilon"], steps=config["steps"],
                                     restarts=config["restarts"], eot_samples=eot, device=device,
                                     seed=config["attack_seed"], method=config["method"])
        # clean accuracy of the same (EoT-averaged, for a noisy network) model the attack saw
        with rob.seeded_torch(config["attack_seed"], torch.device(device)):
            clean = rob.accuracy(rob.attackable_model(model, images, eot, device), images, labels, device=device)
        self.insert1(dict(key, n_images=len(labels), clean_accuracy=float(clean), robust_accuracy=float(robust)))


# ----------------------------------------------------------------------------------- corruptions
def default_corruption_config() -> dict:
    return {"source": "builtin", "path": "", "corruptions": list(corr.CORRUPTIONS), "severities": [1, 2, 3, 4, 5],
            "n_images": 1000, "image_seed": 0, "corruption_seed": 0}


def _validate_corruption(config: dict) -> None:
    if config["source"] not in ("builtin", "cifar10c"):
        raise ValueError(f"source must be 'builtin' or 'cifar10c', got {config['source']!r}")
    if config["source"] == "cifar10c" and not config["path"]:
        raise ValueError("source 'cifar10c' needs 'path': the extracted CIFAR-10-C folder")
    if config["source"] == "builtin":
        unknown = sorted(set(config["corruptions"]) - set(corr.CORRUPTIONS))
        if unknown:
            raise ValueError(f"unknown corruption(s) {unknown}; built in: {sorted(corr.CORRUPTIONS)}")
    bad = sorted(set(config["severities"]) - set(corr.SEVERITIES))
    if bad or not config["severities"] or not config["corruptions"]:
        raise ValueError(f"severities must be a non-empty subset of {list(corr.SEVERITIES)}; corruptions non-empty")
    _positive_int(config, "n_images")


@schema
class CorruptionConfig(ConfigTable, dj.Lookup):
    """Common corruptions: computed here ('builtin') or read from CIFAR-10-C files ('cifar10c', grayscale)."""

    definition = """
    corruption_hash      : char(32)
    ---
    corruption_config    : json
    corruption_label = '' : varchar(64)
    """
    config_name = "corruption"
    default_config = staticmethod(default_corruption_config)
    validate_config = staticmethod(_validate_corruption)


@schema
class CorruptionAccuracy(dj.Computed):
    definition = """
    -> training.TrainedNetwork
    -> CorruptionConfig
    ---
    n_images             : int32
    clean_accuracy       : float64
    mean_accuracy        : float64                  # over corruptions and severities
    """

    class Level(dj.Part):
        definition = """
        -> master
        corruption       : varchar(32)
        severity         : int16
        ---
        accuracy         : float64
        """

    def make(self, key):
        config = CorruptionConfig.config_of(key)
        model, device = _network(key)
        images, labels = evaluation_images(key, config["n_images"], config["image_seed"])
        levels = []
        for name in config["corruptions"]:
            for severity in config["severities"]:
                if config["source"] == "builtin":
                    acc = corr.corruption_accuracy(model, images, labels, name, severity,
                                                   seed=config["corruption_seed"], device=device)
                else:
                    x, y = corr.load_cifar10c(config["path"], name, severity)
                    pick = np.sort(np.random.default_rng(config["image_seed"]).permutation(len(y))[: config["n_images"]])
                    acc = rob.accuracy(model, x[pick], y[pick], device=device)
                levels.append(dict(key, corruption=name, severity=int(severity), accuracy=float(acc)))
        clean = rob.accuracy(model, images, labels, device=device)
        self.insert1(dict(key, n_images=len(labels), clean_accuracy=float(clean),
                          mean_accuracy=float(np.mean([lv["accuracy"] for lv in levels]))))
        self.Level.insert(levels)


def add_standard_configs(quick: bool = False, n_images: int | None = None) -> dict:
    """The standard evaluation as config rows; ``quick`` is the CPU demo version (fewer steps, no BB/Boundary,
    robust accuracy by PGD instead of AutoAttack).

    Returns the keys added, by table. The paper's sizes (1000 images, full attack set) need a GPU.
    """
    n = n_images or (100 if quick else 1000)
    attack_keys = [AttackConfig.add(c, label=c["attack"]) for c in atk.default_attack_configs(quick=quick)]
    steps = 10 if quick else 40
    method = "pgd" if quick else "autoattack"  # AutoAttack is the leaderboards' number; PGD the quick one
    return {
        "noise": NoiseConfig.add(n_images=n, label="ladder"),
        "perturbation": PerturbationConfig.add(attacks=[k["attack_hash"] for k in attack_keys], n_images=min(n, 50) if quick else n,
                                               eot_samples=4 if quick else 8, label="quick" if quick else "paper"),
        "robust_linf": RobustConfig.add(method=method, norm="linf", epsilon=8 / 255, steps=steps, n_images=n,
                                        label=f"{method} linf 8/255"),
        "robust_l2": RobustConfig.add(method=method, norm="l2", epsilon=0.5, steps=steps, n_images=n,
                                      label=f"{method} l2 0.5"),
        "corruption": CorruptionConfig.add(n_images=n, label="builtin"),
        "attacks": attack_keys,
    }
