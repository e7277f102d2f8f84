"""robustness: how much noise, adversarial perturbation and corruption each trained network withstands.

Four computed tables, each keyed by a TrainedNetwork and a config row, so every score names the exact
network (and through it data, target, configs, seed) and the evaluation settings behind it. Each make
fetches the network and its evaluation images (a fixed, seed-chosen subset of the test split), calls one
evaluation in ``models.robustness.protocols`` and stores the result. Stochastic networks (VOneNet noise)
are attacked through expectation over transformation with their noise on.
"""

from __future__ import annotations

import logging

import datajoint as dj
import numpy as np

from ..models.robustness import attack_registry as attacks
from ..models.robustness import protocols
from ..models.runtime import Runtime
from . import training
from ._config import ConfigTable

logger = logging.getLogger("neureg")
schema = dj.Schema()


def activate(prefix: str = "neureg_", *, create_tables: bool = True) -> None:
    """Bind the robustness tables to ``{prefix}robustness`` on the current connection."""
    schema.activate(f"{prefix}robustness", create_tables=create_tables)


def evaluation_images(key: dict, n_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed subset of the network's test split: the same images for every network and condition."""
    dataset = training.Dataset.load(key)
    index = protocols.evaluation_subset(len(dataset.test_y), n_images, seed)
    return dataset.test_x[index], dataset.test_y[index]


def _evaluation_inputs(key: dict, config: dict):
    """(network on the worker's device and layout, evaluation images, labels, device) for one table row."""
    runtime = Runtime.from_env()
    images, labels = evaluation_images(key, config["n_images"], config["image_seed"])
    model = (training.TrainedNetwork & key).load_model(runtime.device, runtime.memory_format)
    return model, images, labels, runtime.device


def _only(config: dict, *names: str) -> dict:
    return {name: config[name] for name in names}


@schema
class NoiseConfig(ConfigTable, dj.Lookup):
    """Gaussian-noise ladder and images (``protocols.noise_settings``)."""

    config_name = "noise"
    settings = staticmethod(protocols.noise_settings)


@schema
class NoiseAccuracy(dj.Computed):
    """Accuracy under additive Gaussian noise at every level of the ladder (Li et al. 2019, Fig. 4)."""

    definition = """
    -> training.TrainedNetwork
    -> NoiseConfig
    ---
    n_images             : int32
    clean_accuracy       : float64
    """

    class Level(dj.Part):
        """One noise level's accuracy."""

        definition = """
        -> master
        level            : int16                    # index on the ladder
        ---
        sigma            : float64                  # noise std, images in [0, 1]
        accuracy         : float64
        """

    def make(self, key):
        config = NoiseConfig.config_of(key)
        model, images, labels, device = _evaluation_inputs(key, config)
        result = protocols.noise_evaluation(model, images, labels, **_only(config, "sigmas", "noise_seed"), device=device)
        self.insert1(dict(key, n_images=len(labels), clean_accuracy=result["clean_accuracy"]))
        self.Level.insert(dict(key, level=i, sigma=s, accuracy=a) for i, (s, a) in enumerate(result["levels"]))


@schema
class AttackConfig(ConfigTable, dj.Lookup):
    """One attack and its hyper-parameters (``models.robustness.attack_registry.ATTACKS``)."""

    config_name = "attack"
    registry = attacks.ATTACKS


@schema
class PerturbationConfig(ConfigTable, dj.Lookup):
    """Which attacks (AttackConfig hashes) on how many images (``protocols.perturbation_settings``)."""

    config_name = "perturbation"
    settings = staticmethod(protocols.perturbation_settings)

    @classmethod
    def check_references(cls, full: dict) -> dict:
        """Every attack hash names an AttackConfig row; the list is sorted, so its order never splits rows."""
        full = {**full, "attacks": sorted(set(full["attacks"]))}
        missing = [h for h in full["attacks"] if not (AttackConfig & {"attack_hash": h})]
        if missing:
            raise ValueError(f"attack hashes not in AttackConfig: {missing}")
        return full


@schema
class MinimalPerturbation(dj.Computed):
    """Per image, the smallest verified adversarial perturbation over attacks; the median is the score.

    Attacks run for minutes to hours on real sizes, so this is a three-part make: no transaction stays
    open while the attacks run.
    """

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

    class Distance(dj.Part):
        """One evaluation image's smallest distance per norm, and the attack that found it."""

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
        """Each attack's own median and success rate: which attacks did the work."""

        definition = """
        -> master
        -> AttackConfig
        ---
        median_distance = null : float64            # this attack alone; null: it broke fewer than half
        success_rate     : float64                  # share of correctly classified images it flipped
        """

    def make_fetch(self, key):
        config = PerturbationConfig.config_of(key)
        return config, [AttackConfig.config_of({"attack_hash": h}) for h in config["attacks"]]

    def make_compute(self, key, config, attack_configs):
        model, images, labels, device = _evaluation_inputs(key, config)
        result = protocols.perturbation_evaluation(
            model, images, labels, attack_configs, config["attacks"], device=device,
            progress=lambda msg: logger.info("  %s", msg), **_only(config, "eot_samples", "batch_size", "attack_seed"))
        return result, [int(y) for y in labels]

    def make_insert(self, key, result, labels):
        self.insert1(dict(key, n_images=len(labels), clean_accuracy=result["clean_accuracy"],
                          stochastic=result["stochastic"], attack_seconds=result["attack_seconds"], **result["medians"]))
        self.Distance.insert(dict(key, image_index=i, label=y, **row)
                             for i, (y, row) in enumerate(zip(labels, result["images"])))
        hashes = PerturbationConfig.config_of(key)["attacks"]
        self.Attack.insert(dict(key, attack_hash=h, **row) for h, row in zip(hashes, result["attacks"]))


@schema
class RobustConfig(ConfigTable, dj.Lookup):
    """Fixed-epsilon attack settings (PGD or AutoAttack): Linf 8/255 and L2 0.5 are what leaderboards report."""

    config_name = "robust"
    settings = staticmethod(protocols.robust_settings)


@schema
class RobustAccuracy(dj.Computed):
    """Share of images still correctly classified under a fixed-epsilon attack."""

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
        model, images, labels, device = _evaluation_inputs(key, config)
        result = protocols.robust_evaluation(model, images, labels, device=device, **_only(
            config, "method", "norm", "epsilon", "steps", "restarts", "eot_samples", "attack_seed"))
        self.insert1(dict(key, n_images=len(labels), **result))


@schema
class CorruptionConfig(ConfigTable, dj.Lookup):
    """Common corruptions: computed here ('builtin') or read from CIFAR-10-C files ('cifar10c', grayscale)."""

    config_name = "corruption"
    settings = staticmethod(protocols.corruption_settings)


@schema
class CorruptionAccuracy(dj.Computed):
    """Accuracy under common corruptions (noise, blur, contrast, JPEG) at five severities."""

    definition = """
    -> training.TrainedNetwork
    -> CorruptionConfig
    ---
    n_images             : int32
    clean_accuracy       : float64
    mean_accuracy        : float64                  # over corruptions and severities
    """

    class Level(dj.Part):
        """One corruption at one severity."""

        definition = """
        -> master
        corruption       : varchar(32)
        severity         : int16
        ---
        accuracy         : float64
        """

    def make(self, key):
        config = CorruptionConfig.config_of(key)
        model, images, labels, device = _evaluation_inputs(key, config)
        result = protocols.corruption_evaluation(model, images, labels, device=device, **_only(
            config, "source", "path", "corruptions", "severities", "n_images", "image_seed", "corruption_seed"))
        levels = result.pop("levels")
        self.insert1(dict(key, n_images=len(labels), **result))
        self.Level.insert(dict(key, corruption=c, severity=s, accuracy=a) for c, s, a in levels)


def add_standard_configs(quick: bool = False, n_images: int | None = None) -> dict:
    """The standard evaluation as config rows; ``quick`` is the CPU demo version (fewer steps, no BB/Boundary,
    robust accuracy by PGD instead of AutoAttack).

    Returns the keys added, by table. The paper's sizes (1000 images, full attack set) need a GPU.
    """
    n = n_images or (100 if quick else 1000)
    attack_keys = [AttackConfig.add(c, label=c["attack"]) for c in attacks.default_attack_configs(quick=quick)]
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
