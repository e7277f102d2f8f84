"""`neureg plan paper`: one command registers Li et al. 2019's experiment; a dry run writes nothing."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from neureg.experiments.paper import PAPER_ALPHA, PlanError, plan_paper
from neureg.models.vision.datasets import CIFAR10_FOLDER
from neureg.upkeep.status import table_counts

CONDITIONS = {"None", "Shuffle", "Neural (model)", "Pixel", "VOne"}
METHODS = {"neural_model", "neural_data", "shuffle", "pixel", "pixel_threshold"}


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """A tiny CIFAR-10 in the python-pickle layout: five training batches of 4 images, a test batch of 6."""
    return write_cifar10(tmp_path_factory.mktemp("cifar"), seed=7)


def write_cifar10(root, seed):
    rng = np.random.default_rng(seed)
    folder = root / CIFAR10_FOLDER
    folder.mkdir()
    batches = {f"data_batch_{i}": 4 for i in range(1, 6)} | {"test_batch": 6}
    for name, n in batches.items():
        payload = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [b"x.png"] * n,
        }
        (folder / name).write_bytes(pickle.dumps(payload))
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_cases_per_batch": 4, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return root


def plan_cli(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "neureg.cli", "plan", "paper", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _items(run) -> list[dict]:
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def _of(items, table) -> list[dict]:
    return [item for item in items if item["table"] == table]


def test_plan_paper_registers_the_experiment_once(pipeline, cohort, subprocess_env, cifar_root, tmp_path):
    """Dry run writes nothing and lists exactly what the real run then writes; a rerun finds it all there."""
    before = table_counts(pipeline)
    dry = _items(plan_cli(subprocess_env, "--cifar", str(cifar_root), "--seeds", "2", "--dry-run", "--json"))
    assert table_counts(pipeline) == before  # not one row in any table

    real = _items(plan_cli(subprocess_env, "--cifar", str(cifar_root), "--seeds", "2", "--json"))
    assert real == dry  # the dry run is the real run, rolled back
    after = table_counts(pipeline)
    new = sum(item["status"] == "new" for item in real)
    assert sum(after.values()) - sum(before.values()) == new + sum(  # ScanSet members land with their set
        len(pipeline.experiment.ScanSet.Member & i["key"])
        for i in _of(real, "experiment.ScanSet")
        if i["status"] == "new"
    )

    # 1 predictor config: the default but for the image scale
    (predictor,) = _of(real, "predictive.PredictorConfig")
    config = pipeline.predictive.PredictorConfig.config_of(predictor["key"])
    default = pipeline.predictive.PredictorConfig.complete()
    assert config == {**default, "image_scale": 0.25} and predictor["label"] == "paper"
    # the scan set of every ingested scan
    (scan_set,) = _of(real, "experiment.ScanSet")
    scans = pipeline.experiment.Scan().keys(order_by="KEY")
    assert len(scans) >= 4 and (pipeline.experiment.ScanSet & scan_set["key"]).members() == scans
    assert scan_set["label"].startswith("paper: all") or scan_set["status"] == "exists"
    # 5 target configs; the model-based ones name the paper's predictor, the others its image scale
    targets = {
        pipeline.similarity.TargetConfig.config_of(t["key"])["method"]: t["key"]
        for t in _of(real, "similarity.TargetConfig")
    }
    assert set(targets) == METHODS and len(_of(real, "similarity.TargetConfig")) == 5
    for method, key in targets.items():
        config = pipeline.similarity.TargetConfig.config_of(key)
        if method in ("neural_model", "shuffle"):
            assert config["predictor_hash"] == predictor["key"]["predictor_hash"]
        else:
            assert config["image_scale"] == 0.25
    # 5 conditions on CIFAR-10, the paper's schedule, x seeds 0 and 1
    plans = pipeline.training.TrainingPlan & [p["key"] for p in _of(real, "training.TrainingPlan")]
    assert sorted(plans.to_arrays("condition")) == sorted(CONDITIONS) and len(plans) == 5
    assert set(plans.to_arrays("dataset")) == {"cifar10"}
    assert {
        pipeline.training.TrainConfig.config_of(k) == pipeline.training.TrainConfig.complete() for k in plans.keys()
    } == {True}
    assert {0, 1} <= set(pipeline.training.Seed().to_arrays("seed"))
    assert len(plans * (pipeline.training.Seed & "seed < 2")) == 10
    for row in (pipeline.training.RegularizerConfig * plans).to_dicts():
        if row["condition"] in ("None", "VOne"):
            assert row["regularizer_config"]["alpha"] == 0 and row["target_hash"] is None
        else:
            method = {"Shuffle": "shuffle", "Neural (model)": "neural_model", "Pixel": "pixel"}[row["condition"]]
            assert row["regularizer_config"]["alpha"] == PAPER_ALPHA
            assert (row["scan_set"], row["target_hash"]) == (
                scan_set["key"]["scan_set"],
                targets[method]["target_hash"],
            )
    vone = pipeline.training.NetworkConfig.config_of((plans & {"condition": "VOne"}).fetch1("KEY"))
    assert vone["arch"] == "vone_resnet18"
    # the standard robustness evaluation
    standard = pipeline.robustness.add_standard_configs()  # idempotent: the keys the plan registered
    assert len(_of(real, "robustness.AttackConfig")) == len(standard["attacks"])
    for table in ("NoiseConfig", "PerturbationConfig", "CorruptionConfig"):
        assert len(_of(real, f"robustness.{table}")) == 1
    assert len(_of(real, "robustness.RobustConfig")) == 2

    # a rerun: everything exists, nothing is written; the text form says so
    again = _items(plan_cli(subprocess_env, "--cifar", str(cifar_root), "--seeds", "2", "--json"))
    assert [i["status"] for i in again] == ["exists"] * len(real)
    assert [(i["table"], i["key"]) for i in again] == [(i["table"], i["key"]) for i in real]
    text = plan_cli(subprocess_env, "--cifar", str(cifar_root), "--seeds", "2", "--dry-run")
    assert text.returncode == 0, text.stderr[-3000:]
    lines = text.stdout.strip().splitlines()
    assert all(line.startswith("exists") for line in lines[:-1]) and len(lines) == len(real) + 1
    assert "dry run: 0 new row(s)" in lines[-1]
    assert table_counts(pipeline) == after

    # other numbers under the same name: refused, nothing written (the runs would not be what was planned)
    other = write_cifar10(tmp_path, seed=8)
    run = plan_cli(subprocess_env, "--cifar", str(other), "--seeds", "3")
    assert run.returncode == 2 and f"--cifar {other} holds other data than the cifar10" in run.stderr, run.stderr
    assert table_counts(pipeline) == after


def test_wrong_cifar_path_exits_2_and_writes_nothing(pipeline, cohort, subprocess_env, tmp_path):
    before = table_counts(pipeline)
    wrong = tmp_path / "no_cifar_here"
    run = plan_cli(subprocess_env, "--cifar", str(wrong), "--seeds", "2")
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]  # (MariaDB warns too)
    assert len(errors) == 1 and str(wrong) in errors[0] and "Traceback" not in run.stderr, run.stderr
    assert run.stdout == ""
    assert table_counts(pipeline) == before


def _stub_pipeline(n_scans, n_unusable=0):
    """Just the experiment tables' scan listings: the checks that come before any database write."""

    def keys(first, n):
        listing = {"keys": lambda self, order_by=None: [{"scan_idx": i} for i in range(first, n)]}
        return type("Scans", (), {**listing, "__and__": lambda self, sealed: self})  # every stub scan is sealed

    every, unusable = keys(0, n_scans + n_unusable), keys(n_scans, n_scans + n_unusable)
    return SimpleNamespace(
        experiment=SimpleNamespace(Scan=every(), Ingestion=None, scans_without_usable_repeats=unusable)
    )


