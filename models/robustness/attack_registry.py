"""The minimal-perturbation attacks, one registered builder each (docs/attacks.md).

A builder's keyword arguments are the attack's config, so ``{"attack": "l2_ddn", "steps": 300}`` is
``l2_ddn(steps=300)``; defaults follow Foolbox except the step counts (Foolbox: DDN 10, C&W 10000 per
binary-search step, Boundary 25000) and PGD's step size. Every builder returns one call shape, as
Foolbox gives every attack one ``run``: ``attack(fmodel, x, y, starts) -> adversarials``, NaN where the
attack gave up. ``starts`` are starting adversarials, used by the attacks registered with
``starting_points=True``. Adding an attack is one decorated function here plus its test.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..registry import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, Registry, UnitInterval

ATTACKS = Registry("attack", key="attack")

#: The one call shape: (foolbox model, images, labels, starting points or None) -> adversarials.
Attack = Callable[..., torch.Tensor]


def _foolbox(attack, with_starts: bool = False) -> Attack:
    """A Foolbox attack object in the registry's call shape."""

    def run(fmodel, x, y, starts=None):
        import foolbox as fb

        extra = {"starting_points": starts} if with_starts else {}
        return attack.run(fmodel, x, fb.criteria.Misclassification(y), **extra)

    return run


def _check_pgd(config: dict) -> None:
    if config["init_epsilon"] > config["max_epsilon"]:
        raise ValueError(f"linf_pgd: init_epsilon {config['init_epsilon']} > max_epsilon {config['max_epsilon']}")


def _check_bb(config: dict) -> None:
    if config["lr_num_decay"] > config["steps"]:
        raise ValueError(
            f"{config['attack']}: lr_num_decay ({config['lr_num_decay']}) must not exceed steps "
            f"({config['steps']}): the trust region decays every steps/lr_num_decay"
        )


@ATTACKS.register(norm="linf", check=_check_pgd)
def linf_pgd(
    steps: PositiveInt = 40,
    rel_stepsize: PositiveFloat | None = None,
    random_start: bool = True,
    init_epsilon: PositiveFloat = 1 / 255,
    max_epsilon: UnitInterval = 0.5,
    search_steps: PositiveInt = 10,
) -> Attack:
    """PGD has no minimal mode: an epsilon search per image (the cross-check of the minimal-norm attacks).

    ``rel_stepsize`` None is Madry et al.'s rule, 2.5 / steps.
    """
    from .pgd_search import minimal_linf_pgd

    settings = dict(
        steps=steps,
        rel_stepsize=rel_stepsize or 2.5 / steps,
        random_start=random_start,
        init_epsilon=init_epsilon,
        max_epsilon=max_epsilon,
        search_steps=search_steps,
    )
    return lambda fmodel, x, y, starts=None: minimal_linf_pgd(fmodel, x, y, **settings)


def _fast_minimum_norm(norm: str, foolbox_name: str, max_stepsize_default: float, doc: str) -> None:
    """Register Foolbox's Fast Minimum Norm attack of one norm (Pintor et al. 2021): one keyword set, the
    step size's default per norm."""

    def builder(
        steps: PositiveInt = 100,
        max_stepsize: PositiveFloat = max_stepsize_default,
        gamma: Fraction = 0.05,
        binary_search_steps: PositiveInt = 10,
    ) -> Attack:
        import foolbox as fb

        settings = dict(steps=steps, max_stepsize=max_stepsize, gamma=gamma, binary_search_steps=binary_search_steps)
        return _foolbox(getattr(fb.attacks, foolbox_name)(**settings))

    builder.__name__ = builder.__qualname__ = f"{norm}_fmn"
    builder.__doc__ = doc
    ATTACKS.register(norm=norm)(builder)


_fast_minimum_norm(
    "linf", "LInfFMNAttack", 1.0, "Fast Minimum Norm: the minimal Linf perturbation in one run, no search."
)
_fast_minimum_norm(
    "l2",
    "L2FMNAttack",
    0.1,
    "Fast Minimum Norm in L2. Foolbox's max_stepsize 1.0 pins the result at the first step's norm whenever the "
    "minimal distance is smaller (every image at exactly 1.0 on 32x32 grayscale networks); 0.1 does not.",
)


@ATTACKS.register(norm="l2")
def l2_ddn(steps: PositiveInt = 300, init_epsilon: PositiveFloat = 1.0, gamma: Fraction = 0.05) -> Attack:
    """Decoupled Direction and Norm (Rony et al. 2019): a fast L2 minimal-norm attack."""
    import foolbox as fb

    return _foolbox(fb.attacks.DDNAttack(steps=steps, init_epsilon=init_epsilon, gamma=gamma))


@ATTACKS.register(norm="l2")
def l2_cw(
    steps: PositiveInt = 1000,
    binary_search_steps: PositiveInt = 9,
    stepsize: PositiveFloat = 1e-2,
    confidence: NonNegativeFloat = 0.0,
    initial_const: PositiveFloat = 1e-3,
    abort_early: bool = True,
) -> Attack:
    """Carlini-Wagner L2, the slow reference attack of the minimal-perturbation literature."""
    import foolbox as fb

    attack = fb.attacks.L2CarliniWagnerAttack(
        steps=steps,
        binary_search_steps=binary_search_steps,
        stepsize=stepsize,
        confidence=confidence,
        initial_const=initial_const,
        abort_early=abort_early,
    )

    def run(fmodel, x, y, starts=None):
        adv = attack.run(fmodel, x, fb.criteria.Misclassification(y))
        # foolbox's C&W returns an all-zero image where it found no adversarial: mark it failed rather
        # than let a black image pass verification as a (huge) adversarial.
        gave_up = (adv == 0).flatten(1).all(dim=1) & ~(x == 0).flatten(1).all(dim=1)
        adv[gave_up] = float("nan")
        return adv

    return run


