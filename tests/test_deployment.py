"""The lab deployment: docker-compose.yml's structure, `docker compose config` where it runs, and the accounts
(`neureg accounts --sql`) tried on a real MySQL-protocol server."""

from __future__ import annotations

import argparse
import datetime
import pickle
import re
import shutil
import subprocess
import sys
import uuid
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import datajoint as dj
import numpy as np
import pytest

import neureg
from neureg.cli import accounts as accounts_command
from neureg.cli.worker import register
from neureg.upkeep.accounts import accounts_sql, statements

ROOT = Path(neureg.__file__).resolve().parent
REPO = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SECRET_NAME = re.compile(r"PASS|PASSWORD|SECRET|TOKEN|_USER$|^DJ_USER$")
REFERENCE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml", reason="pyyaml (a test dependency) is needed to read docker-compose.yml")
    return yaml.safe_load(COMPOSE.read_text())


def _environment(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def _mounts(service: dict) -> dict:
    """Container path -> source, for short-syntax volumes."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, _, target = volume.partition(":")
        mounts[target.split(":")[0]] = source
    return mounts


def test_database_service(compose):
    db = compose["services"]["db"]
    assert re.match(r"^(datajoint/)?mysql:8", db["image"]), db["image"]
    assert db["healthcheck"]["test"], "the db needs a health check for depends_on: service_healthy"
    data = _mounts(db).get("/var/lib/mysql")
    assert data in compose["volumes"], "MySQL's data must live in a named volume"


def test_worker_service_scales_and_gets_a_gpu(compose):
    worker = compose["services"]["worker"]
    assert "container_name" not in worker, "a fixed container name prevents --scale worker=N"
    for port in worker.get("ports", []):
        assert ":" not in str(port), f"a fixed host port prevents --scale worker=N: {port}"
    assert worker["depends_on"]["db"]["condition"] == "service_healthy"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)
    command = worker.get("command")
    command = command.split() if isinstance(command, str) else command
    assert command[:2] == ["neureg", "worker"]
    parser = argparse.ArgumentParser(prog="neureg")
    register(parser.add_subparsers(dest="command"))
    assert parser.parse_args(command[1:]).command == "worker"  # the compose command is one neureg accepts


def _interpolate(text: str, values: dict) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} against ``values`` (as `docker compose config` would)."""

    def one(match):
        name, op, rest = match.group(1), match.group(2), match.group(3)
        if values.get(name):
            return values[name]
        if op == ":-":
            return rest
        raise AssertionError(f"${{{name}}} is required ({rest})")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-?])([^}]*))?\}", one, text)


def _example_values() -> dict:
    return dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    )


def test_workers_and_jupyter_share_one_s3_store_from_dotenv(compose):
    """Both use DataJoint's store 'neureg' in the s3 service's bucket, with the credentials MinIO was given."""
    import json

    worker, jupyter, s3 = (compose["services"][name] for name in ("worker", "jupyter", "s3"))
    assert _environment(worker)["DJ_STORES"] == _environment(jupyter)["DJ_STORES"]
    values = _example_values()
    stores = json.loads(_interpolate(_environment(worker)["DJ_STORES"], values))
    spec = stores["neureg"]
    assert spec["protocol"] == "s3" and spec["endpoint"] == "s3:9000" and spec["secure"] is False
    assert spec["access_key"] == _interpolate(_environment(s3)["MINIO_ROOT_USER"], values)
    assert spec["secret_key"] == _interpolate(_environment(s3)["MINIO_ROOT_PASSWORD"], values)
    raw = _environment(worker)["DJ_STORES"]
    for secret in ("access_key", "secret_key"):  # written as ${VAR} references, never as values
        assert re.search(rf'"{secret}": "\$\{{[A-Z0-9_]+:\?[^}}]*\}}"', raw), raw
    # DataJoint accepts the spec as it is (the same validation a worker's first array goes through)
    with dj.config.override(stores=stores):
        assert dj.config.get_store_spec("neureg")["bucket"] == values["S3_BUCKET"]
    for service in (worker, jupyter):
        assert "NEUREG_STORE" not in _environment(service)
        assert service["depends_on"]["s3"]["condition"] == "service_healthy"
    assert s3["healthcheck"]["test"] and _mounts(s3).get("/data") in compose["volumes"]
    assert re.match(r"^minio/minio:RELEASE\.", s3["image"]), "pin MinIO's release"


