"""The oracle stage on a simulated cohort: equations against a direct computation and the ground truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from neureg.experiments.simulate import load_ground_truth
from neureg.models.neural.rsa import centered_cosine


def folder_arrays(folder):
    """Responses and image ids read straight from the scan folder files (not through the database)."""
    frame_ids = np.load(folder / "meta/trials/frame_image_id.npy")
    responses = np.stack([np.load(folder / f"data/responses/{t}.npy") for t in range(frame_ids.size)]).astype(
        np.float64
    )
    return responses, frame_ids


def naive_eq1(responses, frame_ids):
    ids, counts = np.unique(frame_ids, return_counts=True)
    oracle = ids[counts > 1]
    signal, noise = [], []
    for a in range(responses.shape[1]):
        means = [responses[frame_ids == i, a].mean() for i in oracle]
        variances = [responses[frame_ids == i, a].var(ddof=1) for i in oracle]
        signal.append(np.var(means, ddof=1))
        noise.append(np.mean(variances))
    return np.array(signal), np.array(noise)


def test_oracle_stats_match_a_direct_computation(pipeline, oracle_populated):
    folder, key = oracle_populated[0]
    responses, frame_ids = folder_arrays(folder)
    signal, noise = naive_eq1(responses, frame_ids)
    unit_ids = np.load(folder / "meta/neurons/unit_ids.npy")
    stored = {
        u: (s, n, w)
        for u, s, n, w in zip(
            *(pipeline.oracle.OracleStats.Unit & key).to_arrays("unit_id", "signal_var", "noise_var", "snr_weight")
        )
    }
    got = np.array([stored[u] for u in unit_ids])
    np.testing.assert_allclose(got[:, 0], signal, rtol=1e-5)
    np.testing.assert_allclose(got[:, 1], noise, rtol=1e-5)
    np.testing.assert_allclose(got[:, 2], np.sqrt(signal / noise), rtol=1e-5)
    n_oracle = (pipeline.oracle.OracleStats & key).fetch1("n_oracle_images")
    assert n_oracle == len(pipeline.oracle.OracleStats.OracleImage & key) == 40


def test_snr_weights_track_true_snr(pipeline, oracle_populated):
    for folder, key in oracle_populated:
        truth = load_ground_truth(folder)
        order = {u: i for i, u in enumerate(truth["unit_ids"])}
        unit_ids, weights = (pipeline.oracle.OracleStats.Unit & key).to_arrays("unit_id", "snr_weight")
        true_snr = truth["true_snr"][[order[u] for u in unit_ids]]
        rho = spearmanr(weights, true_snr).statistic
        assert rho > 0.75, f"{key}: Spearman(w_a, true SNR) = {rho:.2f}"


def test_data_similarity_matches_equation_2(pipeline, oracle_populated):
    folder, key = oracle_populated[1]
    responses, frame_ids = folder_arrays(folder)
    weights = np.asarray(
        (pipeline.oracle.OracleStats.Unit * pipeline.experiment.Scan.Unit & key).to_arrays(
            "snr_weight", order_by="unit_index"
        )
    )
    hashes, matrix = (pipeline.oracle.DataSimilarity & key).labeled()
    ids, counts = np.unique(frame_ids, return_counts=True)
    single = np.isin(frame_ids, ids[counts == 1])
    trial_hash = pipeline.experiment.load_trials(key)["image_hash"]
    row_of = {h: t for t, h in enumerate(trial_hash)}
    r = np.stack([responses[row_of[h]] for h in hashes]) * weights
    e = (r - r.mean(0)) / np.linalg.norm(r - r.mean(0), axis=1, keepdims=True)
    assert len(hashes) == single.sum()
    np.testing.assert_allclose(matrix, e @ e.T, atol=2e-5)


def test_oracle_similarity_is_closer_to_truth_than_single_trials(pipeline, oracle_populated):
    exp, orc = pipeline.experiment, pipeline.oracle
    for folder, key in oracle_populated:
        truth = load_ground_truth(folder)
        labeled = (orc.OracleSimilarity & key).labeled()
        rows = [int(np.flatnonzero(truth["image_hash"] == h)[0]) for h in labeled.labels]
        weights = np.asarray(
            (orc.OracleStats.Unit * exp.Scan.Unit & key).to_arrays("snr_weight", order_by="unit_index")
        )
        order = {u: i for i, u in enumerate(truth["unit_ids"])}
        columns = [order[u] for u in exp.unit_ids(key)]
        true_sim = centered_cosine(truth["true_rates"][rows][:, columns] * weights)
        # single-trial S^data on the same images: the first repeat of each image
        responses, trials = exp.load_responses(key), exp.load_trials(key)
        first = [int(np.flatnonzero(trials["image_hash"] == h)[0]) for h in labeled.labels]
        single_sim = centered_cosine(responses[first] * weights)
        upper = np.triu_indices(len(rows), 1)
        r_oracle = np.corrcoef(labeled.matrix[upper], true_sim[upper])[0, 1]
        r_single = np.corrcoef(single_sim[upper], true_sim[upper])[0, 1]
        assert r_oracle > r_single, f"{key}: r(S^oracle, truth) {r_oracle:.2f} <= r(S^data, truth) {r_single:.2f}"
        assert 0 < (orc.OracleSimilarity & key).fetch1("data_oracle_r") < 1


def test_scan_fluctuations_are_narrower_than_repeat_fluctuations(pipeline, oracle_populated):
    exp, orc = pipeline.experiment, pipeline.oracle
    keys = [key for _, key in oracle_populated]
    set_key = exp.ScanSet.create(keys)  # the cohort's four scans (prepare() registered this set already)
    assert len(exp.ScanSet.Member & set_key) == 4
    row = (orc.ScanStability & set_key).fetch1()
    assert row["n_scans"] == 4 and row["n_images"] == 40
    assert row["scan_std"] < row["repeat_std"] and row["width_ratio"] < 1
    assert row["scan_hist"].sum() == 4 * 40 * 39 // 2
    assert row["repeat_hist"].sum() == sum(
        len(f) for f in [(orc.OracleSimilarity & k).fetch1("repeat_fluctuations") for k in keys]
    )


def test_scan_set_hash_is_order_free_and_checked(pipeline, oracle_populated):
    exp = pipeline.experiment
    keys = [key for _, key in oracle_populated]
    assert exp.ScanSet.create(keys) == exp.ScanSet.create(list(reversed(keys)))
    assert exp.ScanSet.create(keys[:2]) != exp.ScanSet.create(keys[:3])
    with pytest.raises(ValueError, match="not in experiment.Scan"):
        exp.ScanSet.create([dict(keys[0], scan_idx=99)])


def test_report_oracle_writes_figures(pipeline, oracle_populated, tmp_path):
    from neureg.reports.oracle import oracle_figures

    paths = oracle_figures(pipeline, tmp_path)
    assert paths and all(p.suffix == ".png" and p.stat().st_size > 5000 for p in paths)
    assert {p.name.split("_")[1] for p in paths} == {"similarity", "fluctuations"}
