"""K deterministic networks of one architecture evaluated as one fused model (``vision/fused.py``).

Why: an evaluation runs the same images through every network of a condition and seed; K networks side
by side in one grouped forward put K times the work into each kernel (the same reason training fuses,
``vision/group.py``). The group is an execution setting: every number equals the network's evaluated
alone up to the rounding of grouped against dense kernels (``tests/models/robustness/test_group.py``
checks equality in float64).

Two views of one fused model:

- ``NetworkGroup.shared``: every network sees the same images, (B, 1, H, W) -> logits (B, K, C). Clean,
  noise and corruption accuracy use it: the noise and corruptions are drawn once, as for each network
  alone, and one forward answers for all K (``runtime.predict_labels`` and ``noise_accuracy`` return
  one column per network).
- ``NetworkGroup.interleaved``: K networks' own images in one batch, row r going to network r mod K,
  (b K, 1, H, W) -> (b K, C). Each row is an independent sample to Foolbox, so a minimal-norm attack on
  the interleaved batch is K attacks at once. It needs every model call to take the whole batch, which
  Fast Minimum Norm, DDN and C&W do (``WHOLE_BATCH_ATTACKS``); the PGD epsilon search, Brendel-Bethge and
  Boundary call the model on subsets of their batch, so ``group_minimal_perturbations`` runs those per
  network.

Stochastic networks (VOne noise) are not grouped for evaluation: their EoT draws come from one global
generator per evaluation, whose order a fused forward would change. ``NetworkGroup`` refuses them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..runtime import as_image_tensor, as_label_tensor, evaluation_mode, predict_labels
from ..vision.fused import fuse
from .attack_registry import attack_norm, validate_attack_config
from .attacks import MinimalPerturbations, _run_attack, _verify, attack_seed, minimal_perturbations, perturbation_norm
from .evaluation import gradient_model, is_stochastic, seeded_torch

#: Attacks whose every model call takes the whole batch they were given (so rows can be interleaved).
WHOLE_BATCH_ATTACKS = ("linf_fmn", "l2_fmn", "l2_ddn", "l2_cw")


class _SharedInput(nn.Module):
    def __init__(self, fused: nn.Module, k: int):
        super().__init__()
        self.fused, self.k = fused, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fused(x.expand(len(x), self.k, *x.shape[2:]))
        return logits.view(len(x), self.k, -1)


class _Interleaved(nn.Module):
    def __init__(self, fused: nn.Module, k: int):
        super().__init__()
        self.fused, self.k = fused, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) % self.k:
            raise ValueError(f"an interleaved batch holds a multiple of {self.k} images, got {len(x)}")
        logits = self.fused(x.reshape(len(x) // self.k, self.k, *x.shape[2:]))
        return logits.view(len(x), -1)


class NetworkGroup:
    """K trained deterministic networks of one architecture, fused once, in eval mode on ``device``."""

    def __init__(self, models: list[nn.Module], device, probe=None):
        if not models:
            raise ValueError("a network group needs at least one network")
        if probe is not None and any(is_stochastic(m, probe, device) for m in models):
            raise ValueError("stochastic networks (VOne noise) are evaluated one at a time, not as a group")
        self.models, self.k, self.device = models, len(models), torch.device(device)
        self.fused = fuse([m.eval() for m in models]).to(self.device).eval()
        self.shared = _SharedInput(self.fused, self.k).eval()
        self.interleaved = _Interleaved(self.fused, self.k).eval()


def group_minimal_perturbations(
    group: NetworkGroup,
    images,
    labels,
    configs: list[dict],
    progress: Callable[[str], None] | None = None,
    batch_size: int = 128,
    seed: int | None = 0,
    gradient_dtype: torch.dtype | None = None,
) -> list[MinimalPerturbations]:
    """``attacks.minimal_perturbations`` of every network of the group, on the same images: whole-batch
    attacks on interleaved batches of ``batch_size`` images per network, the others per network. Returns one
    result per network, as its own call would (every adversarial verified on the network it fools, in float32
    whatever ``gradient_dtype`` the attacks follow)."""
    configs = [validate_attack_config(config) for config in configs]
    x_all = as_image_tensor(images)
    y_all = as_label_tensor(labels, len(x_all))
    k, n, device = group.k, len(x_all), group.device
    norms = [attack_norm(config) for config in configs]
    distances = np.full((k, len(configs), n), np.inf)
    adversarials = np.full((k, len(configs), *x_all.shape), np.nan, dtype=np.float32)
    with evaluation_mode(group.fused), seeded_torch(seed, device):
        correct = (predict_labels(group.shared, x_all, batch_size, device) == y_all.numpy()[:, None]).T  # (K, N)
    for net in range(k):
        wrong = np.flatnonzero(~correct[net])
        distances[net][:, wrong] = 0.0
        adversarials[net][:, wrong] = x_all[wrong].numpy()
    slots = _interleaved_slots(correct)  # (M, K) image indices, -1 where a network has fewer to attack
    for c, config in enumerate(configs):
        if config["attack"] not in WHOLE_BATCH_ATTACKS or gradient_dtype is not None:  # per network: the push
            for net, model in enumerate(group.models):
                alone = minimal_perturbations(
                    model,
                    x_all,
                    y_all,
                    [config],
                    device,
                    batch_size=batch_size,
                    seed=seed,
                    gradient_dtype=gradient_dtype,
                )
                distances[net, c], adversarials[net, c] = alone.distances[0], alone.adversarials[0]
            continue
        with evaluation_mode(group.fused), seeded_torch(attack_seed(seed, config), device):
            _attack_interleaved(
                group, x_all, y_all, config, c, slots, batch_size, distances, adversarials, norms[c], gradient_dtype
            )
        if progress is not None:
            progress(f"{config['attack']} (config {c + 1}/{len(configs)}): {k} networks attacked as one batch")
    return [MinimalPerturbations(configs, norms, distances[i], adversarials[i], correct[i]) for i in range(k)]


def _interleaved_slots(correct: np.ndarray) -> np.ndarray:
    """(M, K): row j holds, per network, its j-th correctly classified image (-1 once it has none left)."""
    lists = [np.flatnonzero(row) for row in correct]
    slots = np.full((max((len(x) for x in lists), default=0), len(lists)), -1, dtype=np.int64)
    for net, indices in enumerate(lists):
        slots[: len(indices), net] = indices
    return slots


def _attack_interleaved(
    group, x_all, y_all, config, c, slots, batch_size, distances, adversarials, norm, gradient_dtype
) -> None:
    """One whole-batch attack over the interleaved slots; a network short of images fills its slot with
    its first image to attack, whose outcome is discarded (the attack treats every row independently)."""
    import foolbox as fb

    fmodel = fb.PyTorchModel(gradient_model(group.interleaved, gradient_dtype), bounds=(0.0, 1.0), device=group.device)
    filler = np.where(slots[0] >= 0, slots[0], 0) if len(slots) else None
    for start in range(0, len(slots), batch_size):
        block = slots[start : start + batch_size]
        valid = block >= 0
        index = np.where(valid, block, filler).reshape(-1)  # row j * K + net
        xb, yb = x_all[index].to(group.device), y_all[index].to(group.device)
        adv = _run_attack(fmodel, group.interleaved, xb, yb, config, None, False)
        ok = _verify(group.interleaved, xb, yb, adv)
        adv_np = adv.detach().cpu().numpy().astype(np.float32)
        dist = perturbation_norm(adv_np, xb.cpu().numpy(), norm)
        for row in np.flatnonzero(valid.reshape(-1)):
            net, image = row % group.k, index[row]
            distances[net, c, image] = dist[row] if ok[row] else np.inf
            if ok[row]:
                adversarials[net, c, image] = adv_np[row]
