"""Similarity targets: one registered builder per method (docs/science.md §5, §7).

A target is a similarity matrix over the stimulus images that every scan of a set was shown. A method is
a function registered in ``TARGETS``: its keyword arguments are its config, and ``reads`` says which
inputs the table must fetch for it:

- ``"model"``: each member scan's S^model over the images (its predictor is named by ``predictor_hash``
  and ``predictor_seed``, which the table uses to find the model; the builder never reads them);
- ``"data"``: each member scan's single-trial S^data over the images;
- ``"images"``: the images themselves (uint8, n x H x W);
- nothing: only their number.

``condition`` is what a network regularized toward the method's target is called in every table and
figure, ``rank`` its place among the conditions there (``models.conditions``).

A builder returns a :class:`Target`: the matrix, the per-scan matrices it averaged (each compared with
the target in ``SimilarityTarget.Agreement``), and extra columns. Adding a method is one function here
plus its test; nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..digests import file_digest
from ..registry import NonNegativeInt, OpenUnit, PositiveInt, Registry, UnitInterval
from . import similarity
from .images import downsample

TARGETS = Registry("similarity method", key="method")


@dataclass
class TargetInputs:
    """What the table fetched for one target: the fields the method ``reads``, the rest None."""

    n_images: int
    images: np.ndarray | None = None  # uint8 (n, H, W) as stored, rows in target order
    per_scan: list[np.ndarray] | None = None  # S^model or S^data of each member scan, rows in target order
    image_scale: float = 1.0  # "model": the predictor's image_scale, the resolution S^model was computed at


@dataclass
class Target:
    """A computed target: its matrix, the per-scan matrices behind it, and extra columns to store."""

    matrix: np.ndarray
    image_scale: float = 1.0  # the resolution networks regularized toward it see the images at
    per_scan: list[np.ndarray] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def agreement(self) -> list[float]:
        """r(each scan's matrix, the target): how consistently the scans say the same thing."""
        return [similarity.similarity_agreement(s, self.matrix) for s in self.per_scan]


@TARGETS.register(reads="model", condition="Neural (model)", rank=8)
def neural_model(inputs: TargetInputs, predictor_hash: str = "", predictor_seed: NonNegativeInt = 0) -> Target:
    """The paper's target: S^model (w_a * v_a weighted) averaged over the member scans.

    ``predictor_hash`` '' means the default predictor config; its ``image_scale`` is the target's.
    """
    return Target(np.mean(inputs.per_scan, axis=0), inputs.image_scale, list(inputs.per_scan))


@TARGETS.register(reads="model", condition="Shuffle", rank=1)
def shuffle(
    inputs: TargetInputs, predictor_hash: str = "", predictor_seed: NonNegativeInt = 0, shuffle_seed: NonNegativeInt = 0
) -> Target:
    """The Shuffle control: the neural_model target with its images permuted (same statistics, no meaning).

    The agreement compares like with like: each scan's matrix under the same permutation, so it measures
    scan-to-target consistency, as for neural_model.
    """
    matrix, perm = similarity.shuffled(np.mean(inputs.per_scan, axis=0), shuffle_seed)
    return Target(matrix, inputs.image_scale, [s[np.ix_(perm, perm)] for s in inputs.per_scan], {"permutation": perm})


@TARGETS.register(reads="data", condition="Neural (data)", rank=7)
def neural_data(inputs: TargetInputs, image_scale: UnitInterval = 1.0) -> Target:
    """Single-trial S^data averaged over the scans: the target without the predictive model.

    ``image_scale`` (here and in the image methods) is the resolution the regularized networks see the
    images at; give every condition of an experiment the same one (``images.downsample``).
    """
    return Target(np.mean(inputs.per_scan, axis=0), image_scale, list(inputs.per_scan))


@TARGETS.register(reads="images", condition="Pixel", rank=3)
def pixel(inputs: TargetInputs, image_scale: UnitInterval = 1.0) -> Target:
    """The pixel-similarity control: centered cosine of the pixels, at the resolution the networks see."""
    return Target(similarity.pixel_similarity(downsample(inputs.images, image_scale)), image_scale)


@TARGETS.register(reads="images", condition="Pixel threshold", rank=4)
def pixel_threshold(inputs: TargetInputs, threshold: OpenUnit = 0.8, image_scale: UnitInterval = 1.0) -> Target:
    """S^Th: pixel similarity thresholded to -1 / 0 / 1 (the paper's sparser pixel control)."""
    pixels = similarity.pixel_similarity(downsample(inputs.images, image_scale))
    return Target(similarity.threshold_similarity(pixels, threshold), image_scale)


def _check_vgg(config: dict) -> None:
    path = config["vgg_weights"]
    if not path:
        raise ValueError(
            "the 'vgg' method needs vgg_weights: the path to torchvision's ImageNet VGG19 "
            f"state_dict ({similarity.VGG19_URL})"
        )
    if not Path(path).is_file():
        raise ValueError(f"vgg_weights: no file at {path} (download {similarity.VGG19_URL} there)")


@TARGETS.register(reads="images", check=_check_vgg, condition="VGG", rank=5)
def vgg(inputs: TargetInputs, vgg_weights: str = "", image_scale: UnitInterval = 1.0) -> Target:
    """VGG19 conv3_1 feature similarity: an ImageNet network's view of the same images."""
    matrix = similarity.vgg_similarity(downsample(inputs.images, image_scale), vgg_weights)
    return Target(matrix, image_scale, extra={"weights_sha256": file_digest(vgg_weights)})


@TARGETS.register(reads=None, condition="Random", rank=2)
def random(
    inputs: TargetInputs,
    random_seed: NonNegativeInt = 0,
    random_dim: PositiveInt = 1000,
    image_scale: UnitInterval = 1.0,
) -> Target:
    """A valid similarity matrix with no image structure: the control for 'any target at all'."""
    return Target(similarity.random_similarity(inputs.n_images, random_seed, dim=random_dim), image_scale)


def reads(config: dict) -> str | None:
    """Which inputs a target config's method needs fetched: "model", "data", "images" or None."""
    return TARGETS[config["method"]].info["reads"]


def methods_reading(what: str | None) -> list[str]:
    """The registered methods whose targets are built from ``what`` ("model": they name a predictor)."""
    return [name for name in TARGETS if TARGETS[name].info["reads"] == what]


def build_target(config: dict, inputs: TargetInputs) -> Target:
    """The target a (completed) config describes, from the inputs its method reads."""
    if reads(config) in ("model", "data") and not inputs.per_scan:
        raise ValueError(f"method {config['method']!r} needs the member scans' matrices")
    return TARGETS.build(config, inputs)
