"""`neureg report similarity`: Fig. 1B (S^model of the oracle images, per scan, one image order) and
Fig. 1D (single-trial S^data and S^model against S^oracle)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ..models.neural import oracle
from ..models.neural.similarity import similarity_agreement
from ._plot import cluster_order, plt, save, symmetric_limit


def similarity_figures(pipeline, out: Path) -> list[Path]:
    """Fig. 1B and 1D as PNGs, for the largest group of modelled scans shown the same oracle images."""
    orc, sim, pred = pipeline.oracle, pipeline.similarity, pipeline.predictive
    rows = (sim.ModelAgreement * pred.PredictiveModel.proj() * orc.OracleStats.proj("oracle_set")).to_dicts(
        order_by="KEY"
    )
    if not rows:
        raise LookupError("no ModelAgreement rows yet: populate the predictive and similarity stages")
    groups = Counter(row["oracle_set"] for row in rows)
    largest = max(groups, key=lambda s: (groups[s], s))  # one image order needs one oracle image set
    models = [{k: row[k] for k in sim.ModelAgreement.primary_key} for row in rows if row["oracle_set"] == largest]
    oracle_sims, model_sims, titles = [], [], []
    for key in models:
        labeled = (orc.OracleSimilarity & key).labeled()
        oracle_sims.append(labeled)
        model_sims.append(oracle.LabeledSimilarity(labeled.labels, sim.scan_model_similarity(key, labeled.labels)))
        titles.append(f"{key['mouse']} session {key['session']} scan {key['scan_idx']}")
    return [_model_grid(oracle_sims, model_sims, titles, out), _scatter(pipeline, models[0], out)]


def _model_grid(oracle_sims, model_sims, titles, out: Path) -> Path:
    common = oracle.align_similarities(oracle_sims).labels
    order = cluster_order(oracle.align_similarities(oracle_sims).matrix.mean(0))
    aligned = [
        m.matrix[np.ix_(np.searchsorted(m.labels, common), np.searchsorted(m.labels, common))] for m in model_sims
    ]
    n = len(aligned)
    limit = symmetric_limit(aligned)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    for ax, matrix, title in zip(axes.flat, aligned, titles):
        image = ax.imshow(matrix[np.ix_(order, order)], cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.7, label="S^model")
    fig.suptitle("Model similarity of the oracle images, the image order of Fig. 1A (Fig. 1B)")
    return save(fig, out, "similarity_model.png")


def _scatter(pipeline, key: dict, out: Path) -> Path:
    """Fig. 1D for one scan: every trial pair's S^data and every image pair's S^model against S^oracle."""
    exp, orc, sim = pipeline.experiment, pipeline.oracle, pipeline.similarity
    labeled = (orc.OracleSimilarity & key).labeled()
    model = sim.scan_model_similarity(key, labeled.labels)
    weights = orc.snr_weights(key)
    responses, trials = exp.load_responses(key), exp.load_trials(key)
    oracle_trials = np.flatnonzero(np.isin(trials["image_hash"], labeled.labels))
    from ..models.neural.rsa import centered_cosine

    r = responses[oracle_trials] * weights
    image_of = np.searchsorted(labeled.labels, trials["image_hash"][oracle_trials])
    means = np.stack([r[image_of == i].mean(0) for i in range(len(labeled.labels))])
    trial_sim = centered_cosine(r, center=means.mean(0))
    first, second = np.triu_indices(len(oracle_trials), 1)
    different = image_of[first] != image_of[second]
    data_x = labeled.matrix[image_of[first[different]], image_of[second[different]]]
    data_y = trial_sim[first[different], second[different]]
    upper = np.triu_indices(len(labeled.labels), 1)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(
        data_x,
        data_y,
        s=2,
        alpha=0.15,
        color="0.6",
        label=f"S^data (single trials), r = {np.corrcoef(data_x, data_y)[0, 1]:.2f}",
    )
    ax.scatter(
        labeled.matrix[upper],
        model[upper],
        s=6,
        color="C3",
        label=f"S^model, r = {similarity_agreement(model, labeled.matrix):.2f}",
    )
    ax.set_xlabel("S^oracle")
    ax.set_ylabel("similarity")
    ax.set_title(f"{key['mouse']} session {key['session']} scan {key['scan_idx']} (Fig. 1D)")
    ax.legend(fontsize=7, loc="upper left")
    return save(fig, out, "similarity_scatter.png")
