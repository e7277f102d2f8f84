"""experiment: what was recorded. Mice, sessions, scans and their units, images, trials, behaviour.

Filled by lab members through ingestion (``neureg ingest``, ``neureg.ingestion``), never by populate. Images are
content-addressed, so one stimulus shown in many scans is one row; a scan's responses are one
(n_trials, n_units) float32 matrix in the object store, because 48 million per-trial rows would take
minutes to load and a single ``.npy`` takes a fraction of a second.
"""

from __future__ import annotations

import logging
import re

import datajoint as dj
import numpy as np

from ..database.store import stored_columns, verified
from ..database.transaction import transaction
from ..errors import StoreIntegrityError
from ..models.digests import image_hash, stable_hash
from ._config import activator

logger = logging.getLogger("neureg")

schema = dj.Schema()
activate = activator(schema, "experiment")
BEHAVIOR_COLUMNS = ("pupil_dilation", "pupil_dilation_derivative", "running_speed")  # Behavior's, in file order


@schema
class Mouse(dj.Manual):
    """An animal: every scan, model and target traces back to the mice it came from."""

    definition = """
    mouse                : varchar(32)              # lab's name for the animal
    ---
    mouse_notes = ''     : varchar(1024)
    """


@schema
class Session(dj.Manual):
    """One recording session of a mouse: scans of a session share its day and field of view history."""

    definition = """
    -> Mouse
    session              : int32                    # session number, as the recording names it
    ---
    session_date = null  : date                     # recording day, when known
    """


@schema
class Scan(dj.Manual):
    """One two-photon scan as ingested: its units, trials and responses never change after ingestion."""

    definition = """
    -> Session
    scan_idx             : int16                    # scan index within the session
    ---
    area = ''            : varchar(32)              # brain area, e.g. V1
    depth = null         : float32                  # imaging depth below pia (um)
    frame_rate = null    : float32                  # Hz
    scan_notes = ''      : varchar(4096)
    n_trials             : int32
    n_units              : int32
    source_path = ''     : varchar(1024)            # folder it was ingested from
    """

    class Unit(dj.Part):
        """One recorded unit: its id, its column in the response matrix, its position, area and layer."""

        definition = """
        -> master
        unit_id          : int32                    # the lab's id for the unit
        ---
        unit_index       : int32                    # its column in Responses.responses
        x                : float64                  # cortical position (um)
        y                : float64
        z                : float64
        unit_area = ''   : varchar(32)
        unit_layer = ''  : varchar(32)              # cortical layer, e.g. L2/3
        """


@schema
class Image(dj.Manual):
    """A stimulus image, keyed by its content hash so the same pixels are one row across scans and mice."""

    definition = """
    image_hash           : char(32)                 # sha256 of dtype, shape and pixels (first 32 hex digits)
    ---
    source_id            : int64                    # frame_image_id where it was first ingested
    height               : int16
    width                : int16
    pixels               : bytes                    # uint8 (height, width) grayscale, row-major raw bytes
    """

    def insert(self, rows, **kwargs):
        """Insert only rows whose pixels hash to their key: a content address cannot be squatted with other
        pixels through DataJoint (ingestion, a notebook). Rows are dicts of uint8 arrays, as every neureg
        caller passes; they are stored as raw bytes, so the server can hash them too (the accounts SQL's
        image trigger on MySQL refuses any other INSERT, raw SQL included)."""
        rows = list(rows)
        for row in rows:
            check_image_row(row)
        if _pixels_are_bytes():
            rows = [dict(row, pixels=np.ascontiguousarray(row["pixels"]).tobytes()) for row in rows]
        return super().insert(rows, **kwargs)


def _pixels_are_bytes() -> bool:
    """Whether this database's ``Image.pixels`` holds raw bytes (``bytes``); a database declared before
    2026-12-04 holds them as ``<blob>`` arrays, which neureg still reads and writes (docs/architecture.md)."""
    return Image.heading.attributes["pixels"].codec is None


def image_columns(query) -> tuple[list, list, list, list]:
    """``(hashes, heights, widths, pixels)`` of these Image rows, pixels as stored (raw bytes, each row's own
    object: ``to_arrays`` would turn a bytes column into a character array)."""
    rows = query.proj("height", "width", "pixels").to_dicts()
    return tuple([row[name] for row in rows] for name in ("image_hash", "height", "width", "pixels"))


