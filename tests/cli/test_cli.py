"""The command line as a lab member meets it: help everywhere, clear configuration errors, isolated homes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from neureg.cli import build_parser


def run_cli(*args, env=None, timeout=120):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DJ_", "NEUREG_"))}
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "neureg.cli", *args], env=base, capture_output=True, text=True, timeout=timeout
    )


def test_every_command_has_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"init", "ingest", "status", "demo"} <= set(commands)
    for name in commands:
        run = run_cli(name, "--help")
        assert run.returncode == 0 and "usage: neureg" in run.stdout and name in run.stdout


CONNECTING = pytest.mark.parametrize("command", [["status"], ["worker", "--once"]])  # every command connects alike


@CONNECTING
def test_bad_prefix_is_a_clear_error(tmp_path, command):
    run = run_cli(*command, env={"NEUREG_HOME": str(tmp_path), "NEUREG_PREFIX": "Bad-Prefix"})
    assert run.returncode == 4 and "schema prefix 'Bad-Prefix' is not usable" in run.stderr


@CONNECTING
def test_unreachable_server_is_a_clear_error(tmp_path, command):
    env = {
        "NEUREG_HOME": str(tmp_path),
        "DJ_HOST": "127.0.0.1",
        "DJ_PORT": "1",
        "DJ_USER": "x",
        "DJ_PASS": "y",
        "DJ_BACKEND": "mysql",
    }
    run = run_cli(*command, env=env)
    assert run.returncode == 4 and "cannot connect to the mysql server at 127.0.0.1" in run.stderr


def test_server_without_password_is_a_clear_error(tmp_path):
    run = run_cli("status", env={"NEUREG_HOME": str(tmp_path), "DJ_HOST": "127.0.0.1", "DJ_USER": "x"})
    assert run.returncode == 4 and "no password is set" in run.stderr


def test_neureg_home_keeps_installations_apart(tmp_path, scan_folder_factory):
    """Two homes on one machine are two databases: a scan ingested in one is not in the other."""
    folder = scan_folder_factory(tmp_path / "scan")
    one, two = {"NEUREG_HOME": str(tmp_path / "one")}, {"NEUREG_HOME": str(tmp_path / "two")}
    assert run_cli("ingest", str(folder), env=one).returncode == 0
    counts_one = json.loads(run_cli("status", "--json", env=one).stdout)
    counts_two = json.loads(run_cli("status", "--json", env=two).stdout)
    scan = next(name for name in counts_one if name.endswith('."scan"'))
    assert counts_one[scan] == 1 and counts_two[scan] == 0
    assert (tmp_path / "one" / "store").is_dir() and (tmp_path / "one" / "pgdata").is_dir()
    # The store neureg creates is its owner's alone (the responses of a lab's scans are in it).
    assert (tmp_path / "one" / "store").stat().st_mode & 0o777 == 0o700


def test_connect_leaves_datajoint_safemode_on(tmp_path):
    """Only workers turn DataJoint's delete confirmation off; a notebook's connect() keeps it."""
    code = (
        "import datajoint as dj, neureg, sys; neureg.connect(home=sys.argv[1]); "
        "print('safemode', dj.config['safemode'])"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DJ_", "NEUREG_"))}
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "home")], capture_output=True, text=True, env=base, timeout=120
    )
    assert run.returncode == 0 and "safemode True" in run.stdout, run.stderr[-2000:]


def test_version_and_module_entry_point():
    from neureg import __version__

    for command in ([sys.executable, "-m", "neureg", "--version"], [sys.executable, "-m", "neureg.cli", "--version"]):
        run = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and run.stdout.strip() == f"neureg {__version__}", run
    run = subprocess.run(
        [sys.executable, "-m", "neureg", "status", "--help"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and "usage: neureg status" in run.stdout


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KB tmpfs as the object store: a real ENOSPC, not a simulated one (needs root to mount)."""
    store = tmp_path / "store"
    store.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(store)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield store
    subprocess.run(["umount", "-l", str(store)], check=False)


def test_full_disk_during_ingest_is_one_line_and_leaves_nothing(tmp_path, full_disk, scan_folder_factory):
    folder = scan_folder_factory(tmp_path / "scan", n_units=600)  # 39 trials x 600 units: 94 KB of responses
    env = {"NEUREG_HOME": str(tmp_path / "home"), "NEUREG_STORE": str(full_disk)}
    run = run_cli("ingest", str(folder), env=env)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "no space left on the device" in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]
    counts = json.loads(run_cli("status", "--json", env=env).stdout)
    scan = next(name for name in counts if name.endswith('."scan"'))
    assert counts[scan] == 0
    # No partial (.npy.saving) or unreferenced block is left to keep the store full.
    assert [p for p in full_disk.rglob("*") if p.is_file()] == []


def _oracle_images(pipeline, key) -> set:
    trials = pipeline.experiment.Trial & key & "tier = 'oracle'"
    return {str(h) for h in trials.to_arrays("image_hash")}