@pytest.mark.parametrize("n_scans", [0, 1])
def test_fewer_than_two_scans_are_refused(n_scans, tmp_path):
    """Checked before the dataset is read or anything is written."""
    with pytest.raises(PlanError, match=f"{n_scans} scan\\(s\\) ingested; the experiment needs at least 2"):
        plan_paper(_stub_pipeline(n_scans), tmp_path / "never_read")


def test_scans_without_usable_repeats_do_not_count(tmp_path):
    """A scan that never gets oracle statistics would keep its set's targets from ever being computed."""
    with pytest.raises(PlanError, match=r"1 scan\(s\) ingested \(3 more without usable repeats"):
        plan_paper(_stub_pipeline(1, n_unusable=3), tmp_path / "never_read")


@pytest.mark.parametrize("seeds", [0, -1, 1001, 3_000_000_000])
def test_seeds_out_of_range_are_refused_before_anything(tmp_path, seeds):
    with pytest.raises(PlanError, match=rf"--seeds must be 1\.\.1000 \(networks per condition\), got {seeds}"):
        plan_paper(_stub_pipeline(4), tmp_path, seeds=seeds)


def test_seeds_not_a_whole_number_is_exit_2(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "neureg.cli", "plan", "paper", "--cifar", str(tmp_path), "--seeds", "3e9"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "invalid int value: '3e9'" in run.stderr and "Traceback" not in run.stderr


class _Payload:
    """What a hostile download hides in a batch: unpickling it would run a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _plant(batch_file, marker) -> bytes:
    """Rewrite a CIFAR batch so it still holds valid data and labels, plus a payload; return the original."""
    original = batch_file.read_bytes()
    batch = pickle.loads(original)
    batch[b"extra"] = _Payload(marker)
    batch_file.write_bytes(pickle.dumps(batch))
    return original


def test_a_payload_in_a_cifar_batch_never_runs_before_planning(pipeline, cohort, subprocess_env, tmp_path):
    root = write_cifar10(tmp_path, seed=8)
    marker = tmp_path / "payload-ran"
    _plant(root / CIFAR10_FOLDER / "data_batch_1", marker)
    before = table_counts(pipeline)
    for args in (("--dry-run",), ()):
        run = plan_cli(subprocess_env, "--cifar", str(root), "--seeds", "1", *args)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert f"{root / CIFAR10_FOLDER / 'data_batch_1'}" in run.stderr and "posix.system" in run.stderr
    assert not marker.exists(), "the payload ran"
    assert table_counts(pipeline) == before


def test_a_payload_swapped_in_after_planning_never_runs_on_a_worker(pipeline, cifar_root, tmp_path):
    from neureg.errors import DatasetError

    training = pipeline.training
    key = {"dataset": "cifar10"}
    if not (training.Dataset & key):
        training.Dataset.add("cifar10", cifar_root)
    root = Path((training.Dataset & key).fetch1("data_root"))
    batch_file = (root if root.name == CIFAR10_FOLDER else root / CIFAR10_FOLDER) / "data_batch_1"
    marker = tmp_path / "payload-ran"
    original = _plant(batch_file, marker)
    try:
        with pytest.raises(DatasetError, match="refers to posix.system, which a CIFAR batch never does"):
            training.Dataset.load(key)  # what TrainedNetwork.make_fetch calls on a worker
    finally:
        batch_file.write_bytes(original)
    assert not marker.exists(), "the payload ran"
    assert training.Dataset.load(key).n_classes == 10
