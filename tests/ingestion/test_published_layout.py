"""Published mouse-V1 folders (Sensorium 2022 / Lurz 2021 layout) ingest as published, checked on the tables.

The folders are written by the test suite itself (``publish_scan`` in conftest): no scan.json, identity in
the meta files and the folder name, trial files in random order, float32 images, competition tiers with
withheld (all-zero) responses, zips.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from neureg.errors import ScanFolderError
from neureg.ingestion import ingest_folder
from neureg.models.digests import image_hash


def _animal() -> int:
    return int(np.random.default_rng().integers(10**6, 10**7))


@pytest.fixture
def source(tmp_path, scan_folder_factory):
    return scan_folder_factory(tmp_path / "ours", n_images=40, n_oracle=5, repeats=4, n_units=10, seed=5)


def _trials(pipeline, key):
    return (pipeline.experiment.Trial & key).to_dicts(order_by="trial_idx")


def test_float32_folder_ingests_with_identity_order_layer_and_exact_pixels(
    pipeline, tmp_path, source, publish_scan_factory
):
    animal = _animal()
    folder = publish_scan_factory(source, tmp_path, animal, 17, 20)
    assert not (folder / "scan.json").exists()
    key = ingest_folder(folder, pipeline)
    assert key == {"mouse": str(animal), "session": 17, "scan_idx": 20}
    exp = pipeline.experiment
    scan = (exp.Scan & key).fetch1()
    assert scan["area"] == "V1" and (exp.Session & key).fetch1("session_date") is None
    assert set((exp.Scan.Unit & key).to_arrays("unit_layer")) == {"L2/3"}
    trials = _trials(pipeline, key)
    recorded = np.load(folder / "meta/trials/trial_idx.npy")
    assert [t["presentation"] for t in trials] == recorded.tolist()  # the real order, file i -> trial_idx[i]
    assert [t["recorded_trial"] for t in trials] == [str(r) for r in recorded]
    # float32 images holding 0..255 are stored exactly as uint8: the same hash as the original uint8 pixels
    for t in trials[:5]:
        original = np.load(source / f"data/images/{t['presentation']}.npy")
        assert t["image_hash"] == image_hash(original.reshape(original.shape[-2:]))
    tiers = np.load(folder / "meta/trials/tiers.npy")
    assert sorted({t["tier"] for t in trials}) == sorted({"oracle" if x == "test" else str(x) for x in tiers})
    assert not any(t["withheld"] for t in trials)


def test_uint8_and_float_copies_of_a_stimulus_are_one_image_row(pipeline, tmp_path, source, publish_scan_factory):
    exp = pipeline.experiment
    a = ingest_folder(publish_scan_factory(source, tmp_path / "a", _animal(), 1, 1), pipeline)
    before = len(exp.Image())
    b = ingest_folder(publish_scan_factory(source, tmp_path / "b", _animal(), 1, 1, images_as=np.uint8), pipeline)
    assert len(exp.Image()) == before
    assert set((exp.Trial & a).to_arrays("image_hash")) == set((exp.Trial & b).to_arrays("image_hash"))


def test_older_sets_with_non_integral_pixels_follow_one_rounding_rule(
    pipeline, tmp_path, scan_folder_factory, publish_scan_factory
):
    exp = pipeline.experiment
    source = scan_folder_factory(tmp_path / "ours", n_images=30, n_oracle=4, n_units=8, seed=6, shape=(36, 64))
    first = publish_scan_factory(source, tmp_path / "a", _animal(), 5, 9, image_gain=0.7)
    second = publish_scan_factory(source, tmp_path / "b", _animal(), 5, 9, image_gain=0.7, seed=1)
    pixels = np.load(first / "data/images/0.npy")
    assert pixels.shape == (1, 36, 64) and not np.all(pixels == np.round(pixels))  # the older sets: non-integral
    a, b = ingest_folder(first, pipeline), ingest_folder(second, pipeline)
    for key, folder in ((a, first), (b, second)):
        row = _trials(pipeline, key)[0]
        expected = np.clip(np.rint(np.load(folder / "data/images/0.npy")[0]), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(exp.load_images([row["image_hash"]])[0], expected)
    # the same stimulus, shown to two mice in another trial order, is one Image row
    assert set((exp.Trial & a).to_arrays("image_hash")) == set((exp.Trial & b).to_arrays("image_hash"))


def test_zip_as_downloaded_ingests_and_names_the_zip(pipeline, tmp_path, source, publish_scan_factory):
    animal = _animal()
    folder = publish_scan_factory(source, tmp_path / "unpacked", animal, 4, 22)
    archive = tmp_path / f"{folder.name}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(folder.rglob("*")):
            z.write(path, path.relative_to(folder.parent))
    key = ingest_folder(archive, pipeline)
    assert key == {"mouse": str(animal), "session": 4, "scan_idx": 22}
    assert (pipeline.experiment.Scan & key).fetch1("source_path") == str(archive)


def test_bad_zips_are_refused_with_the_member_named_and_nothing_written(
    pipeline, tmp_path, source, publish_scan_factory, subprocess_env, neureg_cli
):
    from neureg.upkeep.status import table_counts

    folder = publish_scan_factory(source, tmp_path / "unpacked", _animal(), 4, 23)
    np.save(folder / "data/responses/2.npy", np.full(3, np.nan, np.float32))
    broken = tmp_path / f"{folder.name}.zip"
    with zipfile.ZipFile(broken, "w") as z:
        for path in sorted(folder.rglob("*")):
            z.write(path, path.relative_to(folder.parent))
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../outside.npy", b"x")
    before = table_counts(pipeline)
    with pytest.raises(ScanFolderError, match=r"evil.zip: unsafe member '../outside.npy'"):
        ingest_folder(evil, pipeline)
    run = neureg_cli("ingest", str(broken), timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"{broken}!{folder.name}/data/responses/2.npy" in run.stderr, run.stderr
    assert table_counts(pipeline) == before and not (tmp_path / "outside.npy").exists()


def test_scan_json_that_disagrees_with_the_files_is_refused_naming_both(
    pipeline, tmp_path, source, publish_scan_factory
):
    animal = _animal()
    folder = publish_scan_factory(source, tmp_path, animal, 3, 7)
    (folder / "scan.json").write_text(json.dumps({"mouse": str(animal), "session": 4, "scan": 7, "depth": 200.0}))
    with pytest.raises(ScanFolderError, match=r"session disagrees: scan\.json says 4, the folder name .* says 3"):
        ingest_folder(folder, pipeline)
    (folder / "scan.json").write_text(json.dumps({"session": 3, "date": "2019-05-02", "depth": 200.0}))
    key = ingest_folder(folder, pipeline)  # agreeing scan.json adds what the files lack
    assert str((pipeline.experiment.Session & key).fetch1("session_date")) == "2019-05-02"
    assert (pipeline.experiment.Scan & key).fetch1("depth") == 200.0


def test_competition_scan_marks_withheld_trials_and_gets_no_oracle_row(
    pipeline, tmp_path, source, publish_scan_factory, subprocess_env, neureg_cli
):
    exp = pipeline.experiment
    folder = publish_scan_factory(
        source, tmp_path, _animal(), 9, 1, final_test=2, withhold=("test", "final_test"), hashed_trial_idx=True
    )
    key = ingest_folder(folder, pipeline)
    trials = _trials(pipeline, key)
    files_tier = np.load(folder / "meta/trials/tiers.npy")
    held_out = np.isin(files_tier, ("test", "final_test"))
    assert [t["withheld"] for t in trials] == held_out.tolist()
    assert {t["tier"] for t in trials if t["withheld"]} == {"oracle", "final_test"}
    assert all(len(t["recorded_trial"]) == 32 and t["presentation"] is None for t in trials)
    assert exp.load_responses(key).shape[0] == (~held_out).sum()  # no stage sees a withheld row
    run = neureg_cli("populate", "--stage", "oracle", timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not (pipeline.oracle.OracleStats & key)
    scan_text = f"{key['mouse']} / session 9 / scan 1: no oracle statistics: all"
    assert scan_text in run.stderr and "withheld responses" in run.stderr
    status = subprocess.run(
        [sys.executable, "-m", "neureg.cli", "status"], env=subprocess_env, capture_output=True, text=True, timeout=300
    )
    assert status.returncode == 0 and scan_text in status.stdout


def test_withheld_final_test_trials_enter_no_oracle_statistic(pipeline, tmp_path, source, publish_scan_factory):
    """Recorded test repeats count, withheld final_test repeats do not: checked on the stored tables."""
    from neureg.populate.stages import populate_stage

    folder = publish_scan_factory(source, tmp_path, _animal(), 2, 2, final_test=2, withhold=("final_test",))
    key = ingest_folder(folder, pipeline)
    populate_stage(pipeline, ["oracle"], keys=[key])
    exp, orc = pipeline.experiment, pipeline.oracle
    withheld = exp.Trial & key & "withheld"
    assert len(withheld) == 2 * 4  # two final_test images, four repeats each
    stats = (orc.OracleStats & key).fetch1()
    assert stats["n_oracle_images"] == 3 and stats["n_oracle_trials"] == 3 * 4
    withheld_images = set(withheld.to_arrays("image_hash"))
    used = set((orc.OracleStats.OracleImage & key).to_arrays("image_hash"))
    used |= set((orc.OracleSimilarity.Image & key).to_arrays("image_hash"))
    used |= set((orc.DataSimilarity.Image & key).to_arrays("image_hash"))
    assert used and not used & withheld_images


def test_published_cohort_runs_stability_and_the_neural_target_at_the_predictor_resolution(
    pipeline, tmp_path, publish_scan_factory
):
    """Several published scans sharing test images: scan stability and the neural_model target run across them."""
    from neureg.experiments.simulate import simulate_cohort
    from neureg.populate.stages import populate_stage
    from neureg.upkeep.scansets import register_oracle_groups

    sims = simulate_cohort(
        tmp_path / "sim", n_mice=3, n_days=1, scans_per_day=1, n_units=30, n_images=90, n_oracle=8, n_repeats=4, seed=11
    )
    animals = [_animal() for _ in sims]
    keys = [
        ingest_folder(publish_scan_factory(s, tmp_path / "pub", a, 6, 1, seed=i), pipeline)
        for i, (s, a) in enumerate(zip(sims, animals))
    ]
    populate_stage(pipeline, ["oracle"], keys=keys)  # OracleStats.oracle_set is the grouping scan sets use
    sets = [s for s in register_oracle_groups(pipeline) if {m["mouse"] for m in s["members"]} == set(map(str, animals))]
    assert len(sets) == 1 and sets[0]["n_scans"] == 3
    scan_set = {"scan_set": sets[0]["scan_set"]}
    populate_stage(pipeline, ["oracle"], keys=[scan_set])
    assert (pipeline.oracle.ScanStability & scan_set).fetch1("n_images") == 8
    pred = pipeline.predictive.PredictorConfig.add(
        dict(hidden_channels=4, max_epochs=2, patience=1, input_kernel=5, hidden_kernel=3, image_scale=0.5),
        label="half",
    )
    populate_stage(pipeline, ["predictive"], keys=[dict(k, **pred) for k in keys])
    hashes, predicted = (pipeline.predictive.ModelResponses & keys[0] & pred).labeled()
    assert predicted.shape == (90, 30)  # every image predicted, from 18x32 inputs (36x64 at scale 0.5)
    target = pipeline.similarity.TargetConfig.add(dict(method="neural_model", **pred))
    populate_stage(pipeline, ["similarity"], keys=[dict(k, **pred) for k in keys] + [dict(scan_set, **target)])
    row = (pipeline.similarity.SimilarityTarget & scan_set & target).fetch1()
    assert row["image_scale"] == 0.5 and row["n_images"] == 90 - 8
    assert len(pipeline.similarity.SimilarityTarget.Agreement & scan_set & target) == 3
