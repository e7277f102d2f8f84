"""The store's roles, enforced by an S3 server: each role's keys do what `neureg accounts --store-policy` allows.

A moto S3 server of this module's own runs with IAM enforcement on (moto checks each request's signature
and the policies of the IAM user whose keys signed it, resources included). Its users carry the policies
neureg generates: a worker, the lab member whose database login this suite uses, and a second lab member.
Every neureg command runs as its own process configured only by ``DJ_*`` and ``DJ_STORES``, as on a host.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import datajoint as dj
import pytest

from neureg.database.store import member_prefix
from neureg.upkeep.store_policy import store_policy

s3fs = pytest.importorskip("s3fs", reason="the S3 tests need s3fs and moto (pip install -e '.[test]')")
boto3 = pytest.importorskip("boto3", reason="moto's IAM needs boto3 (installed with moto)")

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location(
    "neureg_fault_helpers_roles", HERE.parent / "populate" / "test_faults.py"
)
faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(faults)
toy, clean_env, wait_for, NEUREG = faults.toy, faults.clean_env, faults.wait_for, faults.NEUREG

BUCKET, LOCATION = "neureg-roles", "lab"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _up(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2)
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def roles(pipeline, tmp_path_factory):
    """The S3 server with IAM on, its bucket, and the keys of each role; the schemas of this module's prefix."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto-iam") / "moto.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_for(lambda: _up(port) or proc.poll() is not None, 60, "moto's S3 server")
        assert proc.poll() is None, "moto's S3 server did not start"
        endpoint = f"http://127.0.0.1:{port}"
        boot = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="boot", aws_secret_access_key="x")
        iam, s3 = boto3.client("iam", **boot), boto3.client("s3", **boot)
        s3.create_bucket(Bucket=BUCKET)
        login = dj.conn().conn_info["user"]
        users = {
            "worker": store_policy("worker", BUCKET, LOCATION),
            "member": store_policy("lab", BUCKET, LOCATION, login=login),  # this suite's login: its ingests
            "other": store_policy("lab", BUCKET, LOCATION, login="someone_else"),
        }
        keys = {}
        for name, policy in users.items():
            iam.create_user(UserName=name)
            iam.put_user_policy(UserName=name, PolicyName=f"neureg-{name}", PolicyDocument=json.dumps(policy))
            created = iam.create_access_key(UserName=name)["AccessKey"]
            keys[name] = (created["AccessKeyId"], created["SecretAccessKey"])
        # From here on every request must be signed by a known user and allowed by its policies.
        urllib.request.urlopen(
            urllib.request.Request(
                f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
            )
        )
        prefix = f"p{uuid.uuid4().hex[:8]}_"
        yield type("Roles", (), dict(port=port, keys=keys, prefix=prefix, login=login, pipeline=pipeline))()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        _drop(prefix if "prefix" in locals() else None)


def _drop(prefix) -> None:
    if not prefix:
        return
    conn = dj.conn()
    for (name,) in conn.query("SELECT schema_name FROM information_schema.schemata").fetchall():
        if name.startswith(prefix):
            try:
                dj.Schema(name, create_schema=False).drop(prompt=False)
            except Exception:  # noqa: BLE001 - a dependent schema drops with its upstream one
                pass


def env_as(roles, who: str) -> dict:
    key, secret = roles.keys[who]
    store = dict(
        protocol="s3",
        endpoint=f"127.0.0.1:{roles.port}",
        bucket=BUCKET,
        location=LOCATION,
        access_key=key,
        secret_key=secret,
        secure=False,
    )
    env = clean_env({"NEUREG_PREFIX": roles.prefix, "DJ_STORES": json.dumps({"neureg": store})})
    if roles.pipeline.backend == "mysql":
        env.update(toy.dj_env(), NEUREG_BACKEND="server")
    else:
        env.update(NEUREG_BACKEND="embedded", NEUREG_HOME=str(roles.pipeline.home))
    return env


def files_as(roles, who: str):
    key, secret = roles.keys[who]
    return s3fs.S3FileSystem(key=key, secret=secret, client_kwargs={"endpoint_url": f"http://127.0.0.1:{roles.port}"})


def run(command, env) -> subprocess.CompletedProcess:
    return subprocess.run([*NEUREG, *command], env=env, capture_output=True, text=True, timeout=300)


def attempt(action) -> None:
    try:
        action()
    except PermissionError:
        pass


