"""A results table never averages what differs: networks grouped by lineage, metrics by their config."""

from __future__ import annotations

import numpy as np
import pytest

from neureg.reports.lineage import tell_apart
from neureg.reports.robustness import per_network_metrics, results_table, robustness_figures


def test_labels_shared_by_different_settings_get_what_differs():
    named = tell_apart(
        {
            "a": ("None", {"train.epochs": 1, "train.lr": 0.1, "reg.alpha": 0.0}),
            "b": ("None", {"train.epochs": 2, "train.lr": 0.1, "reg.alpha": 0.0}),
            "c": ("Shuffle", {"train.epochs": 1, "train.lr": 0.1, "reg.alpha": 10.0}),
            "d": ("robust accuracy Linf 0.0314", {"n_images": 24, "label": "quick"}),
            "e": ("robust accuracy Linf 0.0314", {"n_images": 50, "label": "paper"}),
        }
    )
    assert named == {
        "a": "None (train.epochs=1)",
        "b": "None (train.epochs=2)",
        "c": "Shuffle",
        "d": "robust accuracy Linf 0.0314 (label=quick)",  # distinct labels say it alone
        "e": "robust accuracy Linf 0.0314 (label=paper)",
    }
    same_label = tell_apart({1: ("x", {"n": 1, "label": ""}), 2: ("x", {"n": 2, "label": ""})})
    assert same_label == {1: "x (n=1)", 2: "x (n=2)"}


def test_an_extra_run_and_a_second_config_of_one_name_are_never_averaged_in(pipeline, trained, evaluated, tmp_path):
    """The collisions a lab met: one more None network trained with another schedule joined the None row
    (n=3), and two fixed-epsilon configs at Linf 8/255 on 40 and 24 images printed as one column (the last
    fetched won). Both now stand apart, each equal to its own rows."""
    from neureg.populate.stages import populate_stage

    tr, rb = pipeline.training, pipeline.robustness
    none = trained["None"]
    schedule = dict(tr.TrainConfig.config_of(none), epochs=1)
    extra = tr.plan("mnist_demo", tr.NetworkConfig.config_of(none), schedule, dict(alpha=0))
    second = rb.RobustConfig.add(norm="linf", epsilon=8 / 255, steps=5, n_images=24)
    try:
        populate_stage(pipeline, ["training"], keys=[dict(extra, seed=1)])
        keys = [dict(none, seed=s, **second) for s in (0, 1)] + [dict(extra, seed=1, **evaluated["robust_linf"])]
        populate_stage(pipeline, ["robustness"], keys=keys)
        restriction = [dict(none), dict(extra)]
        table = {row["condition"]: row for row in results_table(pipeline, restriction)}
        assert set(table) == {"None (train.epochs=1)", "None (train.epochs=2)"}
        for label, plan, n in (("None (train.epochs=2)", none, 2), ("None (train.epochs=1)", extra, 1)):
            accuracies = (tr.TrainedNetwork & plan).to_arrays("test_accuracy")
            assert table[label]["clean accuracy"][::2] == (pytest.approx(np.mean(accuracies)), n)
        columns = {
            n_images: f"robust accuracy Linf 0.0314 (n_images={n_images})"
            for n_images in (24, 40)  # the fixture's config is on 40 images
        }
        for n_images, config in ((40, evaluated["robust_linf"]), (24, second)):
            stored = (rb.RobustAccuracy & none & config).to_arrays("robust_accuracy")
            assert table["None (train.epochs=2)"][columns[n_images]][::2] == (pytest.approx(np.mean(stored)), 2)
        assert columns[24] not in table["None (train.epochs=1)"]
        rows = per_network_metrics(pipeline, {"seed": 1, "condition": "None"})
        assert sorted(r["condition"] for r in rows) == ["None (train.epochs=1)", "None (train.epochs=2)"]
        robustness_figures(pipeline, tmp_path, restriction)
        markdown = (tmp_path / "robustness_results.md").read_text()
        assert "| None (train.epochs=1) |" in markdown and "| None (train.epochs=2) |" in markdown
        assert not (tmp_path / "robustness_vs_none.md").read_text().count("| None (train.epochs=1) |")
        with pytest.raises(ValueError, match=r"cannot restrict trained networks by \['mouse'\]"):
            per_network_metrics(pipeline, {"mouse": "m1"})  # DataJoint would return every network
        with pytest.raises(LookupError, match="no trained network matches"):
            robustness_figures(pipeline, tmp_path, {"seed": 99})
    finally:
        (rb.RobustAccuracy & second).delete(prompt=False)
        (rb.RobustConfig & second).delete(prompt=False)
        (tr.TrainedNetwork & extra).delete(prompt=False)
        (tr.TrainingPlan & extra).delete(prompt=False)
