"""Labels that tell apart what differs, so a results table never averages two experiments as one.

Networks are grouped by their whole lineage (dataset, network, training schedule, regularizer with its
scan set and target: the ``TrainingPlan`` key), metrics by the config row that computed them. Both get a
readable label (a condition, a metric name); where two lineages or two configs share one, each label gets
the settings that differ between them appended: ``None (train.epochs=2)``, ``robust accuracy Linf 0.0314
(n_images=50)``. Nothing is merged that differs, and a label alone never hides a difference.
"""

from __future__ import annotations

from collections.abc import Hashable

#: The lineage fields of a trained network other than its seed (``TrainingPlan``'s primary key).
LINEAGE = ("dataset", "network_hash", "train_hash", "regularizer_hash")
#: Networks paired by seed in a comparison share these: the same data and schedule (the architecture is a
#: condition of its own: VOne is compared with None).
EXPERIMENT = ("dataset", "train_hash")


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_shown(v) for v in value[:4]) + (", ...]" if len(value) > 4 else "]")
    if isinstance(value, str) and len(value) == 32 and value.isalnum():  # a config hash
        return value[:8]
    return str(value)


def tell_apart(items: dict[Hashable, tuple[str, dict]]) -> dict[Hashable, str]:
    """``{id: (label, settings)}`` to ``{id: label}``, where ids sharing a label get the settings that differ
    among them appended (a differing non-empty ``label`` setting alone, when that tells them apart)."""
    by_label: dict[str, list] = {}
    for item, (label, _) in items.items():
        by_label.setdefault(label, []).append(item)
    named = {}
    for label, ids in by_label.items():
        if len(ids) == 1:
            named[ids[0]] = label
            continue
        settings = [items[i][1] for i in ids]
        keys = list(dict.fromkeys(k for s in settings for k in s))
        differing = [k for k in keys if len({_shown(s.get(k)) for s in settings}) > 1]
        names = [s.get("label") for s in settings]
        if "label" in differing and all(names) and len(set(names)) == len(names):
            differing = ["label"]
        for item, setting in zip(ids, settings):
            parts = ", ".join(f"{k}={_shown(setting.get(k))}" for k in differing) or str(item)
            named[item] = f"{label} ({parts})"
    return named


def lineage_settings(training, lineage: dict) -> dict:
    """What a lineage ran with, flat and readable: the dataset, the network, schedule and regularizer configs
    (prefixed ``net.``, ``train.``, ``reg.``), and the scan set and target the regularizer pulls toward."""
    regularizer = (training.RegularizerConfig & lineage).fetch1()
    settings = {"dataset": lineage["dataset"]}
    settings.update({f"net.{k}": v for k, v in training.NetworkConfig.config_of(lineage).items()})
    settings.update({f"train.{k}": v for k, v in training.TrainConfig.config_of(lineage).items()})
    settings.update({f"reg.{k}": v for k, v in regularizer["regularizer_config"].items()})
    settings.update({"scan set": regularizer["scan_set"] or "", "target": regularizer["target_hash"] or ""})
    return settings
