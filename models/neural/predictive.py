"""Fit and use the predictive (denoising) model of one scan (Li et al. 2019, section 2.2).

Single-trial responses are too noisy for a similarity target; a model that predicts every unit from
the image (and accounts for eye position and behaviour) gives deterministic, denoised responses
rhohat_ai, and its held-out correlation v_a says how far to trust each unit (docs/science.md §5).

Pure torch / numpy: the DataJoint tables call these functions and store what they return.

    cfg = default_predictor_config()
    fit = fit_predictor(images, responses, behavior, pupil_center, train_idx, val_idx, cfg, seed=0,
                        trial_image=trial_image)
    model = fit.to_model()
    rates = predict_responses(model, images)            # behaviour at its mean, eye centred
    v = unit_correlations(predict_responses(model, images[trial_image[test]], behavior[test],
                                            pupil_center[test]), responses[test])
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import torch

from ..registry import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    UnitInterval,
    at_least,
    complete_kwargs,
    one_of,
)
from ..runtime import Runtime, as_runtime, synchronize
from .predictions import predict_responses, rows_or_none, unit_correlations
from .predictive_mapping import receptive_field_positions
from .predictive_modules import FactorizedReadout, GaussianReadout, Modulator, PredictiveNetwork, Shifter, SkipCore


def predictor_settings(
    hidden_channels: PositiveInt = 16,
    input_kernel: PositiveInt = 9,
    hidden_kernel: PositiveInt = 5,
    core_layers: PositiveInt = 3,
    bn_momentum: UnitInterval = 0.1,
    smoothness_weight: NonNegativeFloat = 0.01,
    readout: Annotated[str, one_of("gaussian", "factorized")] = "gaussian",
    readout_l1: NonNegativeFloat = 0.001,
    init_positions: Annotated[str, one_of("mapped", "random")] = "mapped",
    init_mu_range: PositiveFloat = 0.5,
    init_sigma: PositiveFloat = 0.3,
    shifter: bool = True,
    shifter_hidden: PositiveInt = 5,
    modulator: bool = True,
    modulator_hidden: PositiveInt = 10,
    batch_size: Annotated[int, at_least(2)] = 64,
    lr: PositiveFloat = 0.01,
    max_epochs: PositiveInt = 60,
    patience: PositiveInt = 4,
    lr_decay_steps: NonNegativeInt = 2,
    lr_decay_factor: UnitInterval = 0.3,
    tolerance: NonNegativeFloat = 1e-4,
    image_scale: UnitInterval = 1.0,
) -> None:
    """A predictive model's config (its keyword arguments; docs/science.md §5).

    Core: ``hidden_channels`` per layer (the readout sees core_layers x this many), a valid first
    convolution of ``input_kernel``, odd ``hidden_kernel`` ('same' padding), a Laplacian penalty of
    ``smoothness_weight`` on the first-layer filters. Readout: "gaussian" (a learned position,
    initialised from reverse correlation when ``init_positions`` is "mapped", else uniform in
    +-``init_mu_range``; ``init_sigma`` its training jitter) or "factorized" (mask x channels), with an
    L1 penalty ``readout_l1``. Shifter and modulator take eye position and behaviour. Optimisation:
    Adam at ``lr``, batch norm needs ``batch_size`` >= 2; after ``patience`` epochs without a validation
    gain above ``tolerance`` the lr decays by ``lr_decay_factor`` from the best weights, ``lr_decay_steps``
    times, then the fit stops. ``image_scale`` downsamples the images before the fit (``images.downsample``;
    the community fits Sensorium scans at 0.25: 144x256 -> 36x64), and the model predicts at that size.
    """


def default_predictor_config() -> dict:
    """Every config key with its default: a fresh dict, safe to edit."""
    return complete_kwargs(predictor_settings, {})


def resolve_config(config: dict | None) -> dict:
    """Defaults overlaid with ``config``; an unknown key or a bad value is an error, so a typo never trains."""
    return complete_kwargs(predictor_settings, dict(config or {}), "predictor config")


def build_predictor(config: dict | None, n_units: int, image_shape: tuple[int, int]) -> PredictiveNetwork:
    """An untrained network for ``n_units`` and images of ``image_shape`` (height, width).

    Initial weights come from torch's global RNG: seed it (``fit_predictor`` does) for reproducibility.
    """
    cfg = resolve_config(config)
    height, width = image_shape
    if height < cfg["input_kernel"] or width < cfg["input_kernel"]:
        raise ValueError(f"images {image_shape} smaller than input_kernel {cfg['input_kernel']}")
    core = SkipCore(
        cfg["hidden_channels"], cfg["input_kernel"], cfg["hidden_kernel"], cfg["core_layers"], cfg["bn_momentum"]
    )
    feature_shape = (height - cfg["input_kernel"] + 1, width - cfg["input_kernel"] + 1)
    if cfg["readout"] == "gaussian":
        readout = GaussianReadout(core.out_channels, n_units, cfg["init_mu_range"], cfg["init_sigma"])
    else:
        readout = FactorizedReadout(core.out_channels, n_units, feature_shape)
    shifter = Shifter(cfg["shifter_hidden"]) if cfg["shifter"] else None
    modulator = Modulator(3, n_units, cfg["modulator_hidden"]) if cfg["modulator"] else None
    return PredictiveNetwork(core, readout, shifter, modulator, n_units, (height, width), feature_shape)


def load_predictor(
    state_dict: dict, config: dict | None, n_units: int, image_shape: tuple[int, int], device: str = "cpu"
) -> PredictiveNetwork:
    """Rebuild a fitted network from what ``FitResult`` (or a stored model) holds; returned in eval mode."""
    model = build_predictor(config, n_units, image_shape)
    model.load_state_dict(state_dict)
    return model.to(device).eval()


@dataclass
class FitResult:
    """What a fit produces: weights (CPU tensors, normalization buffers included) and its history."""

    state_dict: dict
    config: dict
    n_units: int
    image_shape: tuple[int, int]
    best_val_corr: float
    best_epoch: int
    epochs_run: int
    fit_seconds: float
    train_images_per_second: float
    device: str
    history: list[dict] = field(default_factory=list)

    def to_model(self, device: str = "cpu") -> PredictiveNetwork:
        return load_predictor(self.state_dict, self.config, self.n_units, self.image_shape, device)


def poisson_loss(rates: torch.Tensor, observed: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean Poisson negative log likelihood without the log(k!) constant: rate - k log(rate)."""
    return (rates - observed * torch.log(rates + eps)).mean()


