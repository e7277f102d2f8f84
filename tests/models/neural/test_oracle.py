"""Equations 1-5 against direct loop computations, and against the simulator's ground truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from neureg.experiments import simulate as simulated_cohort
from neureg.ingestion.folder import read_scan_folder
from neureg.models.neural import oracle as orc
from neureg.models.neural import simulator as sim
from neureg.models.neural.rsa import centered_cosine


# ------------------------------------------------------------------------------ naive references
def naive_stats(responses, labels):
    images = [im for im in sorted(set(labels.tolist())) if list(labels).count(im) >= 2]
    n_units = responses.shape[1]
    signal, noise, weight, corr = (np.zeros(n_units) for _ in range(4))
    for a in range(n_units):
        means, variances = [], []
        for im in images:
            values = [responses[t, a] for t in range(len(labels)) if labels[t] == im]
            means.append(sum(values) / len(values))
            variances.append(sum((v - means[-1]) ** 2 for v in values) / (len(values) - 1))
        grand = sum(means) / len(means)
        signal[a] = sum((m - grand) ** 2 for m in means) / (len(means) - 1)
        noise[a] = sum(variances) / len(variances)
        weight[a] = np.sqrt(signal[a]) / np.sqrt(noise[a]) if noise[a] > 0 else 0.0
        xs, ys = [], []
        for t in range(len(labels)):
            if labels[t] in images:
                others = [responses[u, a] for u in range(len(labels)) if labels[u] == labels[t] and u != t]
                xs.append(responses[t, a])
                ys.append(sum(others) / len(others))
        xs, ys = np.array(xs), np.array(ys)
        if xs.std() > 0 and ys.std() > 0:
            corr[a] = np.corrcoef(xs, ys)[0, 1]
    return images, signal, noise, weight, corr


def naive_cosine(rows, center):
    n = len(rows)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            ei, ej = rows[i] - center, rows[j] - center
            out[i, j] = sum(ei * ej) / (np.sqrt(sum(ei * ei)) * np.sqrt(sum(ej * ej)))
    return out


def naive_trial_similarity(responses, labels, weights):
    images = [im for im in sorted(set(labels.tolist())) if list(labels).count(im) >= 2]
    trials = [t for t in range(len(labels)) if labels[t] in images]
    r = responses[trials] * weights
    image_means = [r[[k for k, t in enumerate(trials) if labels[t] == im]].mean(0) for im in images]
    center = sum(image_means) / len(image_means)
    return images, trials, naive_cosine(r, center)


def naive_oracle_similarity(responses, labels, weights):
    images, trials, trial_sim = naive_trial_similarity(responses, labels, weights)
    out = np.zeros((len(images), len(images)))
    for i, a in enumerate(images):
        for j, b in enumerate(images):
            values = [
                trial_sim[p, q]
                for p, t in enumerate(trials)
                for q, u in enumerate(trials)
                if labels[t] == a and labels[u] == b and p != q
            ]
            out[i, j] = sum(values) / len(values)
    return images, out


@pytest.fixture
def ragged():
    """Ragged repeats (2, 3 and 4), unsorted string labels, single-shown images mixed in."""
    rng = np.random.default_rng(0)
    labels = np.array(["c"] * 3 + ["a"] * 2 + ["d"] * 4 + ["b"] * 3 + ["x", "y"])
    order = rng.permutation(labels.size)
    labels = labels[order]
    responses = rng.gamma(0.8, 1.0, (labels.size, 6)) + np.arange(6) * 0.1
    return responses.astype(np.float32), labels, rng.uniform(0.2, 2.0, 6)


# ----------------------------------------------------------------------------------- equations
def test_oracle_stats_matches_loops(ragged):
    responses, labels, _ = ragged
    stats = orc.oracle_stats(responses, labels)
    images, signal, noise, weight, corr = naive_stats(responses.astype(np.float64), labels)
    assert stats.image_labels.tolist() == images == ["a", "b", "c", "d"]
    assert stats.n_repeats.tolist() == [2, 3, 3, 4]
    np.testing.assert_allclose(stats.signal_var, signal, rtol=1e-6)
    np.testing.assert_allclose(stats.noise_var, noise, rtol=1e-6)
    np.testing.assert_allclose(stats.snr_weight, weight, rtol=1e-6)
    np.testing.assert_allclose(stats.oracle_corr, corr, atol=1e-9)


def test_oracle_stats_guards_silent_and_noiseless_units():
    labels = np.repeat([0, 1, 2], 3)
    responses = np.zeros((9, 4))
    responses[:, 1] = np.repeat([1.0, 2.0, 4.0], 3)  # no repeat noise: weight 0, not infinite
    responses[:, 2] = np.repeat([0.1, 0.7, 0.3], 3)  # the same, with means that round in binary
    responses[:, 3] = np.arange(9.0)
    stats = orc.oracle_stats(responses, labels)
    assert stats.snr_weight.tolist()[:3] == [0.0, 0.0, 0.0]
    assert stats.oracle_corr[0] == 0.0 and np.isfinite(stats.oracle_corr).all()
    assert stats.snr_weight[3] > 0 and stats.oracle_corr[3] > 0.8
    assert np.all(stats.signal_var[1:] > 0)


def test_data_similarity_matches_loops(ragged):
    responses, labels, weights = ragged
    result = orc.data_similarity(responses, labels, weights)
    images = sorted(set(labels.tolist()))
    rows = np.array([(responses[labels == im] * weights).mean(0) for im in images])
    assert result.labels.tolist() == images
    np.testing.assert_allclose(result.matrix, naive_cosine(rows, rows.mean(0)), atol=1e-6)
    np.testing.assert_allclose(np.diag(result.matrix), 1, atol=1e-6)


def test_oracle_similarity_matches_loops(ragged):
    responses, labels, weights = ragged
    result = orc.oracle_similarity(responses, labels, weights)
    images, expected = naive_oracle_similarity(responses.astype(np.float64), labels, weights)
    assert result.labels.tolist() == images
    np.testing.assert_allclose(result.matrix, expected, atol=1e-6)
    np.testing.assert_allclose(result.matrix, result.matrix.T, atol=1e-12)
    assert np.all(np.diag(result.matrix) < 1), "self-pairs (S = 1) must be left out"


def test_trial_oracle_agreement_leaves_the_compared_pair_out(ragged):
    """Fig. 1D by loops: every trial pair of two different oracle images against the mean of the *other*
    repeat pairs of those images; the pair itself is not in its own reference."""
    responses, labels, weights = ragged
    images, trials, trial_sim = naive_trial_similarity(responses.astype(np.float64), labels, weights)
    single, reference = [], []
    for p in range(len(trials)):
        for q in range(p + 1, len(trials)):
            a, b = labels[trials[p]], labels[trials[q]]
            if a == b:
                continue
            others = [
                trial_sim[u, v]
                for u, tu in enumerate(trials)
                for v, tv in enumerate(trials)
                if labels[tu] == a and labels[tv] == b and (u, v) != (p, q)
            ]
            single.append(trial_sim[p, q])
            reference.append(sum(others) / len(others))
    expected = np.corrcoef(single, reference)[0, 1]
    assert orc.trial_oracle_agreement(responses, labels, weights) == pytest.approx(expected, abs=1e-6)
    # Including the pair in its own average gives a larger (inflated) agreement on this data.
    _, oracle = naive_oracle_similarity(responses.astype(np.float64), labels, weights)
    index = {im: k for k, im in enumerate(images)}
    inflated = [
        oracle[index[labels[trials[p]]], index[labels[trials[q]]]]
        for p in range(len(trials))
        for q in range(p + 1, len(trials))
        if labels[trials[p]] != labels[trials[q]]
    ]
    assert np.corrcoef(single, inflated)[0, 1] > expected


def test_repeat_fluctuations_match_loops(ragged):
    responses, labels, weights = ragged
    values = orc.repeat_fluctuations(responses, labels, weights)
    images, trials, trial_sim = naive_trial_similarity(responses.astype(np.float64), labels, weights)
    _, oracle = naive_oracle_similarity(responses.astype(np.float64), labels, weights)
    expected = [
        trial_sim[p, q] - oracle[images.index(labels[t]), images.index(labels[t])]
        for p, t in enumerate(trials)
        for q, u in enumerate(trials)
        if p < q and labels[t] == labels[u]
    ]
    assert len(values) == 1 + 3 + 3 + 6  # pairs of 2, 3, 3 and 4 repeats
    np.testing.assert_allclose(np.sort(values), np.sort(expected), atol=1e-6)


def test_scan_fluctuations_match_loops():
    rng = np.random.default_rng(1)
    mats = [np.corrcoef(rng.normal(size=(5, 12))) for _ in range(3)]
    values = orc.scan_fluctuations(mats)
    expected = [
        [mats[h][i, j] - sum(m[i, j] for m in mats) / 3 for i in range(5) for j in range(i + 1, 5)] for h in range(3)
    ]
    np.testing.assert_allclose(values, expected, atol=1e-12)


def test_align_similarities_reorders_by_label():
    rng = np.random.default_rng(2)
    base = np.corrcoef(rng.normal(size=(4, 9)))
    labels = np.array([10, 20, 30, 40])
    perm = np.array([2, 0, 3, 1])
    shuffled = orc.LabeledSimilarity(labels[perm], base[np.ix_(perm, perm)])
    extra = orc.LabeledSimilarity(np.array([50, 10, 20, 30, 40]), np.pad(base, ((1, 0), (1, 0))))
    aligned = orc.align_similarities([orc.LabeledSimilarity(labels, base), shuffled, extra])
    assert aligned.labels.tolist() == [10, 20, 30, 40]
    for matrix in aligned.matrix:
        np.testing.assert_allclose(matrix, base)


def test_summaries():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 0.1, 500), rng.normal(0, 0.5, 800)
    summary = orc.summarize(a, quantiles=(0.5, 0.9))
    assert summary["n"] == 500
    assert summary["mean"] == pytest.approx(a.mean()) and summary["std"] == pytest.approx(a.std())
    assert summary["quantiles"][0.9] == pytest.approx(np.quantile(a, 0.9))
    edges = orc.shared_bin_edges(a, b, n_bins=21)
    assert edges.size == 22 and edges[0] == pytest.approx(-np.abs(np.concatenate([a, b])).max())
    assert edges[0] == -edges[-1]
    assert orc.histogram_counts(a, edges).sum() == 500 and orc.histogram_counts(b, edges).sum() == 800
    assert orc.histogram_counts(a, edges).dtype == np.int64


@pytest.mark.parametrize(
    "responses, labels, message",
    [
        (np.ones((4, 2)), np.array([0, 0, 1, 2]), "at least 2 images shown at least 2 times"),
        (np.ones((4, 2)), np.array([0, 0, 1]), "one label per trial"),
        (np.ones(4), np.array([0, 0, 1, 1]), r"\(n_trials, n_units\)"),
        (np.array([[1.0, np.nan]] * 4), np.array([0, 0, 1, 1]), "NaN"),
    ],
)
def test_bad_inputs_raise(responses, labels, message):
    with pytest.raises(ValueError, match=message):
        orc.oracle_stats(responses, labels)


def test_bad_weights_and_scan_counts_raise(ragged):
    responses, labels, weights = ragged
    with pytest.raises(ValueError, match="one value per unit"):
        orc.oracle_similarity(responses, labels, weights[:-1])
    with pytest.raises(ValueError, match="non-negative"):
        orc.data_similarity(responses, labels, -weights)
    with pytest.raises(ValueError, match="at least 2 scans"):
        orc.scan_fluctuations([np.eye(3)])
    with pytest.raises(ValueError, match="share 1 image"):
        orc.align_similarities(
            [orc.LabeledSimilarity(np.array([1, 2]), np.eye(2)), orc.LabeledSimilarity(np.array([2, 3]), np.eye(2))]
        )


# ------------------------------------------------------------------------- against the simulator
@pytest.fixture(scope="module")
def scan():
    return sim.simulate_scan(400, n_images=110, n_oracle=100, n_repeats=10, seed=21)


def test_snr_weight_ranks_true_snr(scan):
    stats = orc.oracle_stats(scan.responses, scan.trial_image)
    assert spearmanr(stats.snr_weight, scan.true_snr)[0] > 0.8
    assert spearmanr(stats.oracle_corr, scan.true_snr)[0] > 0.8


def test_oracle_similarity_is_closer_to_truth_than_single_trials(scan):
    stats = orc.oracle_stats(scan.responses, scan.trial_image)
    oracle_trials = scan.trial_image < scan.n_oracle
    truth = centered_cosine(scan.true_rates[: scan.n_oracle] * np.sqrt(scan.true_snr))
    oracle = orc.oracle_similarity(scan.responses[oracle_trials], scan.trial_image[oracle_trials], stats.snr_weight)
    first = np.array([np.flatnonzero(scan.trial_image == i)[0] for i in range(scan.n_oracle)])
    single = orc.data_similarity(scan.responses[first], scan.trial_image[first], stats.snr_weight)
    upper = np.triu_indices(scan.n_oracle, k=1)
    r_oracle = pearsonr(oracle.matrix[upper], truth[upper])[0]
    r_single = pearsonr(single.matrix[upper], truth[upper])[0]
    assert r_oracle > r_single + 0.1
    assert r_oracle > 0.6


def test_scan_fluctuations_are_narrower_than_repeat_fluctuations(tmp_path):
    """The paper's Fig. 1C on a small cohort written to disk and read back as scan folders."""
    folders = simulated_cohort.simulate_cohort(
        tmp_path, n_mice=3, n_days=1, scans_per_day=1, n_units=250, n_images=45, n_oracle=40, n_repeats=5, seed=1
    )
    similarities, repeats = [], []
    for folder in folders:
        data = read_scan_folder(folder)
        labels = np.array(data.trial_images)
        oracle = data.tiers == "oracle"
        weights = orc.oracle_stats(data.responses, labels).snr_weight
        similarities.append(orc.oracle_similarity(data.responses[oracle], labels[oracle], weights))
        repeats.append(orc.repeat_fluctuations(data.responses[oracle], labels[oracle], weights))
    aligned = orc.align_similarities(similarities)
    assert aligned.labels.size == 40
    scan_std = orc.summarize(orc.scan_fluctuations(aligned.matrix))["std"]
    repeat_std = orc.summarize(np.concatenate(repeats))["std"]
    assert scan_std < 0.6 * repeat_std
