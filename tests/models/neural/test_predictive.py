"""Predictive (denoising) model: building blocks, the training loop, and recovery of a known LN truth.

Sizes are tiny (16x26 images, 12 units, 400 trials) so the file runs in well under a minute on two shared
cores; the real size is in bench/bench_predictive.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.nn import functional as F

from neureg.models.neural import predictive
from neureg.models.neural.predictions import predict_gain, predict_responses, predict_shift, unit_correlations
from neureg.models.neural.predictive import (
    build_predictor,
    default_predictor_config,
    fit_predictor,
    load_predictor,
    poisson_loss,
    resolve_config,
)
from neureg.models.neural.predictive_mapping import receptive_field_positions
from neureg.models.neural.predictive_modules import (
    FactorizedReadout,
    GaussianReadout,
    laplace_smoothness,
    translate_feature_map,
)

TINY = {"hidden_channels": 6, "input_kernel": 5, "hidden_kernel": 3, "batch_size": 32, "lr": 0.01, "max_epochs": 20}


# -- a tiny linear-nonlinear scan with eye shift and behavioural gain -------------------------------------
@dataclass
class LNScan:
    images: np.ndarray  # (n, H, W) uint8, one per trial
    responses: np.ndarray  # (n, n_units) Poisson counts
    behavior: np.ndarray  # (n, 3) pupil dilation, derivative (pure noise), running speed
    pupil_center: np.ndarray  # (n, 2)
    true_rates: np.ndarray  # (n, n_units) at mean behaviour (gain 1) and centred eye
    expected: np.ndarray  # (n, n_units) noise-free per trial: shift and gain applied
    true_shift: np.ndarray  # (n, 2) (dx, dy) pixels each receptive field moved on that trial
    true_gain: np.ndarray  # (n, n_units)
    rf_center: np.ndarray  # (n_units, 2) receptive-field centre (x, y) in pixels at the resting eye


def ln_scan(
    n_units=12, n_trials=400, height=16, width=26, seed=0, shift_px=1.5, gain_strength=0.5, mean_rate=3.0
) -> LNScan:
    """Gabor LN units on smooth noise images. The RF shift is ``shift_px * pupil_center`` (a unit at c
    sees the pixel at c + shift, the simulator's convention); log gain is linear in running and dilation
    with a per-unit slope."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.standard_normal((n_trials, height, width)), sigma=(0, 1.2, 1.2))
    smooth = (smooth - smooth.mean()) / smooth.std()
    images = np.clip(128 + 40 * smooth, 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:height, 0:width].astype(float)
    margin = 5
    cy = rng.uniform(margin, height - 1 - margin, n_units)[:, None, None]
    cx = rng.uniform(margin, width - 1 - margin, n_units)[:, None, None]
    theta = rng.uniform(0, np.pi, n_units)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, n_units)[:, None, None]
    along = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    rfs = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 8.0) * np.cos(2 * np.pi * along / 6.0 + phase)
    pupil = rng.standard_normal((n_trials, 2))
    dilation, derivative = rng.standard_normal(n_trials), rng.standard_normal(n_trials)
    running = np.abs(rng.standard_normal(n_trials)) * 5
    true_shift = shift_px * pupil
    pix = (images.astype(float) - 128) / 40
    seen = np.stack(
        [
            ndimage.shift(pix[t], (-true_shift[t, 1], -true_shift[t, 0]), order=1, mode="nearest")
            for t in range(n_trials)
        ]
    )
    drive_rest = np.einsum("thw,nhw->tn", pix, rfs)
    scale = drive_rest.std(axis=0)

    def nonlinearity(drive):
        return mean_rate * np.log1p(np.exp(2.0 * drive / scale - 0.5))

    log_gain = gain_strength * (0.6 * (running - running.mean()) / running.std() + 0.4 * dilation)
    true_gain = np.exp(np.outer(log_gain, rng.uniform(0.5, 1.5, n_units)))
    expected = nonlinearity(np.einsum("thw,nhw->tn", seen, rfs)) * true_gain
    return LNScan(
        images,
        rng.poisson(expected).astype(np.float32),
        np.stack([dilation, derivative, running], 1),
        pupil,
        nonlinearity(drive_rest),
        expected,
        true_shift,
        true_gain,
        np.stack([cx.ravel(), cy.ravel()], 1),
    )


@pytest.fixture(scope="module")
def scan():
    return ln_scan()


SPLIT = (np.arange(0, 340), np.arange(340, 400))


@pytest.fixture(scope="module")
def full_fit(scan):  # about 10 s of CPU
    return fit_predictor(scan.images, scan.responses, scan.behavior, scan.pupil_center, *SPLIT, TINY, seed=0)


