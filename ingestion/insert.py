"""The one insert path of a validated scan: every row of it in one transaction, sealed last.

Ingests run concurrently in a lab: two scans of one mouse, or sharing images, both try to add the Mouse,
Session or Image row, and the later commit fails as a duplicate. The whole transaction is then tried again
(now seeing the other's rows). If the duplicate is the scan itself, it is already there. A failed insert
removes the response blocks it had already written to the store (they are written before the commit).
"""

from __future__ import annotations

import datetime
import logging
import random
import time

import datajoint as dj
import numpy as np

from .. import __version__
from ..database.store import store_files, stored
from ..database.transaction import transaction
from ..errors import ScanExistsError
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
        try:
            return _insert_scan_once(data, source_path)
        except dj.errors.DuplicateError:
            if Scan & data.key:
                raise _exists(data) from None
            _discard_scan_blocks(data.key)
            if attempt == tries - 1:
                raise
            time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))
        except ScanExistsError:
            raise
        except BaseException:
            # The transaction rolled back, but the response blocks already written to the store (or the
            # partial one a full disk left, ``.npy.saving``) stay there unreferenced: remove them.
            _discard_scan_blocks(data.key)
            raise
    raise AssertionError("unreachable")


def _discard_scan_blocks(key: dict) -> None:
    """Delete the store files of a scan whose insert failed, if the scan is not in the database.

    DataJoint lays a store out as ``<root>/<schema_prefix>/<schema>/<table>/<attr>=<value>/...`` (its store
    spec; the root is a folder or ``bucket/location``); only the failed scan's own folder of
    Responses.Block is touched, and only while no Scan row claims it (a concurrent ingest of the same scan
    that won keeps its files). Best effort: a store that cannot be reached keeps them for ``neureg gc``.
    """
    try:
        claimed = bool(Scan & key)
    except Exception:  # noqa: BLE001 - the server is gone: without knowing, delete nothing
        return
    if claimed:
        return
    try:
        fs, root, spec = store_files()
        folder = "/".join(
            [root, spec.get("schema_prefix", "_schema"), Responses.Block.database, Responses.Block.table_name]
            + [f"{name}={key[name]}" for name in ("mouse", "session", "scan_idx")]
        )
        if fs.exists(folder):
            fs.rm(folder, recursive=True)
    except Exception as exc:  # noqa: BLE001 - no store configured, or it is unreachable: gc's business
        logger.warning("could not remove the failed ingest's blocks (%s); `neureg gc` lists them", exc)


def _exists(data: ScanData) -> ScanExistsError:
    return ScanExistsError(
        f"scan {data.mouse} / {data.session} / scan {data.scan} is already in the database; "
        "delete it first (experiment.Scan & key).delete() if it must be replaced"
    )


def _insert_scan_once(data: ScanData, source_path: str) -> dict:
    key = data.key
    if Scan & key:
        raise _exists(data)
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
            raise ValueError(
                f"session {data.mouse} / {data.session} was recorded on {known_date[0]}, "
                f"this scan says {data.session_date}"
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
                frame_image_id=data.image_source_ids[data.trial_images[t]],
                tier=str(data.tiers[t]),
                withheld=bool(data.withheld[t]),
                recorded_trial=str(data.trial_labels[t]),
                presentation=None if np.isnan(data.presentation[t]) else int(data.presentation[t]),
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
        for block, first in enumerate(starts):
            rows = np.ascontiguousarray(data.responses[first : first + RESPONSE_BLOCK_TRIALS], dtype=np.float32)
            Responses.Block.insert1(dict(key, block_idx=block, first_trial=first, **stored("responses", rows)))
        Ingestion.insert1(
            dict(
                key,
                ingested_by=str(Scan.connection.conn_info.get("user", ""))[:255],
                ingested_at=datetime.datetime.now(datetime.UTC).replace(tzinfo=None),
                neureg_version=__version__,
            )
        )
    return key