def test_compose_file_is_valid_under_the_compose_specification(tmp_path):
    """check-jsonschema with the compose-spec schema it ships (the docker CLI here has no compose plugin)."""
    tool = Path(sys.executable).with_name("check-jsonschema")
    command = [str(tool), "--builtin-schema", "vendor.compose-spec"]
    good = subprocess.run([*command, str(COMPOSE)], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stdout + good.stderr
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("condition: service_healthy", "condition: whenever"))
    bad = subprocess.run([*command, str(broken)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "depends_on" in bad.stdout, "the validator accepted a broken file"


def test_no_credentials_in_the_files(compose):
    for name, service in compose["services"].items():
        for key, value in _environment(service).items():
            if SECRET_NAME.search(key):
                assert isinstance(value, str) and re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?[-?][^}]*)?\}", value), (
                    f"{name}: {key} must come from the environment (${{VAR}}), not be written in the file"
                )
    dockerfile = (REPO / "Dockerfile").read_text()
    assert not re.search(r"^\s*(ENV|ARG)\b.*(PASS|SECRET|TOKEN)", dockerfile, re.MULTILINE | re.IGNORECASE)


def test_env_example_defines_every_variable_the_compose_file_uses():
    used = set(REFERENCE.findall(COMPOSE.read_text()))
    defined = {
        line.split("=", 1)[0].strip()
        for line in ENV_EXAMPLE.read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    }
    assert used, "the compose file references no variables: credentials must come from .env"
    assert used <= defined, f".env.example lacks {sorted(used - defined)}"


def _compose_cli() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_accepts_the_file(tmp_path):
    """Where the docker CLI has its compose plugin (not on these machines: the schema test above runs instead)."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip(
            "docker compose is not installed here; test_compose_file_is_valid_under_the_compose_specification "
            "validates the file"
        )
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    run = subprocess.run(
        [*cli, "--project-directory", str(tmp_path), "-f", str(tmp_path / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr


# ------------------------------------------------------------------------------------------------ accounts
def _accounts_command(*argv):
    parser = argparse.ArgumentParser(prog="neureg")
    parser.add_argument("--home")
    parser.add_argument("--prefix")
    accounts_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["accounts", "--sql", *argv])
    out, err = StringIO(), StringIO()
    from contextlib import redirect_stderr

    with redirect_stdout(out), redirect_stderr(err):
        code = args.func(args)
    return code, out.getvalue(), err.getvalue()


def test_accounts_refuse_to_invent_a_default_password(tmp_path):
    code, out, err = _accounts_command("--lab", "ann")
    assert code == 2 and out == "" and "no password for ann" in err
    with pytest.raises(ValueError, match="no password for neureg_lab, neureg_worker"):
        accounts_sql()


def test_accounts_generate_strong_passwords_into_an_owner_only_file(tmp_path):
    secrets_file = tmp_path / "accounts.txt"
    code, out, err = _accounts_command(
        "--lab", "ann", "--worker", "w1", "--password", "w1=given", "--generate-passwords", str(secrets_file)
    )
    assert code == 0 and str(secrets_file) in err and "ann" in err
    assert secrets_file.stat().st_mode & 0o777 == 0o600
    lines = dict(line.split("=", 1) for line in secrets_file.read_text().splitlines())
    assert set(lines) == {"ann"} and len(lines["ann"]) == 32  # only the account that had none
    assert f"IDENTIFIED BY '{lines['ann']}'" in out and "IDENTIFIED BY 'given'" in out
    assert lines["ann"] not in err  # the password is in the file and the SQL, not the log
    again = _accounts_command("--lab", "ann", "--generate-passwords", str(secrets_file))
    assert again[0] == 2 and "never overwritten" in again[2]
    other = _accounts_command("--lab", "ann", "--generate-passwords", str(tmp_path / "b.txt"))[1]
    assert other != out  # random, not derived from the name


def test_accounts_command_prints_the_sql():
    parser = argparse.ArgumentParser(prog="neureg")
    parser.add_argument("--home")
    parser.add_argument("--prefix")
    accounts_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["--prefix", "lab1_", "accounts", "--sql", "--lab", "ann", "--password", "ann=s3cr'et"])
    out = StringIO()
    with redirect_stdout(out):
        assert args.func(args) == 0
    sql = out.getvalue()
    assert "CREATE USER IF NOT EXISTS 'ann'@'%' IDENTIFIED BY 's3cr''et';" in sql
    assert "GRANT SELECT, INSERT ON `lab1\\_experiment`.* TO 'ann'@'%';" in sql
    assert "neureg_worker" not in sql and "DELETE" not in sql.split("-- lab member: ann")[1]


def _refused(connection, sql: str) -> bool:
    import pymysql

    try:
        with connection.cursor() as cursor:
            cursor.execute(sql)
    except pymysql.err.OperationalError as exc:
        return exc.args[0] in (1142, 1044, 1045, 1227)  # command denied / access denied
    return False


def _sealed(connection, sql: str) -> bool:
    """Whether the server refused ``sql`` with the seal trigger's message."""
    import pymysql

    try:
        with connection.cursor() as cursor:
            cursor.execute(sql)
        connection.commit()
    except pymysql.err.MySQLError as exc:
        connection.rollback()
        return "sealed" in str(exc)
    return False