# -- fitting ------------------------------------------------------------------------------------------
def _set_normalization(
    model: PredictiveNetwork,
    images: np.ndarray,
    responses: np.ndarray,
    behavior: np.ndarray | None,
    pupil_center: np.ndarray | None,
) -> None:
    """Store training-set statistics in the model's buffers (zero spreads become 1: nothing to scale)."""

    def spread(x: np.ndarray) -> np.ndarray:
        s = x.std(axis=0)
        return np.where(s > 0, s, 1.0)

    with torch.no_grad():
        pix = images.astype(np.float64)
        model.image_mean.fill_(float(pix.mean()))
        model.image_std.fill_(float(pix.std()) if pix.std() > 0 else 1.0)
        model.response_scale.copy_(torch.from_numpy(spread(responses.astype(np.float64))))
        if behavior is not None:
            model.behavior_mean.copy_(torch.from_numpy(behavior.mean(axis=0)))
            model.behavior_std.copy_(torch.from_numpy(spread(behavior.astype(np.float64))))
        if pupil_center is not None:
            model.pupil_mean.copy_(torch.from_numpy(pupil_center.mean(axis=0)))
            model.pupil_std.copy_(torch.from_numpy(spread(pupil_center.astype(np.float64))))
        # Start each unit at its mean response: invert ELU + 1 so the initial output equals it.
        mean = torch.from_numpy(responses.mean(axis=0) / model.response_scale.numpy()).float()
        mean = mean.clamp_min(1e-3)
        model.readout.bias.copy_(torch.where(mean >= 1, mean - 1, torch.log(mean)))


def _check_inputs(images, responses, behavior, pupil_center, trial_image, cfg) -> None:
    n_trials = responses.shape[0]
    if images.ndim != 3:
        raise ValueError(f"images must be (n, height, width), got shape {images.shape}")
    if trial_image is None and images.shape[0] != n_trials:
        raise ValueError(f"{images.shape[0]} images but {n_trials} response rows: pass trial_image")
    if cfg["modulator"] and behavior is None:
        raise ValueError("config has a modulator but behavior is None (set modulator=False)")
    if cfg["shifter"] and pupil_center is None:
        raise ValueError("config has a shifter but pupil_center is None (set shifter=False)")
    for name, arr, width in (("behavior", behavior, 3), ("pupil_center", pupil_center, 2)):
        if arr is not None and arr.shape != (n_trials, width):
            raise ValueError(f"{name} must be ({n_trials}, {width}), got {arr.shape}")


