"""Benchmark: an S3 store against a local folder store, for workers and for reading arrays.

Why: a lab that moves its store from a shared folder to a bucket wants to know what that costs. Two
numbers, each for a local folder store and for an S3 bucket (moto's S3 server on this machine, started
here; over a network a real MinIO adds its round trips):

* scheduling overhead per job: 4 worker processes (the real ``Worker``, the test suite's toy stage whose
  make() stores one 64 KB array per key) against MariaDB; jobs per second and worker-seconds per job,
  from the jobs table's own reserved and completed times;
* array reads: ``load_array`` (fetch, read, SHA-256 check) of --arrays arrays of --mb MB each, MB/s.

    python bench/bench_s3_store.py                       # 200 jobs, 8 arrays of 32 MB
    python bench/bench_s3_store.py --jobs 400 --mb 64

Needs MariaDB as the tests do (NEUREG_TEST_MYSQL_HOST/_PORT/_USER/_PASS, defaults 127.0.0.1:3306
neureg_ci/neureg_ci_pw) and the test extras (moto, s3fs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import datajoint as dj
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("neureg_toy_stage", ROOT / "tests/populate/test_worker.py")
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)

KEY, SECRET = "bench-key", "bench-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3() -> tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto's S3 server did not start")


def stores(port: int, folder: Path, bucket: str) -> dict[str, dict]:
    import s3fs

    s3fs.S3FileSystem(key=KEY, secret=SECRET, client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"}).mkdir(bucket)
    return {
        "local folder": {"protocol": "file", "location": str(folder)},
        "S3 (moto, loopback)": {
            "protocol": "s3",
            "endpoint": f"127.0.0.1:{port}",
            "bucket": bucket,
            "location": "bench",
            "access_key": KEY,
            "secret_key": SECRET,
            "secure": False,
        },
    }


def connect_mysql() -> dict:
    conftest = importlib.util.spec_from_file_location("neureg_tests_conftest", ROOT / "tests/conftest.py")
    suite = importlib.util.module_from_spec(conftest)
    conftest.loader.exec_module(suite)
    settings = suite.mysql_settings()  # the account and server the test suite uses
    for k, v in settings.items():
        dj.config[k] = v
    dj.config["safemode"] = False
    return toy.dj_env()


def bench_workers(store: dict, n_jobs: int, n_workers: int, env: dict) -> dict:
    dj.config.stores = {"neureg": store}
    stage = toy.toy_stage(f"bench_s3_{uuid.uuid4().hex[:8]}", stored=True)
    try:
        stage.Item.insert(dict(item=i) for i in range(n_jobs))
        worker_env = {k: v for k, v in os.environ.items() if not k.startswith(("DJ_", "NEUREG_"))}
        worker_env.update(env, DJ_STORES=json.dumps({"neureg": store}), **{toy.TOY_STORED: "1"})
        command = [
            sys.executable,
            str(ROOT / "tests/populate/test_worker.py"),
            stage.schema.database,
            "worker",
            "--once",
            "--orphan-timeout",
            "60",
        ]
        procs = [
            subprocess.Popen(command, env=worker_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(n_workers)
        ]
        if any(p.wait(timeout=1800) for p in procs):
            raise RuntimeError("a worker failed")
        assert len(stage.Square()) == n_jobs
        jobs = stage.Square().jobs.full_table_name
        [(span,)] = (
            dj.conn()
            .query(f"SELECT TIMESTAMPDIFF(MICROSECOND, MIN(reserved_time), MAX(completed_time)) / 1e6 FROM {jobs}")
            .fetchall()
        )
        span = float(span)
        return {
            "jobs": n_jobs,
            "workers": n_workers,
            "seconds": round(span, 2),
            "jobs_per_s": round(n_jobs / span, 1),
            "worker_ms_per_job": round(1000 * n_workers * span / n_jobs, 1),
        }
    finally:
        stage.schema.drop(prompt=False)


def bench_reads(store: dict, n_arrays: int, mb: int) -> dict:
    from neureg.database.store import load_array, stored

    dj.config.stores = {"neureg": store}
    schema = dj.Schema(f"bench_s3r_{uuid.uuid4().hex[:8]}")

    @schema
    class Big(dj.Manual):
        definition = """
        idx          : int32
        ---
        array        : <npy@neureg>
        array_sha256 : char(64)
        """

    try:
        rng = np.random.default_rng(0)
        size = mb * 2**20 // 4
        for i in range(n_arrays):
            Big.insert1(dict(idx=i, **stored("array", rng.standard_normal(size, dtype=np.float32))))
        start = time.perf_counter()
        total = sum(load_array(Big, {"idx": i}, "array").nbytes for i in range(n_arrays))
        seconds = time.perf_counter() - start
        return {
            "arrays": n_arrays,
            "mb_each": mb,
            "seconds": round(seconds, 2),
            "mb_per_s": round(total / 2**20 / seconds, 1),
        }
    finally:
        schema.drop(prompt=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--arrays", type=int, default=8)
    parser.add_argument("--mb", type=int, default=32)
    args = parser.parse_args()
    env = connect_mysql()
    proc, port = start_s3()
    folder = Path(tempfile.mkdtemp(prefix="neureg_bench_store_"))
    try:
        results = {}
        for name, store in stores(port, folder, f"bench-{uuid.uuid4().hex[:8]}").items():
            results[name] = {
                "workers": bench_workers(store, args.jobs, args.workers, env),
                "reads": bench_reads(store, args.arrays, args.mb),
            }
        a, b = results.values()
        results["S3 / local"] = {
            "worker_ms_per_job": round(b["workers"]["worker_ms_per_job"] / a["workers"]["worker_ms_per_job"], 2),
            "read_mb_per_s": round(b["reads"]["mb_per_s"] / a["reads"]["mb_per_s"], 2),
        }
        results["load_average"] = os.getloadavg()
        print(json.dumps(results, indent=1))
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
