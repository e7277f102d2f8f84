"""What a lab builds and submits: the worker and Jupyter images (Dockerfile targets), the Apptainer definition
that matches the worker image, and the SLURM array script; read and checked against constraints.txt and
pyproject.toml, since no container engine or scheduler runs on these machines."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ images
def _locked(name: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(name.lower() + "=="):
            return line.split("==", 1)[1]
    raise AssertionError(f"{name} is not in constraints.txt")


def _stages(dockerfile: str) -> dict[str, str]:
    """Stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", dockerfile)
    stages, name = {}, None
    for line in text.splitlines():
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            name = match[1]
        if name:
            stages[name] = stages.get(name, "") + line + "\n"
    return stages


def _pytorch_base(text: str) -> str:
    match = re.search(r"pytorch/pytorch:(\S+)", text)
    assert match, "the worker image must start from the official PyTorch image"
    return match[1]


def test_worker_image_is_lean_locked_and_on_the_official_pytorch_cuda_runtime():
    dockerfile = (REPO / "Dockerfile").read_text()
    stages = _stages(dockerfile)
    assert set(stages) == {"worker", "jupyter"}
    worker, jupyter = stages["worker"], stages["jupyter"]
    tag = _pytorch_base(dockerfile)
    torch_version, cuda, cudnn, kind = re.fullmatch(r"([\d.]+)-cuda([\d.]+)-cudnn(\d+)-(\w+)", tag).groups()
    assert kind == "runtime", "the runtime image: no compilers in a worker"
    assert torch_version == _locked("torch").split("+")[0], "the base image's torch must be the locked one"
    assert cuda == ".".join(_locked("nvidia-cuda-runtime").split(".")[:2]), "the CUDA of the locked torch wheel"
    assert cudnn == _locked("nvidia-cudnn-cu13").split(".")[0]
    install = re.search(r"pip install[^\n]*", worker)[0]
    assert '".[s3]"' in install and "-c constraints.txt" in install and "-e " not in install
    for heavy in ("test", "jupyter", "pytest", "notebook"):
        assert heavy not in install.lower(), f"the worker image installs {heavy}"
    assert re.search(r"^USER neureg", worker, re.M), "workers do not run as root"
    assert re.match(r"FROM worker AS jupyter", jupyter) and "jupyterlab==" in jupyter


def test_images_take_the_package_from_the_repository_with_no_list_of_modules():
    """Both images install what setup.py finds; neither names a module, so a new package cannot be left out."""
    dockerfile = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    assert re.findall(r"^COPY\s+(.+)$", dockerfile, re.M) == [". ./"]
    definition = (REPO / "deploy/apptainer/neureg-worker.def").read_text()
    assert "%files" not in definition
    assert re.search(r"git archive --format=tar HEAD \| tar -x -C \"\$\{APPTAINER_ROOTFS\}/opt/neureg\"", definition)
    for text in (dockerfile, definition):
        assert not re.search(r"\b(cli|connection|errors|scanfolder)\.py\b", text)


def test_apptainer_definition_matches_the_worker_image():
    definition = (REPO / "deploy/apptainer/neureg-worker.def").read_text()
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^Bootstrap:\s*docker$", definition, re.M)
    assert re.search(r"^From:\s*pytorch/pytorch:(\S+)$", definition, re.M)[1] == _pytorch_base(dockerfile)
    docker_install = re.search(r'pip install --no-cache-dir "\.\[s3\]" -c constraints\.txt', dockerfile)
    apptainer_install = re.search(r'pip install --no-cache-dir "\.\[s3\]" -c constraints\.txt', definition)
    assert docker_install and apptainer_install
    assert "NEUREG_BACKEND=server" in definition and "ENV NEUREG_BACKEND=server" in dockerfile


# ------------------------------------------------------------------------------------------------ SLURM
def test_slurm_array_script_asks_one_gpu_per_task_and_stops_inside_its_time():
    from neureg.cli.worker import duration

    script = (REPO / "deploy/slurm/worker.sbatch").read_text()
    check = subprocess.run(["bash", "-n", str(REPO / "deploy/slurm/worker.sbatch")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    directives = dict(re.findall(r"^#SBATCH\s+--([\w-]+)=(\S+)", script, re.M))
    assert directives["gres"] == "gpu:1" and re.fullmatch(r"\d+-\d+(%\d+)?", directives["array"])
    signal_name, lead = re.fullmatch(r"B:(\w+)@(\d+)", directives["signal"]).groups()
    assert signal_name == "TERM", "SIGTERM is what makes a worker put its job back"
    default_limit = re.search(r"NEUREG_TIME_LIMIT:-([\d:-]+)", script)[1]
    assert duration(default_limit) < duration(directives["time"]) - int(lead), (
        "the worker must stop taking jobs before SLURM's warning signal"
    )
    assert 'exec neureg worker --time-limit "$LIMIT"' in script
    assert re.search(r'exec apptainer exec --nv .*neureg worker --time-limit "\$LIMIT"', script, re.S)
