"""The building blocks of the predictive (denoising) model: core, readouts, shifter, modulator.

Li et al. 2019 (section 2.2) denoise single-trial responses with a system-identification model in the
style of Sinz et al. 2018 / neuralpredictors: a small convolutional core shared by all units, a
per-unit spatial readout, a shifter that moves every readout with the eye, and a modulator that scales
each unit's response with running and pupil state. Everything here is plain torch so the same model
trains on the CPU and on a GPU; the training loop and the public API live in ``predictive.py``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# A discrete Laplacian: zero on constant and linear patches, large on pixel-to-pixel jitter.
_LAPLACE_KERNEL = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])


def laplace_smoothness(weight: torch.Tensor) -> torch.Tensor:
    """Squared Laplacian of every 2-D filter slice, relative to the filters' squared norm.

    Applied to the first core layer so its filters look like receptive fields (smooth) rather than
    pixel noise fitted to a few thousand trials. The Laplacian is taken only where the 3x3 stencil fits
    inside the filter (no zero padding), so a constant filter costs exactly nothing; dividing by the
    squared norm makes the penalty about shape, not about the filters' overall scale.
    """
    out_c, in_c, kh, kw = weight.shape
    if kh < 3 or kw < 3:
        return weight.new_zeros(())
    slices = weight.reshape(out_c * in_c, 1, kh, kw)
    kernel = _LAPLACE_KERNEL.to(dtype=weight.dtype, device=weight.device)[None, None]
    curvature = F.conv2d(slices, kernel)
    return curvature.pow(2).sum() / slices.pow(2).sum().clamp_min(1e-12)


class _ConvBlock(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel: int, padding: int, momentum: float):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel, padding=padding, bias=False),
            nn.BatchNorm2d(out_channels, momentum=momentum),
            nn.ELU(),
        )


class SkipCore(nn.Module):
    """Convolutional core with dense skip connections (concatenation, not sums).

    Layer 1 sees the image (valid convolution, so no features are invented from zero padding at the
    border). Every later layer sees the channel-concatenation of *all* earlier layers' outputs, and the
    core's output is the concatenation of every layer's output, so the readout can pick simple
    (layer 1) and more nonlinear (layers 2..n) features per unit. Each layer is conv -> batch norm ->
    ELU; layers after the first use 'same' padding so all outputs share the layer-1 map size.
    """

    def __init__(self, hidden_channels: int, input_kernel: int, hidden_kernel: int, n_layers: int, bn_momentum: float):
        super().__init__()
        if hidden_kernel % 2 != 1:
            raise ValueError(f"hidden_kernel must be odd for 'same' padding, got {hidden_kernel}")
        if n_layers < 1:
            raise ValueError(f"core_layers must be >= 1, got {n_layers}")
        blocks = [_ConvBlock(1, hidden_channels, input_kernel, 0, bn_momentum)]
        for depth in range(1, n_layers):
            blocks.append(
                _ConvBlock(hidden_channels * depth, hidden_channels, hidden_kernel, hidden_kernel // 2, bn_momentum)
            )
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = hidden_channels * n_layers

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = [self.blocks[0](images)]
        for block in self.blocks[1:]:
            outputs.append(block(torch.cat(outputs, dim=1)))
        return torch.cat(outputs, dim=1)

    def smoothness_penalty(self) -> torch.Tensor:
        return laplace_smoothness(self.blocks[0][0].weight)


def translate_feature_map(feature_map: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """out(p) = feature_map(p + shift[b]) in grid_sample's normalized (x, y) coordinates.

    The same convention as adding ``shift`` to a Gaussian readout's position, so both readouts mean the
    same thing by a shifter output.
    """
    batch = feature_map.shape[0]
    theta = feature_map.new_zeros(batch, 2, 3)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(feature_map.shape), align_corners=True)
    return F.grid_sample(feature_map, grid, align_corners=True, padding_mode="zeros")


class GaussianReadout(nn.Module):
    """Each unit reads the core's feature vector at one learned position, then weights the channels.

    ``mu`` is (n_units, 2) in grid_sample's normalized coordinates (x along width, y along height,
    -1..1 corner to corner). In training the position is jittered by N(0, sigma^2) per trial, which
    smears the gradient over a neighbourhood so positions can travel to the receptive field; in eval the
    mean position is used, so predictions are deterministic.
    """

    def __init__(self, in_channels: int, n_units: int, init_mu_range: float, init_sigma: float):
        super().__init__()
        self.mu = nn.Parameter(torch.empty(n_units, 2).uniform_(-init_mu_range, init_mu_range))
        self.sigma = nn.Parameter(torch.full((n_units, 2), float(init_sigma)))
        self.features = nn.Parameter(torch.empty(n_units, in_channels).normal_(0.0, 1.0 / in_channels))
        self.bias = nn.Parameter(torch.zeros(n_units))

    def positions(self, batch: int, shift: torch.Tensor | None) -> torch.Tensor:
        grid = self.mu.clamp(-1.0, 1.0).expand(batch, -1, -1)
        if self.training:
            grid = grid + torch.randn_like(grid) * self.sigma.abs()
        if shift is not None:
            grid = grid + shift[:, None, :]
        return grid

    def forward(self, feature_map: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        grid = self.positions(feature_map.shape[0], shift).unsqueeze(2)  # (B, n, 1, 2)
        # 'border' rather than clamping the grid: a position pushed off the map by the shifter reads the
        # edge instead of zeros, and clamping would cut the gradient that could bring it back.
        sampled = F.grid_sample(feature_map, grid, align_corners=True, padding_mode="border")
        # Broadcast-multiply-sum, not einsum: einsum lowers this to a bmm batched over units, ~3x slower
        # on the CPU for a thousand units.
        return (sampled.squeeze(3) * self.features.t()).sum(1) + self.bias

    def sparsity_penalty(self) -> torch.Tensor:
        return self.features.abs().mean()


class FactorizedReadout(nn.Module):
    """Each unit = a spatial mask over the feature map x a channel weighting (rank-1 per unit).

    More parameters than the Gaussian readout but no position to search for, so it is the safer choice
    on small data. The mask is L2-normalized per unit (its scale lives in the channel weights), and the
    L1 penalty on the normalized mask favours compact receptive fields. The shifter translates the
    feature map under the mask, which is the Gaussian readout's convention.
    """

    def __init__(self, in_channels: int, n_units: int, map_shape: tuple[int, int]):
        super().__init__()
        height, width = map_shape
        self.spatial = nn.Parameter(torch.empty(n_units, height, width).normal_(0.0, 0.01))
        self.features = nn.Parameter(torch.empty(n_units, in_channels).normal_(0.0, 1.0 / in_channels))
        self.bias = nn.Parameter(torch.zeros(n_units))

    def masks(self) -> torch.Tensor:
        flat = self.spatial.flatten(1)
        return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(self.spatial)

    def forward(self, feature_map: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        if shift is not None:
            feature_map = translate_feature_map(feature_map, shift)
        per_channel = feature_map.flatten(2) @ self.masks().flatten(1).t()  # (B, C, n): one GEMM
        return (per_channel * self.features.t()).sum(1) + self.bias

    def sparsity_penalty(self) -> torch.Tensor:
        return self.features.abs().mean() + self.masks().abs().mean()


class Shifter(nn.Module):
    """Pupil centre (standardized) -> one (dx, dy) readout shift per trial, shared by all units.

    The eye moves, so every receptive field moves with it in image coordinates; one small MLP learns
    that map. Output is in normalized grid units (tanh keeps it within the map). The last layer starts
    near zero so training begins from 'no shift'.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2), nn.Tanh())
        with torch.no_grad():
            self.net[2].weight.mul_(0.1)
            self.net[2].bias.zero_()

    def forward(self, pupil_center: torch.Tensor) -> torch.Tensor:
        return self.net(pupil_center)


