"""VOneBlock: a fixed, primate-V1-like Gabor front end with neuronal noise (Dapello, Marques et al. 2020).

What it computes (docs/science.md §8). Input in [0, 1] is mapped to [-1, 1] (VOneNet's 0.5/0.5
normalisation: the Gabors see contrast around mid-gray). A bank of Gabor filters g_c, one per channel,
gives linear responses; simple cells are ReLU(k_exc * <g_c(phase), x>), complex cells are the quadrature
energy k_exc * sqrt(<g_c(phase), x>^2 + <g_c(phase + 90 deg), x>^2) / sqrt(2). Then, when ``noise`` is on,
Poisson-like noise x + N(0, 1) * sqrt(relu(x * noise_scale + noise_level) + 1e-4) / noise_scale
(docs/science.md §8), and a
final ReLU (firing rates are non-negative). The bank is fixed: buffers, not parameters.

Gabor parameters are drawn from published primate V1 statistics (the distributions VOneNet uses), with
our own sampler:
  * orientation: De Valois, Yund & Hepler 1982 (Vision Res 22:531), counts 66, 49, 77, 54 in 45-degree
    bins centred on 0, 45, 90, 135 deg, uniform within a bin;
  * peak spatial frequency: De Valois, Albrecht & Thorell 1982 (Vision Res 22:545), counts
    4, 4, 8, 25, 32, 26, 28, 12, 8 in octave-half bins 0.5 .. 11.2 cycles/deg, log-uniform within a bin;
  * envelope nx = sigma_x * f and ny = sigma_y * f (widths in cycles): Ringach 2002 (J Neurophysiol
    88:455), the 5 x 5 joint histogram over log-spaced bins 0.1 .. 10^0.2; nx from its marginal, ny from
    the row of nx's bin, log-uniform within bins;
  * nx and SF correlated through a Gaussian copula with correlation ``sf_corr`` = 0.75 (VOneNet's default:
    cells tuned to higher SF have envelopes spanning more cycles);
  * phase uniform in [0, 360) deg.

Re-derivation for 32-px inputs (VOneNet's numbers are for 224 px = 8 deg, ppd 28, ksize 25, stride 4):
  * visual_degrees = 8: a CIFAR image is the same kind of whole-object photograph as a 224-px ImageNet
    crop, only sampled 7x more coarsely, so it spans the same field: ppd = 32 / 8 = 4.
  * sf_max = Nyquist = ppd / 2 = 2 cycles/deg. A cell tuned above that would look at structure the
    32-px image no longer has (and its kernel would alias), so the SF distribution is truncated there and
    renormalised, as VOneNet's own ``sf_max`` does. Frequencies then span 0.125 .. 0.5 cycles/px.
  * ksize = 7: VOneNet's 25-px kernel spans about 7 median envelope widths (the median sigma_x of its
    bank is 3.6 px at ppd 28, sf_max 9). The truncated bank here has a median sigma_x of 1.07 px at ppd 4,
    so the same ratio asks for 7.5 px; the nearest odd size is 7. ``median_envelope_px`` computes both.
  * stride = 1: VOneNet's stride 4 replaced the ImageNet ResNet stem (stride-2 conv + stride-2 max-pool);
    the CIFAR stem it replaces here has stride 1, so stage 1 of the backend still sees 32x32 maps and
    the five taps keep the strides of the plain ResNet18.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats
from torch import nn
from torch.nn import functional as F

ORIENTATION_EDGES_DEG = np.array([-22.5, 22.5, 67.5, 112.5, 157.5])
ORIENTATION_COUNTS = np.array([66, 49, 77, 54], dtype=float)  # De Valois, Yund & Hepler 1982
SF_EDGES_CPD = np.array([0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6, 8.0, 11.2])
SF_COUNTS = np.array([4, 4, 8, 25, 32, 26, 28, 12, 8], dtype=float)  # De Valois, Albrecht & Thorell 1982
ENVELOPE_EDGES = np.logspace(-1, 0.2, 6)  # nx, ny bins (cycles)
ENVELOPE_JOINT_COUNTS = np.array(  # Ringach 2002: rows nx bins, columns ny bins
    [[2, 0, 1, 0, 0], [8, 9, 4, 1, 0], [1, 2, 19, 17, 3], [0, 0, 1, 7, 4], [0, 0, 0, 0, 0]], dtype=float
)


def _sample_binned(u: np.ndarray, edges: np.ndarray, counts: np.ndarray, log: bool) -> np.ndarray:
    """Inverse CDF of a histogram density, uniform (or log-uniform) within each bin, at quantiles u."""
    cdf = np.concatenate([[0.0], np.cumsum(counts) / counts.sum()])
    axis = np.log(edges) if log else edges
    values = np.interp(u, cdf, axis)
    return np.exp(values) if log else values


def _truncate_sf(sf_max: float) -> tuple[np.ndarray, np.ndarray]:
    """The SF histogram cut at sf_max (a partial bin keeps its log-proportional share)."""
    if sf_max <= SF_EDGES_CPD[0]:
        raise ValueError(f"sf_max {sf_max} cycles/deg is below the lowest V1 SF bin {SF_EDGES_CPD[0]}")
    top = min(sf_max, SF_EDGES_CPD[-1])
    edges = np.append(SF_EDGES_CPD[SF_EDGES_CPD < top], top)
    counts = SF_COUNTS[: len(edges) - 1].copy()
    last_full = SF_EDGES_CPD[len(edges) - 1]
    counts[-1] *= np.log(edges[-1] / edges[-2]) / np.log(last_full / edges[-2])
    return edges, counts


def sample_gabor_parameters(n: int, seed: int, sf_max_cpd: float, sf_corr: float) -> dict[str, np.ndarray]:
    """n Gabor parameter sets in visual units: sf (cycles/deg), theta and phase (rad), nx, ny (cycles)."""
    rng = np.random.default_rng(seed)
    theta_deg = _sample_binned(rng.random(n), ORIENTATION_EDGES_DEG, ORIENTATION_COUNTS, log=False) % 180.0
    phase_deg = rng.random(n) * 360.0
    copula = stats.norm.cdf(rng.multivariate_normal([0.0, 0.0], [[1.0, sf_corr], [sf_corr, 1.0]], size=n))
    nx_counts = ENVELOPE_JOINT_COUNTS.sum(axis=1)
    nx = _sample_binned(copula[:, 0], ENVELOPE_EDGES, nx_counts, log=True)
    sf_edges, sf_counts = _truncate_sf(sf_max_cpd)
    sf = _sample_binned(copula[:, 1], sf_edges, sf_counts, log=True)
    nx_bin = np.clip(np.searchsorted(ENVELOPE_EDGES, nx, side="right") - 1, 0, len(nx_counts) - 1)
    u_ny = rng.random(n)
    ny = np.array([_sample_binned(u, ENVELOPE_EDGES, ENVELOPE_JOINT_COUNTS[b], log=True) for u, b in zip(u_ny, nx_bin)])
    return {"sf": sf, "theta": np.deg2rad(theta_deg), "phase": np.deg2rad(phase_deg), "nx": nx, "ny": ny}


def gabor_kernel(
    frequency: float, sigma_x: float, sigma_y: float, theta: float, phase: float, ksize: int
) -> torch.Tensor:
    """g(x, y) = exp(-x'^2 / 2 sx^2 - y'^2 / 2 sy^2) / (2 pi sx sy) * cos(2 pi f x' + phase), float64.

    As in the published VOneNet code, x is the *row* offset and y the column offset from the kernel
    centre (pixels), x' = x cos t + y sin t, y' = -x sin t + y cos t; f in cycles/pixel. That convention
    fixes what an orientation t means (t = 0: the carrier varies down the rows). The 1 / (2 pi sx sy)
    gain is VOneNet's.
    """
    half = ksize // 2
    offsets = torch.arange(-half, half + 1, dtype=torch.float64)
    x, y = torch.meshgrid(offsets, offsets, indexing="ij")
    x_rot = x * math.cos(theta) + y * math.sin(theta)
    y_rot = -x * math.sin(theta) + y * math.cos(theta)
    envelope = torch.exp(-0.5 * (x_rot**2 / sigma_x**2 + y_rot**2 / sigma_y**2))
    envelope = envelope / (2 * math.pi * sigma_x * sigma_y)
    return envelope * torch.cos(2 * math.pi * frequency * x_rot + phase)


#: The published code's floor under the square root (``eps = 10e-5``).
NOISE_EPS = 1e-4


def neuronal_noise(
    x: torch.Tensor, scale: float, level: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """x + N(0, 1) * sqrt(relu(x * scale + level) + 1e-4) / scale, the published VOneNet noise.

    Poisson-like: the variance (relu(s x + l) + 1e-4) / s^2 grows with the activity. The published code
    scales x by s, shifts by l, adds noise of standard deviation sqrt(relu(.) + eps), then undoes the
    shift and the scale, which is where the division by s comes from (docs/science.md §8). ``generator``:
    a network's own noise stream (a fused group's members, models/vision/fused.py); default torch's global.
    """
    # Drawn in logical (N, C, H, W) order, not the tensor's memory order: the same noise whatever the layout
    # (and randn_like on a channels_last tensor takes a much slower path on the CPU).
    noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    return x + noise * torch.sqrt(F.relu(x * scale + level) + NOISE_EPS) / scale


class VOneBlock(nn.Module):
    """Fixed Gabor bank -> simple (ReLU) and complex (energy) cells -> optional noise -> ReLU.

    ``noise`` is a plain attribute, independent of ``train()``/``eval()``: VOneNets are stochastic at
    test time too (attack them with EoT), and switching it off makes the block deterministic.
    """

    def __init__(
        self,
        params: dict[str, np.ndarray],
        simple_channels: int,
        complex_channels: int,
        pixels_per_degree: float,
        ksize: int,
        stride: int,
        k_exc: float,
        noise: bool,
        noise_scale: float,
        noise_level: float,
        in_channels: int = 1,
    ):
        super().__init__()
        n = simple_channels + complex_channels
        if len(params["sf"]) != n:
            raise ValueError(f"need {n} Gabor parameter sets, got {len(params['sf'])}")
        if ksize % 2 != 1:
            raise ValueError(f"ksize must be odd so the kernel has a centre pixel, got {ksize}")
        self.simple_channels, self.complex_channels = simple_channels, complex_channels
        self.out_channels = n
        self.stride, self.padding = stride, ksize // 2
        self.k_exc = k_exc
        self.noise, self.noise_scale, self.noise_level = noise, noise_scale, noise_level
        frequency = params["sf"] / pixels_per_degree  # cycles/px
        sigma_x, sigma_y = params["nx"] / frequency, params["ny"] / frequency  # px
        self.pixel_params = {
            "frequency": frequency,
            "sigma_x": sigma_x,
            "sigma_y": sigma_y,
            "theta": params["theta"],
            "phase": params["phase"],
        }

        def bank(channels: range, phase_shift: float) -> torch.Tensor:
            kernels = [
                gabor_kernel(
                    frequency[c], sigma_x[c], sigma_y[c], params["theta"][c], params["phase"][c] + phase_shift, ksize
                )
                for c in channels
            ]
            return torch.stack(kernels).to(torch.get_default_dtype()) if kernels else torch.zeros(0, ksize, ksize)

        # One conv computes every needed response: simple cells use phase 0 of their own Gabor; complex
        # cells need phase 0 and phase + 90 deg (VOneNet's two full banks would waste the simple q1 half).
        simple = bank(range(simple_channels), 0.0)
        complex_q0 = bank(range(simple_channels, n), 0.0)
        complex_q1 = bank(range(simple_channels, n), math.pi / 2)
        kernels = torch.cat([simple, complex_q0, complex_q1])[:, None]
        # Grayscale input: every Gabor reads the one channel (VOneNet draws a random channel per filter).
        self.register_buffer("weight", kernels.repeat(1, in_channels, 1, 1) / in_channels)

    @classmethod
    def build(cls, **vone) -> VOneBlock:
        """The block a VOne config describes: ``networks.vone_config()``'s keyword arguments, where their
        defaults (VOneNet's) are written once (``sf_max`` None: the Nyquist limit ppd / 2).

        The Gabor bank is drawn from ``gabor_seed`` alone, so every training seed shares it, as in VOneNet.
        """
        ppd = vone["image_size"] / vone["visual_degrees"]
        sf_max = vone["sf_max"] if vone["sf_max"] is not None else ppd / 2
        n = vone["simple_channels"] + vone["complex_channels"]
        params = sample_gabor_parameters(n, vone["gabor_seed"], sf_max, vone["sf_corr"])
        block = (
            "simple_channels",
            "complex_channels",
            "ksize",
            "stride",
            "k_exc",
            "noise",
            "noise_scale",
            "noise_level",
            "in_channels",
        )
        return cls(params, pixels_per_degree=ppd, **{name: vone[name] for name in block})

    def cell_responses(self, x: torch.Tensor) -> torch.Tensor:
        """Noise-free simple and complex cell activity, (N, simple + complex, H / stride, W / stride)."""
        linear = F.conv2d(x * 2.0 - 1.0, self.weight, None, self.stride, self.padding)
        s, c = self.simple_channels, self.complex_channels
        simple = F.relu(linear[:, :s])
        q0, q1 = linear[:, s : s + c], linear[:, s + c :]
        # The tiny constant keeps the gradient finite where both quadratures vanish (input-gradient attacks).
        complex_ = torch.sqrt(q0**2 + q1**2 + 1e-12) / math.sqrt(2.0)
        return self.k_exc * torch.cat([simple, complex_], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        responses = self.cell_responses(x)
        if self.noise:
            responses = neuronal_noise(responses, self.noise_scale, self.noise_level)
        return F.relu(responses)


def median_envelope_px(visual_degrees: float, image_size: int, sf_max: float | None = None, n: int = 20000) -> float:
    """Median sigma_x in pixels of the sampled bank: the number the ksize derivation scales from."""
    ppd = image_size / visual_degrees
    params = sample_gabor_parameters(n, 0, sf_max if sf_max is not None else ppd / 2, 0.75)
    return float(np.median(params["nx"] / (params["sf"] / ppd)))
