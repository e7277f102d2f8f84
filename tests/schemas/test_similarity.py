"""Similarity targets: each method against an independent computation from the stored inputs."""

from __future__ import annotations

import numpy as np
import pytest

from neureg.models.neural.rsa import centered_cosine


def _load(pipeline, key):
    hashes, matrix = (pipeline.similarity.SimilarityTarget & key).labeled()
    return pipeline.experiment.load_images(hashes), matrix


def _members(pipeline, key):
    return (pipeline.experiment.ScanSet.Member & key).keys(order_by="KEY")


def _hashes(pipeline, key):
    return np.asarray((pipeline.similarity.SimilarityTarget.Image & key).to_arrays("image_hash", order_by="row_index"))


def test_every_method_gives_a_valid_matrix_over_non_oracle_images(pipeline, targets):
    exp = pipeline.experiment
    for method, key in targets.items():
        images, matrix = _load(pipeline, key)
        n = len(images)
        assert matrix.shape == (n, n) and n == 170 - 40, method
        np.testing.assert_allclose(matrix, matrix.T, atol=1e-6, err_msg=method)
        oracle_images = set((exp.Trial & "tier = 'oracle'").to_arrays("image_hash"))
        assert not oracle_images & set(_hashes(pipeline, key)), method
        assert (pipeline.similarity.SimilarityTarget & key).fetch1("method") == method


def test_pixel_targets_match_a_direct_computation(pipeline, targets):
    images, pixel = _load(pipeline, targets["pixel"])
    x = images.reshape(len(images), -1).astype(np.float64)
    e = (x - x.mean(0)) / np.linalg.norm(x - x.mean(0), axis=1, keepdims=True)
    np.testing.assert_allclose(pixel, e @ e.T, atol=1e-5)
    _, thresholded = _load(pipeline, targets["pixel_threshold"])
    expected = np.where(e @ e.T > 0.8, 1.0, np.where(e @ e.T < -0.8, -1.0, 0.0))
    assert np.array_equal(thresholded, expected)


def test_neural_data_target_is_the_mean_of_the_scans_data_similarity(pipeline, targets):
    key = targets["neural_data"]
    hashes = _hashes(pipeline, key)
    _, target = _load(pipeline, key)
    stack = []
    for member in _members(pipeline, key):
        rows, matrix = (pipeline.oracle.DataSimilarity & member).labeled()
        pos = {h: i for i, h in enumerate(rows)}
        idx = [pos[h] for h in hashes]
        stack.append(np.asarray(matrix)[np.ix_(idx, idx)])
    np.testing.assert_allclose(target, np.mean(stack, axis=0), atol=1e-6)


def test_neural_model_target_is_equation_6_averaged_over_scans(pipeline, targets):
    key = targets["neural_model"]
    config = pipeline.similarity.TargetConfig.config_of(key)
    hashes = _hashes(pipeline, key)
    _, target = _load(pipeline, key)
    stack = []
    for member in _members(pipeline, key):
        model_key = dict(member, predictor_hash=config["predictor_hash"], seed=config["predictor_seed"])
        rows, predicted = (pipeline.predictive.ModelResponses & model_key).labeled()
        pos = {h: i for i, h in enumerate(rows)}
        order = "unit_index"
        w = (pipeline.oracle.OracleStats.Unit * pipeline.experiment.Scan.Unit & member).to_arrays(
            "snr_weight", order_by=order
        )
        v = (pipeline.predictive.PredictiveModel.Unit * pipeline.experiment.Scan.Unit & model_key).to_arrays(
            "model_corr", order_by=order
        )
        stack.append(centered_cosine(predicted[[pos[h] for h in hashes]] * w * np.clip(v, 0, None)))
    np.testing.assert_allclose(target, np.mean(stack, axis=0), atol=1e-5)
    agreement = (pipeline.similarity.SimilarityTarget.Agreement & key).to_arrays("scan_target_r")
    assert len(agreement) == 4 and np.all(agreement > 0)


