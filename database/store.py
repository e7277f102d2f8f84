"""Arrays in the object store, each with its SHA-256 kept in the database and checked on every read.

DataJoint's ``<npy@store>`` trusts the store: a flipped byte loads without error, a valid but
wrong-shaped file is broadcast into the caller's array, and a truncated one fails with a message that
names neither the table nor the row. So every ``<npy@neureg>`` attribute ``x`` has a sibling column
``x_sha256``, the digest of the array's dtype, shape and bytes, written in the same INSERT as the
array; :func:`load_array` recomputes it after every read. A mismatch, a missing or unreadable file, or a
shape other than the one recorded is a :class:`StoreIntegrityError` naming the table, the key and the
file, so no stage computes from damaged data. ``neureg verify`` runs the same check over a whole store.

The store itself is DataJoint's: a local or shared folder (``protocol: file``) or an S3-compatible bucket
(``protocol: s3``), named ``neureg`` in DataJoint's store configuration. What neureg does to files by
itself (removing a failed ingest's blocks, judging an orphan's age) goes through :func:`store_files`,
the same fsspec filesystem DataJoint reads and writes, so it works the same on both.
"""

from __future__ import annotations

import importlib
import logging
import re
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import datajoint as dj
import numpy as np
from datajoint.errors import MissingExternalFile
from datajoint.storage import StorageBackend

from ..errors import ConfigurationError, StoreIntegrityError, StoreReferenceError
from ..models.digests import array_digest
from .settings import STORE, Settings

logger = logging.getLogger("neureg")

DIGEST_SUFFIX = "_sha256"


def stored_columns(name: str, what: str) -> str:
    """The two definition lines of one verified store array, for a table definition (an f-string):
    ``name`` in the store and ``name_sha256``, its digest, which :func:`load_array` checks on every read."""
    return (
        f"{name} : <npy@{STORE}>  # {what}\n"
        f"{name}{DIGEST_SUFFIX} : char(64)  # its SHA-256 (dtype, shape, bytes), checked on every read"
    )


def store_files():
    """``(filesystem, root, spec)`` of neureg's store: DataJoint's fsspec filesystem for it, the root that
    DataJoint's relative paths hang from (a folder, or ``bucket/location``), and the store's spec."""
    spec = dj.config.get_store_spec(STORE)
    if spec.get("protocol", "file") == "file":
        root = str(spec["location"]).rstrip("/")
    else:
        root = "/".join(part.strip("/") for part in (spec.get("bucket", ""), spec.get("location", "")) if part)
    return StorageBackend(spec).fs, root, spec


#: Where each lab member's ingests put their response blocks: ``members/<login>/<schema>/<table>/...``. A
#: member's store credentials may write and delete there only (docs/security.md, ``neureg accounts
#: --store-policy``), so no lab member can overwrite or delete another's scans or any computed array.
MEMBERS = "members"
_LOGIN_CHARACTER = re.compile(r"[A-Za-z0-9_.-]")


def member_prefix(login: str) -> str:
    """The store section of one database login (``user`` or ``user@host``): ``members/<user>``, with any
    character outside ``[A-Za-z0-9_.-]`` written as ``~xx`` (its code point in hex), so two logins never
    share a section and the name is the one a store policy names."""
    user = str(login).split("@", 1)[0]
    if not user:
        raise ConfigurationError("the database reports no login name, so ingestion has no store section to write to")
    return f"{MEMBERS}/" + "".join(c if _LOGIN_CHARACTER.fullmatch(c) else f"~{ord(c):02x}" for c in user)


@contextmanager
def schema_section(prefix: str):
    """Within this block, DataJoint writes (and its garbage collector walks) neureg's store objects under
    ``prefix`` instead of the store's ``schema_prefix``. References keep the full relative path, so every
    reader finds the file whatever section it was written in."""
    stores = dict(dj.config.stores)
    stores[STORE] = dict(stores[STORE], schema_prefix=prefix)
    with dj.config.override(stores=stores):
        yield


def member_sections() -> list[str]:
    """The members' sections that exist in the store (``members/<user>``), for the garbage collector."""
    fs, root, _ = store_files()
    base = f"{root}/{MEMBERS}"
    if not fs.exists(base):
        return []
    return sorted(f"{MEMBERS}/{path.rstrip('/').rsplit('/', 1)[-1]}" for path in fs.ls(base, detail=False))


def describe_store(settings: Settings) -> str:
    """Where the arrays go, for people: a folder, or ``s3://bucket/location at endpoint`` (never a key)."""
    if settings.store is not None:
        return str(settings.store)
    spec = dict(dj.config.stores.get(STORE) or {})
    if spec.get("protocol") == "s3":
        return f"s3://{spec.get('bucket')}/{spec.get('location', '')} at {spec.get('endpoint')}"
    return f"{spec.get('protocol', 'file')}: {spec.get('location')}"


def check_lab_store() -> None:
    """A store from DataJoint's config is complete and its protocol's library is installed; else one clear
    error (DataJoint would only fail at the first array, deep inside a job)."""
    try:
        spec = dj.config.get_store_spec(STORE)
    except Exception as exc:  # noqa: BLE001 - DataJoint's message names the missing or invalid setting
        raise ConfigurationError(f"DataJoint's store '{STORE}' is misconfigured: {exc}") from None
    if spec.get("protocol") == "s3":
        try:
            importlib.import_module("s3fs")
        except ImportError:
            raise ConfigurationError(
                f"DataJoint's store '{STORE}' is an S3 bucket, and S3 needs s3fs: pip install 'neureg[s3]' "
                "-c constraints.txt"
            ) from None


