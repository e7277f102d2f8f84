"""What a fitted predictive model says: responses, readout shifts and gains, and per-unit correlations.

Pure torch / numpy, batched and in eval mode; ``models.neural.predictive`` fits the models these read.
"""

from __future__ import annotations

import numpy as np
import torch

from ..runtime import evaluation_mode
from .predictive_modules import PredictiveNetwork


def rows_or_none(tensor: torch.Tensor | None, index):
    """``tensor[index]``, or None for an input the config turned off (no modulator, no shifter)."""
    return None if tensor is None else tensor[index]


def unit_correlations(pred: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """Per-unit Pearson r between (n_samples, n_units) predictions and observations.

    NaN-safe in two senses: samples where either array is non-finite are left out for that unit, and a
    unit with no variance (in prediction or observation) or fewer than two usable samples gets 0.0,
    not NaN, since 'no evidence of prediction' is what v_a should then say.
    """
    p = np.asarray(pred, dtype=np.float64)
    o = np.asarray(obs, dtype=np.float64)
    if p.shape != o.shape or p.ndim != 2:
        raise ValueError(f"pred and obs must be the same (n_samples, n_units) shape: {p.shape}, {o.shape}")
    ok = np.isfinite(p) & np.isfinite(o)
    n = ok.sum(axis=0)
    p = np.where(ok, p, 0.0)
    o = np.where(ok, o, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_c = np.where(ok, p - p.sum(axis=0) / n, 0.0)
        o_c = np.where(ok, o - o.sum(axis=0) / n, 0.0)
        cov = (p_c * o_c).sum(axis=0)
        denom = np.sqrt((p_c**2).sum(axis=0) * (o_c**2).sum(axis=0))
        r = cov / denom
    return np.where((n >= 2) & (denom > 0) & np.isfinite(r), r, 0.0)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batched(model, n: int, batch_size: int, step) -> np.ndarray:
    out = []
    with evaluation_mode(model), torch.no_grad():
        for start in range(0, n, batch_size):
            out.append(step(slice(start, start + batch_size)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def predict_responses(
    model: PredictiveNetwork,
    images: np.ndarray,
    behavior: np.ndarray | None = None,
    pupil_center: np.ndarray | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Predicted responses (n_images, n_units), float32, in the units of the training responses.

    One row per image; ``behavior`` / ``pupil_center`` give one row per image, or None for behaviour at
    its training mean and the training-mean eye position (the denoised responses of equation 6).
    Runs in eval mode (readout at its mean position, batch-norm running statistics), batched.
    """
    device = _device_of(model)
    imgs = torch.as_tensor(np.asarray(images), device=device)
    beh = None if behavior is None else torch.as_tensor(np.asarray(behavior), device=device)
    pup = None if pupil_center is None else torch.as_tensor(np.asarray(pupil_center), device=device)
    out = _batched(model, len(imgs), batch_size, lambda s: model(imgs[s], rows_or_none(beh, s), rows_or_none(pup, s)))
    return out.reshape(len(imgs), model.n_units)


def predict_shift(model: PredictiveNetwork, pupil_center: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """The shifter's per-trial readout shift (n, 2) as (dx, dy) in input-image pixels.

    Positive dx: units read the image further right (larger column index); positive dy: further down.
    """
    if model.shifter is None:
        raise ValueError("this model has no shifter")
    device = _device_of(model)
    pup = torch.as_tensor(np.asarray(pupil_center), device=device)
    grid = _batched(model, len(pup), batch_size, lambda s: model.shift(pup[s], len(pup[s])))
    height, width = model.feature_shape
    return grid.reshape(len(pup), 2) * np.array([(width - 1) / 2.0, (height - 1) / 2.0], np.float32)


def predict_gain(model: PredictiveNetwork, behavior: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """The modulator's per-trial, per-unit multiplicative gain (n, n_units)."""
    if model.modulator is None:
        raise ValueError("this model has no modulator")
    device = _device_of(model)
    beh = torch.as_tensor(np.asarray(behavior), device=device)
    gain = _batched(model, len(beh), batch_size, lambda s: model.gain(beh[s], len(beh[s])))
    return gain.reshape(len(beh), model.n_units)