def test_shuffle_permutes_the_neural_model_target(pipeline, targets):
    _, model = _load(pipeline, targets["neural_model"])
    _, shuffled = _load(pipeline, targets["shuffle"])
    perm = (pipeline.similarity.SimilarityTarget & targets["shuffle"]).fetch1("permutation").ravel().astype(int)
    assert sorted(perm) == list(range(len(model))) and not np.array_equal(perm, np.arange(len(model)))
    np.testing.assert_allclose(shuffled, model[np.ix_(perm, perm)], atol=1e-7)
    # Its per-scan agreement compares each scan's matrix under the same permutation: the consistency of
    # the scans with the target, as for neural_model (not ~0, which comparing unpermuted scans gave).
    agreement = pipeline.similarity.SimilarityTarget.Agreement
    for row in (agreement & targets["neural_model"]).to_dicts():
        scan = {k: row[k] for k in ("mouse", "session", "scan_idx")}
        shuffled_r = (agreement & targets["shuffle"] & scan).fetch1("scan_target_r")
        assert shuffled_r == pytest.approx(row["scan_target_r"], abs=1e-5), scan


def test_random_target_has_no_image_structure(pipeline, targets):
    _, random = _load(pipeline, targets["random"])
    _, pixel = _load(pipeline, targets["pixel"])
    upper = np.triu_indices(len(random), 1)
    assert abs(np.corrcoef(random[upper], pixel[upper])[0, 1]) < 0.1
    np.testing.assert_allclose(np.diag(random), 1, atol=1e-6)


def test_model_agreement_per_scan(pipeline, oracle_populated, predictive_populated, targets):
    agreement = pipeline.similarity.ModelAgreement
    for _, scan_key in oracle_populated:
        row = (agreement & dict(scan_key, **predictive_populated)).fetch1()
        assert row["n_images"] == 40 and -1 <= row["model_oracle_r"] <= 1
        assert row["data_oracle_r"] == pytest.approx(
            (pipeline.oracle.OracleSimilarity & scan_key).fetch1("data_oracle_r")
        )


def test_bad_target_configs_are_refused_and_change_nothing(pipeline, targets, tmp_path):
    table = pipeline.similarity.TargetConfig
    before = len(table())
    with pytest.raises(ValueError, match="unknown similarity method"):
        table.add(dict(method="fmri"))
    with pytest.raises(ValueError, match="needs vgg_weights"):
        table.add(dict(method="vgg"))
    with pytest.raises(ValueError, match="no file at"):
        table.add(dict(method="vgg", vgg_weights=str(tmp_path / "missing.pth")))
    with pytest.raises(ValueError, match="threshold"):
        table.add(dict(method="pixel_threshold", threshold=1.5))
    with pytest.raises(ValueError, match="not in predictive.PredictorConfig"):
        table.add(dict(method="neural_model", predictor_hash="0" * 32))
    # a setting the method does not take is refused, not silently stored in (and splitting) the hash
    with pytest.raises(ValueError, match="unknown config key"):
        table.add(dict(method="pixel", threshold=0.5))
    assert len(table()) == before
    assert table.config_of(table.add(dict(method="pixel"))) == {"method": "pixel", "image_scale": 1.0}


def test_vgg_target_from_a_weights_file(pipeline, targets, tmp_path):
    torch = pytest.importorskip("torch")
    from torchvision.models import vgg19

    from neureg.models.neural.similarity import vgg_similarity
    from neureg.populate.stages import populate_stage

    torch.manual_seed(0)
    path = tmp_path / "vgg19.pth"
    torch.save(vgg19(weights=None).state_dict(), path)
    config = pipeline.similarity.TargetConfig.add(dict(method="vgg", vgg_weights=str(path)))
    key = dict(_members_set(pipeline, targets), **config)
    populate_stage(pipeline, ["similarity"], keys=[key])
    images, matrix = _load(pipeline, key)
    np.testing.assert_allclose(matrix, vgg_similarity(images, path), atol=1e-5)
    assert len((pipeline.similarity.SimilarityTarget & key).fetch1("weights_sha256")) == 64


def _members_set(pipeline, targets):
    return {"scan_set": targets["pixel"]["scan_set"]}


def test_report_similarity_writes_figures(pipeline, targets, tmp_path):
    from neureg.reports.similarity import similarity_figures

    paths = similarity_figures(pipeline, tmp_path)
    assert [p.name for p in paths] == ["similarity_model.png", "similarity_scatter.png"]
    assert all(p.stat().st_size > 5000 for p in paths)
