"""Minimal adversarial perturbations with Foolbox 3 (docs/attacks.md; Li et al. 2019 Fig. 5).

For every test image and every attack configuration we want the smallest perturbation that changes
the model's decision, then per image the minimum over configurations of the same norm, then the
median over images. An attack configuration is a plain dict (so a DataJoint Lookup table can key it
by a hash), for example ``{"attack": "l2_ddn", "steps": 300}``: the keyword arguments of a builder in
``attack_registry``, whose ``validate_attack_config`` fills in every default, so hash the validated form.

Conventions of the result (see :class:`MinimalPerturbations`):

- an image the model already misclassifies has distance 0 and is its own adversarial, the
  convention of the minimal-perturbation literature (Schott et al. 2019; Li et al. 2019), so the
  median over all images is a robustness score that also charges clean errors;
- an image for which the attack found nothing (or whose adversarial failed verification) has
  distance ``inf`` and a NaN adversarial; medians treat ``inf`` as larger than everything;
- every adversarial is re-verified after the attack: inside [0, 1], misclassified by the model, and
  its distance is measured from the stored float32 adversarial in float64, so recomputing
  ``||adv - x||`` from the stored arrays reproduces the reported distance to within 1e-6;
- a stochastic network (VOne) misclassifies an image when its EoT average does so in a majority of
  ``VOTES`` independent draws. A minimal-norm attack stops on the decision boundary, where that vote is a
  coin flip, so an end point that fails it is pushed outward along its own perturbation (``GROWTH``,
  up to 2x) until it passes: the distance reported is the pushed point's, an upper bound on the
  distance to the boundary along the attack's direction (docs/attacks.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..digests import stable_hash
from ..runtime import as_image_tensor, as_label_tensor, evaluation_mode, predict_labels, resolve_device
from .attack_registry import ATTACKS, attack_norm, default_attack_configs, needs_starting_points, validate_attack_config
from .evaluation import VOTES, attackable_model, gradient_model, misclassified, seeded_torch

NORMS = ("linf", "l2")
__all__ = [
    "ATTACKS",
    "attack_norm",
    "default_attack_configs",
    "validate_attack_config",
    "minimal_perturbations",
    "MinimalPerturbations",
    "median_perturbation",
    "perturbation_norm",
]

#: Float slack when comparing a recomputed distance with a reported one.
DISTANCE_TOLERANCE = 1e-6
#: A cross-check beats the primary attacks on an image when its distance is below this share of theirs.
BEAT_MARGIN = 0.99
#: Factors by which a stochastic network's failed end point is pushed outward along its perturbation.
GROWTH = (1.02, 1.05, 1.1, 1.2, 1.5, 2.0)


# ---------------------------------------------------------------------------------------------------
# distances and verification
# ---------------------------------------------------------------------------------------------------


def perturbation_norm(adversarials, images, norm: str) -> np.ndarray:
    """Per-image ``||adv - x||`` in float64 ("linf" or "l2"); NaN adversarials give NaN."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    adv = np.asarray(adversarials, dtype=np.float32).astype(np.float64)
    x = np.asarray(images, dtype=np.float32).astype(np.float64)
    delta = (adv - x).reshape(len(x), -1)
    if norm == "linf":
        return np.abs(delta).max(axis=1) if delta.shape[1] else np.zeros(len(x))
    return np.sqrt((delta**2).sum(axis=1))


def median_perturbation(distances) -> float:
    """Median of per-image minimal distances; ``inf`` (attack failed) counts as larger than all.

    That is the conservative reading: a failure can only raise the robustness score, never hide.
    NaN is refused because it would mean a distance was never filled in.
    """
    d = np.asarray(distances, dtype=np.float64).reshape(-1)
    if d.size == 0:
        raise ValueError("median of zero distances is undefined")
    if np.isnan(d).any():
        raise ValueError("distances contain NaN")
    if (d < 0).any():
        raise ValueError("distances must be >= 0")
    return float(np.median(d))


# ---------------------------------------------------------------------------------------------------
# the result
# ---------------------------------------------------------------------------------------------------


