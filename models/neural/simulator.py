"""A simulated mouse V1 cohort whose truth is known, written as ordinary scan folders.

No real recordings reach these machines, so every stage is run and tested on a cohort simulated here.
Each unit is a linear-nonlinear model of a mouse V1 neuron:

    rate = gain(behaviour) * (baseline + amplitude * drive / (c50 + local contrast))

- ``drive`` is a Gabor receptive field applied to the image seen through the eye: simple cells rectify one
  phase (``relu(q0)``), complex cells take the quadrature energy (``sqrt(q0^2 + q1^2)``).
- The denominator is divisive normalization by the RMS contrast of the image around the receptive field.
- ``gain`` is multiplicative, ``exp(gain_running * speed / 20 cm/s + gain_pupil * dilation z-score)``.
- The eye position moves every receptive field together: the receptive-field shift in image pixels is
  ``shift_per_pupil @ (pupil_center - eye_rest)`` (a scan-level 2x2 map, as the predictive model's
  shifter assumes). It is applied by resampling the image: a unit at ``c`` sees the pixels at ``c + shift``.
- The response is gamma distributed around the rate with variance ``fano * rate`` (Poisson-like). Each
  unit's Fano factor is set from a log-normal target signal-to-noise ratio, so reliability varies over
  two orders of magnitude and most units are unreliable, as in two-photon data.

The pieces live beside this module: ``stimuli`` (natural-image crops, contrast, eye-movement resampling)
and ``receptive_fields`` (the units, their Gabor filters and gain; its docstring gives the geometry).
This module adds the behaviour process, trial layout, noise and the truth.

Truth. ``true_rates`` are noise-free rates at the mean behaviour and the resting eye. ``signal_var`` and
``noise_var`` are equation 1's sigma^2 and eta^2 for infinitely many repeats of this scan's oracle images:
with m_i = E[response | image i] and v_i = Var[response | image i] over behaviour, eye position and noise,
``signal_var = Var_i(m_i)`` (ddof=1 over the oracle images, as the estimator) and ``noise_var = E_i[v_i]``.
Eye position is independent of running and pupil size by construction, so E[gain * f(shift)] factorizes;
E over gain uses 4096 behaviour states and E over shift 24 eye positions of a long reference trace drawn
from the same behaviour process. ``true_snr = signal_var / noise_var`` (the square of the true w_a).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import signal

from .receptive_fields import PIXELS_PER_DEGREE, Filters, UnitPopulation, sample_population
from .stimuli import IMAGE_SHAPE, natural_image_set

REFERENCE_TRIALS = 50_000  # length of the behaviour trace the truth's expectations are taken over
GAIN_SAMPLES = 4096
SHIFT_SAMPLES = 24


# -------------------------------------------------------------------------------------- behaviour
DILATION_MEAN_PX, DILATION_SD_PX = 14.0, 3.0  # reference scale of pupil radius for the gain's z-score


def _ar1(n: int, tau: float, rng: np.random.Generator, drive: np.ndarray | None = None) -> np.ndarray:
    """Stationary unit-variance AR(1) with time constant ``tau`` trials (plus an optional extra input)."""
    a = np.exp(-1.0 / tau)
    eps = np.sqrt(1 - a * a) * rng.standard_normal(n)
    eps[0] = rng.standard_normal()
    if drive is not None:
        eps = eps + drive
    return signal.lfilter([1.0], [1.0, -a], eps)


def _running_bouts(n: int, rng: np.random.Generator, mean_still: float = 90, mean_run: float = 30):
    """Alternating still and running bouts of geometric length; each bout runs at its own speed."""
    running = np.zeros(n, dtype=bool)
    speed = np.zeros(n)
    t, state = 0, rng.random() < mean_run / (mean_still + mean_run)
    while t < n:
        length = rng.geometric(1 / (mean_run if state else mean_still))
        if state:
            running[t : t + length] = True
            speed[t : t + length] = 12.0 * np.exp(0.4 * rng.standard_normal())
        t, state = t + length, not state
    return running, speed


def simulate_behavior(n_trials: int, rng: np.random.Generator, eye_rest: np.ndarray) -> dict:
    """Per-trial behaviour, one trial ~1 s (0.5 s image and a grey gap).

    Running comes in bouts (25% of the time, ~30 trials each, 5-25 cm/s with fluctuations, smoothed onsets);
    pupil dilation drifts slowly (AR time constant 80 trials) and rises with arousal during running; the
    pupil centre drifts around ``eye_rest`` with occasional saccade-like jumps that relax back. Eye
    position is drawn independently of running and dilation (the truth's expectations rely on it).
    """
    running_state, bout_speed = _running_bouts(n_trials, rng)
    target = np.where(running_state, bout_speed * (1 + 0.15 * _ar1(n_trials, 3, rng)), 0.0)
    smooth = lambda x, tau: signal.lfilter([1 - np.exp(-1 / tau)], [1, -np.exp(-1 / tau)], x)  # noqa: E731
    running = np.maximum(smooth(target, 2.0), 0) + np.abs(0.2 * rng.standard_normal(n_trials))
    arousal = smooth(running_state.astype(float), 10.0)
    dilation = np.maximum(11.5 + 2.0 * _ar1(n_trials, 80, rng) + 6.0 * arousal, 3.0)
    jumps = (rng.random((n_trials, 2)) < 0.03) * rng.normal(0, 4.0, (n_trials, 2))
    eye = np.stack([_ar1(n_trials, 10, rng, drive=jumps[:, k] / 1.5) for k in range(2)], axis=1) * 1.5
    behavior = np.stack([dilation, np.gradient(dilation), running], axis=1).astype(np.float32)
    return {"behavior": behavior, "pupil_center": (eye_rest + eye).astype(np.float32)}


# -------------------------------------------------------------------------------------------- scan
@dataclass
class SimulatedScan:
    """One simulated scan in trial layout plus its ground truth (see the module docstring)."""

    images: np.ndarray  # (n_images, 36, 64) uint8, distinct; the first n_oracle are the oracle images
    n_oracle: int
    trial_image: np.ndarray  # (n_trials,) int64 index into images, shuffled order
    responses: np.ndarray  # (n_trials, n_units) float32
    behavior: np.ndarray  # (n_trials, 3) float32: pupil dilation (px), its derivative (px/trial), running (cm/s)
    pupil_center: np.ndarray  # (n_trials, 2) float32, camera px (x, y)
    trial_shift: np.ndarray  # (n_trials, 2) float32 receptive-field shift (dx, dy) in image px
    true_rates: np.ndarray  # (n_images, n_units) float32 at mean behaviour and the resting eye
    signal_var: np.ndarray  # (n_units,) true sigma^2 over the oracle images (equation 1)
    noise_var: np.ndarray  # (n_units,) true eta^2 over the oracle images (equation 1)
    true_snr: np.ndarray  # (n_units,) signal_var / noise_var
    population: UnitPopulation
    shift_per_pupil: np.ndarray  # (2, 2) image px of RF shift per camera px of pupil displacement
    eye_rest: np.ndarray  # (2,) pupil centre at which the RFs are unshifted
    mean_behavior: np.ndarray  # (3,) stationary mean behaviour (true_rates use its gain)
    unit_ids: np.ndarray  # (n_units,) int64
    cell_motor_coordinates: np.ndarray  # (n_units, 3) um, retinotopic: position follows the RF centre
    seed: int
    image_seed: int

    @property
    def n_trials(self) -> int:
        return self.trial_image.size

    @property
    def n_units(self) -> int:
        return self.population.n_units

    def trial_gain(self) -> np.ndarray:
        """(n_trials, n_units) multiplicative gain each trial's behaviour set."""
        return self.population.gain(self.behavior[:, 2], _dilation_z(self.behavior[:, 0]))


def _dilation_z(dilation: np.ndarray) -> np.ndarray:
    return (np.asarray(dilation, np.float32) - DILATION_MEAN_PX) / DILATION_SD_PX


def check_sizes(n_units: int, n_images: int, n_oracle: int, n_repeats: int) -> None:
    """Refuse sizes the truth cannot be computed for, before minutes of simulation (cohorts check too)."""
    if n_units < 1:
        raise ValueError(f"n_units must be at least 1, got {n_units}")
    if n_oracle < 2:
        raise ValueError(
            f"n_oracle must be at least 2 (signal variance is a variance over oracle images), got {n_oracle}"
        )
    if n_oracle > n_images:
        raise ValueError(
            f"n_oracle ({n_oracle}) cannot exceed n_images ({n_images}): oracle images are part of the image set"
        )
    if n_repeats < 2:
        raise ValueError(f"n_repeats must be at least 2 (noise variance needs repeated trials), got {n_repeats}")


def _fano_for_target_snr(true_rates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-unit Fano factors that make var(rates over images) / (fano * mean rate) hit a log-normal
    target SNR (median 0.1; 5% of units below 0.014, 5% above 0.7): most units unreliable, a few good."""
    target_snr = np.clip(0.1 * np.exp(1.2 * rng.standard_normal(true_rates.shape[1])), 1e-3, 10)
    rate_mean, rate_var = true_rates.mean(0, dtype=np.float64), true_rates.var(0, dtype=np.float64)
    return np.clip(rate_var / (target_snr * rate_mean), 1e-3, 1e4)


def _oracle_truth(
    population: UnitPopulation,
    filters: Filters,
    oracle_images: np.ndarray,
    reference: dict,
    eye_rest: np.ndarray,
    shift_per_pupil: np.ndarray,
    rng: np.random.Generator,
):
    """Equation 1's sigma^2 and eta^2 over the oracle images for infinitely many repeats.

    rate = gain(b) * f_i(shift); the response has mean rate and variance fano * rate. With the eye
    independent of gain: m_i = E[g] E_s[f_i], v_i = E[g^2] E_s[f_i^2] - m_i^2 + fano * m_i, the
    expectations taken over states of the reference behaviour trace.
    """
    n_oracle, n_units = len(oracle_images), population.n_units
    picks = rng.choice(len(reference["behavior"]), GAIN_SAMPLES + SHIFT_SAMPLES, replace=False)
    states = reference["behavior"][picks[:GAIN_SAMPLES]]
    gains = population.gain(states[:, 2], _dilation_z(states[:, 0])).astype(np.float64)
    shifts = (reference["pupil_center"][picks[GAIN_SAMPLES:]] - eye_rest) @ shift_per_pupil.T
    shifted = population.rates(
        np.tile(oracle_images, (SHIFT_SAMPLES, 1, 1)), filters=filters, shifts=np.repeat(shifts, n_oracle, axis=0)
    )
    shifted = shifted.reshape(SHIFT_SAMPLES, n_oracle, n_units).astype(np.float64)
    m = gains.mean(0) * shifted.mean(0)
    v = (gains**2).mean(0) * (shifted**2).mean(0) - m**2 + population.fano * m
    return m.var(0, ddof=1), v.mean(0)


def simulate_scan(
    n_units: int = 1000,
    n_images: int | None = None,
    n_oracle: int = 100,
    n_repeats: int = 10,
    seed: int = 0,
    images: np.ndarray | None = None,
    image_seed: int = 0,
) -> SimulatedScan:
    """Simulate one scan: ``n_images`` distinct images (default 1100, or ``len(images)``), of which the first
    ``n_oracle`` are shown ``n_repeats`` times and the rest once, in shuffled order, to ``n_units`` units.

    The paper's scans are ``n_images=5100, n_oracle=100, n_repeats=10, n_units=8000`` (6000 trials).
    Pass ``images`` to share one image set across scans; otherwise it is ``natural_image_set(n_images,
    image_seed)``. ``seed`` fixes the units, behaviour, trial order and noise.
    """
    if images is not None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
            raise ValueError(
                f"images must be uint8 (n, {IMAGE_SHAPE[0]}, {IMAGE_SHAPE[1]}), got {images.dtype} {images.shape}"
            )
        if n_images is not None and n_images != len(images):
            raise ValueError(f"n_images ({n_images}) disagrees with the {len(images)} images given")
        n_images = len(images)
    n_images = 1100 if n_images is None else n_images
    check_sizes(n_units, n_images, n_oracle, n_repeats)
    if images is None:
        images = natural_image_set(n_images, image_seed)

    rng = np.random.default_rng(seed)
    population = sample_population(n_units, rng)
    filters = population.filters()
    eye_rest = np.array([rng.uniform(140, 180), rng.uniform(100, 130)])
    angle = rng.normal(0, 0.2)
    shift_per_pupil = 0.35 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])

    # Truth at the resting eye and the stationary mean behaviour of a long reference trace.
    reference = simulate_behavior(REFERENCE_TRIALS, np.random.default_rng([seed, 1]), eye_rest)
    mean_behavior = reference["behavior"].mean(0)
    rest_gain = population.gain(mean_behavior[2:3], _dilation_z(mean_behavior[0:1]))
    true_rates = population.rates(images, gains=np.broadcast_to(rest_gain, (n_images, n_units)), filters=filters)

    population.fano = _fano_for_target_snr(true_rates, rng)
    signal_var, noise_var = _oracle_truth(
        population, filters, images[:n_oracle], reference, eye_rest, shift_per_pupil, np.random.default_rng([seed, 2])
    )

    # Trials: oracle images n_repeats times, the rest once, shuffled.
    trial_image = np.concatenate([np.repeat(np.arange(n_oracle), n_repeats), np.arange(n_oracle, n_images)])
    trial_image = rng.permutation(trial_image).astype(np.int64)
    n_trials = trial_image.size
    observed = simulate_behavior(n_trials, rng, eye_rest)
    behavior, pupil_center = observed["behavior"], observed["pupil_center"]
    trial_shift = ((pupil_center - eye_rest) @ shift_per_pupil.T).astype(np.float32)
    gain = population.gain(behavior[:, 2], _dilation_z(behavior[:, 0]))
    rates = population.rates(images[trial_image], shifts=trial_shift, gains=gain, filters=filters)
    del gain
    fano = population.fano.astype(np.float32)
    responses = rng.standard_gamma(np.maximum(rates / fano, 1e-12), dtype=np.float32) * fano

    coordinates = np.stack(
        [
            population.center_x / PIXELS_PER_DEGREE * 25.0 + rng.normal(0, 40, n_units),  # ~25 um per degree
            population.center_y / PIXELS_PER_DEGREE * 25.0 + rng.normal(0, 40, n_units),
            rng.uniform(180, 320, n_units),  # depth below the pia, layer 2/3
        ],
        axis=1,
    )
    return SimulatedScan(
        images=images,
        n_oracle=n_oracle,
        trial_image=trial_image,
        responses=responses,
        behavior=behavior,
        pupil_center=pupil_center,
        trial_shift=trial_shift,
        true_rates=true_rates,
        signal_var=signal_var,
        noise_var=noise_var,
        true_snr=signal_var / noise_var,
        population=population,
        shift_per_pupil=shift_per_pupil,
        eye_rest=eye_rest,
        mean_behavior=mean_behavior,
        unit_ids=np.arange(1, n_units + 1, dtype=np.int64),
        cell_motor_coordinates=coordinates,
        seed=seed,
        image_seed=image_seed,
    )
