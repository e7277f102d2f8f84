"""Similarity targets: each against a naive computation, the controls' invariants, the VGG19 file
handling, and the paper's central claim on the simulator (S^model closer to the truth than S^data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neureg.models.neural.rsa import centered_cosine
from neureg.models.neural.similarity import (
    VGG19_URL,
    data_similarity,
    model_similarity,
    pixel_similarity,
    random_similarity,
    shuffled,
    similarity_agreement,
    threshold_similarity,
    vgg_features,
    vgg_similarity,
)


def _naive_centered_cosine(rows: np.ndarray) -> np.ndarray:
    n = len(rows)
    mean = sum(rows[i] for i in range(n)) / n
    unit = []
    for i in range(n):
        d = rows[i] - mean
        unit.append(d / np.sqrt(sum(x * x for x in d)))
    return np.array([[sum(a * b for a, b in zip(unit[i], unit[j])) for j in range(n)] for i in range(n)])


def _assert_similarity_matrix(s: np.ndarray, n: int) -> None:
    assert s.shape == (n, n) and s.dtype in (np.float32, np.float64)
    assert np.allclose(s, s.T)
    assert np.allclose(np.diag(s), 1.0)
    assert np.all(np.abs(s) <= 1 + 1e-9)


def test_model_similarity_equals_naive_loop():
    rng = np.random.default_rng(0)
    rates = rng.gamma(2.0, size=(7, 5))
    w = rng.uniform(0.1, 2.0, 5)
    v = np.array([0.5, -0.3, 0.8, 0.0, 0.2])
    scaled = np.array([[w[a] * max(v[a], 0.0) * rates[i, a] for a in range(5)] for i in range(7)])
    s = model_similarity(rates, w, v)
    assert np.allclose(s, _naive_centered_cosine(scaled))
    _assert_similarity_matrix(s, 7)
    assert np.allclose(s, model_similarity(rates, w, np.clip(v, 0, None)))  # negative v_a -> 0
    with pytest.raises(ValueError, match="finite"):
        model_similarity(rates, np.r_[w[:4], np.inf], v)
    with pytest.raises(ValueError, match="shape"):
        model_similarity(rates, w[:4], v)


def test_pixel_similarity_equals_naive_loop():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 4, 5), dtype=np.uint8)
    flat = [images[i].astype(float).ravel() for i in range(6)]
    s = pixel_similarity(images)
    assert np.allclose(s, _naive_centered_cosine(np.array(flat)))
    _assert_similarity_matrix(s, 6)


def test_data_similarity_is_weighted_centered_cosine():
    rng = np.random.default_rng(2)
    r, w = rng.gamma(2.0, size=(6, 4)), rng.uniform(0.5, 2, 4)
    assert np.allclose(data_similarity(r, w), _naive_centered_cosine(r * w))


def test_threshold_values():
    s = np.array([[1.0, 0.81, -0.9, 0.8], [0.81, 1.0, 0.1, -0.8], [-0.9, 0.1, 1.0, -0.79], [0.8, -0.8, -0.79, 1.0]])
    expected = np.array([[1, 1, -1, 0], [1, 1, 0, 0], [-1, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    assert np.array_equal(threshold_similarity(s, 0.8), expected)
    assert np.array_equal(threshold_similarity(s, 0.0), np.sign(s))
    assert threshold_similarity(s.astype(np.float32)).dtype == np.float32
    with pytest.raises(ValueError):
        threshold_similarity(s, 1.0)


def test_shuffled_is_a_valid_permutation_that_changes_the_matrix():
    s = pixel_similarity(np.random.default_rng(3).integers(0, 256, (20, 6, 6), dtype=np.uint8))
    out, perm = shuffled(s, seed=5)
    assert sorted(perm.tolist()) == list(range(20))
    naive = np.array([[s[perm[i], perm[j]] for j in range(20)] for i in range(20)])
    assert np.array_equal(out, naive)
    p = np.eye(20)[perm]
    assert np.allclose(out, p @ s @ p.T)
    assert not np.allclose(out, s)
    _assert_similarity_matrix(out, 20)
    assert np.array_equal(np.sort(out, axis=None), np.sort(s, axis=None))  # same values, moved
    again, perm_again = shuffled(s, seed=5)
    assert np.array_equal(perm, perm_again) and np.array_equal(out, again)
    assert not np.array_equal(perm, shuffled(s, seed=6)[1])
    for seed in range(20):  # two images: half of all permutations are the identity; never returned
        assert shuffled(np.eye(2), seed)[1].tolist() == [1, 0]


def test_random_similarity_is_valid_and_unstructured():
    s = random_similarity(60, seed=0, dim=2000)
    _assert_similarity_matrix(s, 60)
    assert np.linalg.eigvalsh(s).min() > -1e-9  # a Gram matrix
    off = s[np.triu_indices(60, 1)]
    assert abs(off.mean() + 1 / 59) < 0.01 and off.std() == pytest.approx(1 / np.sqrt(2000), rel=0.2)
    assert np.array_equal(s, random_similarity(60, seed=0, dim=2000))
    assert not np.array_equal(s, random_similarity(60, seed=1, dim=2000))


def test_similarity_agreement():
    rng = np.random.default_rng(4)
    a = random_similarity(15, seed=1, dim=5)
    iu = np.triu_indices(15, 1)
    noisy = a + 0.1 * rng.standard_normal(a.shape)
    expected = np.corrcoef(a[iu], noisy[iu])[0, 1]
    assert similarity_agreement(a, noisy) == pytest.approx(expected)
    assert similarity_agreement(a, a) == pytest.approx(1.0)
    diag_changed = a.copy()
    np.fill_diagonal(diag_changed, -5.0)  # the diagonal does not count
    assert similarity_agreement(a, diag_changed) == pytest.approx(1.0)
    lower_changed = a.copy()
    lower_changed[np.tril_indices(15, -1)] = 0.0  # nor the lower triangle
    assert similarity_agreement(a, lower_changed) == pytest.approx(1.0)


# -- VGG19 conv3_1 ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A torchvision vgg19 with random weights (the real ones are a download), saved as a state_dict.

    The convolutional trunk gets torchvision's own initialisation (kaiming normal, zero bias); the
    classifier, which conv3_1 never touches, is zero-filled, because randomly initialising its 123M
    weights takes longer than the rest of this file.
    """
    from torchvision.models import vgg19

    with torch.device("meta"):
        model = vgg19(weights=None)
    model = model.to_empty(device="cpu").eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.features:
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                module.bias.zero_()
        for param in model.classifier.parameters():
            param.zero_()
    path = tmp_path_factory.mktemp("vgg") / "vgg19_random.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_vgg_similarity_equals_torchvision_features(vgg_file):
    path, model = vgg_file
    layers = model.features
    assert isinstance(layers[10], torch.nn.Conv2d)
    assert (layers[10].in_channels, layers[10].out_channels) == (128, 256)
    assert isinstance(layers[11], torch.nn.ReLU)  # conv3_1 + its ReLU end features[:12]
    images = np.random.default_rng(5).integers(0, 256, (9, 36, 64), dtype=np.uint8)
    x = torch.from_numpy(images).float().div(255).unsqueeze(1).repeat(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        direct = layers[:12]((x - mean) / std).flatten(1).numpy()
    assert direct.shape == (9, 256 * 9 * 16)
    feats = vgg_features(images, path, batch_size=4)
    assert np.allclose(feats, direct, rtol=1e-4, atol=1e-5)
    s = vgg_similarity(images, path, batch_size=4)
    assert np.allclose(s, centered_cosine(direct), atol=1e-5)
    _assert_similarity_matrix(s, 9)


def test_vgg_missing_file_says_where_and_how(tmp_path):
    missing = tmp_path / "nowhere" / "vgg19.pth"
    with pytest.raises(FileNotFoundError) as err:
        vgg_similarity(np.zeros((3, 36, 64), np.uint8), missing)
    assert str(missing) in str(err.value) and VGG19_URL in str(err.value)


def test_vgg_wrong_file_is_a_value_error(tmp_path, vgg_file):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, other)
    path, model = vgg_file
    truncated = tmp_path / "vgg19_without_classifier.pth"
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("features.")}, truncated)
    images = np.zeros((3, 36, 64), np.uint8)
    for bad in (text, other, truncated):
        with pytest.raises(ValueError, match="state_dict"):
            vgg_similarity(images, bad)


