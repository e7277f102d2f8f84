"""oracle: reliability of every unit and the data-based similarity matrices (docs/science.md §1-§4).

The equations live in ``neureg.models.neural.oracle``; these tables fetch a scan, call them, and store what
they return with its lineage: every matrix row is an ``experiment.Image``.
"""

from __future__ import annotations

import logging

import datajoint as dj
import numpy as np

from ..database.blobs import fetch1_blobs
from ..database.store import stored, stored_columns
from ..models.digests import stable_hash
from ..models.neural import oracle
from . import experiment
from ._config import ImageMatrix, ImageRows, activator

logger = logging.getLogger("neureg")
schema = dj.Schema()
activate = activator(schema, "oracle")
HISTOGRAM_BINS = 61


def snr_weights(key: dict) -> np.ndarray:
    """SNR weights of one scan's units, in the response matrix's column order."""
    return experiment.per_unit(OracleStats.Unit, key, "snr_weight")


@schema
class OracleStats(dj.Computed):
    """How reliable each unit is over the repeated (oracle) images: the weights every similarity uses."""

    definition = """
    -> experiment.Scan
    ---
    n_oracle_images      : int32
    n_oracle_trials      : int32
    oracle_set           : char(32)                 # hash of its sorted oracle image hashes: equal -> comparable
    median_snr_weight    : float64
    mean_oracle_corr     : float64
    """

    @property
    def key_source(self):
        """Sealed scans (ingestion finished) with repeated trials whose responses were recorded (withheld ones
        never count)."""
        return (experiment.Scan & experiment.Ingestion.proj()) - experiment.scans_without_usable_repeats().proj()

    class Unit(dj.Part):
        """One unit's signal and noise variance and its SNR weight w_a."""

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
        responses, trials = experiment.load_responses(key), experiment.load_trials(key)
        stats = oracle.oracle_stats(responses, trials["image_hash"])
        unit_ids = experiment.unit_ids(key)
        self.insert1(dict(key, oracle_set=stable_hash(sorted(str(h) for h in stats.image_labels)), **stats.summary()))
        self.Unit.insert(
            dict(key, unit_id=int(u), signal_var=s, noise_var=n, snr_weight=w, oracle_corr=c)
            for u, s, n, w, c in zip(unit_ids, stats.signal_var, stats.noise_var, stats.snr_weight, stats.oracle_corr)
        )
        self.OracleImage.insert(
            dict(key, image_hash=str(h), n_repeats=int(n)) for h, n in zip(stats.image_labels, stats.n_repeats)
        )


@schema
class DataSimilarity(ImageMatrix, dj.Computed):
    """S^data (equation 2) over the scan's single-presentation images: the 'neural data' target."""

    definition = f"""
    -> OracleStats
    ---
    n_images             : int32
    {stored_columns("similarity", "float32 (n_images, n_images), rows as in the Image part")}
    """

    class Image(ImageRows):
        """Row i of the matrix is this image."""

    def make(self, key):
        responses, trials = experiment.load_responses(key), experiment.load_trials(key)
        labels, matrix = oracle.single_presentation_similarity(responses, trials["image_hash"], snr_weights(key))
        self.insert1(dict(key, n_images=len(labels), **stored("similarity", matrix)))
        self.Image.insert(ImageRows.rows(key, labels))


@schema
class OracleSimilarity(ImageMatrix, dj.Computed):
    """S^oracle (equation 3) over the oracle images, and how noisy single-trial similarity is beside it."""

    definition = """
    -> OracleStats
    ---
    n_images             : int32
    similarity           : <blob>                   # float64 (n_oracle, n_oracle), rows as in the Image part
    data_oracle_r        : float64                  # r(S^data of trial pairs, S^oracle of their images), i != j
    repeat_fluctuations  : <blob>                   # equation 5 values, float32
    """

    class Image(ImageRows):
        """Row i of the matrix is this oracle image."""

    def make(self, key):
        responses, trials = experiment.load_responses(key), experiment.load_trials(key)
        report = oracle.oracle_similarity_report(responses, trials["image_hash"], snr_weights(key))
        labels = report.pop("labels")
        self.insert1(dict(key, n_images=len(labels), **report))
        self.Image.insert(ImageRows.rows(key, labels))


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
        """Sets of two or more scans, each with its S^oracle, all shown the same oracle images."""
        incomplete = (experiment.ScanSet.Member - OracleSimilarity.proj()).proj()
        mixed = (
            dj.U("scan_set").aggr(
                experiment.ScanSet.Member * OracleStats.proj("oracle_set"), n_sets="count(distinct oracle_set)"
            )
            & "n_sets > 1"
        )
        return (experiment.ScanSet & "n_scans >= 2") - incomplete - mixed.proj()

    def make(self, key):
        members = experiment.set_members(key)
        similarities = [(OracleSimilarity & m).labeled() for m in members]
        repeats = [fetch1_blobs(OracleSimilarity & m, "repeat_fluctuations") for m in members]
        self.insert1(dict(key, **oracle.scan_stability(similarities, repeats, n_bins=HISTOGRAM_BINS)))
