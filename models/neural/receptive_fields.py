"""The simulated V1 units: their Gabor receptive fields, divisive normalization and behavioural gain.

Each unit is a linear-nonlinear model of a mouse V1 neuron (the simulator's module docstring gives the
whole response model): ``rate = gain * (baseline + amplitude * drive / (c50 + local contrast))``, where
``drive`` is a Gabor filter applied to the image (simple cells rectify one phase, complex cells take the
quadrature energy) and the pool is the RMS contrast around the receptive-field centre.

Geometry: the 64-pixel image width is assumed to span 120 degrees of visual field, so
``PIXELS_PER_DEGREE = 64 / 120`` (0.53 px/deg, 1.9 deg/px). Preferred spatial frequencies are log-normal
around 0.04 cycles/deg (a 25-degree period, 13 px), receptive-field envelopes have a Gaussian sigma around
5.5 degrees (a 10-20 degree receptive field), as reported for mouse V1 (Niell & Stryker 2008).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .stimuli import IMAGE_SHAPE, local_contrast, shift_images, to_contrast

PIXELS_PER_DEGREE = 64 / 120
RUN_SCALE_CM_S = 20.0  # running speed that multiplies the log gain by gain_running


@dataclass
class UnitPopulation:
    """Per-unit parameters, all (n_units,) arrays. Pixel coordinates: x to the right, y down."""

    center_x: np.ndarray  # receptive-field centre, px
    center_y: np.ndarray
    sigma: np.ndarray  # envelope sigma across the bars, px
    aspect: np.ndarray  # envelope sigma along the bars / across (>= 1)
    orientation: np.ndarray  # direction of the carrier's modulation, radians
    spatial_frequency: np.ndarray  # cycles per pixel (cycles/deg = this * PIXELS_PER_DEGREE)
    phase: np.ndarray  # radians
    is_complex: np.ndarray  # bool: quadrature energy instead of a rectified single phase
    c50: np.ndarray  # semi-saturation contrast of the divisive normalization
    amplitude: np.ndarray
    baseline: np.ndarray
    gain_running: np.ndarray  # log gain per RUN_SCALE_CM_S of running speed
    gain_pupil: np.ndarray  # log gain per standard deviation of pupil dilation
    fano: np.ndarray  # noise variance / rate

    @property
    def n_units(self) -> int:
        return self.center_x.size

    def filters(self, units: np.ndarray | None = None) -> Filters:
        """Gabor filters of ``units`` (default all) as one (H*W, n + n_complex) float32 matrix.

        One dense matmul beats cutting filters to their receptive-field windows here: float32 GEMM runs
        at several times the flop rate of many narrow products, which cancels the saved flops.
        """
        units = np.arange(self.n_units) if units is None else np.asarray(units)
        complex_pos = np.flatnonzero(self.is_complex[units])
        unit = np.concatenate([units, units[complex_pos]])
        phase = np.concatenate([self.phase[units], self.phase[units[complex_pos]] + np.pi / 2])
        yy, xx = np.mgrid[0 : IMAGE_SHAPE[0], 0 : IMAGE_SHAPE[1]].astype(np.float32)
        weights = np.empty((yy.size, unit.size), dtype=np.float32)
        col = lambda v: np.asarray(v, dtype=np.float32)[:, None, None]  # noqa: E731
        for start in range(0, unit.size, 1024):
            part = slice(start, start + 1024)
            a = unit[part]
            dx, dy = xx[None] - col(self.center_x[a]), yy[None] - col(self.center_y[a])
            cos, sin = col(np.cos(self.orientation[a])), col(np.sin(self.orientation[a]))
            across, along = dx * cos + dy * sin, -dx * sin + dy * cos
            s = col(self.sigma[a])
            envelope = np.exp(-0.5 * (across**2 / s**2 + along**2 / (s * col(self.aspect[a])) ** 2))
            gabor = envelope * np.cos(2 * np.pi * col(self.spatial_frequency[a]) * across + col(phase[part]))
            # Zero mean (mean luminance does not drive V1) and unit norm; flush the envelope's far tail
            # to zero, denormal floats would stall the matmul.
            gabor -= envelope * (gabor.sum((1, 2), keepdims=True) / envelope.sum((1, 2), keepdims=True))
            gabor = gabor.reshape(a.size, -1)
            gabor /= np.linalg.norm(gabor, axis=1, keepdims=True) + 1e-12
            gabor[np.abs(gabor) < 1e-7] = 0
            weights[:, part] = gabor.T
        return Filters(weights, complex_pos)

    def filter_image(self, unit: int, quadrature: bool = False) -> np.ndarray:
        """(36, 64) float32 picture of one unit's phase-0 (or quadrature) filter, for probes and plots."""
        if quadrature and not self.is_complex[unit]:
            raise ValueError(f"unit {unit} is a simple cell: it has no quadrature filter")
        return self.filters(np.array([unit])).weights[:, int(quadrature)].reshape(IMAGE_SHAPE).copy()

    def pixel_index(self) -> np.ndarray:
        """Flat index of the pixel nearest each receptive-field centre (where the pool is read)."""
        h, w = IMAGE_SHAPE
        row = np.clip(np.rint(self.center_y), 0, h - 1).astype(np.intp)
        col = np.clip(np.rint(self.center_x), 0, w - 1).astype(np.intp)
        return row * w + col

    def gain(self, running: np.ndarray, dilation_z: np.ndarray) -> np.ndarray:
        """(n_states, n_units) multiplicative gain for running speeds (cm/s) and dilation z-scores."""
        speed = np.asarray(running, np.float32)[:, None] / RUN_SCALE_CM_S
        log_gain = speed * self.gain_running.astype(np.float32)
        log_gain += np.asarray(dilation_z, np.float32)[:, None] * self.gain_pupil.astype(np.float32)
        return np.exp(log_gain)

    def rates(
        self,
        images: np.ndarray,
        shifts: np.ndarray | None = None,
        gains: np.ndarray | None = None,
        filters: Filters | None = None,
        chunk: int = 1024,
    ) -> np.ndarray:
        """Noise-free rates (n_images, n_units) float32 for uint8 ``images`` seen with RF ``shifts``
        ((n, 2) px, default none) and ``gains`` ((n, n_units), default 1). Chunked float32 matmuls."""
        images = np.asarray(images)
        filters = self.filters() if filters is None else filters
        n = len(images)
        pool_pixel = self.pixel_index()
        baseline, amplitude, c50 = (p.astype(np.float32) for p in (self.baseline, self.amplitude, self.c50))
        out = np.empty((n, self.n_units), dtype=np.float32)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            x = to_contrast(images[start:stop])
            if shifts is not None:
                x = shift_images(x, shifts[start:stop])
            pool = local_contrast(x).reshape(stop - start, -1)[:, pool_pixel]
            rate = baseline + amplitude * filters.drive(x) / (c50 + pool)
            out[start:stop] = rate if gains is None else rate * gains[start:stop]
        return out


