"""The oracle stage, docs/science.md §1-§4 (Li et al. 2019), on responses in trial layout.

Everything takes ``responses`` (n_trials, n_units) and ``image_labels`` (n_trials,), any hashable labels
(frame ids, image hashes). Oracle images are those shown at least twice; real scans may repeat them
unevenly, so every estimate is written for ragged repeat counts. Pure numpy: the DataJoint tables call
these functions and store what they return.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import sparse

from .rsa import centered_cosine

MIN_REPEATS = 2  # a variance over repeats needs two of them


@dataclass
class OracleStats:
    """Per-unit equation-1 statistics from the oracle images of one scan.

    ``signal_var`` = Var_i(E_t[rho]) and ``noise_var`` = E_i[Var_t(rho)], both sample variances
    (ddof=1): the repeat variance is then unbiased for every image whatever its repeat count, and the
    image variance is the paper's estimator (it still contains noise_var / T of noise, uncorrected, as
    in the paper). ``snr_weight`` = sigma / eta (w_a), 0 where eta is 0 (up to rounding): a unit that
    never varies across repeats is constant or quantized away, not infinitely reliable. ``oracle_corr``
    is the leave-one-out oracle correlation: across oracle trials, the correlation of a trial's response
    with the mean of the other repeats of its image (0 where either side is constant).
    """

    image_labels: np.ndarray  # (n_oracle,) the oracle images used, sorted
    n_repeats: np.ndarray  # (n_oracle,) trials per oracle image
    signal_var: np.ndarray  # (n_units,)
    noise_var: np.ndarray
    snr_weight: np.ndarray
    oracle_corr: np.ndarray

    def summary(self) -> dict:
        """The scan-level numbers a table keeps: oracle images and trials, median w_a, mean oracle r."""
        return {
            "n_oracle_images": len(self.image_labels),
            "n_oracle_trials": int(self.n_repeats.sum()),
            "median_snr_weight": float(np.median(self.snr_weight)),
            "mean_oracle_corr": float(np.mean(self.oracle_corr)),
        }


class LabeledSimilarity(NamedTuple):
    """A similarity matrix and the image label of each of its rows (and columns)."""

    labels: np.ndarray
    matrix: np.ndarray


@dataclass
class _Groups:
    """Trials grouped by image: ``trials`` index the responses, ``group[k]`` is trial k's image."""

    labels: np.ndarray
    trials: np.ndarray
    group: np.ndarray
    counts: np.ndarray

    def indicator(self, dtype=np.float64, normalize: bool = False) -> sparse.csr_matrix:
        """(n_images, n_trials) one-hot, or the averaging operator when ``normalize``."""
        values = 1.0 / self.counts[self.group] if normalize else np.ones(self.group.size)
        shape = (self.labels.size, self.group.size)
        return sparse.csr_matrix((values.astype(dtype), (self.group, np.arange(self.group.size))), shape=shape)


def _check(responses: np.ndarray, image_labels: np.ndarray, weights: np.ndarray | None = None):
    responses = np.asarray(responses)
    image_labels = np.asarray(image_labels)
    if responses.ndim != 2:
        raise ValueError(f"responses must be (n_trials, n_units), got shape {responses.shape}")
    if image_labels.shape != (responses.shape[0],):
        raise ValueError(
            f"image_labels must hold one label per trial ({responses.shape[0]}), got shape {image_labels.shape}"
        )
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (responses.shape[1],):
            raise ValueError(f"weights must hold one value per unit ({responses.shape[1]}), got shape {weights.shape}")
        if not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise ValueError("weights must be finite and non-negative")
    return responses, image_labels, weights


def _groups(image_labels: np.ndarray, min_repeats: int) -> _Groups:
    labels, inverse, counts = np.unique(image_labels, return_inverse=True, return_counts=True)
    keep = counts >= min_repeats
    trials = np.flatnonzero(keep[inverse])
    renumber = np.cumsum(keep) - 1
    return _Groups(labels[keep], trials, renumber[inverse[trials]], counts[keep])


def _oracle_groups(image_labels: np.ndarray) -> _Groups:
    groups = _groups(image_labels, MIN_REPEATS)
    if groups.labels.size < 2:
        raise ValueError(
            f"need at least 2 images shown at least {MIN_REPEATS} times (oracle images), found {groups.labels.size}"
        )
    return groups