@dataclass
class MinimalPerturbations:
    """Per-config and per-image outcome of :func:`minimal_perturbations`.

    ``distances[c, i]``: image i's distance under config c, in ``norms[c]`` (0 for clean-misclassified
    images, inf where nothing verified). ``adversarials[c, i]``: the adversarial image (float32, NaN
    where the distance is inf). ``clean_correct[i]``: whether the model classified image i correctly.
    """

    configs: list[dict]
    norms: list[str]
    distances: np.ndarray
    adversarials: np.ndarray
    clean_correct: np.ndarray
    stochastic: bool = False  # attacked through its EoT average, verdicts by vote
    cross_check: np.ndarray | None = None  # (C,) bool: config c is a cross-check (``with_cross_checks``)
    attacked: np.ndarray | None = None  # (C, N) bool: config c ran on image i (None: every config on every image)

    def best(self, norm: str) -> tuple[np.ndarray, np.ndarray]:
        """Per image, the smallest distance over configs of ``norm`` and the index of that config.

        The index is -1 where no config of that norm found anything (distance inf), and where the image
        was misclassified to begin with (distance 0): no attack earned that image, so none is credited.
        """
        rows = [c for c, n in enumerate(self.norms) if n == norm]
        if not rows:
            raise ValueError(f"no attack config measures {norm!r}; norms here: {sorted(set(self.norms))}")
        sub = self.distances[rows]
        which = np.argmin(sub, axis=0)
        best = sub[which, np.arange(sub.shape[1])]
        index = np.where(np.isfinite(best) & self.clean_correct, np.asarray(rows)[which], -1)
        return best, index

    def best_adversarials(self, norm: str) -> np.ndarray:
        """The adversarial achieving :meth:`best` per image: the image itself where it was misclassified,
        NaN where no attack found one."""
        best, index = self.best(norm)
        out = np.full(self.adversarials.shape[1:], np.nan, dtype=np.float32)
        found = index >= 0
        out[found] = self.adversarials[index[found], np.flatnonzero(found)]
        wrong = ~np.asarray(self.clean_correct, dtype=bool)
        out[wrong] = self.adversarials[0, wrong]  # every config stores the clean image there
        return out

    def median(self, norm: str) -> float:
        """The score: median over images of the per-image minimum in ``norm``."""
        return median_perturbation(self.best(norm)[0])

    def beat_primary(self) -> list[int | None]:
        """Per config: for a cross-check, on how many correctly classified images it verified a distance
        below ``BEAT_MARGIN`` times the best primary attack of its norm (or one where they found none), the
        sign of a weak primary attack; None for a primary attack."""
        cross = np.zeros(len(self.configs), dtype=bool) if self.cross_check is None else self.cross_check
        correct = np.asarray(self.clean_correct, dtype=bool)
        out: list[int | None] = []
        for c, norm in enumerate(self.norms):
            if not cross[c]:
                out.append(None)
                continue
            rows = [r for r, n in enumerate(self.norms) if n == norm and not cross[r]]
            primary = self.distances[rows].min(axis=0) if rows else np.full(self.distances.shape[1], np.inf)
            won = correct & np.isfinite(self.distances[c]) & (self.distances[c] < BEAT_MARGIN * primary)
            out.append(int(won.sum()))
        return out

    def summary(self, attack_ids: list[str]) -> dict:
        """What a results table keeps, ``attack_ids[c]`` naming config c (e.g. its hash).

        ``medians`` and ``images[i][norm]`` are None where nothing finite was found (databases store no
        infinity, and a failed image still counts as larger than every distance in the median);
        ``images[i][norm + '_attack']`` is '' where no attack earned the image; ``attacks[c]`` holds
        that attack's own median and success rate over the correctly classified images it ran on, how many
        images it ran on, and for a cross-check how many it won (:meth:`beat_primary`; None otherwise).
        """
        finite = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731
        best = {norm: self.best(norm) for norm in NORMS if norm in self.norms}
        images = []
        for i, correct in enumerate(self.clean_correct):
            row = {"clean_correct": bool(correct)}
            for norm, (distance, index) in best.items():
                row[norm] = finite(distance[i])
                row[f"{norm}_attack"] = attack_ids[index[i]] if index[i] >= 0 else ""
            images.append(row)
        correct = np.asarray(self.clean_correct, dtype=bool)
        ran = np.ones(self.distances.shape, dtype=bool) if self.attacked is None else self.attacked
        beaten = self.beat_primary()
        attacks = [
            {
                "median_distance": finite(median_perturbation(self.distances[c][ran[c]])),
                "success_rate": float(np.isfinite(self.distances[c][correct & ran[c]]).mean())
                if (correct & ran[c]).any()
                else 0.0,
                "n_images": int(ran[c].sum()),
                "beat_primary": None if beaten[c] is None else int(beaten[c]),
            }
            for c in range(len(self.configs))
        ]
        return {
            "clean_accuracy": float(correct.mean()) if correct.size else 0.0,
            "medians": {f"median_{norm}": finite(self.median(norm)) for norm in best},
            "images": images,
            "attacks": attacks,
        }


