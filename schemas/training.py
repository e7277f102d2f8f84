"""training: classifiers trained with L = L_task + alpha * L_sim (docs/science.md §6).

A run is ``TrainingPlan`` (dataset, network, schedule and regularizer configs a lab asked for) x ``Seed``.
Training takes minutes to hours, so ``TrainedNetwork`` uses the three-part make and writes a checkpoint
every epoch next to the object store: a worker killed mid-run leaves no row, and the next worker that
takes the job resumes from the last finished epoch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import datajoint as dj
import numpy as np
from datajoint.errors import DataJointError

from ..database.checkpoints import checkpoint_dir
from ..database.store import load_array, stored, stored_columns
from ..database.transaction import transaction
from ..errors import DatasetError
from ..models.conditions import condition_name
from ..models.digests import file_digest, stable_hash
from ..models.neural.images import downsample
from ..models.registry import complete_kwargs
from ..models.runtime import Runtime, group_size
from ..models.serialization import array_to_state, state_to_array
from ..models.vision import datasets, networks, schedule
from ..models.vision import group as training_group
from . import experiment, similarity
from ._config import ConfigTable, activator, stored_twins

logger = logging.getLogger("neureg")
schema = dj.Schema()
activate = activator(schema, "training")


@schema
class Dataset(dj.Lookup):
    """A classification dataset as read on first use; its checksum pins the exact numbers trained on."""

    definition = """
    dataset              : varchar(32)              # mnist_demo, cifar10, cifar100
    ---
    data_root = ''       : varchar(1024)            # folder holding the python-pickle batches ('' for the demo)
    checksum             : char(64)                 # sha256 of the arrays (models.datasets.dataset_checksum)
    n_train              : int32
    n_test               : int32
    n_classes            : int16
    """

    @classmethod
    def add(cls, name: str, root: str | Path | None = None) -> dict:
        """Read the dataset once (clear error when missing or corrupt), then record it with its checksum."""
        key = {"dataset": name}
        if not (cls & key):
            cls.record(datasets.load_dataset(name, root), root)
        return key

    @classmethod
    def record(cls, loaded: datasets.ClassificationData, root: str | Path | None = None) -> None:
        cls.insert1(
            dict(
                dataset=loaded.name,
                data_root=str(Path(root).resolve()) if root else "",
                checksum=datasets.dataset_checksum(loaded),
                n_train=len(loaded.train_y),
                n_test=len(loaded.test_y),
                n_classes=loaded.n_classes,
            )
        )

    @classmethod
    def load(cls, key: dict) -> datasets.ClassificationData:
        """The dataset of a row, refusing data whose checksum no longer matches what was recorded."""
        name, root, checksum = (cls & key).fetch1("dataset", "data_root", "checksum")
        loaded = datasets.load_dataset(name, root or None)
        if datasets.dataset_checksum(loaded) != checksum:
            raise DatasetError(f"dataset {name!r} at {root or '(package)'} changed since it was recorded")
        return loaded


@schema
class NetworkConfig(ConfigTable, dj.Lookup, registry=networks.ARCHITECTURES):
    """An architecture and its keyword arguments (``models.vision.networks.ARCHITECTURES``).

    ``n_classes`` is not part of it: the dataset sets it, so one config serves CIFAR-10 and CIFAR-100.
    """

    @classmethod
    def complete(cls, config: dict | None = None, **overrides) -> dict:
        """The architecture's complete keyword arguments, less ``n_classes``; ``arch`` defaults to resnet18."""
        given = {"arch": "resnet18", **(config or {}), **overrides}
        if "n_classes" in given:
            raise ValueError("NetworkConfig: n_classes is set by the dataset, not the network config")
        full = super().complete(given)
        full.pop("n_classes")
        return full


@schema
class TrainConfig(ConfigTable, dj.Lookup, settings=schedule.train_settings):
    """A training schedule (``models.vision.schedule.train_settings``)."""