def refused(action) -> bool:
    try:
        action()
    except PermissionError:
        return True
    return False


def test_each_role_may_write_only_its_part_of_the_store(roles, scan_folder_factory, tmp_path):
    """Lab member: ingests into members/<login>, reads and verifies everything, cannot write computed arrays,
    checkpoints or another member's blocks. Worker: computes, and removes an orphan from a member's section.
    Unsigned requests and unknown keys are refused (the server really enforces)."""
    init = run(["init"], env_as(roles, "worker"))
    assert init.returncode == 0, init.stderr
    folders = [scan_folder_factory(tmp_path / f"scan{i}", mouse="roles", scan=i, seed=40 + i) for i in (1, 2)]
    member = env_as(roles, "member")
    ingest = run(["ingest", *map(str, folders)], member)
    assert ingest.returncode == 0, ingest.stderr

    mine = files_as(roles, "member")
    section = f"{BUCKET}/{LOCATION}/{member_prefix(roles.login)}"
    blocks = [p for p in mine.find(f"{BUCKET}/{LOCATION}") if "responses" in p]
    assert len(blocks) >= 2 and all(p.startswith(section + "/") for p in blocks), blocks

    # The other member reads everything but can change none of it, nor write anywhere but its own section.
    other = files_as(roles, "other")
    original = other.cat(blocks[0])
    assert refused(lambda: other.pipe(blocks[0], b"overwritten")), "another member overwrote a block"
    attempt(lambda: other.rm(blocks[0]))  # s3fs sends a batch delete: S3 answers 200 with per-key errors
    mine.invalidate_cache()
    assert mine.exists(blocks[0]) and mine.cat(blocks[0]) == original, "another member changed a block"
    for where in (
        f"{LOCATION}/_schema/x/forged.npy",
        f"{LOCATION}/checkpoints/forged.pt",
        f"{LOCATION}/{member_prefix(roles.login)}/forged.npy",
    ):
        assert refused(lambda where=where: other.pipe(f"{BUCKET}/{where}", b"x")), where
    assert not refused(lambda: other.pipe(f"{BUCKET}/{LOCATION}/members/someone_else/note.txt", b"own"))
    # The member who ingested cannot write computed arrays either.
    assert refused(lambda: mine.pipe(f"{BUCKET}/{LOCATION}/_schema/x/forged.npy", b"x"))
    # Keys the server does not know are refused outright.
    stranger = s3fs.S3FileSystem(
        key="nobody", secret="x", client_kwargs={"endpoint_url": f"http://127.0.0.1:{roles.port}"}
    )
    assert refused(lambda: stranger.cat(blocks[0]))

    # A second member whose store keys are not those of the login it ingests as cannot write that section:
    # the ingest fails cleanly (exit 1, nothing half-written), and the first member's scans are untouched.
    again = scan_folder_factory(tmp_path / "scan3", mouse="roles", scan=3, seed=43)
    denied = run(["ingest", str(again)], env_as(roles, "other"))
    assert denied.returncode != 0 and "Traceback" not in denied.stderr, denied.stderr
    assert "denied" in denied.stderr.lower() and member_prefix(roles.login) in denied.stderr, denied.stderr
    retried = run(["ingest", str(again)], member)  # nothing of the refused attempt is left in the way
    assert retried.returncode == 0, retried.stderr
    verify = run(["verify", "--json"], member)
    assert verify.returncode == 0 and json.loads(verify.stdout)["damaged"] == [], verify.stdout + verify.stderr

    # The worker computes from the members' blocks and may clean their sections.
    worker = env_as(roles, "worker")
    populate = run(["populate", "--stage", "oracle"], worker)
    assert populate.returncode == 0, populate.stderr
    orphan = blocks[0].rsplit("/", 1)[0] + "/orphan.npy"  # where a killed ingest leaves its file
    mine.pipe(orphan, b"left by a killed ingest")
    lab_gc = run(["gc", "--delete", "--min-age-hours", "0"], env_as(roles, "other"))
    assert lab_gc.returncode == 1 and "refused a deletion" in lab_gc.stderr, lab_gc.stderr
    mine.invalidate_cache()
    assert mine.exists(orphan), "a lab member's keys deleted a file in another member's section"
    gc = run(["gc", "--delete", "--min-age-hours", "0", "--json"], worker)
    assert gc.returncode == 0, gc.stderr
    mine.invalidate_cache()
    assert not mine.exists(orphan) and all(mine.exists(p) for p in blocks), gc.stdout
