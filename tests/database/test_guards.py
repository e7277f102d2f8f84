"""DataJoint 2.3.6's fixes, guarded on 2.3.5: configuration files another user could have written are refused,
and a session that was asked to use TLS but is not encrypted is refused, on the real servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datajoint as dj
import pytest

from neureg.database.guards import check_tls
from neureg.errors import ConfigurationError


def _status(env, cwd):
    return subprocess.run(
        [sys.executable, "-m", "neureg", "status"], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_a_config_file_in_a_folder_others_can_write_is_refused(pipeline, subprocess_env, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / ".git").mkdir()  # DataJoint's search for datajoint.json stops here
    (shared / "datajoint.json").write_text(json.dumps({"database.host": "attacker.example.org"}))
    shared.chmod(0o777)
    run = _status(subprocess_env, shared)
    assert run.returncode == 4 and "Traceback" not in run.stderr, run.stderr
    assert f"refusing DataJoint's configuration {shared / 'datajoint.json'}" in run.stderr
    assert "can be written by other users" in run.stderr
    shared.chmod(0o755)
    (shared / "datajoint.json").write_text(json.dumps({"loglevel": "INFO"}))  # harmless, and now safe
    again = _status(subprocess_env, shared)
    assert "refusing DataJoint's configuration" not in again.stderr and again.returncode == 0, again.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_config_file_another_user_owns_is_refused(pipeline, subprocess_env, tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / ".git").mkdir()
    config = folder / "datajoint.json"
    config.write_text(json.dumps({"loglevel": "INFO"}))
    os.chown(config, 65534, 65534)  # nobody
    run = _status(subprocess_env, folder)
    assert run.returncode == 4 and "it belongs to uid 65534, not to this user" in run.stderr, run.stderr


def test_tls_asked_for_on_an_unencrypted_session_is_refused(pipeline):
    """Neither test server encrypts (the embedded one is a socket, the CI MariaDB has no certificate)."""
    connection = dj.conn()
    with pytest.raises(ConfigurationError, match="use_tls is set but the session with .* is not encrypted"):
        check_tls(connection, {"database.use_tls": True, "database.host": "the test server"})
    check_tls(connection, {"database.use_tls": False, "database.host": "the test server"})  # not asked: fine