class _TrialData:
    """Per-trial tensors on the device; images kept distinct and gathered through trial_image."""

    def __init__(self, images, responses, behavior, pupil_center, trial_image, scale, device):
        def tensor(x, dtype=torch.float32):
            return None if x is None else torch.as_tensor(np.ascontiguousarray(x), dtype=dtype, device=device)

        n_trials = responses.shape[0]
        self.images = tensor(images, torch.float32)
        self.trial_image = tensor(np.arange(n_trials) if trial_image is None else trial_image, torch.long)
        self.responses = tensor(responses)
        self.scaled = self.responses / scale.to(device)
        self.behavior = tensor(behavior)
        self.pupil_center = tensor(pupil_center)

    def batch(self, idx: torch.Tensor):
        return (
            self.images[self.trial_image[idx]],
            rows_or_none(self.behavior, idx),
            rows_or_none(self.pupil_center, idx),
        )


def _validation_corr(model: PredictiveNetwork, data: _TrialData, val_idx: torch.Tensor, batch_size: int) -> float:
    model.eval()
    preds = []
    with torch.no_grad():
        for start in range(0, len(val_idx), batch_size):
            preds.append(model.standardized_rates(*data.batch(val_idx[start : start + batch_size])))
    pred = torch.cat(preds).cpu().numpy()
    return float(unit_correlations(pred, data.responses[val_idx].cpu().numpy()).mean())


def fit_predictor(
    images: np.ndarray,
    responses: np.ndarray,
    behavior: np.ndarray | None,
    pupil_center: np.ndarray | None,
    train_idx,
    val_idx,
    config: dict | None = None,
    seed: int = 0,
    runtime: Runtime | str | None = None,
    progress: Callable[[dict], None] | None = None,
    trial_image: np.ndarray | None = None,
) -> FitResult:
    """Fit one predictive model; early-stopped on the mean validation correlation, best weights kept.

    ``images``: uint8 (n, height, width), one per trial or, with ``trial_image`` (n_trials,) indexing
    them, the distinct images of the scan. ``responses`` (n_trials, n_units), nonnegative (a Poisson
    rate model); ``behavior`` (n_trials, 3) = pupil dilation, its derivative, running speed;
    ``pupil_center`` (n_trials, 2). ``train_idx`` / ``val_idx`` index trials. Each may be None when
    the config turns the modulator / shifter off.

    Training: Adam on the mean Poisson loss of per-unit-standardized responses plus the smoothness and
    readout penalties. After ``patience`` epochs without a validation gain the best weights are
    restored and the learning rate decayed, ``lr_decay_steps`` times; the next stall stops the fit.
    ``progress`` is called with each epoch's history row. ``runtime`` is the worker's execution settings, as
    training takes them (a device string or None, the CPU, also do): its device and cuDNN kernels.
    Reproducible for a given seed on the CPU
    (same torch build and thread count); on CUDA, grid_sample's backward uses atomics, so runs agree
    only approximately. The caller's torch RNG state is left untouched.
    """
    start = time.perf_counter()
    cfg = resolve_config(config)
    images = np.asarray(images)
    responses = np.asarray(responses, dtype=np.float32)
    behavior = None if behavior is None or not cfg["modulator"] else np.asarray(behavior, np.float64)
    pupil_center = None if pupil_center is None or not cfg["shifter"] else np.asarray(pupil_center, np.float64)
    _check_inputs(images, responses, behavior, pupil_center, trial_image, cfg)
    train_idx, val_idx = np.asarray(train_idx, dtype=np.int64), np.asarray(val_idx, dtype=np.int64)
    if len(train_idx) < 2 or len(val_idx) < 2:
        raise ValueError("need at least 2 training and 2 validation trials")
    trial_image = None if trial_image is None else np.asarray(trial_image, dtype=np.int64)
    train_images = images[train_idx] if trial_image is None else images[np.unique(trial_image[train_idx])]
    n_units = responses.shape[1]
    runtime = as_runtime(runtime)
    device = runtime.torch_device
    fork_devices = []
    if device.type == "cuda":
        fork_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=fork_devices), runtime.kernels():
        torch.manual_seed(seed)
        model = build_predictor(cfg, n_units, images.shape[1:])
        _set_normalization(
            model,
            train_images,
            responses[train_idx],
            None if behavior is None else behavior[train_idx],
            None if pupil_center is None else pupil_center[train_idx],
        )
        if cfg["readout"] == "gaussian" and cfg["init_positions"] == "mapped":
            trial_images = images[train_idx] if trial_image is None else images[trial_image[train_idx]]
            positions = receptive_field_positions(trial_images, responses[train_idx], cfg["input_kernel"])
            with torch.no_grad():
                model.readout.mu.copy_(torch.from_numpy(positions))
        model.to(device)
        data = _TrialData(images, responses, behavior, pupil_center, trial_image, model.response_scale, device)
        return _train(model, data, train_idx, val_idx, cfg, seed, device, progress, start)


