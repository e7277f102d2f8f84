"""Real database servers for the tests: embedded PostgreSQL and a MySQL-protocol server (MariaDB/MySQL).

Each pytest process talks to one backend, as neureg's own processes do (``neureg.connect`` binds the
schema modules to one database): ``--backend postgres`` (the default) or ``--backend mysql``, also set by
``NEUREG_TEST_BACKEND``. The whole suite is therefore two runs::

    python -m pytest && python -m pytest --backend mysql

The postgres run collects every test; the mysql run keeps only the database tests (those whose fixtures
include ``pipeline``, marked ``db`` here) and deselects the rest, so the tests without a database run
once. The session-scoped ``pipeline`` fixture activates the whole pipeline on the process's backend.

The MySQL server is reached with NEUREG_TEST_MYSQL_HOST / _PORT / _USER / _PASS (``.ci/run`` creates that
account). Outside CI an unreachable MySQL server skips its tests with the reason in the summary; under CI
(``CI`` set) it fails them, so a broken server can never pass as green.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest

import neureg

BACKENDS = ("postgres", "mysql")
BACKEND_VARIABLE = "NEUREG_TEST_BACKEND"


def pytest_addoption(parser):
    default = os.environ.get(BACKEND_VARIABLE) or "postgres"
    parser.addoption(
        "--backend",
        choices=BACKENDS,
        default=default,
        help=f"the database backend of this pytest process (default: ${BACKEND_VARIABLE} or postgres); "
        "with mysql only the database tests run",
    )


def pytest_configure(config):
    backend = config.getoption("--backend")
    if backend not in BACKENDS:  # a bad NEUREG_TEST_BACKEND: argparse checks only what is typed
        raise pytest.UsageError(f"{BACKEND_VARIABLE} must be one of {', '.join(BACKENDS)}, got {backend!r}")


def pytest_report_header(config):
    return f"neureg database backend: {config.getoption('--backend')}"


@pytest.hookimpl(tryfirst=True)  # before ``-m db`` filters on the marker
def pytest_collection_modifyitems(config, items):
    """Mark every test that uses ``pipeline`` as ``db``; a mysql run keeps only those."""
    selected, deselected = [], []
    for item in items:
        if "pipeline" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.db)
            selected.append(item)
        else:
            deselected.append(item)
    if config.getoption("--backend") != "postgres" and deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


def mysql_settings() -> dict:
    return {
        "database.backend": "mysql",
        "database.host": os.environ.get("NEUREG_TEST_MYSQL_HOST", "127.0.0.1"),
        "database.port": int(os.environ.get("NEUREG_TEST_MYSQL_PORT", "3306")),
        "database.user": os.environ.get("NEUREG_TEST_MYSQL_USER", "neureg_ci"),
        "database.password": os.environ.get("NEUREG_TEST_MYSQL_PASS", "neureg_ci_pw"),
        "database.use_tls": False,
    }


def mysql_env() -> dict:
    """The same server as environment variables, for CLI subprocesses."""
    s = mysql_settings()
    return {
        "NEUREG_BACKEND": "server",
        "DJ_BACKEND": "mysql",
        "DJ_HOST": s["database.host"],
        "DJ_PORT": str(s["database.port"]),
        "DJ_USER": s["database.user"],
        "DJ_PASS": s["database.password"],
        "DJ_USE_TLS": "false",
    }


def _drop_all(pipeline) -> None:
    for stage in reversed(list(vars(pipeline).values())):
        schema = getattr(stage, "schema", None)
        if schema is not None and schema.exists:
            schema.drop(prompt=False)


@pytest.fixture(scope="session")
def pipeline(request):
    """The whole pipeline activated on this process's backend (``--backend``) under a throw-away prefix."""
    import datajoint as dj

    backend = request.config.getoption("--backend")
    # Not under pytest's tmp dirs: embedded PostgreSQL runs as its own system user when we are root
    # and needs the parents readable, which pytest's 0700 temp folders are not at exit.
    home = Path(tempfile.mkdtemp(prefix=f"neureg_test_{backend}_"))
    prefix = f"t{uuid.uuid4().hex[:8]}_"
    if backend == "postgres":
        pipe = neureg.connect(home=home, prefix=prefix, backend="embedded")
    else:
        for key, value in mysql_settings().items():
            dj.config[key] = value
        try:
            pipe = neureg.connect(home=home, prefix=prefix, backend="server")
        except neureg.ConfigurationError as exc:
            message = f"MySQL-protocol server not reachable: {exc}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    pipe.backend = backend
    pipe.home = home
    yield pipe
    _drop_all(pipe)