def _brendel_bethge(norm: str, foolbox_name: str, doc: str) -> None:
    """Register Foolbox's Brendel-Bethge attack of one norm: both norms take the same keyword arguments."""

    def builder(
        steps: PositiveInt = 1000,
        lr: PositiveFloat = 1e-3,
        lr_decay: UnitInterval = 0.5,
        lr_num_decay: PositiveInt = 20,
        momentum: Fraction = 0.8,
        binary_search_steps: PositiveInt = 10,
        overshoot: PositiveFloat = 1.1,
    ) -> Attack:
        import foolbox as fb

        settings = dict(
            steps=steps,
            lr=lr,
            lr_decay=lr_decay,
            lr_num_decay=lr_num_decay,
            momentum=momentum,
            binary_search_steps=binary_search_steps,
            overshoot=overshoot,
        )
        return _foolbox(getattr(fb.attacks, foolbox_name)(**settings), with_starts=True)

    builder.__name__ = builder.__qualname__ = f"{norm}_bb"
    builder.__doc__ = doc
    ATTACKS.register(norm=norm, starting_points=True, check=_check_bb)(builder)


_brendel_bethge(
    "l2",
    "L2BrendelBethgeAttack",
    "Brendel-Bethge L2: walks the decision boundary from a starting adversarial (strongest known).",
)
_brendel_bethge(
    "linf", "LinfinityBrendelBethgeAttack", "Brendel-Bethge Linf: the boundary walk in the paper's main norm."
)


@ATTACKS.register(norm="l2", starting_points=True)
def boundary(
    steps: PositiveInt = 5000,
    spherical_step: PositiveFloat = 1e-2,
    source_step: PositiveFloat = 1e-2,
    source_step_convergance: PositiveFloat = 1e-7,
    step_adaptation: PositiveFloat = 1.5,
    update_stats_every_k: PositiveInt = 10,
) -> Attack:
    """Decision-based (black-box) Boundary attack: a view that gradient masking cannot fool."""
    import foolbox as fb

    return _foolbox(
        fb.attacks.BoundaryAttack(
            steps=steps,
            spherical_step=spherical_step,
            source_step=source_step,
            source_step_convergance=source_step_convergance,
            step_adaptation=step_adaptation,
            update_stats_every_k=update_stats_every_k,
        ),
        with_starts=True,
    )


def validate_attack_config(config: dict) -> dict:
    """The config with every default filled in, or a ValueError saying exactly what is wrong."""
    return ATTACKS.complete(config)


def attack_norm(config: dict) -> str:
    """ "linf" or "l2": the norm in which the attack minimises and its distances are reported (the config
    need only name its attack)."""
    return ATTACKS[config["attack"]].info["norm"]


def needs_starting_points(config: dict) -> bool:
    """Whether the attack starts from adversarial images drawn from a pool of dataset images."""
    return ATTACKS[config["attack"]].info.get("starting_points", False)


#: The standard evaluation's primary attacks, run on every image: the fast minimal-norm ones (FMN-100 needs
#: 100 gradient calls where the PGD epsilon search needs 560 to 1,400 for an equal or larger median). The
#: others (PGD search, Brendel-Bethge, C&W, Boundary) cross-check them on a subset (docs/attacks.md).
PRIMARY_ATTACKS = ("linf_fmn", "l2_fmn", "l2_ddn")


def default_attack_configs(quick: bool = False) -> list[dict]:
    """The standard minimal-perturbation attack set, validated.

    Full set (for the real evaluation, on a GPU): Linf and L2 Fast Minimum Norm first, Linf PGD with an
    epsilon search at two step settings as a cross-check, Linf and L2 Brendel-Bethge, DDN,
    Carlini-Wagner and the Boundary attack. ``quick=True`` is a CPU demo set: FMN, PGD, DDN and C&W
    with few steps and no Brendel-Bethge (its numba compilation alone takes ~30 s) or Boundary attack
    (thousands of queries per image).
    """
    if quick:
        configs = [
            {"attack": "linf_fmn", "steps": 50},
            {"attack": "l2_fmn", "steps": 50},
            {"attack": "linf_pgd", "steps": 20, "rel_stepsize": 2.5 / 20, "search_steps": 7},
            {"attack": "l2_ddn", "steps": 50},
            {"attack": "l2_cw", "steps": 50, "binary_search_steps": 4, "initial_const": 1e-2},
        ]
    else:
        configs = [
            {"attack": "linf_fmn", "steps": 100},
            {"attack": "l2_fmn", "steps": 100},
            {"attack": "linf_pgd", "steps": 40, "rel_stepsize": 2.5 / 40},
            {"attack": "linf_pgd", "steps": 100, "rel_stepsize": 0.025},
            {"attack": "linf_bb", "steps": 1000},
            {"attack": "l2_ddn", "steps": 300},
            {"attack": "l2_cw", "steps": 1000, "binary_search_steps": 9},
            {"attack": "l2_bb", "steps": 1000},
            {"attack": "boundary", "steps": 5000},
        ]
    return [validate_attack_config(config) for config in configs]
