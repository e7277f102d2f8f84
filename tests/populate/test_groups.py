"""Networks trained as fused groups by ``neureg populate`` and by workers (populate/groups.py), on both backends.

What a group must not change: the rows. Each network's stored weights, accuracy and epochs equal those of
the same network trained alone from the same fetched inputs (checked in float64, where grouped and dense
kernels agree to about 1e-15: tests/models/vision/test_group.py measures the float32 rounding). What a
group must keep per key: its job row (reserved, then done or failed on its own), its checkpoint, and its
failure: a member whose loss turns infinite fails alone, the others are stored, and a SIGTERM in the
middle leaves each unfinished member pending and resumable from its own checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from neureg.database.store import load_array
from neureg.models.serialization import array_to_state
from neureg.models.vision.group import train_network
from neureg.populate.heartbeat import Heartbeat
from neureg.populate.stages import populate_stage
from neureg.populate.worker import Worker, WorkerOptions

NET = dict(width=0.0625)


def _plans(tr, targets, train: dict, diverging: bool = False) -> list[dict]:
    plans = [
        tr.plan("mnist_demo", NET, train, dict(alpha=0.0)),
        tr.plan("mnist_demo", NET, train, dict(alpha=2.0, pairs_per_step=8), target=targets["pixel"]),
        tr.plan("mnist_demo", NET, train, dict(alpha=2.0, pairs_per_step=8), target=targets["neural_model"]),
    ]
    if diverging:  # alpha beyond float32's range: the loss is infinite from the first step
        plans[2] = tr.plan("mnist_demo", NET, train, dict(alpha=1e39, pairs_per_step=8), target=targets["pixel"])
    return [dict(p, seed=0) for p in plans]


def _job_status(jobs, key) -> str | None:
    rows = (jobs & {k: key[k] for k in jobs.primary_key}).to_arrays("status")
    return rows[0] if len(rows) else None  # None: done, and DataJoint keeps no completed rows by default


@pytest.mark.db
def test_a_populated_group_stores_what_each_network_gets_alone(pipeline, targets, monkeypatch, float64):
    tr = pipeline.training
    monkeypatch.setenv("NEUREG_GROUP", "4")
    keys = _plans(tr, targets, dict(epochs=2, max_train_images=96, batch_size=32, lr=0.031))
    populate_stage(pipeline, ["training"], keys=keys, reserve_jobs=True)
    jobs = tr.TrainedNetwork().jobs
    for key in keys:
        row = (tr.TrainedNetwork & key).fetch1()
        assert row["device"].endswith("group of 3") and _job_status(jobs, key) is None
        table = tr.TrainedNetwork()
        member = table._member(key, *table.make_fetch(key))
        alone = train_network(*member.run_args(tr.Dataset.load(key)))
        stored = array_to_state(load_array(tr.TrainedNetwork(), key, "weights"))
        for name, value in alone.state_dict.items():
            np.testing.assert_allclose(stored[name].numpy(), value.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)
        assert row["test_accuracy"] == alone.test_accuracy
        epochs = (tr.TrainedNetwork.Epoch & key).to_dicts(order_by="epoch")
        assert [e["train_acc"] for e in epochs] == [r["train_acc"] for r in alone.history]


@pytest.mark.db
def test_a_worker_group_fails_one_member_alone_and_resumes_the_others_after_sigterm(pipeline, targets, monkeypatch):
    from neureg.schemas import training as training_schema

    tr = pipeline.training
    keys = _plans(tr, targets, dict(epochs=2, max_train_images=96, batch_size=32, lr=0.032), diverging=True)
    table = tr.TrainedNetwork()
    jobs = table.jobs
    jobs.refresh(delay=-1)
    messages = {tuple(k[n] for n in jobs.primary_key): "" for k in keys}
    worker = Worker(pipeline, WorkerOptions(tables=["TrainedNetwork"], group="3"))
    worker._heartbeat = Heartbeat(worker.connection, interval=60)  # beats are tested in test_worker.py
    logged = training_schema._log_epoch

    def sigterm_after_first_epoch(key, row, epochs):  # the stop comes mid-group, as from the scheduler
        logged(key, row, epochs)
        if row["epoch"] == 1 and key == keys[1]:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(training_schema, "_log_epoch", sigterm_after_first_epoch)
    saved = signal.signal(signal.SIGTERM, worker._on_signal)
    try:
        assert worker._run_group(tr.TrainedNetwork, table, keys, messages) == ["interrupted"]
    finally:
        signal.signal(signal.SIGTERM, saved)
    failed = (jobs & {k: keys[2][k] for k in jobs.primary_key}).fetch1()
    assert failed["status"] == "error" and failed["error_message"].startswith("[attempt 1 of 3] TrainingDiverged")
    assert [_job_status(jobs, k) for k in keys[:2]] == ["pending", "pending"] and not (tr.TrainedNetwork & keys)
    assert len(tr.Checkpoint & "epoch = 1") >= 2

    monkeypatch.setattr(training_schema, "_log_epoch", logged)
    again = Worker(pipeline, WorkerOptions(tables=["TrainedNetwork"], group="3"))
    again._heartbeat = Heartbeat(again.connection, interval=60)
    assert again._run_group(tr.TrainedNetwork, table, keys[:2], messages) == ["done", "done"]
    for key in keys[:2]:
        row = (tr.TrainedNetwork & key).fetch1()
        assert row["resumed_from_epoch"] == 1 and len(tr.TrainedNetwork.Epoch & key) == 2
        assert row["device"].endswith("group of 2") and _job_status(jobs, key) in (None, "success")
    assert not (tr.TrainedNetwork & keys[2]) and _job_status(jobs, keys[2]) == "error"


def test_worker_options_are_checked():
    with pytest.raises(ValueError, match="orphan-timeout"):
        WorkerOptions(orphan_timeout=0)
    with pytest.raises(ValueError):
        WorkerOptions(max_retries=-1)
    with pytest.raises(ValueError, match="--group"):
        WorkerOptions(group="0")
    with pytest.raises(ValueError, match="--group"):
        WorkerOptions(group="many")
    WorkerOptions(group="auto")


@pytest.mark.db
def _forget(pipeline, configs) -> None:
    rb = pipeline.robustness
    for table, config in zip((rb.NoiseAccuracy, rb.CorruptionAccuracy, rb.MinimalPerturbation), configs):
        (table & config).delete(prompt=False)


def test_evaluations_of_a_group_store_what_each_network_gets_alone(
    pipeline, trained, monkeypatch, float64, caplog, request
):
    """Six networks of one architecture (three conditions, two seeds) evaluated as one group: noise,
    corruption and minimal-perturbation rows equal each network's own evaluation (float64: the stored
    float32 weights, evaluated without rounding differences). VOne is evaluated alone beside them."""
    from neureg.models.robustness import protocols

    rb, tr = pipeline.robustness, pipeline.training
    monkeypatch.setenv("NEUREG_GROUP", "8")
    attacks = [
        rb.AttackConfig.add(dict(attack="linf_fmn", steps=12), label="fmn group test"),
        rb.AttackConfig.add(dict(attack="l2_ddn", steps=12), label="ddn group test"),
    ]
    configs = [
        rb.NoiseConfig.add(sigmas=[0.0, 0.25, 0.6], n_images=48),
        rb.CorruptionConfig.add(corruptions=["gaussian_noise", "defocus_blur"], severities=[2, 4], n_images=48),
        rb.PerturbationConfig.add(attacks=[a["attack_hash"] for a in attacks], n_images=10, eot_samples=2),
    ]
    nets = [dict(trained[c], seed=s) for c in ("None", "Pixel", "Neural (model)") for s in (0, 1)]
    vone = dict(trained["VOne"], seed=0)
    request.addfinalizer(lambda: _forget(pipeline, configs))  # the session's report tests see only theirs
    with caplog.at_level("INFO", logger="neureg"):
        populate_stage(pipeline, ["robustness"], keys=[dict(n, **c) for n in [*nets, vone] for c in configs])
    for table in ("NoiseAccuracy", "CorruptionAccuracy", "MinimalPerturbation"):
        assert re.search(rf"{table}: group [12] of 2, 6 key\(s\)", caplog.text), table  # the six together, VOne alone
    data = tr.Dataset.load(nets[0])
    attack_configs = [rb.AttackConfig.config_of(a) for a in attacks]
    for net in nets:
        model = (tr.TrainedNetwork & net).load_model()
        noise = protocols.noise_evaluation(
            model, data.test_x, data.test_y, device="cpu", batch_size=None, **rb.NoiseConfig.config_of(configs[0])
        )
        levels = (rb.NoiseAccuracy.Level & net & configs[0]).to_arrays("accuracy", order_by="level")
        assert list(levels) == [a for _, a in noise["levels"]]
        corrupted = protocols.corruption_evaluation(
            model, data.test_x, data.test_y, device="cpu", batch_size=None, **rb.CorruptionConfig.config_of(configs[1])
        )
        row = (rb.CorruptionAccuracy & net & configs[1]).fetch1()
        assert (row["mean_accuracy"], row["clean_accuracy"]) == (
            corrupted["mean_accuracy"],
            corrupted["clean_accuracy"],
        )
        config = rb.PerturbationConfig.config_of(configs[2])
        alone = protocols.perturbation_evaluation(
            model,
            data.test_x,
            data.test_y,
            attack_configs,
            [],
            device="cpu",
            batch_size=None,
            gradient_dtype=None,
            progress=None,
            **config,
        )
        stored = (rb.MinimalPerturbation.Distance & net & configs[2]).to_dicts(order_by="image_index")
        for mine, theirs in zip(stored, alone["images"], strict=True):
            assert mine["clean_correct"] == theirs["clean_correct"]
            for norm in ("linf", "l2"):
                assert (mine[norm] is None) == (theirs[norm] is None)
                if mine[norm] is not None:
                    assert mine[norm] == pytest.approx(theirs[norm], rel=1e-9)
    assert (rb.MinimalPerturbation & vone & configs[2]).fetch1("stochastic")


# ------------------------------------------------------------------------------------------------ the toy stage
# test_worker.py's toy stage (its make_group computes items one after another): the worker's group path
# without training's cost.
_spec = importlib.util.spec_from_file_location("neureg_toy_stage_groups", Path(__file__).with_name("test_worker.py"))
_toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_toy)
run_once, toy_events, toy_report = _toy.run_once, _toy.toy_events, _toy.toy_report


@pytest.fixture
def toy(pipeline, tmp_path, monkeypatch):
    stage = _toy.toy_stage(f"{pipeline.prefix}toyg{uuid.uuid4().hex[:6]}")
    monkeypatch.setenv(_toy.TOY_LOG, str(tmp_path / "toy.log"))
    stage.log = tmp_path / "toy.log"
    stage.pipeline = SimpleNamespace(prefix=pipeline.prefix, toy=stage)
    yield stage
    stage.schema.drop(prompt=False)


def test_a_group_keeps_every_member_reserved_while_one_runs(toy, caplog):
    """--group 3: the three items are reserved together and beat together. Items 2 and 3 wait 3 s inside
    the group behind item 1 with a 1 s orphan timeout: without their own beats they would be reclaimed as
    dead; each is computed once, stored and completed on its own."""
    toy.Item.insert([dict(item=1, first_delay=3.0), dict(item=2, first_delay=0), dict(item=3, first_delay=0)])
    with caplog.at_level("INFO", logger="neureg"):
        assert run_once(toy, orphan_timeout=1, group="3") == 0
    assert "start Square group of 3: item=1; item=2; item=3" in caplog.text
    assert toy_events(toy.log) == {1: 1, 2: 1, 3: 1} and toy_report(toy)["complete"]
    assert toy_report(toy)["jobs"] == {1: "success", 2: "success", 3: "success"}
    assert "stopped beating" not in caplog.text


def test_a_failing_group_member_spends_its_own_attempt(toy):
    toy.Item.insert([dict(item=i, fail_first=int(i == 2)) for i in (1, 2, 3)])
    assert run_once(toy, group="3", retry_delay=0) == 1
    report = toy_report(toy)
    assert report["jobs"] == {1: "success", 2: "error", 3: "success"} and report["squares"] == [1, 3]
    assert report["messages"][2].startswith("[attempt 1 of 3] RuntimeError: toy failure 1 of item 2")