def private_folder(folder: Path) -> None:
    """Create ``folder`` readable by its owner only; warn about an existing one that everyone can read.

    A lab that shares a store through a group gives that folder to the group itself (chmod 2770, see the
    README); neureg never opens one up, and never narrows a folder it did not create."""
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700)
        folder.chmod(0o700)
    elif folder.stat().st_mode & 0o007:
        logger.warning("the object store %s is readable by every user on this machine (chmod o-rwx it)", folder)


def ensure_bucket() -> str | None:
    """Create the S3 store's bucket if it does not exist yet (``neureg init``); returns what was done."""
    fs, _, spec = store_files()
    if spec.get("protocol") != "s3":
        return None
    if fs.exists(spec["bucket"]):
        return f"bucket {spec['bucket']} exists"
    fs.mkdir(spec["bucket"])
    return f"bucket {spec['bucket']} created"


def modified_at(info: dict) -> float:
    """A store file's modification time (seconds since the epoch) from its fsspec ``info()``, which names it
    ``mtime`` on a local filesystem and ``LastModified`` on S3."""
    stamp = info.get("mtime", info.get("LastModified", info.get("created")))
    if isinstance(stamp, datetime):
        return stamp.timestamp()
    if stamp is None:
        raise OSError(f"the store reports no modification time for {info.get('name')}")
    return float(stamp)


def stored(attribute: str, array: np.ndarray) -> dict:
    """The two columns of one stored array, for an insert: ``dict(key, **stored("responses", matrix))``."""
    array = np.ascontiguousarray(array)
    return {attribute: array, attribute + DIGEST_SUFFIX: array_digest(array)}


def stored_attributes(table) -> list[str]:
    """The store-backed array attributes of a table (those with a digest column)."""
    names = table.heading.names
    return [name for name in names if name + DIGEST_SUFFIX in names]


def load_array(table, key: dict, attribute: str) -> np.ndarray:
    """One array attribute of one row; from the store, verified: its file exists, reads, has the recorded shape
    and hash. (An in-database ``<blob>`` has no digest column: the database keeps it whole.)"""
    if attribute + DIGEST_SUFFIX not in table.heading.names:
        from .blobs import fetch1_blobs  # an in-database <blob>: its expansion bounded

        return np.asarray(fetch1_blobs(table & key, attribute))
    ref, digest = (table & key).fetch1(attribute, attribute + DIGEST_SUFFIX)
    return verified(ref, digest, table, key, attribute)


def verified(ref, digest: str, table, key: dict, attribute: str) -> np.ndarray:
    """The array behind ``ref`` if it matches ``digest``; else a StoreIntegrityError that says where."""
    path = getattr(ref, "path", "?")

    def damaged(fault: str) -> StoreIntegrityError:
        where = {k: key[k] for k in table.primary_key if k in key}
        return StoreIntegrityError(
            f"{table.full_table_name}.{attribute} {where}: {fault} (store file {path})",
            table=table.full_table_name,
            key=where,
            path=path,
            fault=fault,
        )

    try:
        array = ref.load()
    except (FileNotFoundError, MissingExternalFile):
        raise damaged("the file is missing") from None
    except (ValueError, OSError, EOFError) as exc:
        raise damaged(f"the file is unreadable ({exc})") from None
    if tuple(array.shape) != tuple(ref.shape) or array.dtype != ref.dtype:
        raise damaged(
            f"the file holds {array.dtype} {tuple(array.shape)}, the database recorded {ref.dtype} {tuple(ref.shape)}"
        )
    if array_digest(array) != digest:
        raise damaged("the content does not match its SHA-256 recorded at insert")
    return array


def store_references(query, attribute: str) -> dict[str, dict]:
    """``{path: row key}`` of the store files the rows of ``query`` reference in ``attribute``.

    Read from the column's raw metadata (DataJoint's ``cursor`` and the codec's ``referenced_paths``, as its
    garbage collector does), so no file is opened. Unlike the collector, which logs a warning and skips the
    whole column, any value it cannot read as exactly one path in neureg's store raises
    :class:`StoreReferenceError` naming the row: whoever uses the answer to delete files must stop.
    """
    codec = query.heading.attributes[attribute].codec
    key_names = query.primary_key
    found: dict[str, dict] = {}
    for row in query.proj(attribute).cursor(as_dict=True):
        raw = row[attribute]
        if raw is None:
            continue
        key = {name: row[name] for name in key_names}
        try:
            refs = codec.referenced_paths(raw)
        except Exception as exc:  # noqa: BLE001 - any failure to read it is a doubt
            refs, fault = [], f"unreadable ({exc})"
        else:
            fault = "not a reference DataJoint can read"
        if len(refs) == 1 and isinstance(refs[0][0], str) and refs[0][0] and refs[0][1] in (None, STORE):
            found[refs[0][0]] = key
            continue
        if len(refs) == 1 and refs[0][1] not in (None, STORE) and isinstance(refs[0][1], str):
            continue  # another store's file: not ours to judge
        shown = str(raw)[:120]
        raise StoreReferenceError(f"{query.full_table_name}.{attribute} {key}: the store reference is {fault}: {shown}")
    return found


def remove_store_paths(paths) -> int:
    """Delete these store files (paths relative to the store root, as references give them); return how many.

    One delete per file (``rm_file``): s3fs's ``rm`` sends S3's batch delete, whose answer is 200 even for
    keys the server refused, so a refusal would pass as a deletion. Here a refused file raises
    PermissionError, and a file still there afterwards is an OSError naming it."""
    fs, root, _ = store_files()
    removed = 0
    for path in paths:
        full = f"{root}/{path}"
        if fs.exists(full):
            fs.rm_file(full)
            fs.invalidate_cache(full.rsplit("/", 1)[0])
            if fs.exists(full):
                raise OSError(f"the store kept {path} after deleting it (this account's store keys may not delete it)")
            removed += 1
    return removed