@schema
class RegularizerConfig(dj.Lookup):
    """alpha and pair sampling, and the target they pull toward: a scan set and a target config (none when
    alpha = 0). The target need not be computed yet: its networks wait for it (``TrainedNetwork.key_source``),
    so a whole experiment can be planned before any of it runs."""

    definition = """
    regularizer_hash     : char(32)                 # hash of the config and the target's key
    ---
    regularizer_config   : json
    -> [nullable] experiment.ScanSet
    -> [nullable] similarity.TargetConfig
    regularizer_label = '' : varchar(64)
    """

    @classmethod
    def complete(cls, config: dict | None = None, target: dict | None = None) -> tuple[dict, dict]:
        """The full config and the target's key ({} for alpha = 0); ValueError on anything invalid."""
        full = complete_kwargs(schedule.regularizer_settings, dict(config or {}), "RegularizerConfig")
        if full["alpha"] == 0:
            return full, {}  # the 'None' condition pulls toward nothing
        if target is None or not {"scan_set", "target_hash"} <= set(target):
            raise ValueError("alpha > 0 needs a similarity target: a key with scan_set and target_hash")
        target_key = {"scan_set": target["scan_set"], "target_hash": target["target_hash"]}
        if not (experiment.ScanSet & target_key):
            raise ValueError(f"scan_set {target_key['scan_set']!r} is not in experiment.ScanSet")
        if not (similarity.TargetConfig & target_key):
            raise ValueError(f"target_hash {target_key['target_hash']!r} is not in similarity.TargetConfig")
        return full, target_key

    @classmethod
    def add(cls, config: dict | None = None, target: dict | None = None, label: str = "") -> dict:
        full, target_key = cls.complete(config, target)
        key = {"regularizer_hash": stable_hash({"config": full, "target": target_key})}
        if not (cls & key):
            twin = cls.non_canonical().get(key["regularizer_hash"])
            if twin is not None:  # stored before values were canonical: that row is this config
                return {"regularizer_hash": twin}
            cls.insert1(dict(key, regularizer_config=full, regularizer_label=label[:64], **target_key))
        return key

    @classmethod
    def non_canonical(cls) -> dict[str, str]:
        """{canonical hash: stored hash} of rows keyed before values were canonical (as ``ConfigTable``'s)."""
        canonical = lambda row: stable_hash(  # noqa: E731
            {
                "config": complete_kwargs(schedule.regularizer_settings, row["regularizer_config"]),
                "target": {k: row[k] for k in ("scan_set", "target_hash")} if isinstance(row["scan_set"], str) else {},
            }
        )
        return stored_twins(((row["regularizer_hash"], row) for row in cls().to_dicts()), canonical)


@schema
class Seed(dj.Lookup):
    """Training seeds (the paper: 5 per condition). Separate from predictive.Seed on purpose."""

    definition = """
    seed                 : int32
    """
    contents = [[0]]


@schema
class TrainingPlan(dj.Manual):
    """The runs a lab asks for: one row per (dataset, network, schedule, regularizer); x Seed makes runs."""

    definition = """
    -> Dataset
    -> NetworkConfig
    -> TrainConfig
    -> RegularizerConfig
    ---
    condition            : varchar(32)              # e.g. None, Shuffle, Pixel, Neural (model), VOne
    """


@schema
class Checkpoint(dj.Manual):
    """The SHA-256 of each training checkpoint, recorded by the worker that wrote it (lab accounts cannot
    write this schema). A checkpoint whose file does not match is never resumed: it is discarded and the
    run starts over, so a rewritten or damaged file cannot become a finished ``TrainedNetwork``."""

    definition = """
    checkpoint           : char(32)                 # the file's stem: stable hash of the TrainedNetwork key
    ---
    checkpoint_sha256    : char(64)                 # SHA-256 of the file's bytes
    epoch                : int32                    # the finished epoch it holds
    """


def record_checkpoint(path: Path, digest: str, epoch: int) -> None:
    """What a worker calls after writing a checkpoint: keep its digest (replacing the previous epoch's)."""
    row = {"checkpoint": Path(path).stem, "checkpoint_sha256": digest, "epoch": int(epoch)}
    if Checkpoint & {"checkpoint": row["checkpoint"]}:
        Checkpoint.update1(row)
    else:
        Checkpoint.insert1(row)


def trusted_checkpoint(path: Path) -> bool:
    """Whether ``path`` may be resumed: absent (nothing to trust), or its bytes match the recorded digest.
    Anything else is removed with one warning, and the run trains from its first epoch."""
    path = Path(path)
    if not path.exists():
        return True
    recorded = (Checkpoint & {"checkpoint": path.stem}).to_arrays("checkpoint_sha256")
    if len(recorded) and file_digest(path) == recorded[0]:
        return True
    why = "its SHA-256 differs from the one its worker recorded" if len(recorded) else "no worker recorded it"
    logger.warning("checkpoint %s is not trusted (%s): discarded, training starts from epoch 0", path, why)
    path.unlink(missing_ok=True)
    (Checkpoint & {"checkpoint": path.stem}).delete_quick()
    return False