# ---------------------------------------------------------------------------------------------------
# the attacks
# ---------------------------------------------------------------------------------------------------


def minimal_perturbations(
    model: nn.Module,
    images,
    labels,
    configs: list[dict],
    device: str | torch.device | None = None,
    starting_pool: tuple | None = None,
    eot_samples: int | None = None,
    progress: Callable[[str], None] | None = None,
    batch_size: int = 128,
    seed: int | None = 0,
    gradient_dtype: torch.dtype | None = None,
) -> MinimalPerturbations:
    """Run every attack config on every image and keep only verified adversarials.

    ``starting_pool`` = (pool_images, pool_labels) supplies the starting points of Brendel-Bethge and
    the Boundary attack: for each image, the pool image nearest to it (in the attack's norm) among
    those with another label that the model also assigns to a class other than the image's label;
    by default the attacked images themselves are the pool. That start is then moved along the
    segment towards the clean image as far as it stays adversarial (10 bisections). Images with no
    such pool image get inf for those attacks. ``eot_samples`` attacks a stochastic model through its EoT average
    (required
    for stochastic models). ``seed`` fixes foolbox's random starts and proposals (torch's global
    generator is restored afterwards), each attack from its own ``attack_seed``. ``progress`` receives a
    short message after every batch. ``gradient_dtype`` (bf16 on CUDA under ``NEUREG_AMP``): the precision
    the gradient attacks follow (``evaluation.gradient_model``); Brendel-Bethge and Boundary, whose costs are
    elsewhere and which assert their starting points are adversarial, stay float32, and every verdict is
    the float32 model's.
    """
    configs = [validate_attack_config(config) for config in configs]
    x_all = as_image_tensor(images)
    y_all = as_label_tensor(labels, len(x_all))
    device = resolve_device(model, device)
    n_images = len(x_all)
    distances = np.full((len(configs), n_images), np.inf)
    adversarials = np.full((len(configs),) + tuple(x_all.shape), np.nan, dtype=np.float32)
    norms = [attack_norm(config) for config in configs]
    if n_images == 0:
        return MinimalPerturbations(configs, norms, distances, adversarials, np.zeros(0, bool), eot_samples is not None)

    with evaluation_mode(model), seeded_torch(seed, device):
        target = attackable_model(model, x_all, eot_samples, device)
        stochastic = eot_samples is not None
        clean_correct = predict_labels(target, x_all, batch_size, device) == y_all.numpy()
        wrong = np.flatnonzero(~clean_correct)
        distances[:, wrong] = 0.0
        adversarials[:, wrong] = x_all[wrong].numpy()
        to_attack = np.flatnonzero(clean_correct)

        pool = None
        if any(needs_starting_points(config) for config in configs):
            pool_x, pool_y = (x_all, y_all) if starting_pool is None else starting_pool
            pool_x = as_image_tensor(pool_x)
            pool_y = as_label_tensor(pool_y, len(pool_x))
            pool = (pool_x, pool_y, torch.as_tensor(predict_labels(target, pool_x, batch_size, device)))

        import foolbox as fb

        exact = fb.PyTorchModel(target, bounds=(0.0, 1.0), device=device)
        reduced = fb.PyTorchModel(gradient_model(target, gradient_dtype), bounds=(0.0, 1.0), device=device)
        for c, config in enumerate(configs):
            fmodel = exact if needs_starting_points(config) else reduced
            with seeded_torch(attack_seed(seed, config), device):
                for start in range(0, len(to_attack), batch_size):
                    index = to_attack[start : start + batch_size]
                    xb, yb = x_all[index].to(device), y_all[index].to(device)
                    adv = _run_attack(fmodel, target, xb, yb, config, pool, stochastic)
                    if stochastic or gradient_dtype is not None:  # end points on another model's boundary
                        ok = _verify_by_vote(target, xb, yb, adv, VOTES if stochastic else 1)
                    else:
                        ok = _verify(target, xb, yb, adv)
                    adv_np = adv.detach().cpu().numpy().astype(np.float32)
                    dist = perturbation_norm(adv_np, xb.cpu().numpy(), norms[c])
                    distances[c, index] = np.where(ok, dist, np.inf)
                    adversarials[c, index[ok]] = adv_np[ok]
                    if progress is not None:
                        done = min(start + batch_size, len(to_attack))
                        progress(
                            f"{config['attack']} (config {c + 1}/{len(configs)}): "
                            f"{done}/{len(to_attack)} correctly classified images attacked"
                        )
    return MinimalPerturbations(configs, norms, distances, adversarials, clean_correct, stochastic)


