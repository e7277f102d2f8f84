"""The condition a trained network belongs to, derived from the registries where each variant is declared.

A similarity method declares its condition where it is registered (``TARGETS.register(condition=...)``),
and so does an architecture that is a condition of its own (VOneNet); a network with alpha = 0 is the
baseline, :data:`BASELINE`. Plans, the demo, ``TrainingPlan.condition`` and the reports all take their
labels and their order from here, so a new method is one registered function.
"""

from __future__ import annotations

from .neural.targets import TARGETS
from .vision.networks import ARCHITECTURES

BASELINE = "None"  # no similarity loss (alpha = 0): what every other condition is compared with


def condition_name(network_config: dict, regularizer_config: dict, method: str | None) -> str:
    """The condition label of a run: its architecture's, else the baseline for alpha = 0, else its method's."""
    own = ARCHITECTURES[network_config.get("arch", "resnet18")].info.get("condition")
    if own:
        return own
    if regularizer_config["alpha"] == 0 or method is None:
        return BASELINE
    return TARGETS[method].info.get("condition") or method


def condition_order() -> list[str]:
    """Every registered condition, the baseline first, then by the ``rank`` their variants declare."""
    ranked = [
        (variant.info.get("rank", 99), variant.info["condition"])
        for registry in (TARGETS, ARCHITECTURES)
        for variant in map(registry.__getitem__, registry)
        if variant.info.get("condition")
    ]
    return [BASELINE] + [name for _, name in sorted(ranked)]


def ordered(conditions) -> list[str]:
    """``conditions`` in table order: the registered ones as :func:`condition_order`, unknown ones after."""
    conditions = set(conditions)
    known = [c for c in condition_order() if c in conditions]
    return known + sorted(conditions - set(known))
