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

from ..database.transaction import transaction
from ..models.robustness import protocols
from ..models.robustness.attack_registry import ATTACKS, PRIMARY_ATTACKS, default_attack_configs
from ..models.robustness.evaluation import dataset_epsilons, is_stochastic
from ..models.robustness.group import NetworkGroup
from ..models.runtime import Runtime, group_size
from . import training
from ._config import ConfigTable, activator

logger = logging.getLogger("neureg")
schema = dj.Schema()
activate = activator(schema, "robustness")


def _evaluation_inputs(key: dict) -> tuple:
    """(network on the worker's device and layout, its dataset's test images and labels, device) for one row;
    each evaluation picks its fixed subset of the test split from its config (``n_images``, ``image_seed``)."""
    runtime = Runtime.from_env()
    dataset = training.Dataset.load(key)
    model = (training.TrainedNetwork & key).load_model(runtime.device, runtime.memory_format)
    return model, dataset.test_x, dataset.test_y, runtime.device


def _with_forward_batch(protocol):
    """``protocol`` (noise or corruption accuracy) with the worker's images per forward: NEUREG_EVAL_BATCH,
    or from the device's memory when unset (``models.runtime.memory_batch_size``)."""

    def evaluate(model, images, labels, *, device, **config):
        batch_size = Runtime.from_env().eval_batch_size or None
        return protocol(model, images, labels, device=device, batch_size=batch_size, **config)

    return staticmethod(evaluate)


def _score_of(config: str, columns: str = "") -> str:
    """The definition of a score of one trained network under one row of ``config``: keyed by both, with the
    number of images it used and the clean accuracy on them, then the table's own ``columns``."""
    return f"""
    -> training.TrainedNetwork
    -> {config}
    ---
    n_images             : int32
    clean_accuracy       : float64
    {columns}
    """


class GroupEvaluation:
    """Several networks of one architecture evaluated as one fused model (``models/robustness/group.py``):
    the group members that ``populate/groups.py`` asks of a table. Each table names its ``evaluate`` (a
    protocol taking a network or a ``NetworkGroup``), its ``config_table`` and its ``store``; each
    network's rows go in their own transaction, equal to what its own make stores. Stochastic (VOne)
    networks and fixed-epsilon attacks are evaluated one at a time (``RobustAccuracy``: AutoAttack and
    PGD draw random starts per batch, so a bigger batch would change their numbers)."""

    @classmethod
    def group_key(cls, key: dict) -> tuple:
        hash_name = f"{cls.config_table.config_name}_hash"
        return key["dataset"], key["network_hash"], key[hash_name]

    @staticmethod
    def group_limit(key: dict, runtime: Runtime) -> int:
        network = training.NetworkConfig.config_of(key)
        return 1 if network.get("arch", "").startswith("vone") else group_size(runtime, network)

    def make_group(self, keys: list[dict], on_outcome=None) -> list[Exception | None]:
        """Evaluate ``keys`` (one ``group_key``) as one group; per key None (stored) or its exception."""
        outcomes: list[Exception | None] = [None] * len(keys)
        runtime, models, placed = Runtime.from_env(), [], []
        dataset = training.Dataset.load(keys[0])
        for index, key in enumerate(keys):
            try:
                models.append((training.TrainedNetwork & key).load_model(runtime.device, runtime.memory_format))
                placed.append(index)
            except Exception as exc:  # this network's weights
                outcomes[index] = exc
        results = []
        if models:
            try:
                config = self.config_table.config_of(keys[0])
                inputs = (dataset.test_x, dataset.test_y)
                if len(models) == 1 or any(is_stochastic(m, dataset.test_x[:8], runtime.device) for m in models):
                    results = [self.evaluate(m, *inputs, device=runtime.device, **config) for m in models]
                else:
                    group = NetworkGroup(models, runtime.device)
                    results = self.evaluate(group, *inputs, device=runtime.device, **config)
            except Exception as exc:  # the evaluation itself: every network of the group failed
                for index in placed:
                    outcomes[index] = exc
        for index, result in zip(placed, results):
            try:
                with transaction(self.connection):
                    if not (self & keys[index]):
                        self.store(keys[index], result, direct=True)
            except Exception as exc:
                outcomes[index] = exc
        for key, outcome in zip(keys, outcomes):
            if on_outcome is not None:
                on_outcome(key, outcome)
        return outcomes


@schema
class NoiseConfig(ConfigTable, dj.Lookup, settings=protocols.noise_evaluation):
    """Gaussian-noise ladder and images (``protocols.noise_evaluation``'s keyword arguments)."""