def image_arrays(hashes, heights, widths, pixels, *, checked: bool = True) -> list[np.ndarray]:
    """The uint8 (height, width) arrays of Image rows, each hashed again: a row whose pixels do not hash to
    its key (a raw INSERT on a server without the image trigger) is a StoreIntegrityError naming it."""
    arrays = []
    for digest, height, width, value in zip(hashes, heights, widths, pixels):
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = bytes(value)
            if len(value) != int(height) * int(width):
                raise StoreIntegrityError(
                    f"experiment.Image {digest}: {len(value)} bytes of pixels for a {height}x{width} image",
                    table=Image.full_table_name,
                    key={"image_hash": digest},
                    fault="pixel count differs from height x width",
                )
            array = np.frombuffer(value, dtype=np.uint8).reshape(int(height), int(width))
        else:
            array = np.asarray(value)
        if checked and (array.dtype != np.uint8 or image_hash(array) != digest):
            raise StoreIntegrityError(
                f"experiment.Image {digest}: its pixels do not hash to its key (a forged row?)",
                table=Image.full_table_name,
                key={"image_hash": digest},
                fault="pixels do not hash to image_hash",
            )
        arrays.append(array)
    return arrays


def check_image_row(row: dict) -> None:
    """ValueError unless ``row``'s pixels are uint8 (height, width) hashing to its ``image_hash``."""
    if not isinstance(row, dict):
        raise ValueError(f"Image rows are inserted as dicts (so each can be checked), got {type(row).__name__}")
    pixels = np.asarray(row.get("pixels"))
    shape = (row.get("height"), row.get("width"))
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or tuple(pixels.shape) != shape:
        raise ValueError(
            f"Image {row.get('image_hash')}: pixels must be uint8 {shape}, got {pixels.dtype} {pixels.shape}"
        )
    if image_hash(pixels) != row.get("image_hash"):
        raise ValueError(f"Image {row.get('image_hash')}: its pixels hash to {image_hash(pixels)}, not to its key")


@schema
class Trial(dj.Manual):
    """One presentation of an image: its row in the response matrix, its tier, and its place in the real
    presentation order (``presentation``; the trial files themselves come in random order)."""

    definition = """
    -> Scan
    trial_idx            : int32                    # row of Responses.responses
    ---
    -> Image
    frame_image_id       : int64                    # the id the lab's files used for this image
    tier                 : enum('train', 'validation', 'test', 'final_test', 'oracle')
    withheld             : bool                     # responses held out (all zero in a test tier): no stage uses it
    recorded_trial = ''  : varchar(64)              # the recording's own trial_idx (hashed in competition scans)
    presentation = null  : int64                    # that trial_idx as a number: the real presentation order
    start_time = null    : float64                  # seconds from scan start
    duration = null      : float64                  # seconds
    """


@schema
class Behavior(dj.Manual):
    """Pupil, running and eye position during a trial: what the predictive model's shifter and modulator read."""

    definition = """
    -> Trial
    ---
    pupil_x                   : float64             # pupil centre
    pupil_y                   : float64
    pupil_dilation            : float64
    pupil_dilation_derivative : float64
    running_speed             : float64
    """


@schema
class Responses(dj.Manual):
    """A scan's (n_trials, n_units) float32 matrix, rows trial_idx and columns unit_index.

    Stored as blocks of consecutive trials: DataJoint serialises an array in memory before writing it,
    so one 200 MB matrix would need three copies at once; blocks keep ingestion near one copy.
    """

    definition = """
    -> Scan
    ---
    n_blocks             : int16
    """

    class Block(dj.Part):
        definition = f"""
        -> master
        block_idx        : int16
        ---
        first_trial      : int32
        {stored_columns("responses", "float32 (n_trials_in_block, n_units)")}
        """


@schema
class Ingestion(dj.Manual):
    """Who ingested a scan and when: written last, in the scan's own transaction, so it also seals the scan.

    A scan with this row is complete (its trials, units and blocks all landed) and closed: on a lab's
    MySQL server the triggers ``neureg accounts --sql`` installs refuse any further Unit, Trial, Behavior
    or response row for it, and fill ``ingested_by``/``ingested_at`` from the server itself (the client's
    values are overwritten), so neither can be forged by a lab account. Only sealed scans are computed on.
    """

    definition = """
    -> Scan
    ---
    ingested_by          : varchar(255)             # database login, user@client-host (set by the server where sealed)
    ingested_at          : datetime                 # UTC
    neureg_version       : varchar(32)              # the neureg that validated the files
    """


