"""The one insert path of a validated scan: every row of it in one transaction, sealed last.

Ingests run concurrently in a lab: two scans of one mouse, or sharing images, both try to add the Mouse,
Session or Image row, and the later commit fails as a duplicate. The whole transaction is then tried again
(now seeing the other's rows). If the duplicate is the scan itself, it is already there; if the other
transaction holds the rows past the server's lock wait timeout, the scan is being ingested (exit 3 too).
A failed attempt removes exactly the response blocks it wrote (their paths read back from its own,
uncommitted rows), never a file of a concurrent ingest of the same scan.
"""

from __future__ import annotations

import datetime
import logging
import random
import time

import datajoint as dj
import numpy as np

from .. import __version__
from ..database.store import member_prefix, remove_store_paths, schema_section, store_files, store_references, stored
from ..database.transaction import transaction
from ..errors import ConfigurationError, ScanExistsError, ScanFolderError, StoreIntegrityError
from ..schemas.experiment import (
    BEHAVIOR_COLUMNS,
    Behavior,
    Image,
    Ingestion,
    Mouse,
    Responses,
    Scan,
    Session,
    Trial,
    image_arrays,
    image_columns,
    known_images,
)
from .folder import ScanData

logger = logging.getLogger("neureg")

RESPONSE_BLOCK_TRIALS = 500  # 16 MB per block at 8000 units
IMAGE_BATCH = 256  # images per INSERT: 9 MB of 144x256 pixels


def _optional(value: float):
    return None if value is None or not np.isfinite(value) else float(value)


def insert_scan(data: ScanData, source_path: str = "", tries: int = 5) -> dict:
    """Insert a validated scan in one transaction: everything lands, or nothing does (module notes)."""
    for attempt in range(tries):
        written: list[str] = []  # the store files this attempt wrote: the only ones it may remove
        try:
            return _insert_scan_once(data, source_path, written)
        except dj.errors.DuplicateError:
            _discard(written, data.key)
            if Scan & data.key:
                raise _exists(data, source_path) from None
            if attempt == tries - 1:
                raise
            time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))
        except (ScanExistsError, ScanFolderError, ConfigurationError):
            _discard(written, data.key)
            raise
        except BaseException as exc:
            # The transaction rolled back, but the response blocks this attempt wrote to the store stay
            # there unreferenced: remove exactly those (never another ingest's).
            _discard(written, data.key)
            if _lock_conflict(exc):
                if Scan & data.key:
                    raise _exists(data, source_path) from None
                raise ScanExistsError(
                    f"scan {data.mouse} / {data.session} / scan {data.scan} is being ingested by another process "
                    "right now (its rows stayed locked past the server's lock wait timeout); it appears when that "
                    "ingest commits: check with `neureg status`, rerun only if it does not"
                ) from None
            raise
    raise AssertionError("unreachable")


def _lock_conflict(exc: BaseException) -> bool:
    """A lock wait timeout or deadlock: another transaction holds the rows this one needs (MySQL 1205/1213,
    PostgreSQL 55P03/40P01), not a lost server."""
    code = exc.args[0] if getattr(exc, "args", None) else None
    return code in (1205, 1213) or getattr(exc, "pgcode", None) in ("55P03", "40P01")


def _discard(written: list[str], key: dict) -> None:
    """Delete the store files this attempt wrote, unless a committed row references them after all.

    Every block file has a random token in its name, so the list names this attempt's files and nobody
    else's: a concurrent ingest of the same scan, winning or still running, keeps every one of its files.
    A block whose INSERT failed is in the list too (what appeared in its own folder meanwhile, see
    ``_block_files``). Best effort: a store or server that cannot be reached keeps them for ``neureg gc``.
    """
    if not written:
        return
    try:
        committed = set(store_references(Responses.Block & key, "responses")) if Scan & key else set()
    except Exception:  # noqa: BLE001 - the server is gone: without knowing whether it committed, delete nothing
        logger.debug("server unreachable after a failed ingest: its blocks are left for `neureg gc`")
        return
    try:
        remove_store_paths(p for p in written if p not in committed)
    except Exception as exc:  # noqa: BLE001 - no store, or it is unreachable: gc's business
        logger.warning("could not remove the failed ingest's blocks (%s); `neureg gc` lists them", exc)