def test_lab_member_adds_scans_and_reads_but_cannot_delete_results(
    pipeline, subprocess_env, scan_folder_factory, unique_mouse, tmp_path
):
    if pipeline.backend != "mysql":
        pytest.skip("the accounts are MySQL/MariaDB accounts")
    import json

    import pymysql

    tag = uuid.uuid4().hex[:6]
    lab, worker = f"lab_{tag}", f"wrk_{tag}"
    passwords = {lab: f"lab-{tag}", worker: f"wrk-{tag}"}
    admin = dj.conn()
    store = dj.config.get_store_spec("neureg")["location"]  # one store for this process and the CLI runs

    def cli(user, *args):
        env = dict(subprocess_env, DJ_USER=user, DJ_PASS=passwords[user], NEUREG_STORE=store)
        return subprocess.run(
            [sys.executable, "-m", "neureg.cli", *args], env=env, capture_output=True, text=True, timeout=300
        )

    try:
        for statement in statements(accounts_sql(pipeline.prefix, [lab], [worker], passwords)):
            admin.query(statement.replace("%", "%%"))  # the driver formats queries: '%' -> '%%'
        folder = scan_folder_factory(tmp_path / "scan", mouse=unique_mouse, seed=11)
        ingest = cli(lab, "ingest", str(folder))
        assert ingest.returncode == 0, ingest.stderr
        key = {"mouse": unique_mouse, "session": 1, "scan_idx": 1}
        assert len(pipeline.experiment.Scan & key) == 1
        for args in (("populate", "--stage", "oracle"), ("worker", "--once", "--table", "OracleStats")):
            denied = cli(lab, *args)  # a lab account computing: one line, exit 2, nothing written
            assert denied.returncode == 2 and "Traceback" not in denied.stderr, (args, denied.stderr)
            assert f"the database account '{lab}' may not do this" in denied.stderr, denied.stderr
            assert not (pipeline.oracle.OracleStats & key)
        second = cli(lab, "ingest", str(scan_folder_factory(tmp_path / "scan5", mouse=unique_mouse, scan=5, seed=12)))
        assert second.returncode == 0, second.stderr
        cifar = tmp_path / "cifar" / "cifar-10-batches-py"
        cifar.mkdir(parents=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
            (cifar / name).write_bytes(pickle.dumps(batch))
        from neureg.upkeep.status import table_counts

        before = table_counts(pipeline)
        plan = cli(lab, "plan", "paper", "--cifar", str(cifar.parent), "--seeds", "1")
        assert plan.returncode == 2 and "Traceback" not in plan.stderr, plan.stderr
        assert f"the database account '{lab}' may not do this" in plan.stderr and table_counts(pipeline) == before
        work = cli(worker, "worker", "--once", "--table", "OracleStats")
        assert work.returncode == 0, work.stderr
        assert len(pipeline.oracle.OracleStats & key) == 1
        status = cli(lab, "status", "--json")  # reads every table (and, in the text form, the jobs tables)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)[pipeline.oracle.OracleStats.full_table_name] >= 1
        assert cli(lab, "status").returncode == 0

        info = admin.conn_info
        as_lab = pymysql.connect(host=info["host"], port=info["port"], user=lab, password=passwords[lab])
        stats = pipeline.oracle.OracleStats.full_table_name
        assert _refused(as_lab, f"DELETE FROM {stats} WHERE mouse='{unique_mouse}'")
        assert _refused(as_lab, f"DROP TABLE {stats}")
        assert _refused(
            as_lab, f"UPDATE {pipeline.experiment.Scan.full_table_name} SET scan_idx=99 WHERE mouse='{unique_mouse}'"
        )  # would cascade into the results
        assert _refused(as_lab, f"DELETE FROM {pipeline.experiment.Scan.full_table_name} WHERE mouse='{unique_mouse}'")
        # Sealed: nobody (lab, worker, administrator) can add a trial, unit or block to an ingested scan.
        exp, where = pipeline.experiment, f"mouse='{unique_mouse}' AND session=1 AND scan_idx=1"
        n_trials = len(exp.Trial & key)
        append_trial = (
            f"INSERT INTO {exp.Trial.full_table_name} (mouse, session, scan_idx, trial_idx, image_hash, "
            "frame_image_id, tier, withheld) SELECT mouse, session, scan_idx, 99999, image_hash, "
            f"frame_image_id, tier, withheld FROM {exp.Trial.full_table_name} WHERE {where} LIMIT 1"
        )
        append_unit = (
            f"INSERT INTO {exp.Scan.Unit.full_table_name} (mouse, session, scan_idx, unit_id, unit_index, "
            f"x, y, z) VALUES ('{unique_mouse}', 1, 1, 99999, 99999, 0, 0, 0)"
        )
        append_block = (
            f"INSERT INTO {exp.Responses.Block.full_table_name} SELECT mouse, session, scan_idx, 999, "
            f"first_trial, responses, responses_sha256 FROM {exp.Responses.Block.full_table_name} "
            f"WHERE {where} LIMIT 1"
        )
        as_worker = pymysql.connect(host=info["host"], port=info["port"], user=worker, password=passwords[worker])
        for connection in (as_lab, as_worker):
            for sql in (append_trial, append_unit, append_block):
                assert _sealed(connection, sql), sql
        for sql in (append_trial, append_unit):
            with pytest.raises(Exception, match="sealed"):
                admin.query(sql)
        assert len(exp.Trial & key) == n_trials and len(exp.Scan.Unit & key) == 12
        who, at = (exp.Ingestion & key).fetch1("ingested_by", "ingested_at")
        assert who.startswith(f"{lab}@")  # the server's USER() (login and client host), not what the client sent
        assert abs((datetime.datetime.utcnow() - at).total_seconds()) < 600

        # A seal names the server's account and clock whatever the client sends, and only seals a whole scan:
        # scan 2 is a complete copy of scan 1 made by hand; scan 3 has no trials; scan 4 has its trials, units
        # and behaviour but no responses (what a hand-made scan that fails its jobs forever looked like).
        def copy_rows(cursor, scan_idx, tables):
            for table in tables:
                columns = ", ".join(str(scan_idx) if c == "scan_idx" else f"`{c}`" for c in table.heading.names)
                cursor.execute(
                    f"INSERT INTO {table.full_table_name} SELECT {columns} FROM {table.full_table_name} WHERE {where}"
                )

        rows = (exp.Scan.Unit, exp.Trial, exp.Behavior)
        with as_lab.cursor() as cursor:
            copy_rows(cursor, 2, (exp.Scan, *rows, exp.Responses, exp.Responses.Block))
            cursor.execute(
                f"INSERT INTO {exp.Scan.full_table_name} (mouse, session, scan_idx, n_trials, n_units) "
                f"VALUES ('{unique_mouse}', 1, 3, 5, 0)"
            )
            copy_rows(cursor, 4, (exp.Scan, *rows))
            cursor.execute(
                f"INSERT INTO {exp.Ingestion.full_table_name} VALUES ('{unique_mouse}', 1, 2, "
                "'someone@else', '2001-01-01 00:00:00', 'x')"
            )
        as_lab.commit()
        assert (exp.Ingestion & dict(key, scan_idx=2)).fetch1("ingested_by").startswith(f"{lab}@")
        no_responses = (
            f"INSERT INTO {exp.Ingestion.full_table_name} VALUES ('{unique_mouse}', 1, 4, 'x', "
            "'2001-01-01 00:00:00', 'x')"
        )
        assert _sealed(as_lab, no_responses) and not (exp.Ingestion & dict(key, scan_idx=4))
        no_trials = no_responses.replace(", 1, 4, ", ", 1, 3, ")
        assert _sealed(as_lab, no_trials) and not (exp.Ingestion & dict(key, scan_idx=3))
        # Grants that cannot be stretched: no account but the administrator alters, comments or re-indexes a
        # table anywhere (a DROP INDEX PRIMARY would let a duplicate row replace a sealed image), and only
        # workers create tables, and only in the computed schemas (their jobs tables).
        for module in pipeline.modules().values():
            database = module.schema.database
            name = next(t for t in module.schema.list_tables() if not t.startswith("~"))
            table = f"`{database}`.`{name}`"
            for connection, may_create in ((as_lab, False), (as_worker, not database.endswith("experiment"))):
                for sql in (
                    f"ALTER TABLE {table} COMMENT = 'def make(self): import os'",
                    f"ALTER TABLE {table} ADD COLUMN probe_{tag} int",
                    f"DROP INDEX `PRIMARY` ON {table}",
                    f"CREATE INDEX probe_{tag} ON {table} (`{module.schema.get_table(name).primary_key[0]}`)",
                ):
                    assert _refused(connection, sql), (connection.user, sql)
                create = f"CREATE TABLE `{database}`.`probe_{tag}` (i int)"
                if not may_create:
                    assert _refused(connection, create), (connection.user, create)
        as_lab.close()
        as_worker.close()
        as_worker = pymysql.connect(host=info["host"], port=info["port"], user=worker, password=passwords[worker])
        assert _refused(as_worker, f"DROP TABLE {stats}")
        as_worker.close()
        assert len(pipeline.oracle.OracleStats & key) == 1
    finally:
        (pipeline.experiment.Scan & {"mouse": unique_mouse} & "scan_idx > 1").delete(prompt=False)
        for user in (lab, worker):
            admin.query(f"DROP USER IF EXISTS '{user}'@'%%'")


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: root-relative patterns, ``**`` spans folders, the last matching line wins, ``!`` re-includes.
    A path is also excluded when one of its parent folders is."""

    def regex(pattern: str) -> str:
        out, segments = "", pattern.split("/")
        for i, segment in enumerate(segments):
            last = i == len(segments) - 1
            if segment == "**":
                out += ".*" if last else "(?:[^/]+/)*"
                continue
            out += "".join("[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch) for ch in segment)
            out += "" if last else "/"
        return f"^{out}$"

    def matches(pattern: str, candidate: str) -> bool:
        return re.match(regex(pattern), candidate) is not None

    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for line in patterns:
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        if any(matches(pattern, c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_secrets_environments_and_vcs_out_of_images():
    """Every Dockerfile COPYs the build context; nothing secret or local may be in it."""
    root = Path(__file__).resolve().parents[1]
    patterns = [
        line.strip()
        for line in (root / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    secret = [
        ".env",
        ".env.local",
        ".secrets/db.json",
        "datajoint.json",
        "dj_local_conf.json",
        "certs/server.key",
        ".git/config",
        ".venv/bin/python",
        "sub/.venv/lib/x.py",
        ".devsite/foolbox/__init__.py",
        "data/scan1/data/responses/0.npy",
        "ckpt/run.pt",
        "static-1-2-3.zip",
    ]
    for path in secret:
        assert _dockerignored(path, patterns), path
    for path in ("pyproject.toml", "constraints.txt", "models/vision/training.py", ".env.example", "tests/conftest.py"):
        assert not _dockerignored(path, patterns), path
    dockerfiles = list(root.glob("**/Dockerfile*"))
    assert dockerfiles
    for dockerfile in dockerfiles:
        text = dockerfile.read_text()
        for word in (".env ", ".secrets", "datajoint.json", "PASSWORD=", "DJ_PASS="):
            assert word not in text.replace(".env.example", ""), (dockerfile, word)