def _finite(x: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(x)):
        raise ValueError("responses contain NaN or infinite values")
    return x


# ------------------------------------------------------------------------------------- equation 1
def oracle_stats(responses: np.ndarray, image_labels: np.ndarray) -> OracleStats:
    """Equation 1 and the leave-one-out oracle correlation from the images repeated at least twice."""
    responses, image_labels, _ = _check(responses, image_labels)
    groups = _oracle_groups(image_labels)
    x = _finite(responses[groups.trials].astype(np.float64))
    counts = groups.counts[:, None].astype(np.float64)
    sums = groups.indicator() @ x
    means = sums / counts
    deviations = x - means[groups.group]
    repeat_var = (groups.indicator() @ deviations**2) / (counts - 1)
    signal_var, noise_var = means.var(axis=0, ddof=1), repeat_var.mean(axis=0)
    noisy = ~_negligible(noise_var, x)
    weight = np.divide(np.sqrt(signal_var), np.sqrt(noise_var), out=np.zeros_like(noise_var), where=noisy)

    others = (sums[groups.group] - x) / (counts[groups.group] - 1)
    return OracleStats(
        image_labels=groups.labels,
        n_repeats=groups.counts,
        signal_var=signal_var,
        noise_var=noise_var,
        snr_weight=weight,
        oracle_corr=_column_corr(x, others),
    )