@pytest.fixture(scope="module")
def plain_fit(scan):
    cfg = dict(TINY, shifter=False, modulator=False)
    return fit_predictor(scan.images, scan.responses, None, None, *SPLIT, cfg, seed=0)


# -- building blocks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("readout", ["gaussian", "factorized"])
def test_shapes_and_positive_output(readout):
    model = build_predictor(dict(TINY, readout=readout), n_units=7, image_shape=(16, 26))
    assert model.feature_shape == (12, 22)
    assert model.core.out_channels == 3 * TINY["hidden_channels"]
    images = torch.randint(0, 256, (5, 16, 26), dtype=torch.uint8)
    out = model(images, torch.randn(5, 3), torch.randn(5, 2))
    assert out.shape == (5, 7)
    assert torch.all(out > 0)
    model.eval()
    assert model(images).shape == (5, 7)  # behaviour and eye default to their means


def test_config_defaults_and_unknown_keys():
    cfg = default_predictor_config()
    assert cfg["readout"] == "gaussian" and cfg["core_layers"] == 3
    cfg["lr"] = 1.0
    assert default_predictor_config()["lr"] != 1.0  # a fresh copy each time
    with pytest.raises(ValueError, match="predictor config: unknown config key"):
        resolve_config({"learning_rate": 0.1})
    with pytest.raises(ValueError, match="readout"):
        resolve_config({"readout": "linear"})


def test_poisson_loss_matches_torch():
    rates = torch.rand(20, 9) * 3 + 0.01
    counts = torch.poisson(torch.rand(20, 9) * 3)
    expected = F.poisson_nll_loss(rates, counts, log_input=False, full=False, eps=1e-8)
    assert torch.allclose(poisson_loss(rates, counts), expected)
    assert torch.allclose(poisson_loss(rates, counts), (rates - counts * torch.log(rates + 1e-8)).mean())


def test_smoothness_penalty_zero_for_constant_positive_otherwise():
    assert laplace_smoothness(torch.full((4, 1, 7, 7), 0.3)).item() == pytest.approx(0.0, abs=1e-12)
    ramp = torch.arange(7.0).expand(7, 7).reshape(1, 1, 7, 7)  # linear: no curvature either
    assert laplace_smoothness(ramp).item() == pytest.approx(0.0, abs=1e-10)
    torch.manual_seed(0)
    noisy = torch.randn(4, 1, 7, 7)
    assert laplace_smoothness(noisy).item() > 1.0
    smooth = torch.exp(-((torch.arange(7.0) - 3) ** 2) / 8)
    assert 0 < laplace_smoothness((smooth[:, None] * smooth[None]).reshape(1, 1, 7, 7)) < laplace_smoothness(noisy)
    model = build_predictor(TINY, 3, (16, 26))
    assert model.core.smoothness_penalty().item() == pytest.approx(
        laplace_smoothness(model.core.blocks[0][0].weight).item()
    )


def _position(row, col, height, width):
    """grid_sample (x, y) normalized coordinates of pixel (row, col), align_corners=True."""
    return torch.tensor([2 * col / (width - 1) - 1, 2 * row / (height - 1) - 1])


def test_gaussian_readout_reads_its_position():
    torch.manual_seed(0)
    fmap = torch.randn(3, 4, 9, 13)
    readout = GaussianReadout(in_channels=4, n_units=2, init_mu_range=0.5, init_sigma=0.3).eval()
    with torch.no_grad():
        readout.mu.copy_(torch.stack([_position(2, 5, 9, 13), _position(7, 11, 9, 13)]))
        readout.features.copy_(torch.tensor([[0, 1.0, 0, 0], [0, 0, 0, 2.0]]))
        readout.bias.zero_()
    out = readout(fmap)
    assert torch.allclose(out[:, 0], fmap[:, 1, 2, 5], atol=1e-6)
    assert torch.allclose(out[:, 1], 2 * fmap[:, 3, 7, 11], atol=1e-6)
    one_pixel_right = torch.tensor([[2 / 12, 0.0]]).expand(3, 2)
    assert torch.allclose(readout(fmap, one_pixel_right)[:, 0], fmap[:, 1, 2, 6], atol=1e-6)
    readout.train()  # training jitters the position
    assert not torch.allclose(readout(fmap)[:, 0], fmap[:, 1, 2, 5])


