"""The results the lab reads: condition x metric (mean and SEM over seeds), Fig. 4A and Fig. 5.

Everything is a query: conditions come from ``training.TrainingPlan.condition``, one value per
trained network (seed), then mean and standard error over seeds per condition.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..models.conditions import BASELINE, ordered
from ..models.robustness import attacks
from ..models.robustness.comparison import compare_with_baseline
from ._plot import plt, save
from .lineage import EXPERIMENT, LINEAGE, lineage_settings, tell_apart


def per_network_metrics(pipeline, restriction=None) -> list[dict]:
    """One dict per trained network: its group label ('condition'), seed, lineage and every robustness number
    it has, each under the name of the config that computed it.

    ``restriction``: any DataJoint restriction of trained networks (a plan key, ``{"seed": 0}``, a condition,
    ``{"scan_set": ...}``, a list of keys, an SQL string). Networks are grouped by lineage (``lineage.py``):
    two lineages with one condition label, and two configs with one metric name, are told apart by what
    differs between them, never averaged together."""
    tr, rb = pipeline.training, pipeline.robustness
    networks = tr.TrainedNetwork * tr.TrainingPlan.proj("condition") * tr.RegularizerConfig.proj("scan_set")
    if restriction is not None:
        _check_restriction(restriction, networks.heading.names)
        networks = networks & restriction
    nets = networks.to_dicts(order_by="KEY")
    lineages = {tuple(net[k] for k in LINEAGE): net["condition"] for net in nets}
    groups = tell_apart(
        {lin: (condition, lineage_settings(tr, dict(zip(LINEAGE, lin)))) for lin, condition in lineages.items()}
    )
    rows, metrics = [], {}  # metrics: (name, config table, hash) -> (name, config), told apart below
    for net in nets:
        key = {k: net[k] for k in tr.TrainedNetwork.primary_key}
        lineage = tuple(net[k] for k in LINEAGE)
        row = {
            "condition": groups[lineage],
            "plan condition": net["condition"],
            "seed": net["seed"],
            "key": key,
            "lineage": dict(zip(LINEAGE, lineage)),
            "clean accuracy": net["test_accuracy"],
        }
        values = {}
        for (table, config_hash, settings), value, name in _evaluations(rb, key, row):
            metrics[(name, table, config_hash)] = (name, settings)
            values[(name, table, config_hash)] = value
        row["values"] = values
        rows.append(row)
    names = tell_apart({metric: (name, config) for metric, (name, config) in metrics.items()})
    for row in rows:
        row.update({names[metric]: value for metric, value in row.pop("values").items()})
    return rows


def _check_restriction(restriction, attributes) -> None:
    """A dict restriction (or a list of them) names only attributes of the networks queried: DataJoint would
    silently drop the others and return every network."""
    for part in restriction if isinstance(restriction, (list, tuple)) else [restriction]:
        unknown = sorted(set(part) - set(attributes)) if isinstance(part, dict) else []
        if unknown:
            raise ValueError(f"cannot restrict trained networks by {unknown}; known: {sorted(attributes)}")


def _evaluations(rb, key: dict, row: dict):
    """(config (table, hash, settings), value, metric name) of every robustness number of one network; the
    noise curve goes into ``row`` itself (one per network: the first noise config's)."""
    for noise in (rb.NoiseAccuracy * rb.NoiseConfig & key).to_dicts(order_by="noise_hash"):
        config = ("noise", noise["noise_hash"], dict(noise["noise_config"], label=noise["noise_label"]))
        levels = (rb.NoiseAccuracy.Level & key & {"noise_hash": noise["noise_hash"]}).to_dicts(order_by="level")
        row.setdefault("noise curve", ([lv["sigma"] for lv in levels], [lv["accuracy"] for lv in levels]))
        yield config, levels[-1]["accuracy"], f"noise accuracy (sigma {levels[-1]['sigma']:g})"
        above = [lv["sigma"] for lv in levels if lv["accuracy"] >= 0.5]
        yield config, max(above) if above else 0.0, "noise sigma at 50% accuracy"
    for mp in (rb.MinimalPerturbation * rb.PerturbationConfig & key).to_dicts():
        settings = mp["perturbation_config"]
        config = ("perturbation", mp["perturbation_hash"], dict(settings, label=mp["perturbation_label"]))
        attacked = {
            attacks.attack_norm(rb.AttackConfig.config_of({"attack_hash": h}))
            for h in settings["attacks"] + settings.get("cross_checks", [])
        }
        for norm in sorted(attacked):
            value = mp[f"median_{norm}"]  # null: most images unbroken, so the median is beyond every attack
            yield config, float("inf") if value is None else value, f"median {_NORMS[norm]} perturbation"
    for ra in (rb.RobustAccuracy * rb.RobustConfig & key).to_dicts():
        settings = ra["robust_config"]
        config = ("robust", ra["robust_hash"], dict(settings, label=ra["robust_label"]))
        name = f"robust accuracy {_NORMS[settings['norm']]} {settings['epsilon']:.3g}"
        yield config, ra["robust_accuracy"], name
    for ca in (rb.CorruptionAccuracy * rb.CorruptionConfig & key).to_dicts():
        config = ("corruption", ca["corruption_hash"], dict(ca["corruption_config"], label=ca["corruption_label"]))
        yield config, ca["mean_accuracy"], "corruption accuracy"


_NORMS = {"linf": "Linf", "l2": "L2"}
_NOT_METRICS = ("condition", "plan condition", "seed", "key", "lineage", "noise curve")


def group_order(rows: list[dict]) -> list[str]:
    """The groups' labels in table order: by their plan condition's place (``models.conditions``), then label."""
    base = {r["condition"]: r.get("plan condition", r["condition"]) for r in rows}
    rank = {c: i for i, c in enumerate(ordered(set(base.values())))}
    return sorted(base, key=lambda label: (rank[base[label]], label))


def results_table(pipeline, restriction=None) -> list[dict]:
    """Group x metric: for each lineage group, ``{metric: (mean, sem, n_seeds)}`` plus 'condition' (its
    label); ``restriction`` as for :func:`per_network_metrics`."""
    return table_of(per_network_metrics(pipeline, restriction))


def table_of(rows: list[dict]) -> list[dict]:
    """The results table of :func:`per_network_metrics`' rows: mean, SEM and n over each group's seeds."""
    metrics = comparison_metrics(rows)
    table = []
    for condition in group_order(rows):
        entry = {"condition": condition}
        for metric in metrics:
            values = np.array([r[metric] for r in rows if r["condition"] == condition and metric in r], dtype=float)
            if values.size:
                sem = values.std(ddof=1) / np.sqrt(values.size) if values.size > 1 else float("nan")
                sem = 0.0 if sem < 1e-12 * max(1.0, abs(values.mean())) else sem  # equal seeds: not 3.9e-17
                entry[metric] = (float(values.mean()), float(sem), int(values.size))
        table.append(entry)
    return table


def _metric_order(name: str):
    order = ("clean", "noise", "median", "robust", "corruption")
    return next((i for i, p in enumerate(order) if name.startswith(p)), len(order)), name


def write_table(table: list[dict], out: Path) -> tuple[Path, Path]:
    """CSV (mean, sem, n per metric) and Markdown ('mean ± sem') of the results table."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = [m for m in dict.fromkeys(k for row in table for k in row) if m != "condition"]
    csv_path, md_path = out / "robustness_results.csv", out / "robustness_results.md"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["condition"] + [f"{m} {s}" for m in metrics for s in ("mean", "sem", "n")])
        for row in table:
            writer.writerow([row["condition"]] + [v for m in metrics for v in (row.get(m) or ("", "", ""))])
    lines = ["| condition | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for row in table:
        cells = []
        for m in metrics:
            if m not in row:
                cells.append("")
            else:
                mean, sem, n = row[m]
                cells.append(f"{mean:.4g} ± {sem:.2g} (n={n})" if np.isfinite(sem) else f"{mean:.4g} (n={n})")
        lines.append(f"| {row['condition']} | " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def comparison_metrics(rows: list[dict]) -> list[str]:
    """The scalar metrics of the per-network rows, in table order."""
    return sorted({m for r in rows for m in r if m not in _NOT_METRICS}, key=_metric_order)


def write_comparison(rows: list[dict], out: Path) -> Path:
    """Markdown: per group and metric, the paired difference from None over seeds with its 95% CI; '*'
    marks a difference significant after Holm's correction (see models/robustness/comparison.py). Groups
    are compared only with the None group of their own experiment (same dataset and schedule): one section
    per experiment that has exactly one."""
    metrics = comparison_metrics(rows)
    experiments: dict[tuple, list[dict]] = {}
    for row in rows:
        experiments.setdefault(tuple(row["lineage"][k] for k in EXPERIMENT), []).append(row)
    lines = []
    for experiment, members in experiments.items():
        baselines = {r["condition"] for r in members if r.get("plan condition", r["condition"]) == BASELINE}
        if len(baselines) != 1:
            continue
        if len(experiments) > 1:
            lines += [f"### dataset {experiment[0]}, schedule {experiment[1][:8]}", ""]
        lines += _comparison_lines(members, metrics, baselines.pop())
    lines += [
        "Mean paired difference over seeds (condition minus None, same seed), [95% CI] from Student's t, "
        "two-sided paired t-test p; * significant at 0.05 after Holm's correction over the conditions of "
        "each metric. n/a: fewer than two paired seeds, or a value beyond every attack."
    ]
    path = out / "robustness_vs_none.md"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _comparison_lines(rows: list[dict], metrics: list[str], baseline: str) -> list[str]:
    found = compare_with_baseline(rows, metrics, baseline)
    lines = [f"| condition - {baseline} | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for condition in [c for c in group_order(rows) if c != baseline]:
        cells = []
        for metric in metrics:
            d = next((x for x in found if x.condition == condition and x.metric == metric), None)
            if d is None or not np.isfinite(d.p):
                cells.append("n/a")
            else:
                cells.append(f"{d.mean:+.3g} [{d.low:+.3g}, {d.high:+.3g}] p={d.p:.2g}{' *' if d.significant else ''}")
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    return lines + [""]


def noise_figure(rows: list[dict], out: Path) -> Path:
    """Fig. 4A: accuracy against Gaussian noise level, mean and SEM over seeds per condition."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for condition in group_order([r for r in rows if "noise curve" in r]):
        curves = [r["noise curve"] for r in rows if r["condition"] == condition and "noise curve" in r]
        sigmas = np.asarray(curves[0][0])
        acc = np.array([c[1] for c in curves])
        mean = acc.mean(0)
        sem = acc.std(0, ddof=1) / np.sqrt(len(acc)) if len(acc) > 1 else np.zeros_like(mean)
        ax.plot(sigmas, mean, marker="o", ms=3, label=f"{condition} (n={len(acc)})")
        ax.fill_between(sigmas, mean - sem, mean + sem, alpha=0.2)
    ax.set_xlabel("Gaussian noise sigma (images in [0, 1])")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy under Gaussian noise (Fig. 4A)")
    ax.legend(fontsize=7)
    return save(fig, out, "robustness_noise.png")


def perturbation_figure(rows: list[dict], out: Path) -> Path:
    """Fig. 5: median minimal perturbation per condition (Linf and L2), seeds as points."""
    norms = [m for m in comparison_metrics(rows) if m.startswith("median ")]
    fig, axes = plt.subplots(1, max(1, len(norms)), figsize=(5 * max(1, len(norms)), 4), squeeze=False)
    for ax, metric in zip(axes.flat, norms):
        conditions = group_order([r for r in rows if metric in r])
        for i, condition in enumerate(conditions):
            values = np.array([r[metric] for r in rows if r["condition"] == condition and metric in r])
            finite = values[np.isfinite(values)]
            ax.bar(i, finite.mean() if finite.size else 0, color="0.8", edgecolor="0.3")
            ax.scatter(np.full(finite.size, i), finite, color="k", s=12, zorder=3)
        ax.set_xticks(range(len(conditions)))
        ax.set_xticklabels(conditions, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(metric)
    fig.suptitle("Minimal adversarial perturbation per condition (Fig. 5)")
    return save(fig, out, "robustness_perturbation.png")


def write_attack_coverage(pipeline, out: Path) -> Path | None:
    """``attack_coverage.md``: per perturbation config and attack, how many images it ran on and, for a
    cross-check, on how many images (summed over networks) it beat every primary attack of its norm."""
    rb = pipeline.robustness
    rows = (
        rb.MinimalPerturbation.Coverage * rb.AttackConfig * rb.PerturbationConfig.proj("perturbation_label")
    ).to_dicts()
    if not rows:
        return None
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["perturbation_hash"], row["attack_hash"]), []).append(row)
    lines = [
        "| perturbation config | attack | role | networks | images per network | cross-check wins |",
        "|---|---|---|---|---|---|",
    ]
    for (config, _), group in sorted(groups.items(), key=lambda item: (item[0][0], item[1][0]["cross_check"])):
        first = group[0]
        attack = first["attack_config"]
        name = ", ".join([attack["attack"]] + [f"{k}={v}" for k, v in attack.items() if k in ("steps", "search_steps")])
        counts = sorted({r["n_images"] for r in group})
        wins = sum(r["beat_primary"] for r in group) if first["cross_check"] else ""
        role = "cross-check" if first["cross_check"] else "primary"
        images = counts[0] if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        label = first["perturbation_label"] or config[:8]
        lines.append(f"| {label} | {name} | {role} | {len(group)} | {images} | {wins} |")
    lines.append("")
    lines.append(
        "A cross-check wins an image when it verified a distance below 99% of the best primary attack of its norm "
        "(or one where they found none): often, and the primary attacks are weak (docs/attacks.md)."
    )
    path = Path(out) / "attack_coverage.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def robustness_figures(pipeline, out: Path, restriction=None) -> list[Path]:
    """`neureg report robustness`: the table (CSV, Markdown), both figures, and which attack ran on how many
    images (``attack_coverage.md``), of the networks ``restriction`` selects (all when None)."""
    rows = per_network_metrics(pipeline, restriction)
    if not rows:
        if restriction is not None:
            raise LookupError(f"no trained network matches the restriction {restriction!r}")
        raise LookupError("no trained networks yet: plan training runs and populate the training stage")
    paths = list(write_table(table_of(rows), out))
    if any(r["plan condition"] == BASELINE for r in rows):
        paths.append(write_comparison(rows, out))
    if any("noise curve" in r for r in rows):
        paths.append(noise_figure(rows, out))
    if any(k.startswith("median") for r in rows for k in r):
        paths.append(perturbation_figure(rows, out))
    coverage = write_attack_coverage(pipeline, out)
    return paths + ([coverage] if coverage else [])