def _negligible(variance: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per column: is ``variance`` rounding error (std below 1e-12 of the column's RMS)? Identical
    repeats of a quantized response can leave ~1e-17 deviations that must not read as a variance."""
    return variance <= 1e-24 * np.mean(x * x, axis=0)


def _column_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching columns; 0 where a column is constant."""
    da, db = a - a.mean(axis=0), b - b.mean(axis=0)
    var_a, var_b = (da * da).mean(axis=0), (db * db).mean(axis=0)
    varies = ~_negligible(var_a, a) & ~_negligible(var_b, b)
    norm = np.sqrt(var_a * var_b) * len(a)
    return np.divide((da * db).sum(axis=0), norm, out=np.zeros(a.shape[1]), where=varies)


# ------------------------------------------------------------------------------------- equation 2
def scale_responses(responses: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """r = w * rho (float32): the SNR-scaled responses every similarity is computed on."""
    return np.asarray(responses, dtype=np.float32) * np.asarray(weights, dtype=np.float32)


def image_means(responses: np.ndarray, image_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean response per image, as ``(labels, means)`` with rows sorted by label (float32)."""
    responses, image_labels, _ = _check(responses, image_labels)
    groups = _groups(image_labels, 1)
    means = groups.indicator(np.float32, normalize=True) @ np.asarray(responses, dtype=np.float32)
    return groups.labels, np.asarray(means)


def data_similarity(responses: np.ndarray, image_labels: np.ndarray, weights: np.ndarray) -> LabeledSimilarity:
    """Equation 2: S^data_ij = e_i . e_j over the images in ``image_labels``, one row per image.

    An image shown several times enters with the mean of its trials; pass only single-trial images (or
    one trial per image) for the single-trial S^data the paper compares against.
    """
    responses, image_labels, weights = _check(responses, image_labels, weights)
    labels, means = image_means(scale_responses(_finite(responses), weights), image_labels)
    return LabeledSimilarity(labels, centered_cosine(means))


# ---------------------------------------------------------------------------------- equations 3, 5
def _trial_similarity(responses, image_labels, weights) -> tuple[_Groups, np.ndarray]:
    """S^data between the oracle trials, each trial its own 'image', centred on the mean over images."""
    responses, image_labels, weights = _check(responses, image_labels, weights)
    groups = _oracle_groups(image_labels)
    r = scale_responses(_finite(responses[groups.trials]), weights)
    center = np.asarray(groups.indicator(np.float32, normalize=True) @ r).mean(axis=0)
    return groups, centered_cosine(r, center)


def _block_means(groups: _Groups, trial_sim: np.ndarray) -> np.ndarray:
    """Mean of ``trial_sim`` over each (image i, image j) block, self-pairs left out of the diagonal."""
    onehot = groups.indicator().toarray()
    sums = onehot @ trial_sim @ onehot.T
    pairs = np.outer(groups.counts, groups.counts).astype(np.float64)
    sums[np.diag_indices_from(sums)] -= onehot @ np.diag(trial_sim)
    pairs[np.diag_indices_from(pairs)] -= groups.counts
    return sums / pairs


def oracle_similarity(responses: np.ndarray, image_labels: np.ndarray, weights: np.ndarray) -> LabeledSimilarity:
    """Equation 3: S^oracle_ij = mean over repeat pairs (t_i, t_j) of the trial-level S^data.

    Computed as block means of the full trial-by-trial similarity matrix, the diagonal blocks without
    their self-pairs (S = 1 of a trial with itself). Uses the images shown at least twice.
    """
    groups, trial_sim = _trial_similarity(responses, image_labels, weights)
    return LabeledSimilarity(groups.labels, _block_means(groups, trial_sim))


def repeat_fluctuations(responses: np.ndarray, image_labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Equation 5: S^data_{i t1, i t2} - S^oracle_ii for every oracle image i and repeat pair t1 < t2."""
    groups, trial_sim = _trial_similarity(responses, image_labels, weights)
    oracle_diag = np.diag(_block_means(groups, trial_sim))
    values = []
    for image in range(groups.labels.size):  # O(sum of repeats^2), not O(trials^2)
        trials = np.flatnonzero(groups.group == image)
        first, second = np.triu_indices(trials.size, k=1)
        values.append(trial_sim[trials[first], trials[second]] - oracle_diag[image])
    return np.concatenate(values)


# ------------------------------------------------------------------------------------- equation 4
def align_similarities(similarities: Sequence[LabeledSimilarity]) -> LabeledSimilarity:
    """Stack scans' similarity matrices over the labels all of them share, in sorted label order."""
    if not similarities:
        raise ValueError("no similarity matrices to align")
    common = similarities[0].labels
    for sim in similarities[1:]:
        common = np.intersect1d(common, sim.labels)
    if common.size < 2:
        raise ValueError(f"the scans share {common.size} image(s); equation 4 needs at least 2")
    stack = []
    for sim in similarities:
        sorter = np.argsort(sim.labels)
        pos = sorter[np.searchsorted(sim.labels, common, sorter=sorter)]
        stack.append(np.asarray(sim.matrix)[np.ix_(pos, pos)])
    return LabeledSimilarity(common, np.stack(stack))


def scan_fluctuations(matrices: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Equation 4: S^oracle-h_ij - E_h[S^oracle-h_ij], (n_scans, n_pairs) over the pairs i < j.

    The matrices must share one image order (see ``align_similarities``). The diagonal is left out: it
    is each image's repeat reliability, not a similarity between two images, and j < i repeats i < j.
    """
    stack = np.asarray(matrices, dtype=np.float64)
    if stack.ndim != 3 or stack.shape[1] != stack.shape[2]:
        raise ValueError(f"expected a stack of square matrices (n_scans, n, n), got shape {stack.shape}")
    if stack.shape[0] < 2:
        raise ValueError("scan fluctuations need at least 2 scans")
    upper = np.triu_indices(stack.shape[1], k=1)
    values = stack[:, upper[0], upper[1]]
    return values - values.mean(axis=0)


# -------------------------------------------------------------------------------------- summaries
def summarize(values: np.ndarray, quantiles: Sequence[float] = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)) -> dict:
    """Count, mean, standard deviation and quantiles of a sample (flattened)."""
    values = np.ravel(np.asarray(values, dtype=np.float64))
    if values.size == 0:
        raise ValueError("cannot summarize an empty sample")
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "quantiles": dict(zip((float(q) for q in quantiles), np.quantile(values, quantiles).tolist())),
    }


def shared_bin_edges(*samples: np.ndarray, n_bins: int = 51) -> np.ndarray:
    """Histogram edges symmetric about 0 that cover every sample, so histograms compare bin by bin.

    Fluctuations are zero-mean by construction and are compared by width; an odd ``n_bins`` centres a
    bin on 0.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    nonempty = [np.abs(np.asarray(s, dtype=np.float64)) for s in samples if np.size(s)]
    if not nonempty:
        raise ValueError("need at least one non-empty sample")
    reach = max(float(s.max()) for s in nonempty) or 1.0
    return np.linspace(-reach, reach, n_bins + 1)


def histogram_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of ``values`` in ``edges`` (the last bin closed), int64."""
    return np.histogram(np.ravel(values), bins=edges)[0].astype(np.int64)


def trial_oracle_agreement(responses: np.ndarray, image_labels: np.ndarray, weights: np.ndarray) -> float:
    """Pearson r between single-trial S^data of oracle-trial pairs and S^oracle of their images (i != j).

    This is the paper's Fig. 1D comparison (r = 0.39 on real data): how far a similarity measured from
    single trials is from the repeat-averaged one it estimates. Leave-one-pair-out (docs/science.md §3):
    each trial pair is compared with the S^oracle average over the *other* repeat pairs of its two
    images, (n_i n_j S^oracle_ij - S_ab) / (n_i n_j - 1); with the pair inside its own average the
    agreement was inflated.
    """
    groups, trial_sim = _trial_similarity(responses, image_labels, weights)
    oracle = _block_means(groups, trial_sim)
    first, second = np.triu_indices(groups.group.size, k=1)
    different = groups.group[first] != groups.group[second]
    first, second = first[different], second[different]
    single = trial_sim[first, second]
    image_a, image_b = groups.group[first], groups.group[second]
    pairs = groups.counts[image_a].astype(np.float64) * groups.counts[image_b]
    averaged = (oracle[image_a, image_b] * pairs - single) / (pairs - 1)
    return float(np.corrcoef(single, averaged)[0, 1])


# ------------------------------------------------------------------------------ one call per table
def single_presentation_similarity(
    responses: np.ndarray, image_labels: np.ndarray, weights: np.ndarray
) -> LabeledSimilarity:
    """S^data (equation 2) over the images shown once: the 'neural data' target's rows."""
    image_labels = np.asarray(image_labels)
    labels, counts = np.unique(image_labels, return_counts=True)
    single = np.isin(image_labels, labels[counts == 1])
    if single.sum() < 2:
        raise ValueError(f"{single.sum()} single-presentation images; S^data needs at least 2")
    labels, matrix = data_similarity(responses[single], image_labels[single], weights)
    return LabeledSimilarity(labels, matrix.astype(np.float32))


def oracle_similarity_report(responses: np.ndarray, image_labels: np.ndarray, weights: np.ndarray) -> dict:
    """S^oracle (equation 3) with how noisy single-trial similarity is beside it: one scan's columns."""
    labels, matrix = oracle_similarity(responses, image_labels, weights)
    return {
        "labels": labels,
        "similarity": matrix,
        "data_oracle_r": trial_oracle_agreement(responses, image_labels, weights),
        "repeat_fluctuations": repeat_fluctuations(responses, image_labels, weights).astype(np.float32),
    }


def scan_stability(similarities: Sequence[LabeledSimilarity], repeats: Sequence[np.ndarray], n_bins: int) -> dict:
    """dS^scan (equation 4) against dS^repeat (equation 5) over scans sharing oracle images, as stored columns."""
    aligned = align_similarities(similarities)
    scan = scan_fluctuations(aligned.matrix)
    repeat = np.concatenate([np.asarray(r) for r in repeats])
    edges = shared_bin_edges(scan, repeat, n_bins=n_bins)
    scan_summary, repeat_summary = summarize(scan), summarize(repeat)
    as_json = lambda s: {**s, "quantiles": {str(q): v for q, v in s["quantiles"].items()}}  # noqa: E731
    return {
        "n_scans": len(similarities),
        "n_images": len(aligned.labels),
        "scan_std": scan_summary["std"],
        "repeat_std": repeat_summary["std"],
        "width_ratio": scan_summary["std"] / repeat_summary["std"] if repeat_summary["std"] > 0 else float("inf"),
        "scan_summary": as_json(scan_summary),
        "repeat_summary": as_json(repeat_summary),
        "bin_edges": edges,
        "scan_hist": histogram_counts(scan, edges),
        "repeat_hist": histogram_counts(repeat, edges),
    }
