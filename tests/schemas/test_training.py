"""The training stage's tables: plans, conditions, lineage, stored weights, per-epoch rows, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from neureg.models.digests import stable_hash
from neureg.models.runtime import accuracy
from neureg.models.vision import datasets, group


def test_each_plan_and_seed_is_one_trained_network(pipeline, trained):
    tr = pipeline.training
    for condition, plan in trained.items():
        assert (tr.TrainingPlan & plan).fetch1("condition") == condition
        rows = (tr.TrainedNetwork & plan).to_dicts(order_by="seed")
        assert [r["seed"] for r in rows] == [0, 1]
        for row in rows:
            assert 0 <= row["test_accuracy"] <= 1 and row["wall_seconds"] > 0
            assert row["versions"]["torch"] and row["device"].startswith("cpu")
            epochs = (tr.TrainedNetwork.Epoch & row).to_dicts(order_by="epoch")
            assert [e["epoch"] for e in epochs] == [1, 2]
            assert (epochs[0]["sim_loss"] is None) == (condition in ("None", "VOne"))
            gamma = row["gamma"]
            if condition in ("Pixel", "Neural (model)"):
                assert gamma.shape == (5,) and gamma.sum() == pytest.approx(1) and np.all(gamma > 0)
            else:
                assert gamma is None


def test_stored_weights_give_the_stored_accuracy(pipeline, trained):
    tr = pipeline.training
    key = (tr.TrainedNetwork & trained["Pixel"] & "seed = 0").fetch1("KEY")
    model = (tr.TrainedNetwork & key).load_model()
    data = datasets.load_mnist_demo()
    recomputed = accuracy(model, data.test_x, data.test_y)
    assert recomputed == pytest.approx((tr.TrainedNetwork & key).fetch1("test_accuracy"), abs=1e-9)


def test_regularizer_points_at_its_target(pipeline, trained, targets):
    reg = (pipeline.training.RegularizerConfig & trained["Neural (model)"]).fetch1()
    assert reg["target_hash"] == targets["neural_model"]["target_hash"] and reg["regularizer_config"]["alpha"] == 2.0
    none = (pipeline.training.RegularizerConfig & trained["None"]).fetch1()
    assert none["target_hash"] is None


def test_dataset_is_recorded_with_its_checksum(pipeline, trained):
    row = (pipeline.training.Dataset & {"dataset": "mnist_demo"}).fetch1()
    assert row["checksum"] == datasets.dataset_checksum(datasets.load_mnist_demo())
    assert (row["n_train"], row["n_test"], row["n_classes"]) == (4000, 1000, 10)


def test_bad_configs_are_refused_and_change_nothing(pipeline, trained, tmp_path):
    tr = pipeline.training
    tables = (tr.Dataset, tr.NetworkConfig, tr.TrainConfig, tr.RegularizerConfig, tr.TrainingPlan)
    before = [len(t()) for t in tables]
    with pytest.raises(ValueError, match="unknown arch"):
        tr.plan("mnist_demo", dict(arch="vgg11"))
    with pytest.raises(ValueError, match="unknown config key"):
        tr.plan("mnist_demo", dict(depth=18))
    with pytest.raises(ValueError, match="epochs"):
        tr.plan("mnist_demo", None, dict(epochs=0))
    with pytest.raises(ValueError, match="needs a similarity target"):
        tr.plan("mnist_demo", None, None, dict(alpha=1.0))
    with pytest.raises(datasets.DatasetError, match="CIFAR folder missing"):
        tr.plan("cifar100", data_root=str(tmp_path))  # never recorded here: read, and refused
    assert [len(t()) for t in tables] == before


def _killed_after_first_epoch(tr, trained, seed: int):
    """What a worker killed after epoch 1 leaves behind: its checkpoint (digest recorded, as the worker's
    make records it), no row. Returns (key, checkpoint path)."""
    tr.Seed.insert1({"seed": seed}, skip_duplicates=True)
    key = dict(trained["None"], seed=seed)
    net, train, reg, _ = tr.TrainedNetwork().make_fetch(key)
    checkpoint = tr.checkpoint_dir() / f"{stable_hash({k: str(v) for k, v in key.items()})}.pt"

    class Killed(Exception):
        pass

    def kill(record):
        raise Killed

    with pytest.raises(Killed):
        group.train_network(
            net,
            train,
            reg,
            tr.Dataset.load(key),
            seed=seed,
            checkpoint_path=checkpoint,
            progress=kill,
            on_checkpoint=tr.record_checkpoint,
        )
    return key, checkpoint


def test_killed_run_resumes_from_its_checkpoint(pipeline, trained):
    """A checkpoint left by a killed worker is picked up: the row says from which epoch it resumed."""
    from neureg.populate.stages import populate_stage

    tr = pipeline.training
    key, checkpoint = _killed_after_first_epoch(tr, trained, seed=7)
    assert checkpoint.exists() and not (tr.TrainedNetwork & key)
    populate_stage(pipeline, ["training"], keys=[key])
    row = (tr.TrainedNetwork & key).fetch1()
    assert row["resumed_from_epoch"] == 1 and len(tr.TrainedNetwork.Epoch & key) == 2
    assert not checkpoint.exists(), "the checkpoint is removed once the result is stored"
    assert not (tr.Checkpoint & {"checkpoint": checkpoint.stem}), "and its digest with it"


def _forge(path: Path) -> None:
    """What a hostile lab member writes: the genuine fingerprint, every weight x0, a 40-epoch history at 0.999."""
    import torch

    state = torch.load(path, weights_only=True)
    state["model"] = {k: v * 0 for k, v in state["model"].items()}
    row = dict(state["history"][0], train_acc=0.999, train_loss=0.001)
    state["history"] = [dict(row, epoch=e) for e in range(1, 41)]
    state["epoch"] = 40
    torch.save(state, path)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tamper", [_forge, _flip], ids=["forged", "bit-flipped"])
def test_a_checkpoint_its_worker_did_not_write_is_never_resumed(pipeline, trained, tamper, caplog):
    from neureg.populate.stages import populate_stage

    tr = pipeline.training
    key, checkpoint = _killed_after_first_epoch(tr, trained, seed=8 if tamper is _forge else 9)
    tamper(checkpoint)
    with caplog.at_level("WARNING", logger="neureg"):
        populate_stage(pipeline, ["training"], keys=[key])
    row = (tr.TrainedNetwork & key).fetch1()
    epochs = (tr.TrainedNetwork.Epoch & key).to_dicts(order_by="epoch")
    assert row["resumed_from_epoch"] == 0, "trained from scratch, not from the tampered file"
    assert [e["epoch"] for e in epochs] == [1, 2] and max(e["train_acc"] for e in epochs) < 0.999
    warnings = [r.message for r in caplog.records if "is not trusted" in r.getMessage()]
    assert len(warnings) == 1 and "its SHA-256 differs from the one its worker recorded" in caplog.text
    model = (tr.TrainedNetwork & key).load_model()
    assert any(float(p.abs().sum()) > 0 for p in model.parameters()), "the weights are the retrained ones"


def test_a_checkpoint_no_worker_recorded_is_never_resumed(pipeline, trained, caplog):
    tr = pipeline.training
    path = tr.checkpoint_dir() / ("0" * 32 + ".pt")
    path.write_bytes(b"planted")
    with caplog.at_level("WARNING", logger="neureg"):
        assert tr.trusted_checkpoint(path) is False
    assert not path.exists() and "no worker recorded it" in caplog.text


def test_checkpoints_go_where_a_requeued_task_finds_them(pipeline, tmp_path, monkeypatch):
    """NEUREG_CHECKPOINTS (a cluster's shared scratch) wins; else beside a folder store, which workers share."""
    import datajoint as dj

    shared = tmp_path / "scratch" / "checkpoints"
    monkeypatch.setenv("NEUREG_CHECKPOINTS", str(shared))
    assert pipeline.training.checkpoint_dir() == shared and shared.is_dir()
    monkeypatch.delenv("NEUREG_CHECKPOINTS")
    store = dj.config.get_store_spec("neureg")["location"]
    assert pipeline.training.checkpoint_dir() == Path(store) / "checkpoints"


def test_equal_configs_are_one_row_however_their_numbers_are_written(pipeline):
    """Values take their annotation's form before hashing: 0 and 0.0, 2 and 2.0, (1, 2) and [1, 2] are one
    config and one row, whatever table (settings function, registry of variants, the regularizer)."""
    tr, rb = pipeline.training, pipeline.robustness
    assert tr.RegularizerConfig.add(dict(alpha=0, pairs_per_step=31)) == tr.RegularizerConfig.add(
        dict(alpha=0.0, pairs_per_step=31.0)
    )
    stored = (tr.RegularizerConfig & tr.RegularizerConfig.add(dict(alpha=0, pairs_per_step=31))).fetch1()
    assert stored["regularizer_config"]["alpha"] == 0.0 and isinstance(stored["regularizer_config"]["alpha"], float)
    assert tr.NetworkConfig.add(dict(arch="resnet18", width=1)) == tr.NetworkConfig.add(
        dict(arch="resnet18", width=1.0)
    )
    assert tr.TrainConfig.add(dict(epochs=2.0, lr=1)) == tr.TrainConfig.add(dict(epochs=2, lr=1.0))
    assert rb.NoiseConfig.add(sigmas=(0, 0.1), n_images=7) == rb.NoiseConfig.add(sigmas=[0.0, 0.1], n_images=7.0)
    with pytest.raises(ValueError, match="'epochs' must be a positive integer, got 2.5"):
        tr.TrainConfig.add(dict(epochs=2.5))


def test_a_row_keyed_before_values_were_canonical_is_found_by_its_config(pipeline):
    """A row the older code keyed with an int where a float is meant keeps its key (its results hang off
    it); adding the same config today, in either spelling, returns that row and adds none."""
    tr = pipeline.training
    full = tr.TrainConfig.complete(dict(epochs=3, lr=0.5))
    legacy = dict(full, lr=2)  # as the older code stored lr=2: an int, hashed as one
    key = {"train_hash": stable_hash(legacy)}
    assert key != tr.TrainConfig.key_of(tr.TrainConfig.complete(legacy))
    tr.TrainConfig.insert1({**key, "train_config": legacy, "train_label": "legacy"})
    regularizer = tr.RegularizerConfig.complete(dict(alpha=0.0, pairs_per_step=29))[0]
    old_regularizer = dict(regularizer, alpha=0)
    reg_key = {"regularizer_hash": stable_hash({"config": old_regularizer, "target": {}})}
    tr.RegularizerConfig.insert1(dict(reg_key, regularizer_config=old_regularizer, regularizer_label="legacy"))
    try:
        before = len(tr.TrainConfig()), len(tr.RegularizerConfig())
        assert tr.TrainConfig.add(dict(epochs=3, lr=2)) == key
        assert tr.TrainConfig.add(dict(epochs=3, lr=2.0)) == key
        assert tr.TrainConfig.non_canonical() == {
            tr.TrainConfig.key_of(tr.TrainConfig.complete(legacy))["train_hash"]: key["train_hash"]
        }
        assert tr.RegularizerConfig.add(dict(alpha=0.0, pairs_per_step=29)) == reg_key
        assert tr.RegularizerConfig.add(dict(alpha=0, pairs_per_step=29)) == reg_key
        assert list(tr.RegularizerConfig.non_canonical().values()) == [reg_key["regularizer_hash"]]
        assert (len(tr.TrainConfig()), len(tr.RegularizerConfig())) == before
    finally:
        (tr.TrainConfig & key).delete_quick()
        (tr.RegularizerConfig & reg_key).delete_quick()
