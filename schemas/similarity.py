"""similarity: regularization targets, each keyed by its method config and the set of scans it draws on.

A target is a similarity matrix over stimulus images (rows are ``experiment.Image``): the non-oracle
images that every scan of the set was shown, as in the paper (5000 images, averaged over 8 scans).
Methods (docs/science.md §5, §7): ``neural_model`` (S^model with w_a * v_a weights),
``neural_data`` (S^data), ``shuffle`` (neural_model with images permuted), ``pixel``,
``pixel_threshold`` (S^Th), ``vgg`` (VGG19 conv3_1 features; needs a weights file), ``random``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import datajoint as dj
import numpy as np

from ..models.neural import similarity as sim
from . import experiment, oracle, predictive
from ._config import ConfigTable

logger = logging.getLogger("neureg")
schema = dj.Schema()
POPULATE_ORDER = ("ModelAgreement", "SimilarityTarget")

NEEDS_PREDICTOR = ("neural_model", "shuffle")
# The config keys each method reads; the others are reset to their defaults before hashing, so two
# configs that compute the same target are one row.
METHOD_KEYS = {
    "neural_model": ("predictor_hash", "predictor_seed"),
    "shuffle": ("predictor_hash", "predictor_seed", "shuffle_seed"),
    "neural_data": (),
    "pixel": (),
    "pixel_threshold": ("threshold",),
    "vgg": ("vgg_weights",),
    "random": ("random_seed", "random_dim"),
}


def activate(prefix: str = "neureg_", *, create_tables: bool = True) -> None:
    schema.activate(f"{prefix}similarity", create_tables=create_tables)


def default_target_config() -> dict:
    return {
        "method": "neural_model",
        "predictor_hash": "",  # '' = the default PredictorConfig
        "predictor_seed": 0,
        "threshold": 0.8,
        "shuffle_seed": 0,
        "random_seed": 0,
        "random_dim": 1000,
        "vgg_weights": "",  # path to torchvision's VGG19 state_dict
    }


def _validate_target(config: dict) -> None:
    method = config["method"]
    if method not in METHOD_KEYS:
        raise ValueError(f"unknown similarity method {method!r}; known: {sorted(METHOD_KEYS)}")
    if not 0 < config["threshold"] < 1:
        raise ValueError(f"threshold must lie in (0, 1), got {config['threshold']!r}")
    if not isinstance(config["random_dim"], int) or config["random_dim"] < 1:
        raise ValueError(f"random_dim must be a positive integer, got {config['random_dim']!r}")
    if method == "vgg":
        path = config["vgg_weights"]
        if not path:
            raise ValueError(
                "the 'vgg' method needs vgg_weights: the path to torchvision's ImageNet VGG19 state_dict "
                f"({sim.VGG19_URL})"
            )
        if not Path(path).is_file():
            raise ValueError(f"vgg_weights: no file at {path} (download {sim.VGG19_URL} there)")


@schema
class TargetConfig(ConfigTable, dj.Lookup):
    definition = """
    target_hash          : char(32)                 # stable hash of the complete config
    ---
    target_config        : json
    target_label = ''    : varchar(64)
    """
    config_name = "target"
    default_config = staticmethod(default_target_config)
    validate_config = staticmethod(_validate_target)

    @classmethod
    def complete(cls, config=None, **overrides) -> dict:
        full = super().complete(config, **overrides)
        defaults = default_target_config()
        keep = set(METHOD_KEYS[full["method"]]) | {"method"}
        full = {k: (v if k in keep else defaults[k]) for k, v in full.items()}
        if full["method"] in NEEDS_PREDICTOR:
            if not full["predictor_hash"]:
                full["predictor_hash"] = predictive.PredictorConfig.add(label="default")["predictor_hash"]
            if not (predictive.PredictorConfig & {"predictor_hash": full["predictor_hash"]}):
                raise ValueError(f"predictor_hash {full['predictor_hash']!r} is not in predictive.PredictorConfig")
            if not (predictive.Seed & {"seed": full["predictor_seed"]}):
                raise ValueError(f"predictor_seed {full['predictor_seed']!r} is not in predictive.Seed")
        return full


def _oracle_weights(key: dict) -> np.ndarray:
    return np.asarray(
        (oracle.OracleStats.Unit * experiment.Scan.Unit & key).to_arrays("snr_weight", order_by="unit_index"),
        dtype=np.float64,
    )


def _model_corr(key: dict) -> np.ndarray:
    return np.asarray(
        (predictive.PredictiveModel.Unit * experiment.Scan.Unit & key).to_arrays("model_corr", order_by="unit_index"),
        dtype=np.float64,
    )


def _rows(hashes: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    position = {h: i for i, h in enumerate(hashes)}
    return np.array([position[h] for h in wanted], dtype=np.int64)


def _predictor_key(scan_key: dict, config: dict) -> dict:
    return dict(scan_key, predictor_hash=config["predictor_hash"], seed=config["predictor_seed"])


def scan_model_similarity(model_key: dict, images: np.ndarray) -> np.ndarray:
    """S^model (equation 6) of one fitted model over the given image hashes."""
    hashes, predicted = (predictive.ModelResponses & model_key).matrix()
    return sim.model_similarity(predicted[_rows(hashes, images)], _oracle_weights(model_key), _model_corr(model_key))


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
        labeled = (oracle.OracleSimilarity & key).labeled()
        model = scan_model_similarity(key, labeled.labels)
        upper = np.triu_indices(len(labeled.labels), 1)
        self.insert1(
            dict(
                key,
                n_images=len(labeled.labels),
                model_oracle_r=sim.similarity_agreement(model, labeled.matrix),
                data_oracle_r=(oracle.OracleSimilarity & key).fetch1("data_oracle_r"),
                model_spread=float(np.std(model[upper])),
                oracle_spread=float(np.std(labeled.matrix[upper])),
            )
        )


@schema
class SimilarityTarget(dj.Computed):
    definition = """
    -> experiment.ScanSet
    -> TargetConfig
    ---
    method               : varchar(32)              # copied from the config for easy queries
    n_images             : int32
    similarity           : <npy@neureg>             # float32 (n_images, n_images), rows as in the Image part
    permutation = null   : <blob>                   # shuffle: row i holds image perm[i]'s similarities
    weights_sha256 = ''  : char(64)                 # vgg: checksum of the weights file used
    """

    class Image(dj.Part):
        definition = """
        -> master
        -> experiment.Image
        ---
        row_index        : int32
        """

    class Agreement(dj.Part):
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
        members = (experiment.ScanSet.Member & key).keys(order_by="KEY")
        images = shared_non_oracle_images(members)
        method = config["method"]
        per_scan, extra = [], {}
        if method in NEEDS_PREDICTOR:
            missing = [m for m in members if not (predictive.ModelResponses & _predictor_key(m, config))]
            if missing:
                raise ValueError(f"no ModelResponses yet for {missing[:2]} with predictor {config['predictor_hash']}")
            per_scan = [scan_model_similarity(_predictor_key(m, config), images) for m in members]
            matrix = np.mean(per_scan, axis=0)
            if method == "shuffle":
                # The agreement compares like with like: each scan's matrix under the same permutation
                # (docs/science.md §5), so it measures scan-to-target consistency, as for neural_model.
                matrix, perm = sim.shuffled(matrix, config["shuffle_seed"])
                extra["permutation"] = perm
                per_scan = [s[np.ix_(perm, perm)] for s in per_scan]
        elif method == "neural_data":
            for m in members:
                hashes, scan_matrix = (oracle.DataSimilarity & m).matrix()
                rows = _rows(hashes.astype(str), images)
                per_scan.append(np.asarray(scan_matrix, dtype=np.float64)[np.ix_(rows, rows)])
            matrix = np.mean(per_scan, axis=0)
        elif method in ("pixel", "pixel_threshold"):
            matrix = sim.pixel_similarity(experiment.load_images(images))
            if method == "pixel_threshold":
                matrix = sim.threshold_similarity(matrix, config["threshold"])
        elif method == "vgg":
            matrix = sim.vgg_similarity(experiment.load_images(images), config["vgg_weights"])
            extra["weights_sha256"] = hashlib.sha256(Path(config["vgg_weights"]).read_bytes()).hexdigest()
        else:  # random
            matrix = sim.random_similarity(len(images), config["random_seed"], dim=config["random_dim"])
        self.insert1(dict(key, method=method, n_images=len(images), similarity=matrix.astype(np.float32), **extra))
        self.Image.insert(dict(key, image_hash=str(h), row_index=i) for i, h in enumerate(images))
        self.Agreement.insert(
            dict(key, **m, scan_target_r=sim.similarity_agreement(s, matrix)) for m, s in zip(members, per_scan)
        )

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 images (n, H, W) in row order, float32 (n, n) matrix) of one target."""
        hashes = np.atleast_1d((self.Image & self).to_arrays("image_hash", order_by="row_index")).astype(str)
        return experiment.load_images(hashes), np.asarray(self.fetch1("similarity"))


def shared_non_oracle_images(members: list[dict]) -> np.ndarray:
    """Sorted hashes of the images every member scan showed once (its non-oracle images)."""
    shared = None
    for m in members:
        hashes = np.atleast_1d((oracle.DataSimilarity.Image & m).to_arrays("image_hash")).astype(str)
        shared = set(hashes) if shared is None else shared & set(hashes)
    if not shared or len(shared) < 3:
        raise ValueError(f"the scans {members[:3]} share {len(shared or ())} non-oracle images; a target needs 3")
    return np.array(sorted(shared))