@schema
class TrainedNetwork(dj.Computed):
    """One trained classifier (plan x seed): its weights, test accuracy, layer weights gamma and epochs."""

    definition = f"""
    -> TrainingPlan
    -> Seed
    ---
    {stored_columns("weights", "torch.save(state_dict) bytes as uint8")}
    test_accuracy        : float64                  # clean test accuracy
    gamma = null         : <blob>                   # final softmax layer weights (None when alpha = 0)
    wall_seconds         : float64
    device               : varchar(64)
    versions             : json                     # torch, numpy, python
    resumed_from_epoch   : int16                    # 0 unless a killed run was resumed
    """

    class Epoch(dj.Part):
        """One epoch's losses, accuracy and learning rate: the training curve."""

        definition = """
        -> master
        epoch            : int16                    # 1-based
        ---
        train_loss       : float64
        task_loss        : float64
        sim_loss = null  : float64                  # none when alpha = 0
        train_acc        : float64
        lr               : float64
        seconds          : float64
        """

    @property
    def key_source(self):
        """Plans x seeds whose similarity target (if any) is computed: a planned target is waited for."""
        waiting = (RegularizerConfig & "target_hash IS NOT NULL") - similarity.SimilarityTarget.proj()
        return (TrainingPlan * Seed) - waiting.proj()

    def make_fetch(self, key):
        net = NetworkConfig.config_of(key)
        train = TrainConfig.config_of(key)
        reg_row = (RegularizerConfig & key).fetch1()
        target = {k: reg_row[k] for k in ("scan_set", "target_hash")} if reg_row["target_hash"] else None
        return net, train, reg_row["regularizer_config"], target

    def make_compute(self, key, net, train, reg, target):
        member = self._member(key, net, train, reg, target)
        runtime = Runtime.from_env()
        logger.info("training %s on %s (checkpoint %s)", key, runtime, member.checkpoint_path)
        result = training_group.train_network(
            *member.run_args(Dataset.load(key)),
            runtime=runtime,
            checkpoint_path=member.checkpoint_path,
            progress=lambda row: _log_epoch(key, row, train["epochs"]),
            on_checkpoint=record_checkpoint,
        )
        return state_to_array(result.state_dict), result, str(member.checkpoint_path)

    def make_insert(self, key, weights, result, checkpoint):
        self._insert_result(key, weights, result, checkpoint)

    # ------------------------------------------------------------------ several networks as one fused model
    @staticmethod
    def group_key(key: dict) -> tuple:
        """What networks trained as one fused model share (models/vision/group.py): data, network, schedule."""
        return key["dataset"], key["network_hash"], key["train_hash"]

    @staticmethod
    def group_limit(key: dict, runtime: Runtime) -> int:
        """How many networks of this key's architecture a worker on ``runtime`` trains at once."""
        return group_size(runtime, NetworkConfig.config_of(key))

    def make_group(self, keys: list[dict], on_outcome=None) -> list[Exception | None]:
        """Train ``keys`` (one ``group_key``) as one fused group, outside any transaction; each network's row
        goes in its own transaction as soon as its sub-group finishes. Returns, per key, None (stored, or
        already there) or the exception it failed with; ``on_outcome(key, error)`` hears each as it comes.

        Each key keeps what its make alone would do: its configs are fetched and checked again inside its
        insert's transaction, its checkpoint is trusted only by its recorded digest, and a key that left
        the key source meanwhile is not inserted."""
        outcomes: list[Exception | None] = [None] * len(keys)
        members, fetched, where = [], {}, {}

        def settle(index, error):
            outcomes[index] = error
            if on_outcome is not None:
                on_outcome(keys[index], error)

        for index, key in enumerate(keys):
            try:
                fetched[index] = self.make_fetch(key)
                members.append(self._member(key, *fetched[index]))
                where[len(members) - 1] = index
            except Exception as exc:  # this key's own inputs (its target, its configs)
                settle(index, exc)
        if not members:
            return outcomes
        runtime = Runtime.from_env()
        logger.info("training %d networks as one group on %s", len(members), runtime.describe())

        def finished(position, result):
            index = where[position]
            if isinstance(result, Exception):
                settle(index, result)
                return
            try:
                self._store_member(keys[index], fetched[index], result, members[position].checkpoint_path)
                settle(index, None)
            except Exception as exc:
                settle(index, exc)

        training_group.train_group(
            members,
            Dataset.load(keys[where[0]]),
            runtime,
            progress=lambda position, row: _log_epoch(
                keys[where[position]], row, fetched[where[position]][1]["epochs"]
            ),
            on_checkpoint=lambda position, path, digest, epoch: record_checkpoint(path, digest, epoch),
            on_finished=finished,
        )
        return outcomes

    def _member(self, key, net, train, reg, target) -> training_group.Member:
        """The network of one key as ``train_group`` takes it: configs, target at its resolution, seed, and
        the checkpoint to resume from (discarded first unless its recorded digest matches)."""
        images = matrix = None
        if target is not None:
            hashes, matrix = (similarity.SimilarityTarget & target).labeled()
            scale = (similarity.SimilarityTarget & target).fetch1("image_scale")
            images = downsample(experiment.load_images(hashes), scale)  # the resolution the target was made at
        checkpoint = checkpoint_dir() / f"{stable_hash({k: str(v) for k, v in key.items()})}.pt"
        trusted_checkpoint(checkpoint)
        return training_group.Member(net, train, reg, images, matrix, int(key["seed"]), checkpoint)

    def _store_member(self, key, fetched, result, checkpoint) -> None:
        """One group member's row, in its own transaction, as DataJoint's three-part make would insert it."""
        with transaction(self.connection):
            if self & key:
                return  # another worker stored it first
            if not (self.key_source & key):
                raise DataJointError(f"{key} left TrainedNetwork's key source while it trained")
            if self.make_fetch(key) != fetched:
                raise DataJointError(f"the configs of {key} changed while it trained")
            self._insert_result(key, state_to_array(result.state_dict), result, str(checkpoint), direct=True)

    def _insert_result(self, key, weights, result, checkpoint, direct: bool = False) -> None:
        self.insert1(
            dict(
                key,
                **stored("weights", weights),
                test_accuracy=float(result.test_accuracy),
                gamma=None if result.gamma is None else np.asarray(result.gamma, dtype=np.float64),
                wall_seconds=float(result.wall_seconds),
                device=str(result.device)[:64],
                versions=result.versions,
                resumed_from_epoch=int(result.resumed_from_epoch),
            ),
            allow_direct_insert=direct,
        )
        self.Epoch.insert(
            dict(
                key,
                epoch=int(row["epoch"]),
                **{
                    k: None if row[k] is None else float(row[k])
                    for k in ("train_loss", "task_loss", "sim_loss", "train_acc", "lr", "seconds")
                },
            )
            for row in result.history
        )
        (Checkpoint & {"checkpoint": Path(checkpoint).stem}).delete_quick()
        Path(checkpoint).unlink(missing_ok=True)  # the row now holds the result

    def load_model(self, device: str = "cpu", memory_format=None):
        """The trained network of one row, in eval mode (VOne noise as configured); ``memory_format`` a
        torch layout (a Runtime's), None to keep torch's default."""
        key = self.fetch1("KEY")
        n_classes = (Dataset & key).fetch1("n_classes")
        model = networks.build_network({**NetworkConfig.config_of(key), "n_classes": int(n_classes)})
        model.load_state_dict(array_to_state(load_array(self, key, "weights")))
        model = model.to(device) if memory_format is None else model.to(device, memory_format=memory_format)
        return model.eval()