def test_scanset_registers_one_set_per_group_sharing_oracle_images(
    pipeline, oracle_populated, subprocess_env, neureg_cli
):
    """`neureg scanset --oracle-groups`: the cohort's four scans (same oracle images) become one set, once."""
    from neureg.upkeep.scansets import oracle_groups

    scan_keys = [key for _, key in oracle_populated]  # the grouping is OracleStats.oracle_set: oracle stage first
    run = neureg_cli("scanset", "--oracle-groups", "--json", timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    sets = json.loads(run.stdout)
    expected = sorted((k["mouse"], k["session"], k["scan_idx"]) for k in scan_keys)
    members = {s["scan_set"]: sorted((m["mouse"], m["session"], m["scan_idx"]) for m in s["members"]) for s in sets}
    cohort_set = pipeline.experiment.ScanSet.create(scan_keys)  # the same scans hash to the same set
    assert members.get(cohort_set["scan_set"]) == expected, sets
    for scan_set in sets:  # every group: two or more scans, all shown the same oracle images
        assert scan_set["n_scans"] == len(scan_set["members"]) >= 2
        images = {
            frozenset(_oracle_images(pipeline, m))
            for m in (pipeline.experiment.ScanSet & {"scan_set": scan_set["scan_set"]}).members()
        }
        assert len(images) == 1  # the note is the first registration's (an existing set keeps its own)
        if scan_set["new"]:
            assert scan_set["note"] == f"scans sharing {len(next(iter(images)))} oracle images"
    assert len(sets) == len(oracle_groups(pipeline))
    again = run_cli("scanset", "--oracle-groups", "--json", env=subprocess_env)
    assert again.returncode == 0 and [s["new"] for s in json.loads(again.stdout)] == [False] * len(sets)
    text = run_cli("scanset", "--oracle-groups", env=subprocess_env)
    assert f"scan_set {cohort_set['scan_set']}: 4 scans, already registered" in text.stdout, text.stdout


def test_scanset_needs_a_choice(tmp_path):
    run = run_cli("scanset", env={"NEUREG_HOME": str(tmp_path)})
    assert run.returncode == 2 and "one of the arguments --oracle-groups --all is required" in run.stderr


def test_ingest_json_reports_each_path_for_scripts(
    pipeline, tmp_path, scan_folder_factory, unique_mouse, subprocess_env
):
    """`neureg ingest --json`: one entry per path (key, or the error), the exit status as without --json."""
    good = scan_folder_factory(tmp_path / "good", mouse=unique_mouse, seed=31)
    bad = tmp_path / "missing"
    run = run_cli("ingest", "--json", str(good), str(bad), env=subprocess_env)
    assert run.returncode == 2, run.stderr
    first, second = json.loads(run.stdout)
    assert first == {"path": str(good), "ingested": True, "key": {"mouse": unique_mouse, "session": 1, "scan_idx": 1}}
    assert second["ingested"] is False and str(bad) in second["error"]
    again = run_cli("ingest", "--json", str(good), env=subprocess_env)
    assert again.returncode == 3 and json.loads(again.stdout)[0]["exists"] is True


# ------------------------------------------------------------------------------------------------ habits
def test_every_command_a_script_reads_answers_in_json():
    commands = build_parser()._subparsers._group_actions[0].choices
    parsed = {
        "init",
        "ingest",
        "status",
        "simulate",
        "populate",
        "gc",
        "scanset",
        "plan",
        "report",
        "verify",
        "diagram",
    }
    for name in parsed:
        options = {s for action in commands[name]._actions for s in action.option_strings}
        assert "--json" in options, name


def test_json_outputs_of_init_simulate_populate_and_diagram(tmp_path):
    env = {"NEUREG_HOME": str(tmp_path / "home")}
    init = json.loads(run_cli("init", "--json", env=env).stdout)
    assert init["backend"] == "embedded" and init["store"] == str(tmp_path / "home" / "store")
    assert len(init["schemas"]) == 6 and all(s.startswith("neureg_") for s in init["schemas"])
    sim = run_cli(
        "simulate",
        str(tmp_path / "sim"),
        "--json",
        "--mice",
        "1",
        "--scans-per-day",
        "1",
        "--units",
        "12",
        "--images",
        "30",
        "--oracle-images",
        "5",
        "--repeats",
        "3",
        env=env,
    )
    folders = json.loads(sim.stdout)["folders"]
    assert len(folders) == 1 and (tmp_path / "sim").exists() and all(os.path.isdir(f) for f in folders)
    assert run_cli("ingest", *folders, env=env).returncode == 0
    populate = run_cli("populate", "--stage", "oracle", "--json", env=env)
    assert populate.returncode == 0, populate.stderr
    rows = json.loads(populate.stdout)
    assert any(t.endswith('__oracle_stats"') and r["new_rows"] == 1 and r["errors"] == [] for t, r in rows.items()), (
        rows
    )
    diagram = run_cli("diagram", str(tmp_path / "pipeline.mmd"), "--json", env=env)
    assert json.loads(diagram.stdout) == {"diagram": str(tmp_path / "pipeline.mmd"), "format": "mmd"}


def test_bash_completion_completes_commands_and_their_options(tmp_path):
    script = tmp_path / "neureg.bash"
    script.write_text(run_cli("completion", "bash").stdout)

    def complete(*words):
        line = " ".join(words)
        probe = (
            f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _neureg_complete; "
            'printf "%s\\n" "${COMPREPLY[@]}"'
        )
        return subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30).stdout.split()

    assert complete("neureg", "ver") == ["verify"]
    assert complete("neureg", "--home", "/tmp/x", "ver") == ["verify"]
    assert complete("neureg", "worker", "--time") == ["--time-limit"]
    assert complete("neureg", "verify", "--j") == ["--json"]
    assert set(complete("neureg", "")) >= {"init", "ingest", "worker", "verify", "completion", "--version"}