@pytest.fixture
def subprocess_env(pipeline) -> dict:
    """Environment for running the ``neureg`` CLI against the same database as ``pipeline``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJ_", "NEUREG_"))}
    env.update(NEUREG_HOME=str(pipeline.home), NEUREG_PREFIX=pipeline.prefix, NEUREG_STORE=str(pipeline.home / "store"))
    if pipeline.backend == "mysql":
        env.update(mysql_env())
    else:
        env["NEUREG_BACKEND"] = "embedded"
    return env


@pytest.fixture
def neureg_cli(subprocess_env):
    """``neureg_cli(*args, timeout=300)``: run the ``neureg`` command against the suite's database."""

    def run(*args, timeout: float = 300) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "neureg", *args]
        return subprocess.run(command, env=subprocess_env, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def unique_mouse() -> str:
    """A mouse name no other test uses, so tests share one database without stepping on each other."""
    return f"m{uuid.uuid4().hex[:10]}"


def make_scan_folder(
    path, mouse="m1", session=1, scan=1, n_images=30, n_oracle=3, repeats=4, n_units=12, seed=0, shape=(18, 32)
):
    """A small valid scan folder of random data (stimuli are random uint8 textures)."""
    from neureg.ingestion.folder import write_scan_folder

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n_images, *shape), dtype=np.uint8)
    frame_ids = np.concatenate([np.arange(n_oracle, n_images), np.repeat(np.arange(n_oracle), repeats)]) + 1000
    frame_ids = rng.permutation(frame_ids)
    n_trials = frame_ids.size
    write_scan_folder(
        path,
        {
            "mouse": mouse,
            "session": session,
            "date": "2026-11-01",
            "scan": scan,
            "area": "V1",
            "depth": 210.5,
            "frame_rate": 7.5,
            "notes": "test",
        },
        images=images[frame_ids - 1000],
        responses=rng.gamma(2.0, 1.0, (n_trials, n_units)).astype(np.float32),
        behavior=rng.normal(size=(n_trials, 3)).astype(np.float32),
        pupil_center=rng.normal(size=(n_trials, 2)).astype(np.float32),
        frame_image_id=frame_ids,
        unit_ids=rng.permutation(np.arange(100, 100 + 3 * n_units))[:n_units],
        cell_motor_coordinates=rng.uniform(0, 500, (n_units, 3)),
        start_time=np.arange(n_trials) * 1.5,
        duration=np.full(n_trials, 0.5),
    )
    return path


@pytest.fixture
def scan_folder_factory():
    """``make_scan_folder`` as a fixture (test modules cannot import conftest under importlib mode)."""
    return make_scan_folder


# A small simulated cohort, written once per test session and ingested once per backend: every stage's
# tests read the same scans, as a lab's stages read the same experiment tables.
TEST_COHORT = dict(n_mice=2, n_days=1, scans_per_day=2, n_units=80, n_images=170, n_oracle=40, n_repeats=10, seed=3)


@pytest.fixture(scope="session")
def cohort_folders(tmp_path_factory):
    from neureg.experiments.simulate import simulate_cohort

    return simulate_cohort(tmp_path_factory.mktemp("cohort"), **TEST_COHORT)


@pytest.fixture(scope="session")
def cohort(pipeline, cohort_folders):
    """The simulated cohort ingested into this backend; returns [(folder, scan key)]."""
    from neureg.ingestion import ingest_folder

    return [(folder, ingest_folder(folder, pipeline)) for folder in cohort_folders]


@pytest.fixture(scope="session")
def oracle_populated(pipeline, cohort):
    from neureg.populate.stages import populate_stage

    keys = [key for _, key in cohort]
    populate_stage(pipeline, ["oracle"], keys=keys + [pipeline.experiment.ScanSet.create(keys)])
    return cohort


TINY_PREDICTOR = dict(hidden_channels=6, max_epochs=3, patience=2, batch_size=32, input_kernel=7, hidden_kernel=3)


@pytest.fixture(scope="session")
def predictive_populated(pipeline, oracle_populated):
    """A tiny predictive model fitted for every cohort scan (the science is tested in tests/models)."""
    from neureg.populate.stages import populate_stage

    key = pipeline.predictive.PredictorConfig.add(TINY_PREDICTOR, label="tiny")
    populate_stage(pipeline, ["predictive"], keys=[dict(k, **key) for _, k in oracle_populated])
    return key


TARGET_METHODS = ("neural_model", "neural_data", "shuffle", "pixel", "pixel_threshold", "random")


