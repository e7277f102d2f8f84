"""`neureg accounts --sql` tried on a real MySQL-protocol server: passwords, the SQL, and each account as
itself (lab member, worker): what it may do, what it may not, and the seal."""

from __future__ import annotations

import argparse
import datetime
import pickle
import subprocess
import sys
import uuid
from contextlib import redirect_stdout
from io import StringIO

import datajoint as dj
import numpy as np
import pytest

from neureg.cli import accounts as accounts_command
from neureg.upkeep.accounts import accounts_sql, statements


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

        recorded = pipeline.training.Dataset & {"dataset": "cifar10"}  # an earlier test may have recorded one
        root = recorded.fetch1("data_root") if recorded else str(cifar.parent)
        before = table_counts(pipeline)
        plan = cli(lab, "plan", "paper", "--cifar", root, "--seeds", "1")
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
        # Content-addressed images, checked by the server itself: a raw INSERT of black pixels under the hash
        # of real ones is refused for every account; the real pixels under their own hash are accepted.
        from neureg.models.digests import image_hash

        real = np.random.default_rng(int(tag, 16)).integers(0, 256, (7, 5), dtype=np.uint8)
        image = exp.Image.full_table_name

        def add_image(connection, digest, pixels, height=7, width=5):
            sql = f"INSERT INTO {image} (image_hash, source_id, height, width, pixels) VALUES (%s, 0, %s, %s, %s)"
            try:
                with connection.cursor() as cursor:
                    cursor.execute(sql, (digest, height, width, pixels))
                connection.commit()
            except pymysql.err.MySQLError as exc:
                connection.rollback()
                return str(exc)
            return "inserted"

        forged = "do not hash to image_hash"
        for connection in (as_lab, as_worker):
            assert forged in add_image(connection, image_hash(real), np.zeros_like(real).tobytes())
            assert forged in add_image(connection, image_hash(real), real.tobytes(), height=5, width=7)
            assert forged in add_image(connection, image_hash(real), real.tobytes()[:-1])
        assert not (exp.Image & {"image_hash": image_hash(real)})
        try:
            assert add_image(as_lab, image_hash(real), real.tobytes()) == "inserted"
            assert np.array_equal(exp.load_images([image_hash(real)])[0], real)
        finally:
            (exp.Image & {"image_hash": image_hash(real)}).delete_quick()
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