@schema
class NoiseAccuracy(GroupEvaluation, dj.Computed):
    """Accuracy under additive Gaussian noise at every level of the ladder (Li et al. 2019, Fig. 4)."""

    definition = _score_of("NoiseConfig")

    class Level(dj.Part):
        """One noise level's accuracy."""

        definition = """
        -> master
        level            : int16                    # index on the ladder
        ---
        sigma            : float64                  # noise std, images in [0, 1]
        accuracy         : float64
        """

    evaluate, config_table = _with_forward_batch(protocols.noise_evaluation), NoiseConfig

    def make(self, key):
        model, images, labels, device = _evaluation_inputs(key)
        self.store(key, self.evaluate(model, images, labels, device=device, **NoiseConfig.config_of(key)))

    def store(self, key, result, direct: bool = False):
        self.insert1(
            dict(key, n_images=result["n_images"], clean_accuracy=result["clean_accuracy"]), allow_direct_insert=direct
        )
        self.Level.insert(dict(key, level=i, sigma=s, accuracy=a) for i, (s, a) in enumerate(result["levels"]))


@schema
class AttackConfig(ConfigTable, dj.Lookup, registry=ATTACKS):
    """One attack and its hyper-parameters (``models.robustness.attack_registry.ATTACKS``)."""


@schema
class PerturbationConfig(ConfigTable, dj.Lookup, settings=protocols.perturbation_evaluation):
    """Which attacks (AttackConfig hashes) on how many images, and which cross-checks on how many of them
    (``protocols.perturbation_evaluation``)."""

    @classmethod
    def check_references(cls, full: dict) -> dict:
        """Every attack hash names an AttackConfig row; the lists are sorted, so order never splits rows."""
        full = {**full, "attacks": sorted(set(full["attacks"])), "cross_checks": sorted(set(full["cross_checks"]))}
        missing = [h for h in full["attacks"] + full["cross_checks"] if not (AttackConfig & {"attack_hash": h})]
        if missing:
            raise ValueError(f"attack hashes not in AttackConfig: {missing}")
        return full


@schema
class MinimalPerturbation(GroupEvaluation, dj.Computed):
    """Per image, the smallest verified adversarial perturbation over attacks; the median is the score.

    Attacks run for minutes to hours on real sizes, so this is a three-part make: no transaction stays
    open while the attacks run.
    """

    definition = _score_of(
        "PerturbationConfig",
        """
        median_linf = null   : float64                  # null: no Linf attack configured, or most images unbroken
        median_l2 = null     : float64
        stochastic           : bool                     # attacked through EoT with noise on
        attack_seconds       : float64
        """,
    )

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

    class Coverage(dj.Part):
        """How many images each attack ran on, and how often a cross-check beat the primary attacks (the sign
        of a weak primary attack). Rows written before cross-checks existed have none: every attack ran on
        every image."""

        definition = """
        -> master
        -> AttackConfig
        ---
        n_images         : int32                    # evaluation images this attack ran on
        cross_check      : bool                     # run on the cross-check subset, not on every image
        beat_primary = null : int32                 # cross-checks: images where it beat every primary attack
        """

    config_table = PerturbationConfig

    @staticmethod
    def evaluate(model, images, labels, *, device, **config):
        """``protocols.perturbation_evaluation`` with this table's attacks (the rows of the config's hashes)."""
        rows = lambda hashes: [AttackConfig.config_of({"attack_hash": h}) for h in hashes]  # noqa: E731
        progress = lambda msg: logger.info("  %s", msg)  # noqa: E731
        runtime = Runtime.from_env()
        return protocols.perturbation_evaluation(
            model,
            images,
            labels,
            rows(config["attacks"]),
            rows(config["cross_checks"]),
            device=device,
            batch_size=runtime.attack_batch or None,
            gradient_dtype=runtime.amp_dtype,
            progress=progress,
            **config,
        )

    def make_fetch(self, key):
        return (PerturbationConfig.config_of(key),)

    def make_compute(self, key, config):
        model, images, labels, device = _evaluation_inputs(key)
        result = dict(self.evaluate(model, images, labels, device=device, **config))
        return result, result.pop("labels")

    def make_insert(self, key, result, labels):
        self.store(key, dict(result, labels=labels))

    def store(self, key, result, direct: bool = False):
        labels = result["labels"]
        self.insert1(
            dict(
                key,
                n_images=len(labels),
                clean_accuracy=result["clean_accuracy"],
                stochastic=result["stochastic"],
                attack_seconds=result["attack_seconds"],
                **result["medians"],
            ),
            allow_direct_insert=direct,
        )
        self.Distance.insert(
            dict(key, image_index=i, label=y, **row) for i, (y, row) in enumerate(zip(labels, result["images"]))
        )
        config = PerturbationConfig.config_of(key)
        hashes = config["attacks"] + config["cross_checks"]
        per_attack = result["attacks"]
        self.Attack.insert(
            dict(key, attack_hash=h, median_distance=row["median_distance"], success_rate=row["success_rate"])
            for h, row in zip(hashes, per_attack)
        )
        self.Coverage.insert(
            dict(
                key,
                attack_hash=h,
                n_images=row["n_images"],
                cross_check=h in config["cross_checks"],
                beat_primary=row["beat_primary"],
            )
            for h, row in zip(hashes, per_attack)
        )