def test_store_settings_faults_are_one_clear_line(tmp_path):
    env = {"NEUREG_HOME": str(tmp_path), "NEUREG_STORE": "s3://bucket/neureg"}
    run = run_cli("status", env=env)
    assert run.returncode == 4 and "NEUREG_STORE is a folder" in run.stderr and "DJ_STORES" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    broken = json.dumps({"neureg": {"protocol": "s3", "endpoint": "127.0.0.1:9", "location": "x"}})
    run = run_cli("status", env={"NEUREG_HOME": str(tmp_path), "DJ_STORES": broken})
    assert run.returncode == 4 and "store 'neureg' is misconfigured" in run.stderr and "bucket" in run.stderr, (
        run.stderr
    )
    assert len(run.stderr.strip().splitlines()) == 1


def test_a_mistyped_execution_setting_is_refused_before_any_work(tmp_path):
    """NEUREG_CHANNELS_LAST (now read on every CPU worker) or NEUREG_DEMO_PROCESSES mistyped: exit 2 with
    one line naming it, before the demo creates anything and before populate or a worker takes a job."""
    home = tmp_path / "home"
    bad = {"NEUREG_HOME": str(home), "NEUREG_CHANNELS_LAST": "maybe"}
    demo = run_cli("demo", "--fast", "--out", str(tmp_path / "out"), env=bad)
    assert demo.returncode == 2, demo.stderr
    assert demo.stderr.strip().splitlines() == [
        "error: NEUREG_CHANNELS_LAST='maybe': expected 1/0, true/false, yes/no or on/off"
    ]
    assert not (tmp_path / "out").exists() and not (home / "pgdata").exists()
    processes = run_cli(
        "demo", "--fast", "--out", str(tmp_path / "out"), env={"NEUREG_HOME": str(home), "NEUREG_DEMO_PROCESSES": "two"}
    )
    assert processes.returncode == 2 and "NEUREG_DEMO_PROCESSES='two'" in processes.stderr
    assert not (tmp_path / "out").exists()

    assert run_cli("init", env={"NEUREG_HOME": str(home)}).returncode == 0
    for command in (["populate", "--stage", "oracle"], ["worker", "--once", "--stage", "oracle"]):
        run = run_cli(*command, env=bad)
        assert run.returncode == 2, (command, run.stderr)
        assert "error: NEUREG_CHANNELS_LAST='maybe'" in run.stderr and "Traceback" not in run.stderr


def test_a_bad_group_size_is_refused_before_any_work(tmp_path):
    """--group and NEUREG_GROUP take auto or 1..64: anything else is exit 2 with one line naming it, before
    the demo writes anything or a worker or populate connects."""
    home = tmp_path / "home"
    demo = run_cli("demo", "--fast", "--group", "0", "--out", str(tmp_path / "out"), env={"NEUREG_HOME": str(home)})
    assert demo.returncode == 2 and demo.stderr.strip().splitlines() == [
        "error: --group='0': expected auto or a whole number from 1 to 64"
    ], demo.stderr
    assert not (tmp_path / "out").exists() and not (home / "pgdata").exists()
    for command in (["populate", "--group", "many"], ["worker", "--once", "--group", "65"]):
        run = run_cli(*command, env={"NEUREG_HOME": str(home)})
        assert run.returncode == 2 and "--group" in run.stderr and "Traceback" not in run.stderr, (command, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1
    worker = run_cli("worker", "--once", env={"NEUREG_HOME": str(home), "NEUREG_GROUP": "-3"})
    assert worker.returncode == 2 and "NEUREG_GROUP='-3'" in worker.stderr, worker.stderr
    batch = run_cli("worker", "--once", env={"NEUREG_HOME": str(home), "NEUREG_ATTACK_BATCH": "lots"})
    assert batch.returncode == 2 and "NEUREG_ATTACK_BATCH='lots'" in batch.stderr, batch.stderr
    assert "Traceback" not in batch.stderr and len(batch.stderr.strip().splitlines()) == 1


def test_report_restrictions_are_checked_before_connecting(tmp_path):
    env = {"NEUREG_HOME": str(tmp_path)}
    run = run_cli("report", "robustness", "--restrict", "seed", env=env)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "error: --restrict 'seed': expected ATTRIBUTE=VALUE, e.g. seed=0 or condition=None"
    ]
    run = run_cli("report", "oracle", "--restrict", "seed=0", env=env)
    assert run.returncode == 2 and "--restrict applies to the robustness report, not oracle" in run.stderr
    assert not (tmp_path / "neureg_figures").exists()