def _log_epoch(key: dict, row: dict, epochs: int) -> None:
    logger.info(
        "  seed %s %s epoch %d/%d: loss %.4f, train acc %.3f, lr %.4g, %.1f s",
        key.get("seed"),
        key.get("regularizer_hash", "")[:8],
        row["epoch"],
        epochs,
        row["train_loss"],
        row["train_acc"],
        row["lr"],
        row["seconds"],
    )


def plan(
    dataset: str,
    network: dict | None = None,
    train: dict | None = None,
    regularizer: dict | None = None,
    target: dict | None = None,
    data_root: str | None = None,
    labels: dict | None = None,
) -> dict:
    """Add a TrainingPlan row from plain configs; return its key.

    Every config is completed and validated, and the dataset read, before anything is written; the
    rows then go in one transaction, so a bad argument leaves the database as it was.
    """
    labels = labels or {}
    network_config = NetworkConfig.complete(network)
    train_config = TrainConfig.complete(train)
    reg_config, target_key = RegularizerConfig.complete(regularizer, target)
    loaded = None if Dataset & {"dataset": dataset} else datasets.load_dataset(dataset, data_root)
    method = similarity.TargetConfig.config_of(target_key)["method"] if target_key else None
    with transaction(TrainingPlan.connection):
        if loaded is not None:
            Dataset.record(loaded, data_root)
        key = {"dataset": dataset}
        key.update(NetworkConfig.add(network_config, label=labels.get("network", "")))
        key.update(TrainConfig.add(train_config, label=labels.get("train", "")))
        key.update(RegularizerConfig.add(reg_config, target=target_key, label=labels.get("regularizer", "")))
        if not (TrainingPlan & key):
            TrainingPlan.insert1(dict(key, condition=condition_name(network_config, reg_config, method)))
    return key
