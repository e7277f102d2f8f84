"""Robustness tables and the results table, on tiny networks trained on the MNIST demo set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neureg.models.robustness.protocols import evaluation_subset
from neureg.reports.robustness import per_network_metrics, results_table, robustness_figures, write_attack_coverage


def test_noise_accuracy_levels_match_a_direct_computation(pipeline, trained, evaluated):
    rb, tr = pipeline.robustness, pipeline.training
    key = dict(trained["None"], seed=0, **evaluated["noise"])
    row = (rb.NoiseAccuracy & key).fetch1()
    levels = (rb.NoiseAccuracy.Level & key).to_dicts(order_by="level")
    assert [lv["sigma"] for lv in levels] == [0.0, 0.1, 0.3] and row["n_images"] == 60
    assert levels[0]["accuracy"] == pytest.approx(row["clean_accuracy"])
    test = tr.Dataset.load(key)
    pick = evaluation_subset(len(test.test_y), 60, 0)
    images, labels = test.test_x[pick], test.test_y[pick]
    model = (tr.TrainedNetwork & key).load_model()
    z = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        noisy = (torch.as_tensor(images) + 0.3 * z).clamp(0, 1)
        expected = (model(noisy).argmax(1).numpy() == labels).mean()
    assert levels[2]["accuracy"] == pytest.approx(expected)


def test_minimal_perturbation_rows(pipeline, trained, evaluated):
    rb = pipeline.robustness
    for condition, plan in trained.items():
        for seed in (0, 1):
            key = dict(plan, seed=seed, **evaluated["perturbation"])
            row = (rb.MinimalPerturbation & key).fetch1()
            images = (rb.MinimalPerturbation.Distance & key).to_dicts(order_by="image_index")
            assert len(images) == row["n_images"] == 12
            assert row["stochastic"] == (condition == "VOne")
            assert row["clean_accuracy"] == pytest.approx(np.mean([i["clean_correct"] for i in images]))
            linf = np.array([np.inf if i["linf"] is None else i["linf"] for i in images])  # null: unbroken
            median = np.median(linf)
            assert (row["median_linf"] is None) if np.isinf(median) else row["median_linf"] == pytest.approx(median)
            assert np.all(linf[~np.array([i["clean_correct"] for i in images])] == 0)
            assert len(rb.MinimalPerturbation.Attack & key) == 2


def test_robust_accuracy_is_at_most_clean(pipeline, trained, evaluated):
    """Exactly for deterministic networks (float32 means); VOne's clean and robust numbers come from
    independent noise draws of its EoT average, so they may differ by a few of the 40 images."""
    rb = pipeline.robustness
    vone = [dict(trained["VOne"], seed=s) for s in (0, 1)]
    for name in ("robust_linf", "robust_l2"):
        rows = (rb.RobustAccuracy & evaluated[name]).to_dicts()
        assert len(rows) == 8
        for row in rows:
            stochastic = any(all(row[k] == v for k, v in key.items()) for key in vone)
            assert row["robust_accuracy"] <= row["clean_accuracy"] + (0.1 if stochastic else 1e-6), row


def test_corruption_accuracy_levels(pipeline, trained, evaluated):
    rb = pipeline.robustness
    for row in (rb.CorruptionAccuracy & evaluated["corruption"]).to_dicts():
        levels = (rb.CorruptionAccuracy.Level & row).to_arrays("accuracy")
        assert len(levels) == 4 and row["mean_accuracy"] == pytest.approx(np.mean(levels))


def test_results_table_is_mean_and_sem_over_seeds(pipeline, trained, evaluated, tmp_path):
    restriction = [dict(k) for k in trained.values()]
    rows = per_network_metrics(pipeline, restriction)
    table = {r["condition"]: r for r in results_table(pipeline, restriction)}
    assert set(table) == set(trained)
    for condition in trained:
        values = [r["clean accuracy"] for r in rows if r["condition"] == condition]
        mean, sem, n = table[condition]["clean accuracy"]
        assert n == 2 and mean == pytest.approx(np.mean(values))
        assert sem == pytest.approx(np.std(values, ddof=1) / np.sqrt(2))
        assert "median Linf perturbation" in table[condition] and "corruption accuracy" in table[condition]
    paths = robustness_figures(pipeline, tmp_path, restriction)  # other tests train None networks of their own
    names = {p.name for p in paths}
    assert {
        "robustness_results.csv",
        "robustness_results.md",
        "robustness_noise.png",
        "robustness_perturbation.png",
    } <= names
    markdown = (tmp_path / "robustness_results.md").read_text()
    assert "| None |" in markdown and "±" in markdown


def test_bad_robustness_configs_are_refused(pipeline, evaluated):
    rb = pipeline.robustness
    tables = (rb.NoiseConfig, rb.AttackConfig, rb.PerturbationConfig, rb.RobustConfig, rb.CorruptionConfig)
    before = [len(t()) for t in tables]
    with pytest.raises(ValueError, match="sigmas"):
        rb.NoiseConfig.add(sigmas=[-1.0])
    with pytest.raises(ValueError):
        rb.AttackConfig.add(dict(attack="fgsm"))
    with pytest.raises(ValueError, match="not in AttackConfig"):
        rb.PerturbationConfig.add(attacks=["0" * 32])
    with pytest.raises(ValueError, match="norm"):
        rb.RobustConfig.add(norm="l1")
    with pytest.raises(ValueError, match="unknown corruption"):
        rb.CorruptionConfig.add(corruptions=["fog"])
    with pytest.raises(ValueError, match="needs 'path'"):
        rb.CorruptionConfig.add(source="cifar10c")
    assert [len(t()) for t in tables] == before


def test_standard_budgets_follow_the_dataset(pipeline):
    """MNIST gets MNIST's budgets (a CIFAR one separates nothing there); CIFAR keeps the leaderboards' rows,
    whose hashes are those written before budgets depended on the dataset."""
    rb = pipeline.robustness
    mnist = rb.add_standard_configs(quick=True, dataset="mnist_demo")
    budgets = {
        norm: sorted((rb.RobustConfig & key).fetch1("robust_config")["epsilon"] for key in mnist[f"robust_{norm}"])
        for norm in ("linf", "l2")
    }
    assert budgets == {"linf": [0.1, 0.2, 0.3], "l2": [1.5, 2.0]}
    labels = {(rb.RobustConfig & key).fetch1("robust_label") for key in mnist["robust_linf"] + mnist["robust_l2"]}
    assert labels == {"pgd linf 0.1", "pgd linf 0.2", "pgd linf 0.3", "pgd l2 1.5", "pgd l2 2"}
    cifar = rb.add_standard_configs(quick=True)
    assert cifar["robust_linf"] == [
        rb.RobustConfig.add(method="pgd", norm="linf", epsilon=8 / 255, steps=10, n_images=100)
    ]
    assert cifar["robust_l2"] == [rb.RobustConfig.add(method="pgd", norm="l2", epsilon=0.5, steps=10, n_images=100)]
    assert (rb.RobustConfig & cifar["robust_linf"][0]).fetch1("robust_label") == "pgd linf 8/255"
    tables = (rb.NoiseConfig, rb.AttackConfig, rb.PerturbationConfig, rb.RobustConfig, rb.CorruptionConfig)
    before = [len(t()) for t in tables]
    with pytest.raises(ValueError, match="no fixed-epsilon budgets for dataset 'imagenet'"):
        rb.add_standard_configs(dataset="imagenet", n_images=7)
    assert [len(t()) for t in tables] == before


def test_a_config_keyed_before_cross_checks_existed_is_the_same_row(pipeline, evaluated):
    """Keys a config gained later hash as if absent at their neutral value, and a key that left it (the
    attack batch, an execution setting now) at its old value: the row of a config written by the older code
    and the same config added today are one row, read back in today's form."""
    from neureg.models.digests import stable_hash

    rb = pipeline.robustness
    stored = (rb.PerturbationConfig & evaluated["perturbation"]).fetch1("perturbation_config")
    assert stored["cross_checks"] == [] and stored["cross_check_images"] == 100 and "batch_size" not in stored
    legacy = {k: v for k, v in stored.items() if k not in ("cross_checks", "cross_check_images")}
    legacy["batch_size"] = 128
    assert evaluated["perturbation"] == {"perturbation_hash": stable_hash(legacy)}
    old = dict(legacy, n_images=13)  # a row as the code before cross-checks wrote it
    key = {"perturbation_hash": stable_hash(old)}
    rb.PerturbationConfig.insert1({**key, "perturbation_config": old, "perturbation_label": "legacy"})
    today = {k: v for k, v in old.items() if k != "batch_size"}
    try:
        assert rb.PerturbationConfig.config_of(key) == dict(today, cross_checks=[], cross_check_images=100)
        before = len(rb.PerturbationConfig())
        assert rb.PerturbationConfig.add(today) == key and len(rb.PerturbationConfig()) == before
        assert rb.PerturbationConfig.add(today, cross_checks=[], cross_check_images=100) == key  # spelled out
        assert rb.PerturbationConfig.key_of(rb.PerturbationConfig.complete(today, cross_check_images=50)) != key
        with pytest.raises(ValueError, match=r"\['batch_size'\] left the config: an execution setting now"):
            rb.PerturbationConfig.add(old)
        assert len(rb.PerturbationConfig()) == before
    finally:
        (rb.PerturbationConfig & key).delete_quick()
    with pytest.raises(ValueError, match="both primary attacks and cross-checks"):
        rb.PerturbationConfig.add(today, cross_checks=today["attacks"][:1])


