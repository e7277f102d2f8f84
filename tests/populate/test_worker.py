"""The worker in this process, on both backends, with a test-only stage whose make() can be slow or fail.

The toy stage (``toy_stage``) is also what the fault tests run in worker subprocesses: this file doubles as
their entry point (``python test_worker.py DATABASE worker|setup|report ...``), so those workers run the
real ``Worker`` with the real options parser and touch nothing of the pipeline's own schemas.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import uuid
from types import SimpleNamespace

import datajoint as dj
import numpy as np
import pytest

from neureg.cli.worker import add_worker_arguments, options_from_args
from neureg.database.store import load_array
from neureg.database.store import stored as toy_stored
from neureg.database.transaction import transaction
from neureg.populate.devices import select_device
from neureg.populate.stages import pipeline_tables, stage_tables
from neureg.populate.worker import Worker, WorkerOptions, select_tables
from neureg.populate.worker_jobs import HOST, release, retry_failed

TOY_LOG = "NEUREG_TOY_LOG"  # file each toy make() appends "start ITEM PID" / "end ITEM PID" to
TOY_STORED = "NEUREG_TOY_STORED"  # "1": the toy stage keeps an array per item in the object store


def _toy_log(event: str, item: int) -> None:
    path = os.environ.get(TOY_LOG)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{event} {item} {os.getpid()}\n".encode())
        os.close(fd)


def toy_events(path, event: str = "start") -> dict[int, int]:
    """item -> how many times ``event`` was logged for it."""
    counts: dict[int, int] = {}
    if os.path.exists(path):
        for line in open(path).read().splitlines():
            name, item, _ = line.split()
            if name == event:
                counts[int(item)] = counts.get(int(item), 0) + 1
    return counts


def toy_picture(item: int) -> np.ndarray:
    """The array a stored toy make() keeps for ``item`` (64 KB, content unique to the item)."""
    return np.arange(128 * 128, dtype=np.float32).reshape(128, 128) + item * 1e4


def toy_stage(database: str, stored: bool = False) -> SimpleNamespace:
    """Item (manual) -> Square (computed, with a part): a stage as the worker sees one, in its own schema.

    ``stored``: Square also keeps ``toy_picture(item)`` in the object store (``<npy@neureg>`` with its
    SHA-256, as the pipeline's arrays), inserted with the master row, before make()'s delay."""
    schema = dj.Schema(database)
    picture = "picture              : <npy@neureg>\n        picture_sha256       : char(64)" if stored else ""

    class Item(dj.Manual):
        definition = """
        item                 : int32
        ---
        first_delay = 0      : float64   # seconds the item's first make() sleeps, after inserting the master row
        fail_first = 0       : int16     # the item's first n make() calls raise
        kill_always = 0      : bool      # every make() SIGKILLs its own worker (a poisoned job)
        """

    Item = schema(Item)

    class Square(dj.Computed):
        definition = f"""
        -> Item
        ---
        square               : int64
        {picture}
        """

        class Digit(dj.Part):
            definition = """
            -> master
            position         : int16
            ---
            digit            : int16
            """

        def make(self, key):
            self.compute(key)

        # Groups, as training's: up to --group items, each in its own transaction, its outcome told at once.
        group_key = staticmethod(lambda key: ())
        group_limit = staticmethod(lambda key, runtime: runtime.group or 1)

        def make_group(self, keys, on_outcome):
            for key in keys:
                try:
                    with transaction(self.connection):
                        self.compute(key, direct=True)
                except Exception as exc:
                    on_outcome(key, exc)
                    continue
                on_outcome(key, None)

        def compute(self, key, direct=False):
            first_delay, fail_first, kill = (Item & key).fetch1("first_delay", "fail_first", "kill_always")
            earlier = toy_events(os.environ.get(TOY_LOG, "")).get(key["item"], 0)
            _toy_log("start", key["item"])
            if kill:
                os.kill(os.getpid(), signal.SIGKILL)
            square = key["item"] ** 2
            array = toy_stored("picture", toy_picture(key["item"])) if stored else {}
            self.insert1(dict(key, square=square, **array), allow_direct_insert=direct)  # gone if the job dies
            if earlier == 0 and first_delay:
                time.sleep(first_delay)
            if earlier < fail_first:
                raise RuntimeError(f"toy failure {earlier + 1} of item {key['item']}")
            self.Digit.insert(dict(key, position=i, digit=int(d)) for i, d in enumerate(str(square)))
            _toy_log("end", key["item"])

    Square = schema(Square, context={"Item": Item})
    return SimpleNamespace(schema=schema, Item=Item, Square=Square, stored=stored)


def toy_report(stage) -> dict:
    """What the fault tests check: items, computed squares, whether every square has all its digits, jobs."""
    squares = {r["item"]: r["square"] for r in stage.Square().to_dicts()}
    digits = {}
    for row in stage.Square.Digit().to_dicts():
        digits[row["item"]] = digits.get(row["item"], 0) + 1
    jobs = stage.Square().jobs
    report = {
        "items": sorted(k["item"] for k in stage.Item().keys()),
        "squares": sorted(squares),
        "complete": all(digits.get(i, 0) == len(str(s)) for i, s in squares.items()),
        "orphan_digits": sorted(set(digits) - set(squares)),
        "jobs": {r["item"]: r["status"] for r in jobs.proj("status").to_dicts()},
        "messages": {r["item"]: r["error_message"] for r in jobs.proj("error_message").to_dicts()},
    }
    if stage.stored:  # every array read back through neureg's verified path, compared with what was written
        report["pictures"] = {
            k["item"]: bool(np.array_equal(load_array(stage.Square, k, "picture"), toy_picture(k["item"])))
            for k in stage.Square().keys()
        }
    return report


def dj_env() -> dict:
    """The current DataJoint connection as DJ_* variables, for toy worker subprocesses."""
    info = dj.conn().conn_info
    return {
        "DJ_BACKEND": dj.conn().adapter.backend,
        "DJ_HOST": str(info["host"]),
        "DJ_PORT": str(info["port"]),
        "DJ_USER": info["user"],
        "DJ_PASS": info["passwd"],
        "DJ_USE_TLS": "false",
    }


def main(argv=None) -> int:
    """Entry point of toy subprocesses: ``DATABASE setup N [--first-delay S]`` | ``DATABASE report`` |
    ``DATABASE populate`` | ``DATABASE worker [neureg worker options]``."""
    import logging

    from neureg.database.settings import quiet_datajoint

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(message)s", stream=sys.stderr)
    quiet_datajoint()
    dj.config["safemode"] = False
    database, command, *rest = argv if argv is not None else sys.argv[1:]
    stage = toy_stage(database, stored=os.environ.get(TOY_STORED) == "1")
    if command == "setup":
        parser = argparse.ArgumentParser()
        parser.add_argument("n", type=int)
        parser.add_argument("--start", type=int, default=0)
        parser.add_argument("--first-delay", type=float, default=0.0)
        args = parser.parse_args(rest)
        stage.Item.insert(dict(item=i, first_delay=args.first_delay) for i in range(args.start, args.start + args.n))
        return 0
    if command == "report":
        print(json.dumps(toy_report(stage)))
        return 0
    if command == "populate":  # what `neureg populate` does to each table, without job reservation
        from neureg.populate.stages import populate_beside_others

        populate_beside_others(stage.Square, (), reserve_jobs=False, display_progress=False, suppress_errors=False)
        return 0
    parser = argparse.ArgumentParser(prog="toy-worker")
    add_worker_arguments(parser)
    return Worker(SimpleNamespace(prefix="", toy=stage), options_from_args(parser.parse_args(rest))).run()


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture
def toy(pipeline, tmp_path, monkeypatch):
    """A fresh toy schema on this backend; its make() log in tmp_path/toy.log."""
    stage = toy_stage(f"{pipeline.prefix}toy{uuid.uuid4().hex[:6]}")
    monkeypatch.setenv(TOY_LOG, str(tmp_path / "toy.log"))
    stage.log = tmp_path / "toy.log"
    stage.pipeline = SimpleNamespace(prefix=pipeline.prefix, toy=stage)
    yield stage
    stage.schema.drop(prompt=False)


def run_once(stage, **options) -> int:
    return Worker(stage.pipeline, WorkerOptions(once=True, **options)).run()


# ------------------------------------------------------------------------------------------------ tests
def test_restriction_with_reserve_jobs_is_honoured(toy):
    """DataJoint's issue tracker has a report that populate(restriction, reserve_jobs=True) may ignore the
    restriction. In 2.3.5 it does not, for new jobs (refresh) and for pending ones; the worker does not rely
    on it, but a DataJoint upgrade that breaks it should be noticed here."""
    toy.Item.insert(dict(item=i) for i in range(4))
    assert toy.Square.populate({"item": 2}, reserve_jobs=True)["success_count"] == 1
    assert toy.Square().keys() == [{"item": 2}]
    assert {k["item"] for k in toy.Square().jobs.keys()} <= {2}  # refresh added the restricted key only
    toy.Square().jobs.refresh()
    assert toy.Square.populate("item = 3", reserve_jobs=True, refresh=False)["success_count"] == 1
    assert sorted(k["item"] for k in toy.Square().keys()) == [2, 3]


def test_one_sweep_computes_each_key_once_and_records_it(toy):
    toy.Item.insert(dict(item=i) for i in range(6))
    assert run_once(toy) == 0
    report = toy_report(toy)
    assert report["squares"] == list(range(6)) and report["complete"]
    assert set(report["jobs"].values()) == {"success"}  # the worker keeps success rows: who ran what, how long
    assert toy_events(toy.log) == {i: 1 for i in range(6)}
    jobs = toy.Square().jobs.completed.to_dicts()
    assert {j["host"] for j in jobs} == {HOST} and {j["pid"] for j in jobs} == {os.getpid()}
    toy.Item.insert1(dict(item=7))  # a key added later is picked up by the next sweep
    assert run_once(toy) == 0 and toy_report(toy)["squares"] == [0, 1, 2, 3, 4, 5, 7]


def test_failed_job_is_retried_until_its_attempts_run_out(toy):
    toy.Item.insert([dict(item=1, fail_first=1), dict(item=2, fail_first=9), dict(item=3, fail_first=0)])
    assert run_once(toy, max_retries=2, retry_delay=0) == 1  # --once reports failures in its exit status
    report = toy_report(toy)
    assert report["squares"] == [3]  # the failing makes left no rows
    assert report["messages"][1].startswith("[attempt 1 of 3] RuntimeError: toy failure 1")
    assert run_once(toy, max_retries=2, retry_delay=0) == 1  # item 1 succeeds, item 2 fails again
    assert toy_report(toy)["squares"] == [1, 3] and toy_report(toy)["complete"]
    run_once(toy, max_retries=2, retry_delay=0)
    run_once(toy, max_retries=2, retry_delay=0)
    report = toy_report(toy)
    assert report["jobs"][2] == "error" and report["messages"][2].startswith("[attempt 3 of 3] RuntimeError")
    assert toy_events(toy.log) == {1: 2, 2: 3, 3: 1}  # three attempts for item 2, then no more


def test_retry_waits_for_its_delay(toy):
    toy.Item.insert1(dict(item=5, fail_first=1))
    run_once(toy, max_retries=1, retry_delay=3600)
    run_once(toy, max_retries=1, retry_delay=3600)
    assert toy_events(toy.log) == {5: 1} and toy_report(toy)["jobs"][5] == "error"


def test_job_of_a_dead_worker_is_reclaimed_and_a_live_ones_is_not(toy):
    toy.Item.insert([dict(item=1), dict(item=2)])
    jobs = toy.Square().jobs
    jobs.refresh()
    stale, fresh = ("2020-01-01 00:00:00", "2999-01-01 00:00:00")  # last heartbeat long ago / "now" for ever
    for item, seen in ((1, stale), (2, fresh)):
        assert jobs.reserve({"item": item})
        jobs.connection.query(
            f"UPDATE {jobs.full_table_name} SET reserved_time=%s, pid=%s, host=%s WHERE item=%s",
            args=(seen, 999999, "elsewhere", item),
        )
    assert run_once(toy, orphan_timeout=60, retry_delay=0) == 0
    report = toy_report(toy)
    assert report["squares"] == [1] and report["jobs"][2] == "reserved"
    assert toy_events(toy.log) == {1: 1}


def test_jobs_this_process_left_reserved_are_released_at_start(toy):
    """A container restarts with the same host name and pid: the job it held must not wait for a timeout."""
    toy.Item.insert1(dict(item=4))
    toy.Square().jobs.refresh()
    assert toy.Square().jobs.reserve({"item": 4})  # "held" by this host and pid, as a previous life would
    assert run_once(toy, orphan_timeout=3600) == 0 and toy_report(toy)["squares"] == [4]


def test_sigterm_interrupts_releases_and_exits_zero(toy):
    """SIGTERM mid-job: make unwinds, its rows roll back, the job is pending again with no attempt spent."""
    toy.Item.insert([dict(item=1, first_delay=30)])
    handler = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    start = time.monotonic()
    assert Worker(toy.pipeline, WorkerOptions(idle_sleep=30)).run() == 0
    assert time.monotonic() - start < 10
    report = toy_report(toy)
    assert report["squares"] == [] and report["jobs"] == {1: "pending"} and report["messages"][1] == ""
    assert not dj.conn().in_transaction
    assert run_once(toy) == 0 and toy_report(toy)["squares"] == [1]  # and it is computed later
    assert signal.getsignal(signal.SIGTERM) is handler  # the caller's handler is back


def test_heartbeat_keeps_a_long_job_and_reports_it(toy, monkeypatch, caplog):
    """A job running past --orphan-timeout is not reclaimed while its worker beats; it is reported as running."""
    from neureg.populate import heartbeat

    monkeypatch.setattr(heartbeat, "STILL_RUNNING_EVERY", 0.5)
    toy.Item.insert1(dict(item=3, first_delay=3.0))
    jobs = toy.Square().jobs
    with caplog.at_level("INFO", logger="neureg"):
        assert run_once(toy, orphan_timeout=1) == 0
    assert "still running Square item=3" in caplog.text
    job = jobs.completed.to_dicts()[0]
    assert job["duration"] >= 3.0  # ran once, to the end: never reclaimed
    beat = (job["completed_time"] - job["reserved_time"]).total_seconds()
    assert beat < 1.5, f"last heartbeat {beat:.1f} s before the end of a 3 s job"  # beats every 0.25 s
    assert toy_events(toy.log) == {3: 1}


def test_sigint_while_idle_stops_promptly(toy):
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    start = time.monotonic()
    assert Worker(toy.pipeline, WorkerOptions(idle_sleep=60)).run() == 0
    assert time.monotonic() - start < 10


def test_release_touches_only_this_process_jobs(toy):
    toy.Item.insert([dict(item=1), dict(item=2)])
    jobs = toy.Square().jobs
    jobs.refresh()
    assert jobs.reserve({"item": 1}) and jobs.reserve({"item": 2})
    jobs.connection.query(f"UPDATE {jobs.full_table_name} SET pid=999999 WHERE item=2")
    assert release(jobs) == 1
    assert toy_report(toy)["jobs"] == {1: "pending", 2: "reserved"}


def test_table_and_stage_selection(toy, pipeline):
    assert select_tables(toy.pipeline, tables=["Square"]) == [toy.Square]
    assert select_tables(toy.pipeline, tables=["toy.Square"]) == [toy.Square]
    with pytest.raises(ValueError, match="unknown table"):
        select_tables(toy.pipeline, tables=["Cube"])
    with pytest.raises(ValueError, match="unknown stage"):
        select_tables(pipeline, stages=["nonsense"])
    oracle = select_tables(pipeline, stages=["oracle"])
    assert oracle == [t for t in stage_tables(pipeline) if t.database == pipeline.oracle.schema.database]
    assert select_tables(pipeline, tables=["oracle.ScanStability", "OracleStats"]) == [
        pipeline.oracle.OracleStats,
        pipeline.oracle.ScanStability,
    ]


def _computed_classes(pipeline) -> set:
    """Every dj.Computed / dj.Imported master declared in the pipeline's schema modules, found by scanning them."""
    found = set()
    for module in vars(pipeline).values():
        schema = getattr(module, "schema", None)
        for obj in vars(module).values() if schema is not None else ():
            if (
                isinstance(obj, type)
                and issubclass(obj, (dj.Computed, dj.Imported))
                and not issubclass(obj, dj.Part)
                and getattr(obj, "database", None) == schema.database
            ):
                found.add(obj)
    return found


def test_stage_order_puts_every_table_after_its_upstream_tables(pipeline):
    """The registry's order, checked edge by edge against DataJoint's graph as each table's parents() see it."""
    entries = pipeline_tables(pipeline)
    names = [e.table.full_table_name for e in entries]
    assert len(names) == len(set(names))
    position = {name: i for i, name in enumerate(names)}
    master = {
        e.table.full_table_name: (e.table.master if issubclass(e.table, dj.Part) else e.table).full_table_name
        for e in entries
    }
    checked = 0
    for entry in entries:
        name = entry.table.full_table_name
        if name != master[name]:
            assert position[master[name]] < position[name], f"part {name} before its master"
        for parent in entry.table().parents():
            if parent not in position:
                continue  # a table outside the pipeline's schemas
            if master[parent] == master[name]:
                assert position[parent] < position[name], (parent, name)
            else:  # a master and its parts stay together, after everything any of them references
                assert position[master[parent]] < position[master[name]], (parent, name)
            checked += 1
    assert checked > 20
    computed = stage_tables(pipeline)
    assert set(computed) == _computed_classes(pipeline)  # every computed table, and only those
    assert [position[t.full_table_name] for t in computed] == sorted(position[t.full_table_name] for t in computed)
    # Waits that only a key_source expresses (not a foreign key) are honoured too, so one pass fills them.
    order = [t.__name__ for t in computed]
    assert order.index("OracleSimilarity") < order.index("ScanStability")
    assert order.index("DataSimilarity") < order.index("SimilarityTarget")
    stages = [e.stage for e in entries if e.auto]
    assert stages == sorted(stages, key=list(vars(pipeline)).index)  # here stage order agrees with the graph
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['nonsense'\]"):
        stage_tables(pipeline, ["nonsense"])


def test_release_and_retry_go_through_datajoints_api(toy):
    """Release restores the message and clears the reservation; retry waits on the server's clock."""
    toy.Item.insert([dict(item=1), dict(item=2)])
    jobs = toy.Square().jobs
    jobs.refresh()
    assert jobs.reserve({"item": 1})
    assert release(jobs, {"item": 1}, "[attempt 1 of 3] RuntimeError: x") == 1
    row = (jobs & {"item": 1}).fetch1()
    assert row["status"] == "pending" and row["reserved_time"] is None
    assert row["error_message"] == "[attempt 1 of 3] RuntimeError: x"
    assert release(jobs, {"item": 2}) == 0  # not reserved by anyone
    assert jobs.reserve({"item": 2})
    jobs.error({"item": 2}, error_message="[attempt 1 of 3] RuntimeError: y")
    assert retry_failed(jobs, max_retries=2, retry_delay=3600) == []  # failed just now: waits an hour
    assert (jobs & {"item": 2}).fetch1("status") == "error"
    reset = retry_failed(jobs, max_retries=2, retry_delay=0)
    assert reset == [({"item": 2}, 1, "[attempt 1 of 3] RuntimeError: y")]
    assert (jobs & {"item": 2}).fetch1("status", "error_message") == ("pending", "[attempt 1 of 3] RuntimeError: y")


def test_device_comes_from_the_environment(monkeypatch):
    import torch

    from neureg.errors import ConfigurationError

    monkeypatch.setenv("NEUREG_DEVICE", "cpu")
    assert select_device(None) == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigurationError, match="CUDA"):
            select_device("cuda:0")
    else:
        with pytest.raises(ConfigurationError, match="GPU"):
            select_device(f"cuda:{torch.cuda.device_count()}")
        assert select_device("cuda:0") == "cuda:0"


if __name__ == "__main__":
    sys.exit(main())
