"""The configs of a training run: the schedule (``train_settings``) and the similarity loss
(``regularizer_settings``), each a function whose keyword arguments are the config, and the learning rate
the schedule gives each epoch.
"""

from __future__ import annotations

from typing import Annotated

from ..registry import (
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    UnitInterval,
    complete_kwargs,
    one_of,
    open_interval,
)

AUGMENTATIONS = ("crop_flip", "crop", "none")


def train_settings(
    epochs: PositiveInt = 40,
    batch_size: PositiveInt = 64,
    lr: PositiveFloat = 0.1,
    momentum: Fraction = 0.9,
    nesterov: bool = False,
    weight_decay: NonNegativeFloat = 5e-4,
    lr_decay: UnitInterval = 0.3,
    lr_step_epochs: PositiveInt = 4,
    lr_reset_epochs: NonNegativeInt | None = 20,
    augment: Annotated[str, one_of(*AUGMENTATIONS)] = "crop_flip",
    max_train_images: PositiveInt | None = None,
) -> None:
    """A training schedule's config: Li et al.'s SGD, 40 epochs, batch 64, lr 0.1 x0.3 every 4 epochs, back
    to 0.1 after 20 (``lr_reset_epochs`` None or 0: no reset).

    ``augment`` crop_flip is a random 32x32 crop of the 4-px zero-padded image and a horizontal flip;
    ``max_train_images`` a fixed, seed-independent subset of the training set, for demos. How a run
    executes (device, bf16, channels_last, cuDNN determinism) is a Runtime, never part of this config.
    """


def regularizer_settings(
    alpha: NonNegativeFloat = 0.0,
    pairs_per_step: PositiveInt = 32,
    eps: Annotated[float, open_interval(0, 0.5)] = 1e-3,
    centre_momentum: UnitInterval = 0.05,
) -> None:
    """The similarity loss's config: alpha = 0 is the 'None' condition; 32 pairs = 64 images a step, as many
    as the CIFAR batch (Li et al.); ``eps`` keeps Fisher's z finite; ``centre_momentum`` the running centres'."""


def default_train_config() -> dict:
    """Every training-schedule key with its default."""
    return complete_kwargs(train_settings, {})


def default_regularizer_config() -> dict:
    """Every regularizer key with its default."""
    return complete_kwargs(regularizer_settings, {})


def learning_rate(epoch: int, config: dict) -> float:
    """lr for a 0-based epoch: lr * decay^(e // step), with e counted from the last reset."""
    reset = config["lr_reset_epochs"]
    since_reset = epoch % reset if reset else epoch
    return config["lr"] * config["lr_decay"] ** (since_reset // config["lr_step_epochs"])
