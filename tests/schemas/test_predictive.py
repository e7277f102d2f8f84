"""The predictive stage's tables: lineage, stored weights that reproduce the stored predictions, v_a."""

from __future__ import annotations

import numpy as np
import pytest

from neureg.models.neural import predictive as fit


def test_one_model_per_scan_with_units_and_history(pipeline, oracle_populated, predictive_populated):
    pred = pipeline.predictive
    for _, scan_key in oracle_populated:
        key = dict(scan_key, **predictive_populated, seed=0)
        row = (pred.PredictiveModel & key).fetch1()
        assert row["n_train"] > row["n_validation"] >= 2 and row["n_test"] == 40 * 10
        assert 1 <= row["best_epoch"] <= row["epochs_run"] <= 3 and len(row["history"]) == row["epochs_run"]
        assert len(pred.PredictiveModel.Unit & key) == 80
        corr = (pred.PredictiveModel.Unit & key).to_arrays("model_corr")
        assert np.all(np.abs(corr) <= 1) and row["test_corr"] == pytest.approx(np.mean(corr))


def test_stored_weights_reproduce_stored_predictions(pipeline, oracle_populated, predictive_populated):
    pred, exp = pipeline.predictive, pipeline.experiment
    _, scan_key = oracle_populated[0]
    key = dict(scan_key, **predictive_populated, seed=0)
    model = (pred.PredictiveModel & key).load_model()
    hashes, stored = (pred.ModelResponses & key).labeled()
    assert stored.shape == (len(np.unique(exp.load_trials(scan_key)["image_hash"])), 80)
    again = fit.predict_responses(model, exp.load_images(hashes))
    np.testing.assert_allclose(again, stored, rtol=1e-5, atol=1e-6)
    assert np.all(stored > 0), "ELU+1 output is positive"


def test_model_corr_is_the_held_out_correlation(pipeline, oracle_populated, predictive_populated):
    """v_a recomputed independently from the stored model on the oracle trials."""
    pred, exp = pipeline.predictive, pipeline.experiment
    _, scan_key = oracle_populated[1]
    key = dict(scan_key, **predictive_populated, seed=0)
    model = (pred.PredictiveModel & key).load_model()
    trials, responses = exp.load_trials(scan_key), exp.load_responses(scan_key)
    test = np.flatnonzero(trials["tier"] == "oracle")
    predicted = fit.predict_responses(
        model, exp.load_images(trials["image_hash"][test]), trials["behavior"][test], trials["pupil_center"][test]
    )
    expected = [np.corrcoef(predicted[:, a], responses[test, a])[0, 1] for a in range(responses.shape[1])]
    stored = (pred.PredictiveModel.Unit * exp.Scan.Unit & key).to_arrays("model_corr", order_by="unit_index")
    np.testing.assert_allclose(stored, np.nan_to_num(expected), atol=1e-4)


def test_predictor_config_rejects_bad_input_and_changes_nothing(pipeline):
    table = pipeline.predictive.PredictorConfig
    before = len(table())
    with pytest.raises(ValueError, match="unknown config key"):
        table.add(dict(hiden_channels=8))
    with pytest.raises(ValueError, match="readout"):
        table.add(dict(readout="spline"))
    with pytest.raises(ValueError, match="max_epochs"):
        table.add(dict(max_epochs=0))
    assert len(table()) == before


def test_config_hash_is_stable_and_distinct(pipeline):
    table = pipeline.predictive.PredictorConfig
    a = table.add(dict(hidden_channels=7))
    assert (
        table.add(dict(hidden_channels=7)) == a == table.add({**fit.default_predictor_config(), "hidden_channels": 7})
    )
    assert table.add(dict(hidden_channels=9)) != a
    assert table.config_of(a)["hidden_channels"] == 7