def with_cross_checks(primary: MinimalPerturbations, checks: MinimalPerturbations) -> MinimalPerturbations:
    """One result from the primary attacks on N images and the cross-checks on the first M of them.

    A cross-check has no distance (inf, NaN adversarial) on images it did not run on, and on an image its
    own run found misclassified but the primary run attacked (a stochastic network's clean verdict can
    differ between runs): neither was attacked by it. Images the primary run found misclassified keep
    distance 0 under every config (the module's convention)."""
    n, m = primary.distances.shape[1], checks.distances.shape[1]
    correct = np.asarray(primary.clean_correct, dtype=bool)
    ran = np.zeros((len(checks.configs), n), dtype=bool)
    ran[:, :m] = np.asarray(checks.clean_correct, dtype=bool) | ~correct[:m]  # the first M, less disagreements
    distances = np.full((len(checks.configs), n), np.inf)
    distances[:, :m] = checks.distances
    adversarials = np.full((len(checks.configs), *primary.adversarials.shape[1:]), np.nan, dtype=np.float32)
    adversarials[:, :m] = checks.adversarials
    distances[~ran] = np.inf
    adversarials[~ran] = np.nan
    distances[:, ~correct] = 0.0
    adversarials[:, ~correct] = primary.adversarials[0, ~correct]  # every config stores the clean image there
    before = np.ones(primary.distances.shape, dtype=bool) if primary.attacked is None else primary.attacked
    return MinimalPerturbations(
        primary.configs + checks.configs,
        primary.norms + checks.norms,
        np.concatenate([primary.distances, distances]),
        np.concatenate([primary.adversarials, adversarials]),
        primary.clean_correct,
        primary.stochastic,
        np.array([False] * len(primary.configs) + [True] * len(checks.configs)),
        np.concatenate([before, ran]),
    )


def attack_seed(seed: int | None, config: dict) -> int | None:
    """The seed of one attack's random starts and proposals: from the evaluation's seed and the attack's
    own config, so an attack draws the same numbers whichever other attacks run before it, and whether its
    network is attacked alone or in a group (``group.py``)."""
    return None if seed is None else int(stable_hash({"seed": int(seed), "attack": config})[:15], 16)


@torch.no_grad()
def _verify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, adv: torch.Tensor, votes: int = 1) -> np.ndarray:
    """Which candidate adversarials are real: finite, inside [0, 1] and misclassified (by a majority of
    ``votes`` passes, for a stochastic model)."""
    finite = torch.isfinite(adv).flatten(1).all(dim=1)
    safe = torch.where(finite.view(-1, *[1] * (adv.ndim - 1)), adv, x)
    in_box = ((safe >= 0) & (safe <= 1)).flatten(1).all(dim=1)
    return (finite & in_box & misclassified(model, safe, y, votes)).cpu().numpy()