def _exists(data: ScanData, source_path: str = "") -> Exception:
    """The refusal for a scan whose key is taken: exit 3 when it is an ingested (sealed) scan; exit 2, naming
    it, when the row is unsealed, which no ingest ever commits (its seal is in the same transaction): a row
    made by hand, squatting the key."""
    if Ingestion & data.key:
        return ScanExistsError(
            f"scan {data.mouse} / {data.session} / scan {data.scan} is already in the database; "
            "delete it first (experiment.Scan & key).delete() if it must be replaced"
        )
    return ScanFolderError(
        source_path or "scan",
        f"scan {data.mouse} / {data.session} / scan {data.scan} is taken by an unsealed row that `neureg ingest` "
        "did not make (no Ingestion row records who did); an administrator must delete it before this scan "
        "can be ingested",
    )


def _insert_scan_once(data: ScanData, source_path: str, written: list[str]) -> dict:
    key = data.key
    if Scan & key:
        raise _exists(data, source_path)
    n_trials, n_units = data.responses.shape
    mouse_key = {"mouse": data.mouse}
    with transaction(Scan.connection):
        if not (Mouse & mouse_key):
            Mouse.insert1(mouse_key)
        session_key = dict(mouse_key, session=data.session)
        known_date = (Session & session_key).to_arrays("session_date") if Session & session_key else None
        if known_date is None:  # no skip_duplicates: on MySQL it needs UPDATE, which lab accounts lack
            Session.insert1(dict(session_key, session_date=data.session_date))
        elif data.session_date is not None and known_date[0] not in (None, data.session_date):
            raise ScanFolderError(
                f"{source_path or 'scan.json'}",
                f"session {data.mouse} / {data.session} is in the database as recorded on {known_date[0]}"
                f"{_session_origin(session_key)}; this scan says {data.session_date}",
            )
        Scan.insert1(
            dict(
                key,
                area=data.area,
                depth=_optional(data.depth),
                frame_rate=_optional(data.frame_rate),
                scan_notes=data.notes,
                n_trials=n_trials,
                n_units=n_units,
                source_path=source_path[:1024],
            )
        )
        Scan.Unit.insert(
            dict(
                key,
                unit_id=int(u),
                unit_index=i,
                x=float(p[0]),
                y=float(p[1]),
                z=float(p[2]),
                unit_area=a,
                unit_layer=layer,
            )
            for i, (u, p, a, layer) in enumerate(
                zip(data.unit_ids, data.unit_positions, data.unit_areas, data.unit_layers)
            )
        )
        known = known_images(data.images)
        _check_reused_images(data, known)
        new = [h for h in data.images if h not in known]
        for first in range(0, len(new), IMAGE_BATCH):  # a batch at a time: one INSERT holds its pixels twice
            batch = [(h, data.images[h]) for h in new[first : first + IMAGE_BATCH]]
            Image.insert(
                dict(image_hash=h, source_id=data.image_source_ids[h], height=p.shape[0], width=p.shape[1], pixels=p)
                for h, p in batch
            )
        Trial.insert(
            dict(
                key,
                trial_idx=t,
                image_hash=data.trial_images[t],
                frame_image_id=int(data.frame_ids[t]),
                tier=str(data.tiers[t]),
                withheld=bool(data.withheld[t]),
                recorded_trial=str(data.trial_labels[t]),
                presentation=data.presentation[t],
                start_time=_optional(data.start_time[t]),
                duration=_optional(data.duration[t]),
            )
            for t in range(n_trials)
        )
        Behavior.insert(
            dict(
                key,
                trial_idx=t,
                pupil_x=float(data.pupil_center[t, 0]),
                pupil_y=float(data.pupil_center[t, 1]),
                **{name: float(data.behavior[t, c]) for c, name in enumerate(BEHAVIOR_COLUMNS)},
            )
            for t in range(n_trials)
        )
        starts = range(0, n_trials, RESPONSE_BLOCK_TRIALS)
        Responses.insert1(dict(key, n_blocks=len(starts)))
        _insert_blocks(data, key, starts, written)
        Ingestion.insert1(
            dict(
                key,
                ingested_by=str(Scan.connection.conn_info.get("user", ""))[:255],
                ingested_at=datetime.datetime.now(datetime.UTC).replace(tzinfo=None),
                neureg_version=__version__,
            )
        )
    return key


