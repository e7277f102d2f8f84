"""Adding a similarity method is one registered function: a toy method goes through the plan, populate and the
report with no other edit (docs/architecture.md, "Adding a similarity method")."""

from __future__ import annotations

import numpy as np
import pytest

from neureg.models.conditions import condition_order
from neureg.models.neural import similarity
from neureg.models.neural.images import downsample
from neureg.models.neural.targets import TARGETS, Target, TargetInputs
from neureg.models.registry import UnitInterval
from neureg.populate.stages import populate_stage
from neureg.reports.robustness import per_network_metrics, results_table, robustness_figures

TOY, CONDITION = "toy_mirror", "Toy mirror"


def toy_mirror(inputs: TargetInputs, image_scale: UnitInterval = 1.0) -> Target:
    """Pixel similarity of the left-right mirrored images: a target no built-in method computes."""
    return Target(similarity.pixel_similarity(downsample(inputs.images[:, :, ::-1], image_scale)), image_scale)


@pytest.fixture
def toy_method(pipeline):
    """The toy method registered as a lab would (one decorator), removed again with every row made with it."""
    TARGETS.register(TOY, reads="images", condition=CONDITION, rank=6)(toy_mirror)
    yield
    TARGETS.unregister(TOY)
    configs = pipeline.similarity.TargetConfig & f"target_label = '{TOY}'"
    configs.delete(prompt=False)  # cascades to its target, regularizer, plan, network and scores


def test_a_registered_method_runs_through_plan_populate_and_report(pipeline, targets, toy_method, tmp_path):
    si, tr, rb = pipeline.similarity, pipeline.training, pipeline.robustness
    assert condition_order().index(CONDITION) == condition_order().index("VGG") + 1  # its rank orders tables
    scan_set = {"scan_set": targets["pixel"]["scan_set"]}
    target = dict(scan_set, **si.TargetConfig.add({"method": TOY, "image_scale": 0.5}, label=TOY))
    populate_stage(pipeline, ["similarity"], keys=[target])
    hashes, matrix = (si.SimilarityTarget & target).labeled()
    images = pipeline.experiment.load_images(hashes)
    np.testing.assert_allclose(matrix, toy_mirror(TargetInputs(len(hashes), images=images), 0.5).matrix, atol=1e-6)

    plan = tr.plan(
        "mnist_demo",
        dict(width=0.0625),
        dict(epochs=1, max_train_images=96, batch_size=32),
        dict(alpha=2.0, pairs_per_step=8),
        target=target,
    )
    assert (tr.TrainingPlan & plan).fetch1("condition") == CONDITION
    noise = rb.NoiseConfig.add(sigmas=[0.0, 0.3], n_images=40, label="toy")
    populate_stage(pipeline, ["training"], keys=[dict(plan, seed=0)])
    populate_stage(pipeline, ["robustness"], keys=[dict(plan, seed=0, **noise)])  # this config only
    assert len(rb.NoiseAccuracy & plan) == 1
    rows = {row["condition"]: row for row in results_table(pipeline)}
    assert CONDITION in rows and rows[CONDITION]["clean accuracy"][2] == 1  # one seed
    plan_condition = {r["condition"]: r["plan condition"] for r in per_network_metrics(pipeline)}
    ranks = [condition_order().index(plan_condition[label]) for label in rows]  # told-apart labels by their own
    assert ranks == sorted(ranks) and plan_condition[CONDITION] == CONDITION
    robustness_figures(pipeline, tmp_path)
    assert f"| {CONDITION} |" in (tmp_path / "robustness_results.md").read_text()