@dataclass
class Filters:
    """(H*W, n_units + n_complex) weights: the phase-0 filter of every unit, then the quadrature
    (phase + 90 deg) filter of each complex unit; ``complex_pos`` indexes those units."""

    weights: np.ndarray
    complex_pos: np.ndarray

    def drive(self, contrast: np.ndarray) -> np.ndarray:
        """(n, n_units): simple cells relu(q0), complex cells quadrature energy sqrt(q0^2 + q90^2)."""
        q = contrast.reshape(len(contrast), -1) @ self.weights
        n_units = self.weights.shape[1] - self.complex_pos.size
        drive = np.maximum(q[:, :n_units], 0)
        drive[:, self.complex_pos] = np.hypot(q[:, self.complex_pos], q[:, n_units:])
        return drive


def sample_population(n_units: int, rng: np.random.Generator) -> UnitPopulation:
    """Draw mouse-V1-like units. The Fano factor is set later from each unit's response statistics."""
    h, w = IMAGE_SHAPE
    ppd = PIXELS_PER_DEGREE
    sf_cpd = np.clip(0.04 * np.exp(0.5 * rng.standard_normal(n_units)), 0.01, 0.16)
    sigma_deg = np.clip(5.5 * np.exp(0.3 * rng.standard_normal(n_units)), 2.5, 12.0)
    return UnitPopulation(
        # The monitor is placed so that the imaged population's receptive fields sit mid-screen.
        center_x=np.clip((w - 1) / 2 + 8.0 * rng.standard_normal(n_units), 2, w - 3),
        center_y=np.clip((h - 1) / 2 + 5.0 * rng.standard_normal(n_units), 2, h - 3),
        sigma=sigma_deg * ppd,
        aspect=1 + np.abs(0.5 * rng.standard_normal(n_units)),
        orientation=rng.uniform(0, np.pi, n_units),
        spatial_frequency=sf_cpd / ppd,
        phase=rng.uniform(0, 2 * np.pi, n_units),
        is_complex=rng.random(n_units) < 0.5,
        c50=0.15 * np.exp(0.4 * rng.standard_normal(n_units)),
        amplitude=np.exp(0.5 * rng.standard_normal(n_units)),
        baseline=0.1 * np.exp(0.5 * rng.standard_normal(n_units)),
        gain_running=0.6 + 0.4 * rng.standard_normal(n_units),  # mostly enhanced by locomotion
        gain_pupil=0.15 + 0.1 * rng.standard_normal(n_units),
        fano=np.ones(n_units),
    )
