"""similarity: regularization targets, each keyed by its method config and the set of scans it draws on.

A target is a similarity matrix over stimulus images (rows are ``experiment.Image``): the non-oracle
images that every scan of the set was shown, as in the paper (5000 images, averaged over 8 scans).
The methods are the builders of ``models.neural.targets.TARGETS`` (docs/science.md §5, §7); this module
fetches what a method reads, calls it once, and stores the result with its lineage.
"""

from __future__ import annotations

import logging

import datajoint as dj
import numpy as np

from ..database.store import stored, stored_columns
from ..models.neural import similarity, targets
from . import experiment, oracle, predictive
from ._config import ConfigTable, ImageMatrix, ImageRows, activator

logger = logging.getLogger("neureg")
schema = dj.Schema()
activate = activator(schema, "similarity")


@schema
class TargetConfig(ConfigTable, dj.Lookup, registry=targets.TARGETS):
    """A similarity method and its settings (``models.neural.targets.TARGETS`` lists the methods)."""

    @classmethod
    def check_references(cls, full: dict) -> dict:
        """A method that reads S^model names an existing predictor config and seed ('' = the default config)."""
        if targets.reads(full) != "model":
            return full
        if not full["predictor_hash"]:
            full = {**full, "predictor_hash": predictive.PredictorConfig.default_key()["predictor_hash"]}
        if not (predictive.PredictorConfig & {"predictor_hash": full["predictor_hash"]}):
            raise ValueError(
                f"predictor_hash {full['predictor_hash']!r} is not in predictive.PredictorConfig "
                "(add the predictor first: predictive.PredictorConfig.add(...))"
            )
        if not (predictive.Seed & {"seed": full["predictor_seed"]}):
            raise ValueError(f"predictor_seed {full['predictor_seed']!r} is not in predictive.Seed")
        return full


def _rows(hashes: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    position = {h: i for i, h in enumerate(hashes)}
    return np.array([position[h] for h in wanted], dtype=np.int64)


def _predictor_key(scan_key: dict, config: dict) -> dict:
    return dict(scan_key, predictor_hash=config["predictor_hash"], seed=config["predictor_seed"])


def _model_inputs(model_key: dict, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predicted responses to ``images`` (rows in that order), SNR weights and model correlations of one model."""
    hashes, predicted = (predictive.ModelResponses & model_key).labeled()
    return (
        predicted[_rows(hashes, images)],
        oracle.snr_weights(model_key),
        experiment.per_unit(predictive.PredictiveModel.Unit, model_key, "model_corr"),
    )


def scan_model_similarity(model_key: dict, images: np.ndarray) -> np.ndarray:
    """S^model (equation 6) of one fitted model over the given image hashes."""
    return similarity.model_similarity(*_model_inputs(model_key, images))


@schema
class ModelAgreement(dj.Computed):
    """Per scan and model: how well S^model and single-trial S^data agree with S^oracle (Fig. 1D)."""

    definition = """
    -> predictive.ModelResponses
    ---
    n_images             : int32                    # oracle images compared
    model_oracle_r       : float64                  # r(S^model, S^oracle), the paper's 0.73
    data_oracle_r        : float64                  # r(S^data single trials, S^oracle), the paper's 0.39
    model_spread         : float64                  # std of S^model off the diagonal
    oracle_spread        : float64                  # std of S^oracle off the diagonal
    """

    @property
    def key_source(self):
        return predictive.ModelResponses & oracle.OracleSimilarity.proj()

    def make(self, key):
        labels, oracle_matrix = (oracle.OracleSimilarity & key).labeled()
        data_oracle_r = (oracle.OracleSimilarity & key).fetch1("data_oracle_r")
        agreement = similarity.model_agreement(*_model_inputs(key, labels), oracle_matrix)
        self.insert1(dict(key, data_oracle_r=data_oracle_r, **agreement))


@schema
class SimilarityTarget(ImageMatrix, dj.Computed):
    """A regularization target over the images a scan set shares, with each scan's agreement with it."""

    definition = f"""
    -> experiment.ScanSet
    -> TargetConfig
    ---
    method               : varchar(32)              # copied from the config for easy queries
    n_images             : int32
    {stored_columns("similarity", "float32 (n_images, n_images), rows as in the Image part")}
    image_scale          : float32                  # networks regularized toward it see the images at this scale
    permutation = null   : <blob>                   # shuffle: row i holds image perm[i]'s similarities
    weights_sha256 = ''  : char(64)                 # vgg: checksum of the weights file used
    """

    class Image(ImageRows):
        """Row i of the target is this image."""

    class Agreement(dj.Part):
        """How well each member scan's own matrix agrees with the target it contributed to."""

        definition = """
        -> master
        -> experiment.Scan
        ---
        scan_target_r    : float64                  # r(this scan's matrix, the averaged target)
        """

    @property
    def key_source(self):
        incomplete = (experiment.ScanSet.Member - oracle.DataSimilarity.proj()).proj()
        return (experiment.ScanSet - incomplete) * TargetConfig

    def make(self, key):
        config = TargetConfig.config_of(key)
        members = experiment.set_members(key)
        images = shared_non_oracle_images(members)
        target = targets.build_target(config, _target_inputs(config, members, images))
        self.insert1(
            dict(
                key,
                method=config["method"],
                n_images=len(images),
                image_scale=target.image_scale,
                **stored("similarity", target.matrix.astype(np.float32)),
                **target.extra,
            )
        )
        self.Image.insert(ImageRows.rows(key, images))
        self.Agreement.insert(dict(key, **m, scan_target_r=r) for m, r in zip(members, target.agreement()))


def _target_inputs(config: dict, members: list[dict], images: np.ndarray) -> targets.TargetInputs:
    """Fetch what the config's method reads (``targets.reads``), rows in the order of ``images``."""
    inputs = targets.TargetInputs(n_images=len(images))
    source = targets.reads(config)
    if source == "model":
        missing = [m for m in members if not (predictive.ModelResponses & _predictor_key(m, config))]
        if missing:
            raise ValueError(f"no ModelResponses yet for {missing[:2]} with predictor {config['predictor_hash']}")
        inputs.per_scan = [scan_model_similarity(_predictor_key(m, config), images) for m in members]
        inputs.image_scale = predictive.PredictorConfig.config_of({"predictor_hash": config["predictor_hash"]})[
            "image_scale"
        ]
    elif source == "data":
        inputs.per_scan = []
        for m in members:
            hashes, matrix = (oracle.DataSimilarity & m).labeled()
            rows = _rows(hashes, images)
            inputs.per_scan.append(np.asarray(matrix, dtype=np.float64)[np.ix_(rows, rows)])
    elif source == "images":
        inputs.images = experiment.load_images(images)
    return inputs


def shared_non_oracle_images(members: list[dict]) -> np.ndarray:
    """Sorted hashes of the images every member scan showed once (its non-oracle images)."""
    shared = None
    for m in members:
        hashes = np.atleast_1d((oracle.DataSimilarity.Image & m).to_arrays("image_hash")).astype(str)
        shared = set(hashes) if shared is None else shared & set(hashes)
    if not shared or len(shared) < 3:
        raise ValueError(f"the scans {members[:3]} share {len(shared or ())} non-oracle images; a target needs 3")
    return np.array(sorted(shared))
