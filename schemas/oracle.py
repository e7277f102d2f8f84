"""oracle: reliability of every unit and the data-based similarity matrices (docs/science.md §1-§4).

The equations live in ``neureg.models.neural.oracle``; these tables fetch a scan, call them, and store what
they return with its lineage: every matrix row is an ``experiment.Image``.
"""

from __future__ import annotations

import logging

import datajoint as dj
import numpy as np

from ..models.neural import oracle as eq
from . import experiment

logger = logging.getLogger("neureg")
schema = dj.Schema()
POPULATE_ORDER = ("OracleStats", "DataSimilarity", "OracleSimilarity", "ScanStability")
HISTOGRAM_BINS = 61


def activate(prefix: str = "neureg_", *, create_tables: bool = True) -> None:
    schema.activate(f"{prefix}oracle", create_tables=create_tables)


def prepare() -> list[dict]:
    """Register a ScanSet for every group of two or more scans shown the same oracle images."""
    oracle_trials = experiment.Trial & "tier = 'oracle'"
    by_oracle_set: dict[tuple, list] = {}
    for scan_key in (experiment.Scan & oracle_trials).keys():
        hashes = (dj.U("image_hash") & (oracle_trials & scan_key)).to_arrays("image_hash")
        by_oracle_set.setdefault(tuple(sorted(np.atleast_1d(hashes).tolist())), []).append(scan_key)
    return [
        experiment.ScanSet.create(keys, note=f"scans sharing {len(images)} oracle images")
        for images, keys in by_oracle_set.items()
        if len(keys) >= 2
    ]


def _scan_inputs(key: dict):
    """Responses, per-trial image hashes and tiers, and SNR weights (column order) of one scan."""
    responses = experiment.load_responses(key)
    trials = experiment.load_trials(key)
    return responses, trials


def _weights(key: dict) -> np.ndarray:
    weights = (OracleStats.Unit * experiment.Scan.Unit & key).to_arrays("snr_weight", order_by="unit_index")
    return np.asarray(weights, dtype=np.float64)


def _image_rows(key: dict, labels) -> list[dict]:
    return [dict(key, image_hash=str(h), row_index=i) for i, h in enumerate(labels)]


@schema
class OracleStats(dj.Computed):
    definition = """
    -> experiment.Scan
    ---
    n_oracle_images      : int32
    n_oracle_trials      : int32
    median_snr_weight    : float64
    mean_oracle_corr     : float64
    """

    class Unit(dj.Part):
        definition = """
        -> master
        -> experiment.Scan.Unit
        ---
        signal_var       : float64                  # sigma_a^2 = Var_i(E_t[rho]) over oracle images
        noise_var        : float64                  # eta_a^2 = E_i[Var_t(rho)]
        snr_weight       : float64                  # w_a = sigma_a / eta_a
        oracle_corr      : float64                  # leave-one-out oracle correlation
        """

    class OracleImage(dj.Part):
        definition = """
        -> master
        -> experiment.Image
        ---
        n_repeats        : int16
        """

    def make(self, key):
        responses, trials = _scan_inputs(key)
        stats = eq.oracle_stats(responses, trials["image_hash"])
        unit_ids = experiment.unit_ids(key)
        self.insert1(
            dict(
                key,
                n_oracle_images=len(stats.image_labels),
                n_oracle_trials=int(stats.n_repeats.sum()),
                median_snr_weight=float(np.median(stats.snr_weight)),
                mean_oracle_corr=float(np.mean(stats.oracle_corr)),
            )
        )
        self.Unit.insert(
            dict(key, unit_id=int(u), signal_var=s, noise_var=n, snr_weight=w, oracle_corr=c)
            for u, s, n, w, c in zip(
                unit_ids, stats.signal_var, stats.noise_var, stats.snr_weight, stats.oracle_corr
            )
        )
        self.OracleImage.insert(
            dict(key, image_hash=str(h), n_repeats=int(n)) for h, n in zip(stats.image_labels, stats.n_repeats)
        )