def _train(model, data, train_idx, val_idx, cfg, seed, device, progress, start) -> FitResult:
    rng = np.random.default_rng(seed)
    val_t = torch.as_tensor(val_idx, device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    best_corr, best_epoch = -math.inf, 0
    best_state = copy.deepcopy(model.state_dict())
    stall, decays_left, history = 0, cfg["lr_decay_steps"], []
    images_seen = 0
    for epoch in range(1, cfg["max_epochs"] + 1):
        tic = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
        n_batches = 0
        order = torch.as_tensor(rng.permutation(train_idx), device=device)
        for first in range(0, len(order), cfg["batch_size"]):
            idx = order[first : first + cfg["batch_size"]]
            if len(idx) < 2:  # batch norm cannot normalize a single trial
                continue
            rates = model.standardized_rates(*data.batch(idx))
            fit_loss = poisson_loss(rates, data.scaled[idx])
            loss = fit_loss + model.regularization(cfg["smoothness_weight"], cfg["readout_l1"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += fit_loss.detach()
            n_batches += 1
            images_seen += len(idx)
        synchronize(device)
        train_seconds = time.perf_counter() - tic
        val_corr = _validation_corr(model, data, val_t, max(cfg["batch_size"], 256))
        row = {
            "epoch": epoch,
            "train_loss": float(loss_sum) / max(n_batches, 1),
            "val_corr": val_corr,
            "lr": optimizer.param_groups[0]["lr"],
            "train_seconds": train_seconds,
            "seconds": time.perf_counter() - tic,
        }
        history.append(row)
        if progress is not None:
            progress(row)
        if val_corr > best_corr + cfg["tolerance"]:
            best_corr, best_epoch, stall = val_corr, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
            continue
        stall += 1
        if stall < cfg["patience"]:
            continue
        model.load_state_dict(best_state)
        if decays_left == 0:
            break
        decays_left, stall = decays_left - 1, 0
        for group in optimizer.param_groups:
            group["lr"] *= cfg["lr_decay_factor"]
    model.load_state_dict(best_state)
    fit_seconds = time.perf_counter() - start
    train_time = sum(r["train_seconds"] for r in history)
    return FitResult(
        state_dict={k: v.detach().cpu().clone() for k, v in best_state.items()},
        config=cfg,
        n_units=model.n_units,
        image_shape=model.image_shape,
        best_val_corr=float(best_corr),
        best_epoch=best_epoch,
        epochs_run=len(history),
        fit_seconds=fit_seconds,
        train_images_per_second=images_seen / max(train_time, 1e-9),
        device=str(device),
        history=history,
    )


TEST_TIERS = ("oracle", "test", "final_test")  # held-out trials: v_a is measured on them


def split_by_tier(tiers: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trial indices of the train, validation and held-out test tiers; each needs at least two trials."""
    tiers = np.asarray(tiers)
    train, val = np.flatnonzero(tiers == "train"), np.flatnonzero(tiers == "validation")
    test = np.flatnonzero(np.isin(tiers, TEST_TIERS))
    if len(train) < 2 or len(val) < 2 or len(test) < 2:
        raise ValueError(
            f"{len(train)} train, {len(val)} validation and {len(test)} oracle/test trials; "
            "a predictive model needs at least 2 of each"
        )
    return train, val, test


@dataclass
class EvaluatedFit:
    """A fit and each unit's held-out correlation v_a (equation 6), with the trial counts behind them."""

    fit: FitResult
    model_corr: np.ndarray  # (n_units,), 0 where undefined
    n_train: int
    n_validation: int
    n_test: int


def fit_and_evaluate(
    images: np.ndarray,
    responses: np.ndarray,
    behavior: np.ndarray,
    pupil_center: np.ndarray,
    tiers: np.ndarray,
    config: dict,
    *,
    trial_image: np.ndarray,
    seed: int,
    runtime: Runtime | str | None = None,
    progress: Callable[[dict], None] | None = None,
) -> EvaluatedFit:
    """Fit on the train tier (early stopping on validation), then v_a on the held-out test trials.

    The one call ``PredictiveModel`` makes: the arrays are one scan's, in trial order, images once per
    distinct image (``trial_image`` indexes them).
    """
    train, val, test = split_by_tier(tiers)
    result = fit_predictor(
        images,
        responses,
        behavior,
        pupil_center,
        train,
        val,
        config,
        seed=seed,
        runtime=runtime,
        progress=progress,
        trial_image=trial_image,
    )
    predicted = predict_responses(
        result.to_model(result.device), images[trial_image[test]], behavior[test], pupil_center[test]
    )
    model_corr = np.nan_to_num(unit_correlations(predicted, responses[test]))
    return EvaluatedFit(result, model_corr, len(train), len(val), len(test))
