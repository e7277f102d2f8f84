"""VOneBlock: kernels equal the analytic Gabor, cells compute what they claim, noise has its stated statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from neureg.models.vision.networks import vone_config
from neureg.models.vision.vonenet import (
    ENVELOPE_EDGES,
    ORIENTATION_COUNTS,
    VOneBlock,
    neuronal_noise,
    sample_gabor_parameters,
)

SIMPLE, COMPLEX = 5, 4


def tiny_block(**overrides) -> VOneBlock:
    return VOneBlock.build(**vone_config(**{"simple_channels": SIMPLE, "complex_channels": COMPLEX, **overrides}))


def analytic_gabor(f, sx, sy, theta, phase, ksize) -> np.ndarray:
    """The Gabor evaluated pixel by pixel in the published VOneNet convention: x = row offset, y = column
    offset from the centre (its grid comes from torch.meshgrid in 'ij' order)."""
    half = ksize // 2
    out = np.empty((ksize, ksize))
    for row in range(ksize):
        for col in range(ksize):
            x, y = row - half, col - half
            xr = x * math.cos(theta) + y * math.sin(theta)
            yr = -x * math.sin(theta) + y * math.cos(theta)
            gauss = math.exp(-0.5 * (xr**2 / sx**2 + yr**2 / sy**2)) / (2 * math.pi * sx * sy)
            out[row, col] = gauss * math.cos(2 * math.pi * f * xr + phase)
    return out


def test_kernels_equal_the_analytic_gabor():
    block = tiny_block(ksize=9)
    p = block.pixel_params
    weight = block.weight[:, 0].double().numpy()
    assert weight.shape == (SIMPLE + 2 * COMPLEX, 9, 9)
    for c in range(SIMPLE + COMPLEX):
        expected = analytic_gabor(p["frequency"][c], p["sigma_x"][c], p["sigma_y"][c], p["theta"][c], p["phase"][c], 9)
        np.testing.assert_allclose(weight[c], expected, rtol=1e-5, atol=1e-7)
    for j, c in enumerate(range(SIMPLE, SIMPLE + COMPLEX)):
        quadrature = analytic_gabor(
            p["frequency"][c], p["sigma_x"][c], p["sigma_y"][c], p["theta"][c], p["phase"][c] + math.pi / 2, 9
        )
        np.testing.assert_allclose(weight[SIMPLE + COMPLEX + j], quadrature, rtol=1e-5, atol=1e-7)


def test_pixel_units_follow_pixels_per_degree():
    """32 px over 8 deg is 4 px/deg: frequency = SF / 4 cycles/px, sigma = n / frequency px, below Nyquist."""
    block = tiny_block()
    params = sample_gabor_parameters(SIMPLE + COMPLEX, 0, 2.0, 0.75)
    np.testing.assert_allclose(block.pixel_params["frequency"], params["sf"] / 4.0)
    np.testing.assert_allclose(block.pixel_params["sigma_x"], params["nx"] / (params["sf"] / 4.0))
    np.testing.assert_allclose(block.pixel_params["sigma_y"], params["ny"] / (params["sf"] / 4.0))
    assert block.pixel_params["frequency"].max() <= 0.5


def test_cells_compute_simple_and_complex_responses():
    block = tiny_block(noise=False, ksize=7, k_exc=3.0)
    x = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    kernels = block.weight.double()
    linear = F.conv2d(2 * x - 1, kernels, padding=3)
    simple = F.relu(linear[:, :SIMPLE])
    complex_ = torch.sqrt(linear[:, SIMPLE : SIMPLE + COMPLEX] ** 2 + linear[:, SIMPLE + COMPLEX :] ** 2) / math.sqrt(2)
    expected = 3.0 * torch.cat([simple, complex_], dim=1)
    got = block(x.float()).double()
    assert got.shape == (2, SIMPLE + COMPLEX, 12, 12)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_noise_statistics_match_the_formula():
    """noisy - clean has mean 0 and variance (relu(x * scale + level) + 1e-4) / scale^2 (the published
    noise_f: scale, shift, add N(0, 1) * sqrt(relu + eps), unshift, unscale), elementwise."""
    scale, level = 0.35, 0.07
    x = torch.linspace(-1.0, 8.0, 37, dtype=torch.float64)  # includes activities where the variance is 0
    draws = 20000
    torch.manual_seed(0)
    diff = neuronal_noise(x.expand(draws, -1).clone(), scale, level) - x
    # The published steps, one by one, as the independent computation of the variance.
    shifted = x * scale + level
    variance = (F.relu(shifted) + 1e-4) / scale**2
    mean_error = diff.mean(dim=0)
    sample_variance = diff.var(dim=0)
    # Mean within 5 standard errors; variance within 5 standard errors of a Gaussian variance estimate.
    assert torch.all(mean_error.abs() <= 5 * torch.sqrt(variance / draws))
    rel = (sample_variance / variance - 1).abs()
    assert torch.all(rel <= 5 * math.sqrt(2 / (draws - 1)))
    # Below -level/scale only the 1e-4 floor is left: a standard deviation of 0.01 / scale.
    silent = shifted <= 0
    torch.testing.assert_close(
        sample_variance[silent].sqrt(), torch.full_like(sample_variance[silent], 0.01 / scale), rtol=0.05, atol=0
    )
    # At the published defaults a unit at activity 1 is 1 / scale = 2.9x noisier in standard deviation
    # than without the division (the correction this formula carries).
    one = torch.tensor([1.0], dtype=torch.float64)
    assert ((F.relu(one * scale + level) + 1e-4).sqrt() / scale / F.relu(one * scale + level).sqrt()).item() > 2.8


def test_noise_switch_is_independent_of_train_and_eval():
    x = torch.rand(2, 1, 10, 10)
    noisy = tiny_block(noise=True).eval()
    assert not torch.equal(noisy(x), noisy(x))  # eval() does not silence the noise
    quiet = tiny_block(noise=False).train()
    torch.testing.assert_close(quiet(x), quiet(x), rtol=0, atol=0)  # no noise: deterministic
    noisy.noise = False
    torch.testing.assert_close(noisy(x), quiet(x), rtol=0, atol=0)
    noisy.noise = True
    assert torch.all(noisy(x) >= 0)  # rates stay non-negative after the noise


def test_input_gradient_is_finite_for_attacks():
    block = tiny_block(noise=False)
    x = torch.zeros(1, 1, 10, 10, requires_grad=True)  # flat input: complex quadratures can vanish
    block(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_parameter_distributions():
    n = 20000
    p = sample_gabor_parameters(n, seed=3, sf_max_cpd=2.0, sf_corr=0.75)
    assert np.all((0 <= p["theta"]) & (p["theta"] < math.pi))
    assert np.all((0.5 <= p["sf"]) & (p["sf"] <= 2.0))
    assert np.all((ENVELOPE_EDGES[0] <= p["nx"]) & (p["nx"] <= ENVELOPE_EDGES[-1]))
    assert np.all((ENVELOPE_EDGES[0] <= p["ny"]) & (p["ny"] <= ENVELOPE_EDGES[-1]))
    # Orientation histogram (bins centred on 0, 45, 90, 135 deg) follows De Valois et al.'s counts.
    centred = np.rad2deg(p["theta"])
    bins = np.floor(((centred + 22.5) % 180) / 45).astype(int)
    expected = ORIENTATION_COUNTS / ORIENTATION_COUNTS.sum()
    np.testing.assert_allclose(np.bincount(bins, minlength=4) / n, expected, atol=0.015)
    # SF within the truncated De Valois histogram: counts 4, 4, 8, 25 over 0.5, 0.7, 1.0, 1.4, 2.0.
    sf_hist = np.histogram(p["sf"], bins=[0.5, 0.7, 1.0, 1.4, 2.0])[0] / n
    np.testing.assert_allclose(sf_hist, np.array([4, 4, 8, 25]) / 41, atol=0.015)
    # nx rises with SF (the copula correlation), ny does not have to.
    assert np.corrcoef(np.log(p["nx"]), np.log(p["sf"]))[0, 1] > 0.5
    uncorrelated = sample_gabor_parameters(n, seed=3, sf_max_cpd=2.0, sf_corr=0.0)
    assert abs(np.corrcoef(np.log(uncorrelated["nx"]), np.log(uncorrelated["sf"]))[0, 1]) < 0.05
    # A seed fixes the bank.
    again = sample_gabor_parameters(n, seed=3, sf_max_cpd=2.0, sf_corr=0.75)
    assert all(np.array_equal(p[k], again[k]) for k in p)


def test_configuration_checks():
    with pytest.raises(ValueError, match="odd"):
        tiny_block(ksize=6)
    block = tiny_block(stride=2)
    assert block(torch.rand(1, 1, 32, 32)).shape == (1, SIMPLE + COMPLEX, 16, 16)


def test_orientation_follows_the_published_convention():
    """theta = 0: the carrier runs down the rows (x is the row offset in VOneNet's grid); theta = 90 deg:
    along the columns. A wide envelope across the carrier makes the kernel nearly constant that way."""
    from neureg.models.vision.vonenet import gabor_kernel

    rows = gabor_kernel(0.2, 2.0, 50.0, 0.0, 0.0, 9).numpy()
    cols = gabor_kernel(0.2, 2.0, 50.0, math.pi / 2, 0.0, 9).numpy()
    assert np.abs(np.diff(rows, axis=0)).sum() > 20 * np.abs(np.diff(rows, axis=1)).sum()
    assert np.abs(np.diff(cols, axis=1)).sum() > 20 * np.abs(np.diff(cols, axis=0)).sum()


def test_noise_is_the_same_whatever_the_memory_layout():
    """One seed, one noise draw, whether the activity is NCHW or channels_last (the CPU default layout):
    the draw follows the logical index, so a network's noise does not depend on how a worker lays it out."""
    x = torch.rand(3, 6, 5, 7) * 4
    torch.manual_seed(11)
    nchw = neuronal_noise(x, 0.35, 0.07)
    torch.manual_seed(11)
    nhwc = neuronal_noise(x.contiguous(memory_format=torch.channels_last), 0.35, 0.07)
    torch.testing.assert_close(nhwc, nchw, rtol=0, atol=0)
    torch.manual_seed(11)
    independent = x + torch.randn(x.shape) * torch.sqrt(F.relu(x * 0.35 + 0.07) + 1e-4) / 0.35
    torch.testing.assert_close(nchw, independent)
