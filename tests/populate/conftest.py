"""Fixtures of the populate tests: an S3-protocol server (moto's) and a bucket behind a TCP link a test can cut.

The bucket is served by moto's S3 server (``moto.server``, the S3 REST protocol over HTTP; README "Running at
lab scale" says why moto and not MinIO), reached through a :class:`StoreLink` that a test can cut, as a
switch or a network partition would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("neureg_fault_helpers_conftest", HERE / "test_faults.py")
faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(faults)
toy, clean_env, wait_for = faults.toy, faults.clean_env, faults.wait_for
s3fs = pytest.importorskip("s3fs", reason="the S3 tests need s3fs and moto (pip install -e '.[test]')")

ACCESS_KEY, SECRET_KEY = "neureg-test-key", "neureg-test-secret"


class StoreLink:
    """A TCP link to the S3 server that can be cut (connections refused, open ones dropped) and restored."""

    def __init__(self, target_port: int):
        self.target, self.port = ("127.0.0.1", target_port), faults._free_port()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        try:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in the other thread (close alone does not)
        except OSError:
            pass
        listener.close()
        with self._lock:
            for conn in self._open:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self._open.clear()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source, sink) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for conn in (source, sink):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


S3_VARIABLE = "NEUREG_TEST_S3_PORT"  # .ci/run starts moto's S3 server on 127.0.0.1 and sets this


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The S3-protocol server: the one .ci/run started (its port in NEUREG_TEST_S3_PORT), else moto's server
    started here for the session. Yields its port on 127.0.0.1."""

    def up(port):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    if os.environ.get(S3_VARIABLE):
        port = int(os.environ[S3_VARIABLE])
        if not up(port):
            pytest.fail(f"{S3_VARIABLE}={port} but no S3 server answers on 127.0.0.1:{port}")
        yield port
        return
    port = faults._free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    wait_for(lambda: up(port) or proc.poll() is not None, 60, "moto's S3 server")
    assert proc.poll() is None, "moto's S3 server did not start (see moto.log)"
    yield port
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def s3_lab(pipeline, s3_server, tmp_path):
    """A fresh bucket behind a cuttable link, and the environment of a worker host that uses it."""
    link = StoreLink(s3_server)
    bucket = f"neureg-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(
        key=ACCESS_KEY, secret=SECRET_KEY, client_kwargs={"endpoint_url": f"http://127.0.0.1:{s3_server}"}
    )
    fs.mkdir(bucket)
    store = {
        "protocol": "s3",
        "endpoint": f"127.0.0.1:{link.port}",
        "bucket": bucket,
        "location": "lab",
        "access_key": ACCESS_KEY,
        "secret_key": SECRET_KEY,
        "secure": False,
    }
    prefix = f"s{uuid.uuid4().hex[:8]}_"
    host_home = tmp_path / "host"
    env = clean_env(
        {
            "NEUREG_PREFIX": prefix,
            "DJ_STORES": json.dumps({"neureg": store}),
            "NEUREG_HOME": str(pipeline.home if pipeline.backend == "postgres" else host_home),
        }
    )
    env.update(toy.dj_env() if pipeline.backend == "mysql" else {"NEUREG_BACKEND": "embedded"})
    if pipeline.backend == "mysql":
        env["NEUREG_BACKEND"] = "server"
    lab = type("S3Lab", (), {})()
    lab.env, lab.fs, lab.bucket, lab.link, lab.prefix, lab.store = env, fs, bucket, link, prefix, store
    yield lab
    link.cut()
    _drop_schemas(pipeline, prefix)


def _drop_schemas(pipeline, prefix: str) -> None:
    import datajoint as dj

    conn = dj.conn()
    names = [n for n in conn.query("SELECT schema_name FROM information_schema.schemata").fetchall()]
    for (name,) in names:
        if name.startswith(prefix):
            try:
                dj.Schema(name, create_schema=False).drop(prompt=False)
            except Exception:  # noqa: BLE001 - a dependent schema drops with its upstream one
                pass


@pytest.fixture(scope="session")
def s3_kit(s3_server):
    """For a test that sets up its own bucket (the README's recipe): the server's port, a cuttable link to it,
    the keys, and the schema dropper."""
    return SimpleNamespace(
        port=s3_server,
        link=lambda: StoreLink(s3_server),
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        drop_schemas=_drop_schemas,
    )
