"""Similarity targets as registered builders: each method against an independent numpy computation."""

import numpy as np
import pytest

from neureg.models.neural.targets import TARGETS, TargetInputs, build_target, reads


def _cosine(features):
    """Centered cosine similarity, written out independently of models.neural.rsa."""
    x = features - features.mean(axis=0)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


@pytest.fixture
def scans():
    rng = np.random.default_rng(0)
    return [_cosine(rng.normal(size=(12, 30))) for _ in range(3)]


def test_every_method_declares_what_it_reads():
    assert {m: TARGETS[m].info["reads"] for m in TARGETS} == {
        "neural_model": "model",
        "shuffle": "model",
        "neural_data": "data",
        "pixel": "images",
        "pixel_threshold": "images",
        "vgg": "images",
        "random": None,
    }


def test_neural_model_is_the_mean_of_the_scans_and_agreement_is_pearson_r(scans):
    target = build_target(TARGETS.complete({"method": "neural_model"}), TargetInputs(12, per_scan=scans))
    np.testing.assert_allclose(target.matrix, np.mean(scans, axis=0))
    iu = np.triu_indices(12, 1)
    expected = [np.corrcoef(s[iu], target.matrix[iu])[0, 1] for s in scans]
    np.testing.assert_allclose(target.agreement(), expected, rtol=1e-12)


def test_shuffle_permutes_the_mean_and_the_scans_alike(scans):
    target = build_target({"method": "shuffle", "shuffle_seed": 3}, TargetInputs(12, per_scan=scans))
    perm = target.extra["permutation"]
    assert sorted(perm) == list(range(12)) and not np.array_equal(perm, np.arange(12))
    np.testing.assert_allclose(target.matrix, np.mean(scans, axis=0)[np.ix_(perm, perm)])
    np.testing.assert_allclose(target.per_scan[1], scans[1][np.ix_(perm, perm)])
    plain = build_target({"method": "neural_model"}, TargetInputs(12, per_scan=scans))
    np.testing.assert_allclose(target.agreement(), plain.agreement(), rtol=1e-12)  # a permutation keeps r


def test_pixel_and_threshold_targets_from_the_images():
    images = np.random.default_rng(1).integers(0, 256, (10, 6, 8), dtype=np.uint8)
    pixel = build_target({"method": "pixel"}, TargetInputs(10, images=images))
    np.testing.assert_allclose(pixel.matrix, _cosine(images.reshape(10, -1).astype(float)), atol=1e-12)
    th = build_target({"method": "pixel_threshold", "threshold": 0.1}, TargetInputs(10, images=images)).matrix
    expected = np.where(pixel.matrix > 0.1, 1.0, np.where(pixel.matrix < -0.1, -1.0, 0.0))
    np.testing.assert_array_equal(th, expected)
    assert pixel.per_scan == [] and pixel.agreement() == []


def test_random_target_depends_on_its_seed_only():
    a = build_target({"method": "random", "random_seed": 1, "random_dim": 40}, TargetInputs(9))
    b = build_target({"method": "random", "random_seed": 1, "random_dim": 40}, TargetInputs(9))
    c = build_target({"method": "random", "random_seed": 2, "random_dim": 40}, TargetInputs(9))
    np.testing.assert_array_equal(a.matrix, b.matrix)
    assert not np.allclose(a.matrix, c.matrix) and np.allclose(np.diag(a.matrix), 1)


@pytest.mark.parametrize(
    "config, fault",
    [
        ({"method": "fmri"}, "unknown similarity method"),
        ({"method": "pixel", "threshold": 0.5}, "unknown config key"),
        ({"method": "pixel_threshold", "threshold": 1.0}, "'threshold'"),
        ({"method": "random", "random_dim": 0}, "'random_dim'"),
        ({"method": "vgg"}, "needs vgg_weights"),
    ],
)
def test_bad_configs_are_refused(config, fault):
    with pytest.raises(ValueError, match=fault):
        TARGETS.complete(config)


def test_a_method_that_reads_scans_refuses_to_run_without_them():
    assert reads({"method": "neural_data"}) == "data"
    with pytest.raises(ValueError, match="member scans"):
        build_target({"method": "neural_data"}, TargetInputs(5))
