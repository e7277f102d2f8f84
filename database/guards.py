"""Guards for what DataJoint 2.3.6 fixes, on the 2.3.5 these machines can install (docs/security.md).

* A configuration or secrets file DataJoint would read (``datajoint.json`` found upward from the working
  folder, ``.secrets/``) must belong to this user (or root) and sit in a folder others cannot write:
  another user could otherwise point this process at their server or store, or read its password.
* ``use_tls`` asked for means an encrypted session: checked on the server after connecting.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import ConfigurationError


def check_config_files() -> None:
    """Refuse DataJoint config and secrets files that another user owns or could have written."""
    from datajoint import settings as dj_settings

    config_path = dj_settings.find_config_file()
    candidates = [config_path] if config_path else []
    secrets = dj_settings.find_secrets_dir(config_path)
    if secrets is not None and Path(secrets).is_dir():
        candidates += [Path(secrets), *sorted(p for p in Path(secrets).iterdir() if p.is_file())]
    for path in candidates:
        _check_owned(Path(path))


def _check_owned(path: Path) -> None:
    me = os.geteuid()
    info = path.stat()
    if info.st_uid not in (me, 0):
        raise ConfigurationError(
            f"refusing DataJoint's configuration {path}: it belongs to uid {info.st_uid}, not to this user "
            f"(uid {me}); another user's file may point this process at their server or store"
        )
    folder = path.parent
    mode = folder.stat().st_mode
    if mode & stat.S_IWOTH or (mode & stat.S_IWGRP and folder.stat().st_uid not in (me, 0)):
        raise ConfigurationError(
            f"refusing DataJoint's configuration {path}: its folder {folder} can be written by other users, "
            "who could replace it; move it to a folder only you can write"
        )


def check_tls(connection, config) -> None:
    """When ``database.use_tls`` is set, the session must be encrypted; else refuse (exit 4), naming the server."""
    if not config["database.use_tls"]:
        return
    backend = connection.adapter.backend
    if backend == "mysql":
        row = connection.query("SHOW SESSION STATUS LIKE 'Ssl_cipher'").fetchone()
        encrypted = bool(row and row[1])
    else:
        row = connection.query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        encrypted = bool(row and row[0])
    if not encrypted:
        raise ConfigurationError(
            f"database.use_tls is set but the session with {config['database.host']} is not encrypted; "
            "refusing to send credentials and data in the clear (enable TLS on the server, or unset use_tls)"
        )