@schema
class ScanSet(dj.Manual):
    """A named set of scans: what a stability analysis or a similarity target draws on (its lineage)."""

    definition = """
    scan_set             : char(32)                 # stable hash of the sorted member scan keys
    ---
    n_scans              : int16
    scan_set_note = ''   : varchar(255)
    """

    class Member(dj.Part):
        definition = """
        -> master
        -> Scan
        """

    @classmethod
    def create(cls, scan_keys, note: str = "") -> dict:
        """Insert the set of these scans if it is new; return its key. Every scan must exist and be sealed.

        A set already registered under this key must hold exactly these members: a set pre-registered
        with other members (its key names scans it does not hold) is refused, not reused."""
        members = sorted({(k["mouse"], int(k["session"]), int(k["scan_idx"])) for k in scan_keys})
        if not members:
            raise ValueError("a scan set needs at least one scan")
        keys = [{"mouse": m, "session": d, "scan_idx": s} for m, d, s in members]
        missing = [k for k in keys if not (Scan & k)]
        if missing:
            raise ValueError(f"not in experiment.Scan: {missing[:3]}")
        unsealed = [k for k in keys if not (Ingestion & k)]
        if unsealed:
            raise ValueError(f"not sealed (never completely ingested), so not in a set: {unsealed[:3]}")
        set_key = {"scan_set": stable_hash(members)}
        if not (cls & set_key):
            with transaction(cls.connection):
                cls.insert1(dict(set_key, n_scans=len(keys), scan_set_note=note[:255]))
                cls.Member.insert(dict(set_key, **k) for k in keys)
        set_members(set_key)
        return set_key

    def members(self) -> list[dict]:
        return [{k: m[k] for k in Scan.primary_key} for m in set_members(self.fetch1("KEY"))]


def set_members(key: dict) -> list[dict]:
    """The Member rows of one scan set, checked against the set itself: its key is the hash of exactly these
    scans and ``n_scans`` counts them. A member added after creation, or a set registered with other
    members than its key names, is a ValueError naming the set: no target is computed over it."""
    set_key = {"scan_set": key["scan_set"]}
    rows = (ScanSet.Member & set_key).keys(order_by="KEY")
    members = sorted((r["mouse"], int(r["session"]), int(r["scan_idx"])) for r in rows)
    recorded = (ScanSet & set_key).to_arrays("n_scans")
    if stable_hash(members) != set_key["scan_set"] or not len(recorded) or int(recorded[0]) != len(members):
        raise ValueError(
            f"scan set {set_key['scan_set']} holds {len(members)} member(s) its key does not name "
            f"(n_scans {recorded[0] if len(recorded) else '?'}): it was altered or forged; an administrator "
            "must delete it"
        )
    return rows


# ----------------------------------------------------------------------------------- loading helpers
def usable_trials(key: dict) -> np.ndarray:
    """Per trial in trial order: True unless its responses were withheld (every stage uses only these)."""
    withheld = (Trial & key).to_arrays("withheld", order_by="trial_idx")
    return ~np.asarray(withheld, dtype=bool)


def load_responses(key: dict, include_withheld: bool = False) -> np.ndarray:
    """The scan's float32 response matrix, rows in trial order, columns in unit order.

    The blocks must cover every trial exactly once (``response_blocks``): a missing or overlapping block
    is a StoreIntegrityError naming the scan and the trials, never a matrix with holes. Withheld trials
    (responses published as zeros) are left out unless asked for, so that no stage can mistake a zero for
    a measurement; ``load_trials`` leaves out the same rows.
    """
    n_trials, n_units = (Scan & key).fetch1("n_trials", "n_units")
    matrix = np.empty((n_trials, n_units), dtype=np.float32)
    for block_key, first, ref, digest in response_blocks(key, n_trials, n_units):
        # one block in memory besides the matrix; verified against its recorded shape and SHA-256
        matrix[first : first + ref.shape[0]] = verified(ref, digest, Responses.Block, block_key, "responses")
    if include_withheld:
        return matrix
    usable = usable_trials(key)
    return matrix if usable.all() else matrix[usable]