@schema
class RobustConfig(ConfigTable, dj.Lookup, settings=protocols.robust_evaluation):
    """Fixed-epsilon attack settings (PGD or AutoAttack): Linf 8/255 and L2 0.5 are what leaderboards report."""


@schema
class RobustAccuracy(dj.Computed):
    """Share of images still correctly classified under a fixed-epsilon attack."""

    definition = _score_of("RobustConfig", "robust_accuracy      : float64")

    def make(self, key):
        model, images, labels, device = _evaluation_inputs(key)
        runtime, config = Runtime.from_env(), RobustConfig.config_of(key)
        result = protocols.robust_evaluation(
            model,
            images,
            labels,
            device=device,
            batch_size=runtime.attack_batch or None,
            gradient_dtype=runtime.amp_dtype,
            **config,
        )
        self.insert1(dict(key, **result))


@schema
class CorruptionConfig(ConfigTable, dj.Lookup, settings=protocols.corruption_evaluation):
    """Common corruptions: computed here ('builtin') or read from CIFAR-10-C files ('cifar10c', grayscale)."""


@schema
class CorruptionAccuracy(GroupEvaluation, dj.Computed):
    """Accuracy under common corruptions (noise, blur, contrast, JPEG) at five severities."""

    definition = _score_of(
        "CorruptionConfig", "mean_accuracy        : float64                  # over corruptions and severities"
    )

    class Level(dj.Part):
        """One corruption at one severity."""

        definition = """
        -> master
        corruption       : varchar(32)
        severity         : int16
        ---
        accuracy         : float64
        """

    evaluate, config_table = _with_forward_batch(protocols.corruption_evaluation), CorruptionConfig

    def make(self, key):
        model, images, labels, device = _evaluation_inputs(key)
        self.store(key, self.evaluate(model, images, labels, device=device, **CorruptionConfig.config_of(key)))

    def store(self, key, result, direct: bool = False):
        result = dict(result)
        levels = result.pop("levels")
        self.insert1(dict(key, **result), allow_direct_insert=direct)
        self.Level.insert(dict(key, corruption=c, severity=s, accuracy=a) for c, s, a in levels)


def budget_label(epsilon: float) -> str:
    """An epsilon as papers write it: a short decimal (0.2, 1.5), else k/255 for a multiple of 1/255 (8/255)."""
    steps = round(epsilon * 255)
    if round(epsilon, 3) != epsilon and steps and abs(epsilon * 255 - steps) < 1e-9:
        return f"{steps}/255"
    return f"{epsilon:g}"


def add_standard_configs(quick: bool = False, n_images: int | None = None, dataset: str = "cifar10") -> dict:
    """The standard evaluation as config rows; ``quick`` is the CPU demo version (fewer steps, no BB/Boundary,
    robust accuracy by PGD instead of AutoAttack). The minimal perturbations run ``PRIMARY_ATTACKS`` on every
    image and the other attacks, as cross-checks, on the first 100 (the paper version). The fixed-epsilon
    budgets are ``dataset``'s (``evaluation.dataset_epsilons``: Linf 8/255 and L2 0.5 for CIFAR; Linf 0.1,
    0.2, 0.3 and L2 1.5, 2.0 for MNIST).

    Returns the keys added, by table (``robust_linf`` and ``robust_l2`` are lists, one key per budget). The
    paper's sizes (1000 images, full attack set) need a GPU.
    """
    budgets = dataset_epsilons(dataset)  # first: an unknown dataset writes nothing
    n = n_images or (100 if quick else 1000)
    attack_keys = [AttackConfig.add(c, label=c["attack"]) for c in default_attack_configs(quick=quick)]
    primary = [
        k["attack_hash"]
        for k, c in zip(attack_keys, default_attack_configs(quick=quick))
        if c["attack"] in PRIMARY_ATTACKS
    ]
    checks = [k["attack_hash"] for k in attack_keys if k["attack_hash"] not in primary]
    steps = 10 if quick else 40
    method = "pgd" if quick else "autoattack"  # AutoAttack is the leaderboards' number; PGD the quick one
    robust = {
        f"robust_{norm}": [
            RobustConfig.add(
                method=method,
                norm=norm,
                epsilon=eps,
                steps=steps,
                n_images=n,
                label=f"{method} {norm} {budget_label(eps)}",
            )
            for eps in budgets[norm]
        ]
        for norm in ("linf", "l2")
    }
    return {
        "noise": NoiseConfig.add(n_images=n, label="ladder"),
        "perturbation": PerturbationConfig.add(
            attacks=primary,
            cross_checks=checks,
            cross_check_images=min(n, 50) if quick else 100,
            n_images=min(n, 50) if quick else n,
            eot_samples=4 if quick else 8,
            label="quick" if quick else "paper",
        ),
        **robust,
        "corruption": CorruptionConfig.add(n_images=n, label="builtin"),
        "attacks": attack_keys,
    }