def test_factorized_readout_reads_its_mask_and_shifts_like_gaussian():
    torch.manual_seed(0)
    fmap = torch.randn(3, 4, 9, 13)
    readout = FactorizedReadout(in_channels=4, n_units=1, map_shape=(9, 13))
    with torch.no_grad():
        readout.spatial.zero_()
        readout.spatial[0, 4, 6] = 5.0  # normalization makes the mask a unit spike
        readout.features.copy_(torch.tensor([[0, 0, 1.0, 0]]))
        readout.bias.zero_()
    assert torch.allclose(readout(fmap)[:, 0], fmap[:, 2, 4, 6], atol=1e-6)
    shift = torch.tensor([[2 / 12, -2 / 8]]).expand(3, 2)  # one pixel right, one up
    assert torch.allclose(readout(fmap, shift)[:, 0], fmap[:, 2, 3, 7], atol=1e-5)
    assert torch.allclose(translate_feature_map(fmap, torch.zeros(3, 2)), fmap, atol=1e-6)


def test_unit_correlations_match_numpy_and_are_nan_safe():
    rng = np.random.default_rng(1)
    pred, obs = rng.standard_normal((50, 4)), rng.standard_normal((50, 4))
    obs[:, 1] += 2 * pred[:, 1]
    expected = [np.corrcoef(pred[:, k], obs[:, k])[0, 1] for k in range(4)]
    assert np.allclose(unit_correlations(pred, obs), expected)
    pred[:, 2] = 1.0  # constant prediction: no evidence, 0 not NaN
    obs[7, 3] = np.nan  # a missing sample is left out for that unit only
    r = unit_correlations(pred, obs)
    assert r[2] == 0.0
    keep = np.arange(50) != 7
    assert r[3] == pytest.approx(np.corrcoef(pred[keep, 3], obs[keep, 3])[0, 1])
    assert np.all(np.isfinite(r))


def test_receptive_field_mapping_finds_the_units(scan):
    """Reverse correlation puts readouts within 2 px of their RFs (median 1.6; random starts: 4.4)."""
    margin = TINY["input_kernel"] // 2
    positions = receptive_field_positions(scan.images, scan.responses, TINY["input_kernel"])
    assert positions.shape == (12, 2) and np.all(np.abs(positions) <= 1)
    fh, fw = 16 - 2 * margin, 26 - 2 * margin
    pixels = margin + np.stack([(positions[:, 0] + 1) / 2 * (fw - 1), (positions[:, 1] + 1) / 2 * (fh - 1)], 1)
    assert np.median(np.linalg.norm(pixels - scan.rf_center, axis=1)) < 2.0
    fit_cfg = dict(TINY, max_epochs=1, lr=1e-9)  # one epoch that cannot move anything: the start
    fit = fit_predictor(scan.images, scan.responses, scan.behavior, scan.pupil_center, *SPLIT, fit_cfg)
    mapped_on_train = receptive_field_positions(scan.images[SPLIT[0]], scan.responses[SPLIT[0]], 5)
    assert np.allclose(fit.state_dict["readout.mu"].numpy(), mapped_on_train, atol=1e-6)


# -- the training loop -----------------------------------------------------------------------------------
def test_early_stopping_stops_and_restores_best(scan, monkeypatch):
    scores = iter([0.1, 0.3, 0.2, 0.25, 0.2, 0.2, 0.2])
    states = []

    def scripted(model, data, val_idx, batch_size):
        states.append(copy.deepcopy(model.state_dict()))
        return next(scores)

    monkeypatch.setattr(predictive, "_validation_corr", scripted)
    cfg = dict(TINY, patience=2, lr_decay_steps=0, max_epochs=7)
    fit = fit_predictor(scan.images, scan.responses, scan.behavior, scan.pupil_center, *SPLIT, cfg, seed=0)
    assert fit.epochs_run == 4  # epochs 3 and 4 did not beat epoch 2
    assert fit.best_epoch == 2 and fit.best_val_corr == pytest.approx(0.3)
    for key, value in fit.state_dict.items():
        assert torch.equal(value, states[1][key]), key
    assert not all(torch.equal(v, states[3][k]) for k, v in fit.state_dict.items())


def test_lr_decays_from_best_weights_before_stopping(scan, monkeypatch):
    scores = iter([0.1, 0.3, 0.2, 0.2, 0.35, 0.3, 0.3, 0.3, 0.3])
    monkeypatch.setattr(predictive, "_validation_corr", lambda *args: next(scores))
    cfg = dict(TINY, patience=2, lr_decay_steps=1, lr_decay_factor=0.5, max_epochs=9)
    fit = fit_predictor(scan.images, scan.responses, scan.behavior, scan.pupil_center, *SPLIT, cfg, seed=0)
    lrs = [row["lr"] for row in fit.history]
    assert lrs[:4] == [TINY["lr"]] * 4 and lrs[4] == pytest.approx(TINY["lr"] / 2)
    assert fit.best_epoch == 5 and fit.epochs_run == 7


