"""Workers on "several hosts" sharing one database server and one S3 bucket: a real S3-protocol server.

Each worker is its own process configured only the way a host would be: DataJoint's settings (``DJ_HOST``,
``DJ_USER``, ``DJ_PASS``, ...) and DataJoint's store settings (``DJ_STORES``, a store named ``neureg`` of
protocol ``s3``). The bucket is served by moto's S3 server (``moto.server``, the S3 REST protocol over
HTTP; README "Running at lab scale" says why moto and not MinIO), reached through a TCP link
(``StoreLink``) that a test can cut, as a switch or a network partition would.

On the mysql run these workers share the MariaDB server; on the postgres run, this session's embedded
server. The schemas get a prefix of their own: the test process's pipeline keeps its file store.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import datajoint as dj
import numpy as np
import pytest

from neureg.ingestion.folder import read_scan_folder
from neureg.upkeep.store_policy import store_policy

s3fs = pytest.importorskip("s3fs", reason="the S3 tests need s3fs and moto (pip install -e '.[test]')")

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("neureg_fault_helpers", HERE / "test_faults.py")
faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(faults)
toy = faults.toy
NEUREG, clean_env, wait_for = faults.NEUREG, faults.clean_env, faults.wait_for


def run(command, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def count(status: dict, prefix: str, table: str) -> int:
    """A row count from `neureg status --json` (keys are quoted full table names, `db`.`table` or "db"."table")."""
    [value] = [
        v for k, v in status.items() if prefix in k and k.replace('"', "").replace("`", "").endswith(f".{table}")
    ]
    return value


def objects(lab) -> list[str]:
    lab.fs.invalidate_cache()
    return [p for p in lab.fs.find(f"{lab.bucket}/lab") if not p.endswith("/")]


# ------------------------------------------------------------------------------------------ the pipeline
def test_hosts_share_scans_and_results_through_the_bucket(pipeline, s3_lab, scan_folder_factory, tmp_path, workers):
    """Ingest on one host, three workers on others, a reader on a fourth: every array crosses the bucket."""
    folders = [scan_folder_factory(tmp_path / f"scan{i}", mouse="s3mouse", scan=i, seed=i) for i in (1, 2, 3)]
    ingest = run([*NEUREG, "ingest", "--json", *map(str, folders)], s3_lab.env)
    assert ingest.returncode == 0, ingest.stderr
    assert objects(s3_lab), "the ingest wrote nothing to the bucket"
    assert not (Path(s3_lab.env["NEUREG_HOME"]) / "store").exists() or pipeline.backend == "postgres"

    group = workers(s3_lab.env)
    for _ in range(3):
        group.start([*NEUREG, "worker", "--once", "--stage", "oracle", "--orphan-timeout", "60"])
    assert group.wait(timeout=300) == [0, 0, 0], group.output()
    log = group.output()
    for i in (1, 2, 3):
        described = f"mouse=s3mouse session=1 scan_idx={i}"
        for table in ("OracleStats", "DataSimilarity", "OracleSimilarity"):
            assert len(re.findall(rf"done {table} {described} in ", log)) == 1, (table, i, log[-3000:])

    # A reader host: the responses it loads from the bucket are the folder's, and the noise variances the
    # workers computed from them match numpy's, computed here from the folder alone.
    reader = run([sys.executable, "-c", READER, *map(str, folders)], s3_lab.env)
    assert reader.returncode == 0, reader.stderr
    for folder, row in zip(folders, json.loads(reader.stdout.strip().splitlines()[-1])):
        data = read_scan_folder(folder)
        assert np.array_equal(np.asarray(row["responses"], dtype=np.float32), data.responses), folder
        labels = np.asarray(data.trial_images)
        names, counts = np.unique(labels, return_counts=True)
        noise = np.mean(
            [data.responses[labels == h].astype(np.float64).var(axis=0, ddof=1) for h in names[counts > 1]], axis=0
        )
        stored = dict(zip(row["unit_ids"], row["noise_var"]))
        np.testing.assert_allclose([stored[u] for u in data.unit_ids.tolist()], noise, rtol=1e-5, atol=1e-9)

    verify = run([*NEUREG, "verify", "--json"], s3_lab.env)
    assert verify.returncode == 0, verify.stderr
    report = json.loads(verify.stdout)
    assert report["damaged"] == [] and report["checked"] == len(objects(s3_lab)) >= 3  # every object, each verified


READER = r"""
import json, sys
import neureg
from neureg.ingestion.folder import read_scan_folder
from neureg.upkeep.store_policy import store_policy

