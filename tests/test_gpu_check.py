"""bench/gpu_check.sh runs unchanged on a CPU (tiny sizes), so the script a lent GPU runs cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_and_reports_every_section(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_BUDGET="400")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout[proc.stdout.index("== gpu_check summary ==") :]
    assert "cuda-marked tests:" in summary and " passed" in summary and "failed" not in summary
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["tiny"] is True and report["device"].startswith("cpu")
    results = report["results"]
    for kind in ("plain", "regularized", "vone"):
        assert results[f"step/{kind}/eager"]["ms_per_step"] > 0
        assert results[f"step/{kind}/graph"] == {"status": "n/a on CPU"}
    assert results["ratio/regularized_over_plain/eager"] > 1  # the pair images are extra work
    for k in (1, 2):
        row = results[f"concurrency/{k}"]
        assert len(row["per_process_steps_per_s"]) == k and row["networks_per_hour"] > 0
    fit = results["predictive"]
    assert fit["epochs"] >= 1 and -1 <= fit["val_corr"] <= 1 and fit["r_true_rates"] > 0
    parts = results["robustness"]["parts"]
    assert {"clean", "noise_ladder", "corruptions", "robust_pgd_linf", "autoattack_linf", "autoattack_l2"} <= set(parts)
    attacks = {name for name in parts if name.startswith("attack/")}
    assert {"attack/linf_fmn/50", "attack/l2_fmn/50", "attack/l2_ddn/50"} <= attacks
    assert all("s" in row for row in parts.values()), parts  # nothing skipped at tiny sizes
    for name in attacks:
        assert 0 <= parts[name]["median"] < 2, (name, parts[name])
    # The table names each section once.
    for line in ("step/plain/eager", "concurrency/2", "predictive", "robustness/attack/linf_fmn/50"):
        assert line in summary