@schema
class DataSimilarity(dj.Computed):
    """S^data (equation 2) over the scan's single-presentation images: the 'neural data' target."""

    definition = """
    -> OracleStats
    ---
    n_images             : int32
    similarity           : <npy@neureg>             # float32 (n_images, n_images), rows as in the Image part
    """

    class Image(dj.Part):
        definition = """
        -> master
        -> experiment.Image
        ---
        row_index        : int32
        """

    def make(self, key):
        responses, trials = _scan_inputs(key)
        hashes, counts = np.unique(trials["image_hash"], return_counts=True)
        single = np.isin(trials["image_hash"], hashes[counts == 1])
        if single.sum() < 2:
            raise ValueError(f"scan {key} has {single.sum()} single-presentation images; S^data needs at least 2")
        labels, matrix = eq.data_similarity(responses[single], trials["image_hash"][single], _weights(key))
        self.insert1(dict(key, n_images=len(labels), similarity=matrix.astype(np.float32)))
        self.Image.insert(_image_rows(key, labels))

    def matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """(image hashes in row order, the float32 matrix) of one scan."""
        similarity = np.asarray(self.fetch1("similarity"))
        hashes = (self.Image & self).to_arrays("image_hash", order_by="row_index")
        return np.atleast_1d(hashes), similarity


@schema
class OracleSimilarity(dj.Computed):
    """S^oracle (equation 3) over the oracle images, and how noisy single-trial similarity is beside it."""

    definition = """
    -> OracleStats
    ---
    n_images             : int32
    similarity           : <blob>                   # float64 (n_oracle, n_oracle), rows as in the Image part
    data_oracle_r        : float64                  # r(S^data of trial pairs, S^oracle of their images), i != j
    repeat_fluctuations  : <blob>                   # equation 5 values, float32
    """

    class Image(dj.Part):
        definition = """
        -> master
        -> experiment.Image
        ---
        row_index        : int32
        """

    def make(self, key):
        responses, trials = _scan_inputs(key)
        weights = _weights(key)
        labels, matrix = eq.oracle_similarity(responses, trials["image_hash"], weights)
        self.insert1(
            dict(
                key,
                n_images=len(labels),
                similarity=matrix,
                data_oracle_r=eq.trial_oracle_agreement(responses, trials["image_hash"], weights),
                repeat_fluctuations=eq.repeat_fluctuations(responses, trials["image_hash"], weights).astype(np.float32),
            )
        )
        self.Image.insert(_image_rows(key, labels))

    def labeled(self) -> eq.LabeledSimilarity:
        hashes = (self.Image & self).to_arrays("image_hash", order_by="row_index")
        return eq.LabeledSimilarity(np.atleast_1d(hashes).astype(str), np.asarray(self.fetch1("similarity")))


@schema
class ScanStability(dj.Computed):
    """dS^scan (equation 4) vs dS^repeat (equation 5) over a set of scans sharing oracle images."""

    definition = """
    -> experiment.ScanSet
    ---
    n_scans              : int16
    n_images             : int32                    # oracle images all member scans share
    scan_std             : float64                  # std of dS^scan
    repeat_std           : float64                  # std of dS^repeat
    width_ratio          : float64                  # scan_std / repeat_std (< 1: stable across scans)
    scan_summary         : json                     # n, mean, std, quantiles
    repeat_summary       : json
    bin_edges            : <blob>                   # shared histogram edges
    scan_hist            : <blob>                   # counts of dS^scan
    repeat_hist          : <blob>                   # counts of dS^repeat
    """

    @property
    def key_source(self):
        incomplete = (experiment.ScanSet.Member - OracleSimilarity.proj()).proj()
        return (experiment.ScanSet & "n_scans >= 2") - incomplete

    def make(self, key):
        members = (experiment.ScanSet.Member & key).keys(order_by="KEY")
        aligned = eq.align_similarities([(OracleSimilarity & m).labeled() for m in members])
        scan = eq.scan_fluctuations(aligned.matrix)
        repeat = np.concatenate([(OracleSimilarity & m).fetch1("repeat_fluctuations") for m in members])
        edges = eq.shared_bin_edges(scan, repeat, n_bins=HISTOGRAM_BINS)
        scan_summary, repeat_summary = eq.summarize(scan), eq.summarize(repeat)
        self.insert1(
            dict(
                key,
                n_scans=len(members),
                n_images=len(aligned.labels),
                scan_std=scan_summary["std"],
                repeat_std=repeat_summary["std"],
                width_ratio=scan_summary["std"] / repeat_summary["std"] if repeat_summary["std"] > 0 else float("inf"),
                scan_summary=_json_ready(scan_summary),
                repeat_summary=_json_ready(repeat_summary),
                bin_edges=edges,
                scan_hist=eq.histogram_counts(scan, edges),
                repeat_hist=eq.histogram_counts(repeat, edges),
            )
        )


def _json_ready(summary: dict) -> dict:
    return {**summary, "quantiles": {str(q): v for q, v in summary["quantiles"].items()}}