@pytest.fixture(scope="session")
def targets(pipeline, oracle_populated, predictive_populated):
    """One SimilarityTarget per method (vgg needs a weights file: tested on its own) over the cohort's four scans."""
    from neureg.populate.stages import populate_stage

    configs = {}
    for method in TARGET_METHODS:
        extra = {
            "neural_model": {"predictor_hash": predictive_populated["predictor_hash"]},
            "shuffle": {"predictor_hash": predictive_populated["predictor_hash"]},
            "random": {"random_dim": 50},
        }.get(method, {})
        configs[method] = pipeline.similarity.TargetConfig.add(dict(method=method, **extra), label=method)
    cohort_set = pipeline.experiment.ScanSet.create([key for _, key in oracle_populated])
    populate_stage(
        pipeline,
        ["similarity"],
        keys=[dict(k, **predictive_populated) for _, k in oracle_populated]
        + [dict(cohort_set, **c) for c in configs.values()],
    )
    return {m: dict(cohort_set, **c) for m, c in configs.items()}


TINY_NETWORK = dict(width=0.0625)
TINY_VONE = dict(arch="vone_resnet18", width=0.0625, simple_channels=8, complex_channels=8)
TINY_TRAIN = dict(epochs=2, max_train_images=192, batch_size=32)


@pytest.fixture(scope="session")
def trained(pipeline, targets):
    """Tiny networks on the MNIST demo set for four conditions, two seeds each: {condition: plan key}."""
    from neureg.populate.stages import populate_stage

    tr = pipeline.training
    tr.Seed.insert1({"seed": 1}, skip_duplicates=True)
    plans = {
        "None": tr.plan("mnist_demo", TINY_NETWORK, TINY_TRAIN, dict(alpha=0.0)),
        "Pixel": tr.plan(
            "mnist_demo", TINY_NETWORK, TINY_TRAIN, dict(alpha=2.0, pairs_per_step=8), target=targets["pixel"]
        ),
        "Neural (model)": tr.plan(
            "mnist_demo", TINY_NETWORK, TINY_TRAIN, dict(alpha=2.0, pairs_per_step=8), target=targets["neural_model"]
        ),
        "VOne": tr.plan("mnist_demo", TINY_VONE, TINY_TRAIN, dict(alpha=0.0)),
    }
    populate_stage(pipeline, ["training"], keys=[dict(k, seed=s) for k in plans.values() for s in (0, 1)])
    return plans


@pytest.fixture(scope="session")
def evaluated(pipeline, trained):
    """Small robustness evaluations of every trained network: {name: config key}."""
    from neureg.populate.stages import populate_stage

    rb = pipeline.robustness
    attacks = [
        rb.AttackConfig.add(dict(attack="linf_pgd", steps=8, search_steps=5), label="pgd"),
        rb.AttackConfig.add(dict(attack="l2_ddn", steps=20), label="ddn"),
    ]
    configs = {
        "noise": rb.NoiseConfig.add(sigmas=[0.0, 0.1, 0.3], n_images=60),
        "perturbation": rb.PerturbationConfig.add(
            attacks=[a["attack_hash"] for a in attacks], n_images=12, eot_samples=2
        ),
        "robust_linf": rb.RobustConfig.add(norm="linf", epsilon=8 / 255, steps=5, n_images=40),
        "robust_l2": rb.RobustConfig.add(norm="l2", epsilon=0.5, steps=5, n_images=40),
        "corruption": rb.CorruptionConfig.add(
            corruptions=["gaussian_noise", "contrast"], severities=[1, 5], n_images=60
        ),
    }
    nets = [dict(k, seed=s) for k in trained.values() for s in (0, 1)]
    populate_stage(pipeline, ["robustness"], keys=[dict(n, **c) for n in nets for c in configs.values()])
    configs["attacks"] = attacks
    return configs


# ------------------------------------------------------------------------------------------------ worker processes
TOY_HELPER = Path(__file__).parent / "populate" / "test_worker.py"  # the toy stage's entry point (see that file)


class Workers:
    """Worker subprocesses whose combined stderr lands in files under ``folder``."""

    def __init__(self, folder: Path, env: dict):
        self.folder, self.env, self.procs = folder, env, []

    def start(self, command: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"worker{len(self.procs)}.log", "w")
        proc = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        proc.log_path = log.name
        self.procs.append(proc)
        return proc

    def toy(self, database: str, *options: str) -> subprocess.Popen:
        return self.start([sys.executable, str(TOY_HELPER), database, "worker", *options])

    def wait(self, timeout: float) -> list[int]:
        return [proc.wait(timeout=timeout) for proc in self.procs]

    def stop(self, timeout: float = 30) -> list[int]:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def output(self) -> str:
        return "".join(Path(p.log_path).read_text() for p in self.procs)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def workers(tmp_path):
    made = []

    def make(env: dict) -> Workers:
        made.append(Workers(tmp_path, env))
        return made[-1]

    yield make
    for group in made:
        group.kill_all()


@pytest.fixture
def float64():
    """torch's default dtype float64 for one test: arithmetic compared without float32 rounding."""
    import torch

    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(saved)
