"""Linf PGD turned into a minimal-perturbation attack by a per-image epsilon search (docs/attacks.md).

PGD answers "is there an adversarial within epsilon?"; the minimal-perturbation score needs the smallest
such epsilon per image, so this module brackets and bisects it, batched over images. It is the
cross-check of the minimal-norm attacks (FMN), which find the same distance in one run.
"""

from __future__ import annotations

import math

import torch


def minimal_linf_pgd(
    fmodel, x, y, *, steps, rel_stepsize, random_start, init_epsilon, max_epsilon, search_steps
) -> torch.Tensor:
    """Smallest Linf epsilon at which PGD fools the model, searched per image (batched).

    Phase 1 (bracket): try ``init_epsilon``, doubling (capped at ``max_epsilon``) for the images
    not yet fooled: at most 1 + ceil(log2(max_epsilon / init_epsilon)) PGD runs. Images never fooled
    at ``max_epsilon`` are failures. Phase 2 (bisection): ``search_steps`` PGD runs halve every
    bracket, so the final epsilon is within bracket_width / 2**search_steps of the smallest one PGD
    succeeds at (init_epsilon / 2**search_steps when fooled at once: 1.5e-5 at the defaults).
    Each PGD run is ``steps`` steps of ``rel_stepsize * epsilon`` (epsilon per image). The reported
    adversarial is the verified one of smallest measured Linf norm, not the epsilon.
    """
    import eagerpy as ep
    import foolbox as fb

    class PerImageEpsilonLinfPGD(fb.attacks.LinfPGD):
        """foolbox's PGD loop with epsilon an (N, 1, ..., 1) tensor: one ball per image."""

        def get_random_start(self, x0, epsilon):
            return x0 + epsilon * ep.uniform(x0, x0.shape, -1.0, 1.0)

        def project(self, x_, x0, epsilon):
            return x0 + ep.minimum(ep.maximum(x_ - x0, -epsilon), epsilon)

    attack = PerImageEpsilonLinfPGD(steps=steps, rel_stepsize=rel_stepsize, random_start=random_start)
    n = len(x)
    shape = (-1,) + (1,) * (x.ndim - 1)
    best = torch.full_like(x, float("nan"))
    best_norm = torch.full((n,), math.inf, device=x.device)

    def attempt(which: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
        """PGD on images ``which`` at their epsilons; keeps improvements; returns success mask."""
        eps = ep.astensor(epsilon.to(x.dtype).view(shape))
        adv = attack.run(fmodel, x[which], fb.criteria.Misclassification(y[which]), epsilon=eps)
        with torch.no_grad():
            success = fmodel(adv).argmax(dim=1) != y[which]
        linf = (adv - x[which]).flatten(1).abs().amax(dim=1)
        better = success & (linf < best_norm[which])
        best[which[better]] = adv[better].detach()
        best_norm[which[better]] = linf[better]
        return success

    lo = torch.zeros(n, device=x.device, dtype=torch.float64)
    hi = torch.full((n,), math.inf, device=x.device, dtype=torch.float64)
    trial = torch.full((n,), float(init_epsilon), device=x.device, dtype=torch.float64)
    searching = torch.ones(n, dtype=torch.bool, device=x.device)
    while searching.any():
        which = searching.nonzero().flatten()
        success = attempt(which, trial[which])
        hi[which[success]] = trial[which[success]]
        failed = which[~success]
        lo[failed] = trial[failed]
        exhausted = trial[failed] >= max_epsilon
        searching[which[success]] = False
        searching[failed[exhausted]] = False
        trial[failed] = torch.clamp(trial[failed] * 2, max=max_epsilon)

    bracketed = torch.isfinite(hi).nonzero().flatten()
    for _ in range(search_steps if len(bracketed) else 0):
        mid = (lo[bracketed] + hi[bracketed]) / 2
        success = attempt(bracketed, mid)
        hi[bracketed[success]] = mid[success]
        lo[bracketed[~success]] = mid[~success]
    return best