@torch.no_grad()
def _verify_by_vote(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, adv: torch.Tensor, votes: int = VOTES
) -> np.ndarray:
    """``_verify`` by ``votes`` passes (a stochastic model's vote; 1 for an attack that followed reduced
    precision, whose end points lie on that model's boundary). A finite candidate that fails is replaced in
    ``adv`` (in place) by the first outward push (``GROWTH``, clamped to the box) that passes."""
    ok = torch.from_numpy(_verify(model, x, y, adv, votes)).to(adv.device)
    finite = torch.isfinite(adv).flatten(1).all(dim=1)
    for factor in GROWTH:
        todo = (finite & ~ok).nonzero().flatten()
        if len(todo) == 0:
            break
        pushed = (x[todo] + factor * (adv[todo] - x[todo])).clamp(0.0, 1.0)
        now = misclassified(model, pushed, y[todo], votes)
        adv[todo[now]] = pushed[now]
        ok[todo[now]] = True
    return ok.cpu().numpy()


def _run_attack(fmodel, model, x, y, config, pool, stochastic) -> torch.Tensor:
    """One batch through one attack (its config validated at the entry); candidate adversarials (NaN where
    the attack gave up)."""
    attack = ATTACKS.build_completed(config)
    if not needs_starting_points(config):
        return attack(fmodel, x, y)
    starts, has_start = _starting_points(x, y, pool, attack_norm(config))
    starts = _nearest_adversarial_on_segment(model, x, y, starts, has_start)
    adv = torch.full_like(x, float("nan"))
    if not has_start.any():
        return adv
    # The attacks assert that every starting point is adversarial. For a deterministic model ours
    # are by construction; under EoT each check is a new random draw, so re-check, drop the points
    # that look clean this time, and retry a batch whose check still fails (three tries, then inf).
    for attempt in range(3 if stochastic else 1):
        with torch.no_grad():
            still = has_start & (model(starts).argmax(dim=1) != y) if stochastic else has_start
        sub = still.nonzero().flatten()
        if len(sub) == 0:
            break
        try:
            adv[sub] = attack(fmodel, x[sub], y[sub], starts[sub])
            break
        except (AssertionError, ValueError) as error:
            if not stochastic:
                raise
            if attempt == 2:
                warnings.warn(  # noqa: B028 - the attack's name says where
                    f"{config['attack']}: batch skipped, starting points not adversarial under EoT "
                    f"in three tries: {error}"
                )
    return adv


def _starting_points(x, y, pool, norm):
    """For each image the nearest pool image of another label that the model also misclassifies."""
    pool_x, pool_y, pool_pred = pool
    n = len(x)
    starts = torch.zeros_like(x)
    has_start = torch.zeros(n, dtype=torch.bool, device=x.device)
    flat_pool = pool_x.flatten(1).to(x.device)
    usable = (pool_y.to(x.device)[None, :] != y[:, None]) & (pool_pred.to(x.device)[None, :] != y[:, None])
    for i in range(n):
        candidates = usable[i].nonzero().flatten()
        if len(candidates) == 0:
            continue
        delta = flat_pool[candidates] - x[i].flatten()[None, :]
        dist = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
        starts[i] = flat_pool[candidates[dist.argmin()]].view_as(x[i])
        has_start[i] = True
    return starts, has_start


@torch.no_grad()
def _nearest_adversarial_on_segment(model, x, y, starts, has_start, steps: int = 10) -> torch.Tensor:
    """Move each starting point along the segment towards its clean image while it stays adversarial.

    Foolbox's Brendel-Bethge does this line search too but keeps the original, far starting point as
    its fallback answer, so an optimisation that never improves on the line-search point reports the
    far start; and the Boundary attack starts wherever it is put. ``steps`` bisections leave the
    point within 2**-steps of the segment's crossing of the decision boundary, on the adversarial side.
    """
    shape = (-1,) + (1,) * (x.ndim - 1)

    def point(t: torch.Tensor) -> torch.Tensor:  # clamped: float rounding may step an ulp outside
        return (x + t.view(shape) * (starts - x)).clamp(0.0, 1.0)

    lo = torch.zeros(len(x), device=x.device)
    hi = torch.ones(len(x), device=x.device)
    for _ in range(steps):
        mid = (lo + hi) / 2
        adversarial = (model(point(mid)).argmax(dim=1) != y) & has_start
        hi = torch.where(adversarial, mid, hi)
        lo = torch.where(adversarial, lo, mid)
    moved = (hi < 1).view(shape)
    return torch.where(moved, point(hi), starts)