def test_cross_checks_run_on_a_subset_and_report_what_they_won(pipeline, trained, evaluated, tmp_path):
    """DDN on all 12 images, the PGD search on the first 5: every stored number equals the attacks run
    directly on those images, and the coverage rows say who ran where."""
    from neureg.models.robustness.attacks import minimal_perturbations
    from neureg.populate.stages import populate_stage

    rb, tr = pipeline.robustness, pipeline.training
    pgd, ddn = evaluated["attacks"]
    config = rb.PerturbationConfig.add(
        attacks=[ddn["attack_hash"]], cross_checks=[pgd["attack_hash"]], cross_check_images=5, n_images=12
    )
    key = dict(trained["None"], seed=0, **config)
    populate_stage(pipeline, ["robustness"], keys=[key])
    test = tr.Dataset.load(key)
    pick = evaluation_subset(len(test.test_y), 12, 0)
    images, labels = test.test_x[pick], test.test_y[pick]
    model = (tr.TrainedNetwork & key).load_model()
    as_config = lambda k: rb.AttackConfig.config_of(k)  # noqa: E731
    alone_l2 = minimal_perturbations(model, images, labels, [as_config(ddn)]).distances[0]
    alone_linf = minimal_perturbations(model, images[:5], labels[:5], [as_config(pgd)]).distances[0]
    rows = (rb.MinimalPerturbation.Distance & key).to_dicts(order_by="image_index")
    stored = lambda rows, norm: np.array([np.inf if r[norm] is None else r[norm] for r in rows])  # noqa: E731
    np.testing.assert_allclose(stored(rows, "l2"), alone_l2)
    np.testing.assert_allclose(stored(rows[:5], "linf"), alone_linf)
    wrong = ~np.array([bool(r["clean_correct"]) for r in rows])  # MySQL returns 0 / 1
    assert np.all(stored(rows[5:], "linf")[~wrong[5:]] == np.inf) and np.all(stored(rows, "linf")[wrong] == 0)
    coverage = {r["attack_hash"]: r for r in (rb.MinimalPerturbation.Coverage & key).to_dicts()}
    assert coverage[ddn["attack_hash"]] == dict(
        key, attack_hash=ddn["attack_hash"], n_images=12, cross_check=False, beat_primary=None
    )
    check = coverage[pgd["attack_hash"]]
    assert check["cross_check"] and check["n_images"] == 5
    assert check["beat_primary"] == int((np.isfinite(alone_linf) & ~wrong[:5]).sum())  # no primary Linf attack
    lines = write_attack_coverage(pipeline, tmp_path).read_text().splitlines()
    label = config["perturbation_hash"][:8]
    assert f"| {label} | l2_ddn, steps=20 | primary | 1 | 12 |  |" in lines
    assert f"| {label} | linf_pgd, steps=8, search_steps=5 | cross-check | 1 | 5 | {check['beat_primary']} |" in lines