pipe = neureg.connect()
rows = []
for folder in sys.argv[1:]:
    key = read_scan_folder(folder).key
    units = (pipe.oracle.OracleStats.Unit & key).proj("noise_var").to_dicts()
    rows.append(dict(responses=pipe.experiment.load_responses(key).tolist(),
                     unit_ids=[int(u["unit_id"]) for u in units], noise_var=[float(u["noise_var"]) for u in units]))
print(json.dumps(rows))
"""


def test_damaged_and_orphaned_objects_in_the_bucket(pipeline, s3_lab, scan_folder_factory, tmp_path):
    """The reliability checks hold on S3: a flipped byte and a deleted object are found by `neureg verify`
    and refused by a stage; an object no row references is listed, then removed, by `neureg gc`."""
    folders = [scan_folder_factory(tmp_path / f"scan{i}", mouse="s3damage", scan=i, seed=10 + i) for i in (1, 2)]
    assert run([*NEUREG, "ingest", *map(str, folders)], s3_lab.env).returncode == 0
    blocks = sorted(p for p in objects(s3_lab) if "responses" in p)
    assert len(blocks) >= 2, blocks
    flipped, deleted = blocks[0], blocks[-1]
    content = bytearray(s3_lab.fs.cat(flipped))
    content[-1] ^= 0xFF
    s3_lab.fs.pipe(flipped, bytes(content))
    s3_lab.fs.rm(deleted)

    verify = run([*NEUREG, "verify", "--json"], s3_lab.env)
    assert verify.returncode == 1, verify.stderr
    damaged = {d["fault"]: d["path"] for d in json.loads(verify.stdout)["damaged"]}
    assert set(damaged) == {"the content does not match its SHA-256 recorded at insert", "the file is missing"}
    assert flipped.endswith(damaged["the content does not match its SHA-256 recorded at insert"])
    assert deleted.endswith(damaged["the file is missing"])

    populate = run([*NEUREG, "populate", "--stage", "oracle", "--keep-going"], s3_lab.env)
    assert populate.returncode == 1 and "does not match its SHA-256" in populate.stderr, populate.stderr
    status = json.loads(run([*NEUREG, "status", "--json"], s3_lab.env).stdout)
    assert count(status, s3_lab.prefix, "__oracle_stats") == 0, status

    orphan = flipped.rsplit("/", 1)[0] + "/orphan.npy"
    s3_lab.fs.pipe(orphan, b"left by a killed ingest")
    gc = run([*NEUREG, "gc", "--json", "--min-age-hours", "0"], s3_lab.env)
    assert gc.returncode == 0, gc.stderr
    listed = json.loads(gc.stdout)
    assert [p for p in listed["old"] if p.endswith("orphan.npy")] and len(listed["old"]) == 1, listed
    assert run([*NEUREG, "gc", "--delete", "--min-age-hours", "0"], s3_lab.env).returncode == 0
    assert orphan not in objects(s3_lab) and flipped in objects(s3_lab)


# ------------------------------------------------------------------------------------------ worker faults
@pytest.fixture
def stored_toy(pipeline, s3_lab, tmp_path):
    """The toy stage with an array per item in the bucket, and the environment of its worker hosts."""
    stage = toy.toy_stage(f"{s3_lab.prefix}toy", stored=True)
    stage.log = tmp_path / "toy.log"
    stage.database = stage.schema.database
    stage.env = clean_env(
        {**toy.dj_env(), "DJ_STORES": s3_lab.env["DJ_STORES"], toy.TOY_LOG: str(stage.log), toy.TOY_STORED: "1"}
    )
    yield stage
    stage.schema.drop(prompt=False)


def toy_report(stage) -> dict:
    """The toy report from a host that reads the bucket (arrays compared with what each make() wrote)."""
    proc = run([sys.executable, str(faults.HELPER), stage.database, "report"], stage.env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    report["pictures"] = {int(k): v for k, v in report["pictures"].items()}
    return report


def test_four_hosts_compute_each_key_once_and_survive_a_kill(stored_toy, s3_lab, workers):
    stored_toy.Item.insert([dict(item=0, first_delay=120), *(dict(item=i, first_delay=0.05) for i in range(1, 40))])
    group = workers(stored_toy.env)
    victim = group.toy(stored_toy.database, "--orphan-timeout", "3", "--idle-sleep", "0.2")
    wait_for(lambda: toy.toy_events(stored_toy.log).get(0), 60, "the slow job to start")
    time.sleep(1.0)  # inside make(): the master row and its array are written, the part rows are not
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    for _ in range(3):
        group.toy(stored_toy.database, "--orphan-timeout", "3", "--idle-sleep", "0.2", "--time-limit", "150")
    wait_for(lambda: len(toy.toy_events(stored_toy.log, "end")) == 40, 150, "40 jobs", interval=0.5)
    report = toy_report(stored_toy)
    assert report["squares"] == list(range(40)) and report["complete"] and report["orphan_digits"] == []
    assert report["pictures"] == {i: True for i in range(40)}
    assert set(report["jobs"].values()) == {"success"}
    started = toy.toy_events(stored_toy.log)
    assert started == {0: 2, **{i: 1 for i in range(1, 40)}}  # only the killed job ran twice
    completed = {j["item"]: j["pid"] for j in stored_toy.Square().jobs.completed.to_dicts()}
    assert len(set(completed.values())) >= 2 and completed[0] != victim.pid  # another host finished the killed job


def test_a_host_that_loses_the_bucket_fails_its_job_cleanly_and_retries(stored_toy, s3_lab, workers):
    stored_toy.Item.insert(dict(item=i) for i in range(3))
    s3_lab.link.cut()
    group = workers(stored_toy.env)
    group.toy(
        stored_toy.database, "--retry-delay", "1", "--max-retries", "8", "--idle-sleep", "0.2", "--time-limit", "240"
    )
    jobs = stored_toy.Square().jobs

    def failed():
        return {r["item"]: r["error_message"] for r in (jobs & "status = 'error'").proj("error_message").to_dicts()}

    failures = wait_for(failed, 120, "a job to fail on the lost bucket", interval=0.5)
    assert len(stored_toy.Square()) == 0 and len(stored_toy.Square.Digit()) == 0  # nothing half-written
    assert any(re.search(r"connect|endpoint|refused", m, re.I) for m in failures.values()), failures
    s3_lab.link.restore()
    wait_for(
        lambda: len(stored_toy.Square.Digit()) and toy.toy_events(stored_toy.log, "end").keys() == {0, 1, 2},
        180,
        "the retries to succeed",
        interval=0.5,
    )
    assert group.stop() == [0], group.output()
    report = toy_report(stored_toy)
    assert report["squares"] == [0, 1, 2] and report["complete"] and report["pictures"] == {0: True, 1: True, 2: True}
    assert set(report["jobs"].values()) == {"success"}
    assert "retry" in group.output()


# ------------------------------------------------------------------------------------------ the README recipe
REPO = HERE.parents[1]

SBATCH_HERE = r"""
# sbatch on the test machine: each array task runs the batch script, as SLURM would start it on a node
sbatch() {
  local array="${1#--array=}" script="$2" pids=() task
  for task in $(seq "${array%-*}" "${array#*-}"); do
    SLURM_ARRAY_TASK_ID=$task SLURM_ARRAY_JOB_ID=4242 bash "$script" > "$NEUREG_TEST_LOGS/task$task.log" 2>&1 &
    pids+=($!)
  done
  for task in "${pids[@]}"; do wait "$task"; done
}
"""


def readme_recipe() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("**The recipe**", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def test_the_lab_recipe_in_the_readme(pipeline, s3_kit, scan_folder_factory, tmp_path):
    """The README's "Running at lab scale" commands, in their order, against MariaDB and an S3 server; only
    host names, paths, the prefix and the array size are replaced."""
    if pipeline.backend != "mysql":
        pytest.skip("the recipe is for a lab's MySQL server (the mysql run executes it)")
    link = s3_kit.link()
    fs = s3fs.S3FileSystem(
        key=s3_kit.access_key,
        secret=s3_kit.secret_key,
        client_kwargs={"endpoint_url": f"http://127.0.0.1:{s3_kit.port}"},
    )
    if fs.exists("neureg"):  # left by an earlier run on a long-lived server: the recipe creates it
        fs.rm("neureg", recursive=True)
    home, logs, scans = tmp_path / "home", tmp_path / "logs", tmp_path / "scans"
    (home / ".neureg").mkdir(parents=True)
    logs.mkdir()
    db = toy.dj_env()  # the suite's administrator account (all privileges), standing for the lab's root
    (home / ".neureg" / "root-password").write_text(db["DJ_PASS"])
    tag = uuid.uuid4().hex[:6]
    lab, worker = f"alice_{tag}", f"wrk_{tag}"  # accounts of this run only: the recipe creates them
    for user in (lab, worker):  # each account's store secret (this S3 server does not check them: see
        (home / ".neureg" / f"s3-{user}").write_text(s3_kit.secret_key)  # tests/upkeep/test_store_policy.py)
    for i in (1, 2):
        scan_folder_factory(scans / f"scan{i}", mouse="recipe", scan=i, seed=20 + i)
    prefix = f"r{uuid.uuid4().hex[:8]}_"
    recipe = readme_recipe()
    for old, new in [
        ("db.lab.org", db["DJ_HOST"]),
        ("DJ_USER=root", f"DJ_USER={db['DJ_USER']}"),
        ("-u root", f"-P {db['DJ_PORT']} -u {db['DJ_USER']}"),
        ("neureg_worker", worker),
        ("alice", lab),
        ("s3.lab.org:9000", f"127.0.0.1:{link.port}"),
        ("NEUREG_PREFIX=neureg_", f"NEUREG_PREFIX={prefix}"),
        ("/scratch/$USER/neureg-checkpoints", str(tmp_path / "checkpoints")),
        ("/data/lab/scans/*", f"{scans}/*"),
        ("--array=0-7", "--array=0-1"),
    ]:
        assert old in recipe, f"the README recipe no longer says {old!r}"
        recipe = recipe.replace(old, new)
    script = tmp_path / "recipe.sh"
    script.write_text("set -euo pipefail\n" + SBATCH_HERE + recipe)
    env = clean_env(
        {
            "HOME": str(home),
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "NEUREG_HOME": str(tmp_path / "neureg-home"),
            "NEUREG_TIME_LIMIT": "25",
            "NEUREG_WORKER_ENV": str(home / "none.env"),
            "NEUREG_TEST_LOGS": str(logs),
            "DJ_PORT": db["DJ_PORT"],
            "DJ_USE_TLS": "false",
        }
    )
    try:
        proc = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        tasks = "".join(p.read_text() for p in sorted(logs.glob("task*.log")))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + tasks[-3000:]
        assert "bucket neureg created" in proc.stdout
        assert "0 damaged" in proc.stderr  # neureg verify's summary
        assert tasks.count("time limit of 25 s reached") == 2 and tasks.count("worker: stopped:") == 2, tasks
        status = json.loads(
            run(
                [sys.executable, "-m", "neureg.cli", "status", "--json"],
                {
                    **env,
                    **{k: v for k, v in db.items()},
                    "NEUREG_PREFIX": prefix,
                    "NEUREG_BACKEND": "server",
                    "DJ_STORES": json.dumps(
                        {
                            "neureg": {
                                "protocol": "s3",
                                "endpoint": f"127.0.0.1:{link.port}",
                                "bucket": "neureg",
                                "location": "neureg_",
                                "access_key": s3_kit.access_key,
                                "secret_key": s3_kit.secret_key,
                                "secure": False,
                            }
                        }
                    ),
                },
            ).stdout
        )
        assert count(status, prefix, "__oracle_stats") == 2 and count(status, prefix, "scan_set") == 1, status
        fs.invalidate_cache()
        assert fs.find("neureg/neureg_"), "nothing reached the bucket"
        blocks = [path for path in fs.find("neureg/neureg_") if "responses__block" in path]
        assert blocks and all(path.startswith(f"neureg/neureg_/members/{lab}/") for path in blocks), blocks
        for role in ("worker", "lab"):  # the policies the administrator gives the store users
            written = json.loads((home / ".neureg" / f"{role}-policy.json").read_text())
            assert written == store_policy(role, "neureg", "neureg_"), role
        admin = dj.conn()  # who did what, as the server recorded it: the recipe's own accounts
        sealed_by = admin.query(f"SELECT ingested_by FROM `{prefix}experiment`.`ingestion`").fetchall()
        assert len(sealed_by) == 2 and all(row[0].startswith(f"{lab}@") for row in sealed_by), sealed_by
        computed_by = admin.query(f"SELECT DISTINCT user FROM `{prefix}oracle`.`~~oracle_stats`").fetchall()
        assert {row[0].split("@")[0] for row in computed_by} == {worker}, computed_by
    finally:
        link.cut()
        s3_kit.drop_schemas(pipeline, prefix)
        for user in (lab, worker):
            dj.conn().query(f"DROP USER IF EXISTS '{user}'@'%%'")