# -- the paper's claim on the simulator (Li et al. Fig. 1D) --------------------------------
def _simulator():
    try:
        from neureg.models.neural.simulator import simulate_scan
    except ImportError as err:  # a failure, not a skip: this is the verification the issue asks for
        pytest.fail(f"neureg.models.simulator.simulate_scan is needed for the verification test: {err}")
    return simulate_scan


@pytest.fixture(scope="module")
def simulated_fit():
    """A 300-unit scan: 50 oracle images x 6 repeats, 650 images shown once (575 train, 75 validation).

    The predictor is smaller than the default (8 channels, 3x3 hidden kernels, 20 epochs) to keep this
    file near half a minute of CPU; at the bench's size the gap below is larger.
    """
    from neureg.models.neural.predictive import fit_predictor

    sim = _simulator()(n_units=300, n_images=700, n_oracle=50, n_repeats=6, seed=1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: one thread is several times faster
    try:
        single = np.flatnonzero(sim.trial_image >= sim.n_oracle)
        val, train = single[:75], single[75:]
        config = {"hidden_channels": 8, "hidden_kernel": 3, "max_epochs": 20, "lr": 0.01}
        fit = fit_predictor(
            sim.images,
            sim.responses,
            sim.behavior,
            sim.pupil_center,
            train,
            val,
            config,
            seed=0,
            trial_image=sim.trial_image,
        )
    finally:
        torch.set_num_threads(before)
    return sim, fit.to_model()


@pytest.mark.slow
def test_model_similarity_beats_single_trial_similarity_on_simulator(simulated_fit):
    """r(S^model, truth) well above r(S^data, truth) on the oracle images (paper: 0.73 vs 0.39 against
    S^oracle). Weights as the pipeline computes them: w_a from the oracle repeats (equation 1), v_a the
    model's correlation with the oracle trials, which it never saw. The truth is the noise-free
    similarity with the true w_a."""
    from neureg.models.neural.predictions import predict_responses, unit_correlations

    sim, model = simulated_fit
    oracle = np.flatnonzero(sim.trial_image < sim.n_oracle)
    image = sim.trial_image[oracle]
    by_image = [sim.responses[oracle[image == i]] for i in range(sim.n_oracle)]
    w = np.sqrt(
        np.stack([r.mean(0) for r in by_image]).var(0, ddof=1) / np.stack([r.var(0, ddof=1) for r in by_image]).mean(0)
    )
    v = unit_correlations(
        predict_responses(model, sim.images[image], sim.behavior[oracle], sim.pupil_center[oracle]),
        sim.responses[oracle],
    )
    denoised = predict_responses(model, sim.images[: sim.n_oracle])
    truth = centered_cosine(sim.true_rates[: sim.n_oracle] * np.sqrt(sim.true_snr))
    r_model = similarity_agreement(model_similarity(denoised, w, v), truth)
    r_data = similarity_agreement(data_similarity(np.stack([r[0] for r in by_image]), w), truth)
    assert r_model > 0.6 and r_model > r_data + 0.15, (r_model, r_data)
    # Unit by unit the denoised responses follow the noise-free rates (r ~ 0.33 here, 0.49 at the bench's
    # size); at this training size that is not yet better than one trial (~0.38): the gain is at the
    # population level, where the model's errors do not add up the way independent trial noise does.
    assert unit_correlations(denoised, sim.true_rates[: sim.n_oracle]).mean() > 0.25


@pytest.mark.slow
def test_shifter_and_modulator_recover_simulated_eye_and_gain(simulated_fit):
    from neureg.models.neural.predictions import predict_gain, predict_shift

    sim, model = simulated_fit
    shift = predict_shift(model, sim.pupil_center)
    for axis in (0, 1):  # same convention as the simulator: a unit at c sees the pixel at c + shift
        assert np.corrcoef(shift[:, axis], sim.trial_shift[:, axis])[0, 1] > 0.8
    log_gain = np.log(predict_gain(model, sim.behavior)).mean(1)
    assert np.corrcoef(log_gain, np.log(sim.trial_gain()).mean(1))[0, 1] > 0.8