def _insert_blocks(data: ScanData, key: dict, starts: range, written: list[str]) -> None:
    """The response blocks, written in the ingesting member's own store section (``members/<login>``): the
    only part of the store a lab member's credentials may write (docs/security.md, "Roles")."""
    section = member_prefix(Scan.connection.conn_info.get("user", ""))
    with schema_section(section):
        for block, first in enumerate(starts):
            rows = np.ascontiguousarray(data.responses[first : first + RESPONSE_BLOCK_TRIALS], dtype=np.float32)
            block_key = dict(key, block_idx=block)
            before = _block_files(block_key)
            try:
                Responses.Block.insert1(dict(block_key, first_trial=first, **stored("responses", rows)))
            except BaseException as exc:
                # The file (or the partial one a full disk left, ``.npy.saving``) was written before the
                # INSERT failed. This transaction holds the Scan row, so no other live ingest of this scan
                # writes blocks now: what is new in the block's own folder is this attempt's.
                written.extend(_block_files(block_key) - before)
                if isinstance(exc, PermissionError):
                    raise ConfigurationError(
                        f"the object store refused this account's keys writing {section}/ ({exc}): a lab member's "
                        f"store keys must be allowed to write their own section {section}/ (`neureg accounts "
                        "--store-policy lab`, docs/security.md); nothing was ingested"
                    ) from None
                raise
            written.extend(store_references(Responses.Block & block_key, "responses"))


def _block_files(block_key: dict) -> set[str]:
    """The files in one block's store folder, relative to the store root (as references name them).

    DataJoint lays a schema-addressed store out as ``<root>/<schema_prefix>/<schema>/<table>/<k>=<v>/...``
    over the primary key (its store spec; within ``_insert_blocks``, the member's section); an unreachable
    store lists nothing (gc's business then)."""
    try:
        fs, root, spec = store_files()
        folder = "/".join(
            [spec.get("schema_prefix", "_schema"), Responses.Block.database, Responses.Block.table_name]
            + [f"{name}={block_key[name]}" for name in ("mouse", "session", "scan_idx", "block_idx")]
        )
        if not fs.exists(f"{root}/{folder}"):
            return set()
        return {f"{folder}/{path.rsplit('/', 1)[-1]}" for path in fs.ls(f"{root}/{folder}", detail=False)}
    except Exception:  # noqa: BLE001 - best effort, like the removal itself
        return set()


def _session_origin(session_key: dict) -> str:
    """Who put a session in the database, from its scans' seals: ' (scans 1, 2 ingested by u@h)' or ''."""
    rows = (Ingestion & session_key).to_dicts()
    if not rows:
        return " (by no sealed scan: someone inserted the session row by hand)"
    who = sorted({r["ingested_by"] for r in rows})
    return f" (scan(s) {sorted(r['scan_idx'] for r in rows)} ingested by {', '.join(who)})"


def _check_reused_images(data: ScanData, known: set[str]) -> None:
    """An existing Image row this scan would reuse must hold exactly its pixels (pixel for pixel): a row put
    there under the hash of someone's future stimulus, with other pixels, is refused naming the image."""
    hashes = sorted(known)
    for first in range(0, len(hashes), IMAGE_BATCH):
        batch = hashes[first : first + IMAGE_BATCH]
        found = image_columns(Image & [{"image_hash": h} for h in batch])
        try:
            stored = dict(zip(found[0], image_arrays(*found, checked=False)))
        except StoreIntegrityError:  # bytes that are no (height, width) image: other pixels all the same
            stored = {}
        for digest in batch:
            pixels = data.images[digest]
            if digest not in stored or not np.array_equal(stored[digest], pixels) or stored[digest].dtype != np.uint8:
                trial = data.trial_images.index(digest)
                root = getattr(data.images, "root", None)
                raise ScanFolderError(
                    f"{root}/data/images/{trial}.npy" if root else f"data/images/{trial}.npy",
                    f"image {digest} is already in the database with other pixels under this content hash "
                    "(a forged Image row?); nothing was ingested, ask an administrator to remove that row",
                )
