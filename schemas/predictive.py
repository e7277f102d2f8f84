"""predictive: a denoising model per scan, config and seed (Li et al. 2019, section 2.2).

Training is long (minutes on a CPU, and GPU work at lab scale), so ``PredictiveModel`` uses DataJoint's
three-part make: ``make_fetch`` reads only small, immutable facts, ``make_compute`` loads the scan and
fits outside any transaction, ``make_insert`` writes the result in a short one.
"""

from __future__ import annotations

import logging
import platform
import time

import datajoint as dj
import numpy as np

from ..database.store import load_array, stored, stored_columns
from ..models.neural import predictions, predictive
from ..models.neural.images import downsample, downsampled_shape
from ..models.runtime import Runtime
from ..models.serialization import array_to_state, state_to_array
from . import experiment, oracle  # noqa: F401 - oracle: a table definition names it
from ._config import ConfigTable, ImageMatrix, ImageRows, activator

logger = logging.getLogger("neureg")
schema = dj.Schema()
activate = activator(schema, "predictive")


@schema
class Seed(dj.Lookup):
    """Seeds of predictive-model fits (one model per scan, as the paper, unless a lab adds seeds).

    Training has its own seed table, so adding network seeds never triggers extra predictor fits.
    """

    definition = """
    seed                 : int32
    """
    contents = [[0]]


@schema
class PredictorConfig(ConfigTable, dj.Lookup, settings=predictive.predictor_settings):
    """How a predictive model is built and fitted (``models.neural.predictive.predictor_settings``).

    Every row is fitted on every scan, so no row is added behind a lab's back: ``add`` it to fit it.
    """

    @classmethod
    def default_key(cls) -> dict:
        """The key the default config has (whether or not it was added)."""
        return cls.key_of(cls.complete())


def load_scan_for_fit(key: dict, image_scale: float = 1.0) -> dict:
    """Everything a fit needs, as arrays in trial order (withheld trials left out); images once per distinct
    image, downsampled by ``image_scale``."""
    trials = experiment.load_trials(key)
    hashes, trial_image = np.unique(trials["image_hash"], return_inverse=True)
    return {
        "responses": experiment.load_responses(key),
        "images": downsample(experiment.load_images(hashes), image_scale),
        "image_hash": hashes,
        "trial_image": trial_image,
        "behavior": trials["behavior"],
        "pupil_center": trials["pupil_center"],
        "tiers": trials["tier"],
    }


@schema
class PredictiveModel(dj.Computed):
    """A fitted denoising model of one scan (config x seed) and each unit's held-out correlation v_a."""

    definition = f"""
    -> oracle.OracleStats
    -> PredictorConfig
    -> Seed
    ---
    {stored_columns("weights", "torch.save(state_dict) bytes as uint8")}
    val_corr             : float64                  # mean per-unit correlation on validation trials
    test_corr            : float64                  # mean v_a: correlation on held-out oracle/test trials
    best_epoch           : int16
    epochs_run           : int16
    n_train              : int32
    n_validation         : int32
    n_test               : int32
    fit_seconds          : float64
    images_per_second    : float64
    device               : varchar(64)
    history              : json                     # per-epoch loss and validation correlation
    host = ''            : varchar(255)
    """

    class Unit(dj.Part):
        definition = """
        -> master
        -> experiment.Scan.Unit
        ---
        model_corr       : float64                  # v_a on held-out trials (equation 6)
        """

    def make_fetch(self, key):
        n_trials, n_units = (experiment.Scan & key).fetch1("n_trials", "n_units")
        return PredictorConfig.config_of(key), int(n_trials), int(n_units)

    def make_compute(self, key, config, n_trials, n_units):
        data = load_scan_for_fit(key, config["image_scale"])
        runtime = Runtime.from_env()  # the worker's execution settings, as training takes them
        logger.info("fitting predictive model %s on %s (%d units, %d trials)", key, runtime.device, n_units, n_trials)

        def progress(row):
            logger.info("  epoch %(epoch)d: loss %(train_loss).4f, val corr %(val_corr).3f", row)

        try:
            evaluated = predictive.fit_and_evaluate(
                data["images"],
                data["responses"],
                data["behavior"],
                data["pupil_center"],
                data["tiers"],
                config,
                trial_image=data["trial_image"],
                seed=key["seed"],
                runtime=runtime,
                progress=progress,
            )
        except ValueError as error:
            raise ValueError(f"scan {key}: {error}") from None
        return state_to_array(evaluated.fit.state_dict), evaluated

    def make_insert(self, key, weights, evaluated):
        result = evaluated.fit
        self.insert1(
            dict(
                key,
                **stored("weights", weights),
                val_corr=float(result.best_val_corr),
                test_corr=float(np.mean(evaluated.model_corr)),
                best_epoch=result.best_epoch,
                epochs_run=result.epochs_run,
                n_train=evaluated.n_train,
                n_validation=evaluated.n_validation,
                n_test=evaluated.n_test,
                fit_seconds=float(result.fit_seconds),
                images_per_second=float(result.train_images_per_second),
                device=str(result.device)[:64],
                history=[{k: float(v) for k, v in row.items()} for row in result.history],
                host=platform.node()[:255],
            )
        )
        unit_ids = experiment.unit_ids(key)
        self.Unit.insert(dict(key, unit_id=int(u), model_corr=float(c)) for u, c in zip(unit_ids, evaluated.model_corr))

    def load_model(self, device: str = "cpu"):
        """The fitted network of one row, in eval mode."""
        key = self.fetch1("KEY")
        n_units = (experiment.Scan & key).fetch1("n_units")
        height, width = (experiment.Image & (experiment.Trial & key)).to_arrays("height", "width", limit=1)
        config = PredictorConfig.config_of(key)
        shape = downsampled_shape((int(height[0]), int(width[0])), config["image_scale"])
        return predictive.load_predictor(
            array_to_state(load_array(self, key, "weights")), config, int(n_units), shape, device
        )


@schema
class ModelResponses(ImageMatrix, dj.Computed):
    """Predicted responses to every image of the scan, behaviour at its mean and the eye centred."""

    matrix_attribute = "responses"

    definition = f"""
    -> PredictiveModel
    ---
    n_images             : int32
    {stored_columns("responses", "float32 (n_images, n_units), rows as in the Image part")}
    """

    class Image(ImageRows):
        """Row i of the predictions is this image."""

    def make(self, key):
        start = time.perf_counter()
        hashes = np.unique((experiment.Trial & key).to_arrays("image_hash"))
        model = (PredictiveModel & key).load_model()
        scale = PredictorConfig.config_of(key)["image_scale"]
        predicted = predictions.predict_responses(model, downsample(experiment.load_images(hashes), scale))
        self.insert1(dict(key, n_images=len(hashes), **stored("responses", predicted.astype(np.float32))))
        self.Image.insert(ImageRows.rows(key, hashes))
        logger.info("predicted %d images for %s in %.1f s", len(hashes), key, time.perf_counter() - start)