def response_blocks(key: dict, n_trials: int, n_units: int) -> list[tuple]:
    """(block key, first trial, store reference, SHA-256) of a scan's blocks, in trial order, once their
    recorded shapes are shown to tile trials 0..n_trials-1 exactly once (no file is read to know it)."""
    scan = {name: key[name] for name in Scan.primary_key if name in key}
    recorded = (Responses & key).to_arrays("n_blocks")
    if len(recorded) == 0:
        raise StoreIntegrityError(f"scan {scan} has no Responses row: its responses were never stored", key=scan)
    rows = (Responses.Block & key).to_dicts(order_by="first_trial")  # lazy references: metadata only
    blocks, covered = [], np.zeros(n_trials + 1, dtype=np.int64)
    for row in rows:
        block_key = {name: row[name] for name in Responses.Block.primary_key}
        ref, first = row["responses"], int(row["first_trial"])
        shape = tuple(ref.shape)
        if len(shape) != 2 or shape[1] != n_units or first < 0 or first + shape[0] > n_trials:
            raise StoreIntegrityError(
                f"{Responses.Block.full_table_name} {block_key}: a block of shape {shape} at trial {first} does "
                f"not fit the scan's {n_trials} x {n_units} matrix",
                table=Responses.Block.full_table_name,
                key=block_key,
            )
        covered[first] += 1
        covered[first + shape[0]] -= 1
        blocks.append((block_key, first, ref, row["responses_sha256"]))
    times = np.cumsum(covered)[:n_trials]
    if len(blocks) != int(recorded[0]) or np.any(times != 1):
        missing, twice = np.flatnonzero(times == 0), np.flatnonzero(times > 1)
        raise StoreIntegrityError(
            f"scan {scan}: its responses are incomplete ({len(blocks)} of {int(recorded[0])} recorded block(s)): "
            f"{_ranges(missing)} of {n_trials} trials have no responses"
            + (f", {_ranges(twice)} have them twice" if twice.size else "")
            + "; nothing is computed from it (re-ingest the scan)",
            table=Responses.Block.full_table_name,
            key=scan,
        )
    return blocks


def _ranges(trials: np.ndarray) -> str:
    """Trial numbers as ranges, for people: 'trials 10..19, 40' or 'no trials'."""
    if trials.size == 0:
        return "no trials"
    parts, start = [], trials[0]
    for previous, current in zip(trials, [*trials[1:], None]):
        if current is None or current != previous + 1:
            parts.append(f"{start}" if start == previous else f"{start}..{previous}")
            start = current
    return "trials " + ", ".join(parts[:6]) + (", ..." if len(parts) > 6 else "")


def load_trials(key: dict, include_withheld: bool = False) -> dict:
    """Per-trial arrays in trial order: image hash, tier, behaviour (n, 3) and pupil centre (n, 2); withheld
    trials left out unless asked for (the rows of ``load_responses``)."""
    query = Trial * Behavior & key
    trials = (query if include_withheld else query & "NOT withheld").to_arrays(
        "trial_idx", "image_hash", "tier", "pupil_x", "pupil_y", *BEHAVIOR_COLUMNS, order_by="trial_idx"
    )
    trial_idx, image_hash, tier, px, py, *behavior = trials
    return {
        "trial_idx": np.asarray(trial_idx, dtype=np.int64),
        "image_hash": np.asarray(image_hash, dtype=str),
        "tier": np.asarray(tier, dtype=str),
        "behavior": np.stack(behavior, axis=1).astype(np.float64),
        "pupil_center": np.stack([px, py], axis=1).astype(np.float64),
    }


def load_images(hashes) -> np.ndarray:
    """uint8 (n, H, W) pixels for the given image hashes, in that order."""
    hashes = list(hashes)
    found = image_columns(Image & _hash_in(hashes))
    by_hash = dict(zip(found[0], image_arrays(*found)))
    return np.stack([by_hash[h] for h in hashes]).astype(np.uint8)


def scans_without_usable_repeats():
    """Scans that get no oracle statistics because none of their repeated trials has responses (all withheld,
    as in the competition scans, or no repeats at all): what ``neureg status`` explains."""
    usable_repeats = Trial & "tier = 'oracle'" & "NOT withheld"
    return Scan - usable_repeats.proj()


def per_unit(part, key: dict, attribute: str) -> np.ndarray:
    """A per-unit float attribute of one scan (of any part keyed by ``Scan.Unit``), in response-matrix column order."""
    return np.asarray(_column(part * Scan.Unit & key, attribute, order_by="unit_index"), dtype=np.float64)


def unit_ids(key: dict) -> np.ndarray:
    """Unit ids in column order of the response matrix."""
    return np.asarray(_column(Scan.Unit & key, "unit_id", order_by="unit_index"), dtype=np.int64)


def known_images(hashes) -> set[str]:
    """Which of these image hashes ``Image`` already holds (ingestion inserts only the others)."""
    return set(_column(Image & _hash_in(hashes), "image_hash"))


def _hash_in(hashes) -> str:
    """An SQL restriction on image hashes; they are hex digests, so quoting them is safe."""
    hashes = sorted(set(hashes))
    if any(not re.fullmatch(r"[0-9a-f]{32}", h) for h in hashes):
        raise ValueError("image hashes are 32 lower-case hex digits")
    return "image_hash in ({})".format(",".join(f"'{h}'" for h in hashes)) if hashes else "FALSE"


def _column(query, attribute: str, **kwargs) -> np.ndarray:
    """One attribute as an array (DataJoint returns a bare array, or an empty tuple for no rows)."""
    values = query.to_arrays(attribute, **kwargs)
    return np.asarray(values) if len(values) else np.array([])