def test_seeded_fits_reproduce(scan):
    cfg = dict(TINY, max_epochs=2)
    args = (scan.images, scan.responses, scan.behavior, scan.pupil_center, *SPLIT, cfg)
    a, b, c = fit_predictor(*args, seed=3), fit_predictor(*args, seed=3), fit_predictor(*args, seed=4)
    assert [r["val_corr"] for r in a.history] == [r["val_corr"] for r in b.history]
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert not all(torch.equal(a.state_dict[k], c.state_dict[k]) for k in a.state_dict)


def test_fit_rejects_inconsistent_inputs(scan):
    with pytest.raises(ValueError, match="modulator"):
        fit_predictor(scan.images, scan.responses, None, scan.pupil_center, *SPLIT, TINY)
    with pytest.raises(ValueError, match="trial_image"):
        fit_predictor(scan.images[:10], scan.responses, scan.behavior, scan.pupil_center, *SPLIT, TINY)


def test_trial_image_indexing_equals_per_trial_images(scan):
    """Distinct images + trial_image is the same data as one image per trial."""
    distinct = scan.images[:120]
    trial_image = np.concatenate([np.arange(120), np.arange(30)])  # 30 images shown twice
    rows = slice(0, len(trial_image))
    data = (
        scan.responses[rows],
        scan.behavior[rows],
        scan.pupil_center[rows],
        np.arange(120),
        np.arange(120, 150),
        dict(TINY, max_epochs=1),
    )
    a = fit_predictor(distinct, *data, seed=1, trial_image=trial_image)
    b = fit_predictor(distinct[trial_image], *data, seed=1)
    assert a.history[0]["val_corr"] == pytest.approx(b.history[0]["val_corr"], abs=1e-6)


# -- recovery of the LN truth -----------------------------------------------------------------------------
@pytest.mark.slow
def test_predictions_track_true_rates(scan, full_fit):
    """Denoised responses (mean behaviour, centred eye) vs the noise-free truth: r > 0.75 per unit on
    average (a single Poisson trial of these units correlates with its own rate at only about 0.5)."""
    model = full_fit.to_model()
    pred = predict_responses(model, scan.images)
    assert pred.shape == scan.true_rates.shape and pred.dtype == np.float32
    assert unit_correlations(pred, scan.true_rates).mean() > 0.75
    single_trial = unit_correlations(scan.responses, scan.true_rates).mean()
    assert unit_correlations(pred, scan.true_rates).mean() > single_trial + 0.15
    assert full_fit.best_val_corr == max(r["val_corr"] for r in full_fit.history)


@pytest.mark.slow
def test_shifter_and_modulator_beat_plain_model(scan, full_fit, plain_fit):
    val = SPLIT[1]
    full, plain = full_fit.to_model(), plain_fit.to_model()
    with_state = predict_responses(full, scan.images[val], scan.behavior[val], scan.pupil_center[val])
    r_full = unit_correlations(with_state, scan.expected[val]).mean()
    r_plain = unit_correlations(predict_responses(plain, scan.images[val]), scan.expected[val]).mean()
    assert r_full > 0.75 and r_full > r_plain + 0.2
    assert full_fit.best_val_corr > plain_fit.best_val_corr + 0.2


@pytest.mark.slow
def test_shifter_tracks_true_shift_and_modulator_tracks_gain(scan, full_fit):
    model = full_fit.to_model()
    shift = predict_shift(model, scan.pupil_center)
    for axis in (0, 1):  # same sign convention: positive dx = the unit sees content further right
        assert np.corrcoef(shift[:, axis], scan.true_shift[:, axis])[0, 1] > 0.9
    assert np.allclose(shift.std(0), scan.true_shift.std(0), rtol=0.35)  # pixels, same scale
    gain = predict_gain(model, scan.behavior)
    assert np.all(gain > 0)
    assert np.corrcoef(np.log(gain).mean(1), np.log(scan.true_gain).mean(1))[0, 1] > 0.9


def test_mean_behaviour_is_the_default(scan, full_fit):
    model = full_fit.to_model()
    n = 20
    at_mean = predict_responses(
        model, scan.images[:n], np.tile(model.behavior_mean.numpy(), (n, 1)), np.tile(model.pupil_mean.numpy(), (n, 1))
    )
    assert np.allclose(predict_responses(model, scan.images[:n]), at_mean, rtol=1e-5)
    assert np.allclose(
        predict_responses(model, scan.images[:n], batch_size=7), predict_responses(model, scan.images[:n]), rtol=1e-5
    )


def test_state_dict_round_trip(scan, full_fit):
    rebuilt = load_predictor(full_fit.state_dict, full_fit.config, full_fit.n_units, full_fit.image_shape)
    assert np.array_equal(
        predict_responses(rebuilt, scan.images[:9]), predict_responses(full_fit.to_model(), scan.images[:9])
    )
    assert "response_scale" in full_fit.state_dict and "image_mean" in full_fit.state_dict
