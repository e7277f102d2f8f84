"""The lab deployment: docker-compose.yml's structure, `docker compose config` where it runs, the images'
ignore files. The accounts are tried in tests/upkeep/test_accounts.py."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datajoint as dj
import pytest

import neureg
from neureg.cli.worker import register

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


def test_workers_and_jupyter_share_one_s3_store_each_with_its_role(compose):
    """Both use DataJoint's store 'neureg' in the s3 service's bucket, each with its own store user: the worker's,
    and Jupyter's named as its database login (the lab policy's section); neither has MinIO's root keys, which
    only the one-shot s3-roles service holds, and it attaches the policies neureg generates."""
    import json

    from neureg.upkeep.store_policy import store_policy

    worker, jupyter, s3, roles = (compose["services"][name] for name in ("worker", "jupyter", "s3", "s3-roles"))
    values = _example_values()
    specs = {}
    for name, service in (("worker", worker), ("jupyter", jupyter)):
        raw = _environment(service)["DJ_STORES"]
        for secret in ("access_key", "secret_key"):  # written as ${VAR} references, never as values
            assert re.search(rf'"{secret}": "\$\{{[A-Z0-9_]+:\?[^}}]*\}}"', raw), raw
        stores = json.loads(_interpolate(raw, values))
        spec = specs[name] = stores["neureg"]
        assert spec["protocol"] == "s3" and spec["endpoint"] == "s3:9000" and spec["secure"] is False
        with dj.config.override(stores=stores):  # DataJoint accepts the spec as a worker's first array would
            assert dj.config.get_store_spec("neureg")["bucket"] == values["S3_BUCKET"]
        assert spec["access_key"] != _interpolate(_environment(s3)["MINIO_ROOT_USER"], values), name
        assert spec["secret_key"] != _interpolate(_environment(s3)["MINIO_ROOT_PASSWORD"], values), name
        assert "NEUREG_STORE" not in _environment(service)
        assert service["depends_on"]["s3"]["condition"] == "service_healthy"
        assert service["depends_on"]["s3-roles"]["condition"] == "service_completed_successfully"
    assert {k: v for k, v in specs["worker"].items() if "key" not in k} == {
        k: v for k, v in specs["jupyter"].items() if "key" not in k
    }
    assert specs["jupyter"]["access_key"] == values["JUPYTER_USER"]
    assert specs["worker"]["access_key"] == values["WORKER_S3_KEY"]
    script = roles["command"][0]
    for policy, user in (("neureg-worker", "WORKER_S3_KEY"), ("neureg-lab", "JUPYTER_USER")):
        assert f'mc admin policy attach local {policy} --user "$${user}"' in script, script
    assert _mounts(roles)["/policies"] == "./deploy/minio"
    for role, name in (("worker", "worker-policy.json"), ("lab", "lab-policy.json")):
        on_disk = json.loads((REPO / "deploy" / "minio" / name).read_text())
        assert on_disk == store_policy(role, "neureg", "neureg_"), f"regenerate deploy/minio/{name}"
    assert s3["healthcheck"]["test"] and _mounts(s3).get("/data") in compose["volumes"]
    for service in (s3, roles):
        assert re.match(r"^minio/minio:RELEASE\.", service["image"]), "pin MinIO's release"


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
