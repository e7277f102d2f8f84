"""The simulated mouse V1 cohort: its data look like two-photon scans and its truth is what it claims."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from neureg.experiments import simulate as simulated_cohort
from neureg.ingestion.folder import read_scan_folder
from neureg.models.digests import image_hash
from neureg.models.neural import receptive_fields, stimuli
from neureg.models.neural import simulator as sim
from neureg.models.neural.oracle import oracle_stats

N_UNITS, N_IMAGES, N_ORACLE, N_REPEATS = 300, 140, 40, 5


@pytest.fixture(scope="module")
def scan() -> sim.SimulatedScan:
    return sim.simulate_scan(N_UNITS, N_IMAGES, N_ORACLE, N_REPEATS, seed=3, image_seed=0)


@pytest.fixture(scope="module")
def long_scan() -> sim.SimulatedScan:
    """Few units, many repeats: long enough for running bouts and precise estimates."""
    return sim.simulate_scan(200, n_images=60, n_oracle=60, n_repeats=100, seed=5)


def test_shapes_and_dtypes(scan):
    n_trials = N_ORACLE * N_REPEATS + (N_IMAGES - N_ORACLE)
    assert scan.images.shape == (N_IMAGES, 36, 64) and scan.images.dtype == np.uint8
    assert len({im.tobytes() for im in scan.images}) == N_IMAGES, "images must be distinct"
    assert scan.trial_image.shape == (n_trials,) and scan.trial_image.dtype == np.int64
    counts = np.bincount(scan.trial_image, minlength=N_IMAGES)
    assert np.all(counts[:N_ORACLE] == N_REPEATS) and np.all(counts[N_ORACLE:] == 1)
    assert scan.responses.shape == (n_trials, N_UNITS) and scan.responses.dtype == np.float32
    assert np.all(np.isfinite(scan.responses)) and scan.responses.min() >= 0
    assert scan.behavior.shape == (n_trials, 3) and scan.behavior.dtype == np.float32
    assert scan.pupil_center.shape == (n_trials, 2) and scan.pupil_center.dtype == np.float32
    assert scan.true_rates.shape == (N_IMAGES, N_UNITS) and scan.true_rates.min() > 0
    for values in (scan.signal_var, scan.noise_var, scan.true_snr):
        assert values.shape == (N_UNITS,) and np.all(values > 0)
    np.testing.assert_allclose(scan.true_snr, scan.signal_var / scan.noise_var)
    assert len(np.unique(scan.unit_ids)) == N_UNITS
    assert scan.cell_motor_coordinates.shape == (N_UNITS, 3)


def test_trials_are_shuffled(scan):
    first_block = scan.trial_image[: N_ORACLE * N_REPEATS]
    assert (first_block >= N_ORACLE).any(), "oracle trials should be interleaved with the others"
    assert not np.all(np.diff(scan.trial_image) >= 0)


def test_units_are_mouse_like(scan):
    pop = scan.population
    sf_cpd = pop.spatial_frequency * receptive_fields.PIXELS_PER_DEGREE
    assert 0.025 < np.median(sf_cpd) < 0.06
    sigma_deg = pop.sigma / receptive_fields.PIXELS_PER_DEGREE
    assert 4 < np.median(sigma_deg) < 7  # a 10-20 degree receptive field
    assert 0.3 < pop.is_complex.mean() < 0.7


def test_reliability_varies_widely_and_most_units_are_unreliable(scan):
    q05, q95 = np.quantile(scan.true_snr, [0.05, 0.95])
    assert q95 / q05 > 20
    assert np.mean(scan.true_snr < 0.1) > 0.35
    assert np.mean(scan.true_snr > 0.5) > 0.02


def test_truth_matches_estimates_from_many_repeats(long_scan):
    """The true sigma^2 and eta^2 are what equation 1 estimates (sigma^2 plus eta^2 / T for the signal)."""
    stats = oracle_stats(long_scan.responses, long_scan.trial_image)
    expected_signal = long_scan.signal_var + long_scan.noise_var / 100
    assert stats.signal_var.sum() / expected_signal.sum() == pytest.approx(1, abs=0.08)
    assert stats.noise_var.sum() / long_scan.noise_var.sum() == pytest.approx(1, abs=0.08)
    assert np.median(stats.noise_var / long_scan.noise_var) == pytest.approx(1, abs=0.1)


def test_running_raises_the_gain(long_scan):
    running = long_scan.behavior[:, 2]
    moving, still = long_scan.responses[running > 5], long_scan.responses[running < 1]
    assert len(moving) > 300 and len(still) > 300, "a long scan has running bouts and rest"
    assert moving.mean() / still.mean() > 1.3
    log_ratio = np.log(moving.mean(0) / still.mean(0))
    assert np.corrcoef(log_ratio, long_scan.population.gain_running)[0, 1] > 0.5


def test_behavior_has_bouts_and_slow_drifts():
    trace = sim.simulate_behavior(20_000, np.random.default_rng(0), eye_rest=np.array([160.0, 115.0]))
    dilation, running = trace["behavior"][:, 0], trace["behavior"][:, 2]

    def autocorr(x, lag):
        x = x - x.mean()
        return float((x[lag:] * x[:-lag]).mean() / x.var())

    assert 0.1 < np.mean(running > 5) < 0.45
    assert autocorr(running, 5) > 0.5 and autocorr(dilation, 10) > 0.5
    assert dilation[running > 5].mean() > dilation[running < 1].mean() + 1
    np.testing.assert_allclose(trace["behavior"][:, 1], np.gradient(trace["behavior"][:, 0]), atol=1e-4)
    assert trace["pupil_center"].std(0).min() > 0.5


def test_rf_shift_follows_pupil_center(scan):
    expected = (scan.pupil_center - scan.eye_rest) @ scan.shift_per_pupil.T
    np.testing.assert_allclose(scan.trial_shift, expected, atol=1e-4)
    assert scan.trial_shift.std(0).min() > 0.3

    pop = scan.population
    centred = (np.abs(pop.center_x - 31.5) < 4) & (np.abs(pop.center_y - 17.5) < 3) & ~pop.is_complex
    unit = int(np.flatnonzero(centred)[0])
    pattern = pop.filter_image(unit)
    move = np.array([4.0, 3.0])  # (dx, dy) px

    def as_image(x):
        return np.clip(np.rint(127.5 + 120 * x / np.abs(x).max()), 0, 255).astype(np.uint8)

    at_rf, moved = as_image(pattern), as_image(ndimage.shift(pattern, move[::-1], order=0, mode="nearest"))
    probes = np.stack([at_rf, moved, moved])
    shifts = np.array([[0, 0], [0, 0], move])
    rates = pop.rates(probes, shifts=shifts)[:, unit]
    assert rates[1] < 0.7 * rates[0], "the moved pattern is outside the unshifted receptive field"
    assert rates[2] == pytest.approx(rates[0], rel=0.1), "the shifted receptive field finds it again"


def test_shift_images_matches_scipy():
    images = stimuli.to_contrast(stimuli.natural_image_set(8, seed=1))
    shifts = np.random.default_rng(0).normal(0, 2, (8, 2))
    expected = np.stack([ndimage.shift(im, -s[::-1], order=1, mode="nearest") for im, s in zip(images, shifts)])
    np.testing.assert_allclose(stimuli.shift_images(images, shifts), expected, atol=1e-5)


def naive_gabor(pop, unit, phase_offset=0.0):
    """The receptive field written out pixel by pixel: zero-mean, unit-norm Gabor."""
    values, envelope = np.zeros((36, 64)), np.zeros((36, 64))
    for y in range(36):
        for x in range(64):
            dx, dy = x - pop.center_x[unit], y - pop.center_y[unit]
            across = dx * np.cos(pop.orientation[unit]) + dy * np.sin(pop.orientation[unit])
            along = -dx * np.sin(pop.orientation[unit]) + dy * np.cos(pop.orientation[unit])
            sigma, sigma_along = pop.sigma[unit], pop.sigma[unit] * pop.aspect[unit]
            envelope[y, x] = np.exp(-0.5 * (across**2 / sigma**2 + along**2 / sigma_along**2))
            phase = 2 * np.pi * pop.spatial_frequency[unit] * across + pop.phase[unit] + phase_offset
            values[y, x] = envelope[y, x] * np.cos(phase)
    values -= envelope * values.sum() / envelope.sum()
    return values / np.linalg.norm(values)


def test_filters_and_drive_follow_the_definition(scan):
    pop = scan.population
    contrast = stimuli.to_contrast(scan.images[:10])
    drive = pop.filters().drive(contrast)
    for unit in range(0, N_UNITS, 37):
        phase0 = naive_gabor(pop, unit)
        np.testing.assert_allclose(pop.filter_image(unit), phase0, atol=1e-5)
        q0 = (contrast * phase0).sum((1, 2))
        if pop.is_complex[unit]:
            quadrature = naive_gabor(pop, unit, np.pi / 2)
            np.testing.assert_allclose(pop.filter_image(unit, quadrature=True), quadrature, atol=1e-5)
            expected = np.hypot(q0, (contrast * quadrature).sum((1, 2)))
        else:
            expected = np.maximum(q0, 0)
        np.testing.assert_allclose(drive[:, unit], expected, atol=1e-4)


def test_divisive_normalization_saturates_with_contrast(scan):
    pop = scan.population
    base = stimuli.to_contrast(scan.images[:20])
    rates = [pop.rates(np.clip(np.rint(127.5 + 127.5 * c * base), 0, 255).astype(np.uint8)) for c in (0.25, 0.5, 1.0)]
    low, mid, high = (r - pop.baseline.astype(np.float32) for r in rates)
    assert np.median(high.sum(0) / mid.sum(0)) < np.median(mid.sum(0) / low.sum(0)) < 2


def test_seeds_reproduce_and_differ():
    images = stimuli.natural_image_set(30, seed=2)
    a = sim.simulate_scan(50, n_oracle=10, n_repeats=3, seed=7, images=images)
    b = sim.simulate_scan(50, n_oracle=10, n_repeats=3, seed=7, images=images)
    c = sim.simulate_scan(50, n_oracle=10, n_repeats=3, seed=8, images=images)
    np.testing.assert_array_equal(a.responses, b.responses)
    np.testing.assert_array_equal(a.trial_image, b.trial_image)
    assert not np.array_equal(a.responses, c.responses)
    assert not np.allclose(a.population.center_x, c.population.center_x)


def test_image_set_is_seeded_textured_and_prefix_stable():
    small, large = stimuli.natural_image_set(20, seed=4), stimuli.natural_image_set(60, seed=4)
    np.testing.assert_array_equal(small, large[:20])
    assert not np.array_equal(small, stimuli.natural_image_set(20, seed=5))
    assert large.reshape(60, -1).std(1).min() >= 10


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_images": 10, "n_oracle": 20}, "cannot exceed n_images"),
        ({"n_repeats": 1}, "n_repeats must be at least 2"),
        ({"n_oracle": 1}, "n_oracle must be at least 2"),
        ({"n_units": 0}, "n_units must be at least 1"),
    ],
)
def test_bad_sizes_raise(kwargs, message):
    args = {"n_units": 10, "n_images": 30, "n_oracle": 10, "n_repeats": 3} | kwargs
    with pytest.raises(ValueError, match=message):
        sim.simulate_scan(**args)


def test_bad_images_raise():
    with pytest.raises(ValueError, match="uint8"):
        sim.simulate_scan(10, n_oracle=2, images=np.zeros((5, 36, 64), dtype=np.float32))
    with pytest.raises(ValueError, match="disagrees"):
        sim.simulate_scan(10, n_images=6, n_oracle=2, images=np.zeros((5, 36, 64), dtype=np.uint8))


# ------------------------------------------------------------------------------------------- cohort
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    folders = simulated_cohort.simulate_cohort(
        out, n_mice=2, n_days=2, scans_per_day=1, n_units=30, n_images=25, n_oracle=8, n_repeats=3, seed=11
    )
    return out, folders


def test_cohort_writes_valid_scan_folders(cohort):
    out, folders = cohort
    assert len(folders) == 4 and len({f.name for f in folders}) == 4
    scans = [read_scan_folder(folder) for folder in folders]
    assert sorted({s.mouse for s in scans}) == ["sim_m1", "sim_m2"]
    assert len({(s.mouse, s.session, s.scan) for s in scans}) == 4
    for data in scans:
        assert data.area == "V1" and data.n_trials == 8 * 3 + 17 and data.n_units == 30
        repeated = np.unique(data.trial_images, return_counts=True)[1] > 1
        assert repeated.sum() == 8
        assert set(data.tiers.tolist()) <= {"oracle", "train", "validation"}
        assert np.count_nonzero(data.tiers == "oracle") == 24


def test_cohort_shares_images_but_not_units(cohort):
    _, folders = cohort
    scans = [read_scan_folder(folder) for folder in folders]
    oracle_sets = [{h for h, t in zip(s.trial_images, s.tiers) if t == "oracle"} for s in scans]
    assert all(o == oracle_sets[0] for o in oracle_sets)
    assert all(set(s.images) == set(scans[0].images) for s in scans)
    truths = [simulated_cohort.load_ground_truth(folder) for folder in folders]
    assert not np.allclose(truths[0]["rf_center_x"], truths[1]["rf_center_x"])


def test_ground_truth_lies_beside_the_scan_folders(cohort):
    out, folders = cohort
    for folder in folders:
        inside = [p.name for p in folder.rglob("*")]
        assert not any("truth" in name or name.endswith(".npz") for name in inside)
        assert (out / simulated_cohort.GROUND_TRUTH_DIR / f"{folder.name}.npz").is_file()
        data, truth = read_scan_folder(folder), simulated_cohort.load_ground_truth(folder)
        np.testing.assert_array_equal(truth["unit_ids"], data.unit_ids)
        assert set(truth["image_hash"].tolist()) == set(data.images)
        pixels = np.load(out / simulated_cohort.GROUND_TRUTH_DIR / "images.npy")
        assert [image_hash(p) for p in pixels] == truth["image_hash"].tolist()
        assert truth["true_rates"].shape == (25, 30) and truth["is_oracle"].sum() == 8
    with pytest.raises(FileNotFoundError):
        simulated_cohort.load_ground_truth(out / "not_a_scan")


def test_cohort_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="n_mice"):
        simulated_cohort.simulate_cohort(tmp_path, n_mice=0)
    with pytest.raises(ValueError, match="cannot exceed"):
        simulated_cohort.simulate_cohort(tmp_path, n_images=5, n_oracle=10)