class Modulator(nn.Module):
    """Behaviour (standardized pupil dilation, its derivative, running speed) -> per-unit gain > 0.

    Gain = exp(MLP(behaviour)), multiplicative on the predicted rate: arousal and locomotion scale
    visual responses in mouse V1 rather than replacing them. The last layer starts at zero, so every
    gain starts at exactly 1.
    """

    def __init__(self, n_behavior: int, n_units: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_behavior, hidden), nn.ELU(), nn.Linear(hidden, n_units))
        with torch.no_grad():
            self.net[2].weight.zero_()
            self.net[2].bias.zero_()

    def forward(self, behavior: torch.Tensor) -> torch.Tensor:
        # Clamped log-gain: a gain of e^8 is already absurd, and it keeps exp from overflowing early on.
        return torch.exp(self.net(behavior).clamp(-8.0, 8.0))


class PredictiveNetwork(nn.Module):
    """Image (+ behaviour, pupil centre) -> predicted response of every unit, ELU + 1 output.

    The network owns its input and output normalization as buffers (training-set image mean / std,
    behaviour and pupil mean / std, per-unit response scale), so a saved state_dict is everything
    needed to predict: callers pass raw uint8-range images and raw behaviour. ``behavior=None`` means
    behaviour at its training mean and ``pupil_center=None`` the training-mean eye position, which is
    how the denoised responses of the similarity targets are defined.

    ``forward`` returns responses in the units of the training data; ``standardized_rates`` returns
    them divided by the per-unit response scale (what the Poisson loss is fitted on, so every unit
    weighs the same in the loss whatever its raw scale).
    """

    def __init__(
        self,
        core: SkipCore,
        readout: nn.Module,
        shifter: Shifter | None,
        modulator: Modulator | None,
        n_units: int,
        image_shape: tuple[int, int],
        feature_shape: tuple[int, int],
        n_behavior: int = 3,
    ):
        super().__init__()
        self.core, self.readout, self.shifter, self.modulator = core, readout, shifter, modulator
        self.n_units = n_units
        self.image_shape = tuple(image_shape)
        self.feature_shape = tuple(feature_shape)
        self.register_buffer("image_mean", torch.zeros(()))
        self.register_buffer("image_std", torch.ones(()))
        self.register_buffer("behavior_mean", torch.zeros(n_behavior))
        self.register_buffer("behavior_std", torch.ones(n_behavior))
        self.register_buffer("pupil_mean", torch.zeros(2))
        self.register_buffer("pupil_std", torch.ones(2))
        self.register_buffer("response_scale", torch.ones(n_units))

    # -- normalization -------------------------------------------------------------------------------
    def _images(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.image_mean.dtype)
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return (x - self.image_mean) / self.image_std

    def shift(self, pupil_center: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """Per-trial readout shift in normalized grid units (None without a shifter)."""
        if self.shifter is None:
            return None
        if pupil_center is None:
            z = self.pupil_mean.new_zeros(batch, 2)
        else:
            z = (pupil_center.to(self.pupil_mean.dtype) - self.pupil_mean) / self.pupil_std
        return self.shifter(z)

    def gain(self, behavior: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """Per-trial, per-unit multiplicative gain (None without a modulator)."""
        if self.modulator is None:
            return None
        if behavior is None:
            z = self.behavior_mean.new_zeros(batch, self.behavior_mean.numel())
        else:
            z = (behavior.to(self.behavior_mean.dtype) - self.behavior_mean) / self.behavior_std
        return self.modulator(z)

    # -- prediction ----------------------------------------------------------------------------------
    def standardized_rates(
        self, images: torch.Tensor, behavior: torch.Tensor | None = None, pupil_center: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch = images.shape[0]
        drive = self.readout(self.core(self._images(images)), self.shift(pupil_center, batch))
        rates = F.elu(drive) + 1.0
        gain = self.gain(behavior, batch)
        return rates if gain is None else rates * gain

    def forward(
        self, images: torch.Tensor, behavior: torch.Tensor | None = None, pupil_center: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.standardized_rates(images, behavior, pupil_center) * self.response_scale

    def regularization(self, smoothness_weight: float, readout_l1: float) -> torch.Tensor:
        return smoothness_weight * self.core.smoothness_penalty() + readout_l1 * self.readout.sparsity_penalty()
