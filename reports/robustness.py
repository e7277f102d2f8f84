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


def per_network_metrics(pipeline, restriction=None) -> list[dict]:
    """One dict per trained network: condition, seed and every robustness number it has."""
    tr, rb = pipeline.training, pipeline.robustness
    networks = tr.TrainedNetwork * tr.TrainingPlan.proj("condition")
    if restriction is not None:
        networks = networks & restriction
    rows = []
    for net in networks.to_dicts(order_by="KEY"):
        key = {k: net[k] for k in tr.TrainedNetwork.primary_key}
        row = {"condition": net["condition"], "seed": net["seed"], "key": key, "clean accuracy": net["test_accuracy"]}
        levels = (rb.NoiseAccuracy.Level & key).to_dicts(order_by="level")
        if levels:
            row["noise curve"] = ([lv["sigma"] for lv in levels], [lv["accuracy"] for lv in levels])
            row[f"noise accuracy (sigma {levels[-1]['sigma']:g})"] = levels[-1]["accuracy"]
            above = [lv["sigma"] for lv in levels if lv["accuracy"] >= 0.5]
            row["noise sigma at 50% accuracy"] = max(above) if above else 0.0
        for mp in (rb.MinimalPerturbation * rb.PerturbationConfig & key).to_dicts():
            config = mp["perturbation_config"]
            attacked = {
                attacks.attack_norm(rb.AttackConfig.config_of({"attack_hash": h}))
                for h in config["attacks"] + config.get("cross_checks", [])
            }
            for norm in attacked:
                value = mp[f"median_{norm}"]  # null: most images unbroken, so the median is beyond every attack
                row[f"median {'L2' if norm == 'l2' else 'Linf'} perturbation"] = (
                    float("inf") if value is None else value
                )
        for ra in (rb.RobustAccuracy * rb.RobustConfig & key).to_dicts():
            cfg = ra["robust_config"]
            name = f"robust accuracy {cfg['norm'].replace('linf', 'Linf').replace('l2', 'L2')} {cfg['epsilon']:.3g}"
            row[name] = ra["robust_accuracy"]
        for ca in (rb.CorruptionAccuracy & key).to_dicts():
            row["corruption accuracy"] = ca["mean_accuracy"]
        rows.append(row)
    return rows


def results_table(pipeline, restriction=None) -> list[dict]:
    """Condition x metric: for each condition, ``{metric: (mean, sem, n_seeds)}`` plus 'condition'."""
    rows = per_network_metrics(pipeline, restriction)
    metrics = comparison_metrics(rows)
    table = []
    for condition in ordered({r["condition"] for r in rows}):
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
    return sorted(
        {m for r in rows for m in r if m not in ("condition", "seed", "key", "noise curve")}, key=_metric_order
    )


def write_comparison(rows: list[dict], out: Path) -> Path:
    """Markdown: per condition and metric, the paired difference from None over seeds with its 95% CI; '*'
    marks a difference significant after Holm's correction (see models/robustness/comparison.py)."""
    metrics = comparison_metrics(rows)
    found = compare_with_baseline(rows, metrics)
    conditions = [c for c in ordered({d.condition for d in found})]
    lines = ["| condition - None | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for condition in conditions:
        cells = []
        for metric in metrics:
            d = next((x for x in found if x.condition == condition and x.metric == metric), None)
            if d is None or not np.isfinite(d.p):
                cells.append("n/a")
            else:
                cells.append(f"{d.mean:+.3g} [{d.low:+.3g}, {d.high:+.3g}] p={d.p:.2g}{' *' if d.significant else ''}")
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Mean paired difference over seeds (condition minus None, same seed), [95% CI] from Student's t, "
        "two-sided paired t-test p; * significant at 0.05 after Holm's correction over the conditions of "
        "each metric. n/a: fewer than two paired seeds, or a value beyond every attack.",
    ]
    path = out / "robustness_vs_none.md"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def noise_figure(rows: list[dict], out: Path) -> Path:
    """Fig. 4A: accuracy against Gaussian noise level, mean and SEM over seeds per condition."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for condition in ordered({r["condition"] for r in rows if "noise curve" in r}):
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
    norms = [m for m in ("median Linf perturbation", "median L2 perturbation") if any(m in r for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(norms)), figsize=(5 * max(1, len(norms)), 4), squeeze=False)
    for ax, metric in zip(axes.flat, norms):
        conditions = ordered({r["condition"] for r in rows if metric in r})
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


def robustness_figures(pipeline, out: Path) -> list[Path]:
    """`neureg report robustness`: the table (CSV, Markdown), both figures, and which attack ran on how many
    images (``attack_coverage.md``)."""
    rows = per_network_metrics(pipeline)
    if not rows:
        raise LookupError("no trained networks yet: plan training runs and populate the training stage")
    paths = list(write_table(results_table(pipeline), out))
    if any(r["condition"] == BASELINE for r in rows):
        paths.append(write_comparison(rows, out))
    if any("noise curve" in r for r in rows):
        paths.append(noise_figure(rows, out))
    if any(k.startswith("median") for r in rows for k in r):
        paths.append(perturbation_figure(rows, out))
    coverage = write_attack_coverage(pipeline, out)
    return paths + ([coverage] if coverage else [])
