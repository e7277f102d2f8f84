"""`neureg demo`: the whole chain in a fresh home (``--fast``, the same contract at the smallest sizes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from neureg.experiments.demo import SIZES

CONDITIONS = ("None", "Shuffle", "Pixel", "Pixel threshold", "Neural (data)", "Neural (model)", "VOne")


def test_full_sizes_meet_the_demo_contract():
    """What a lab reads must rest on enough: 3+ seeds, 500 noise images, 100+ attacked correct digits."""
    full = SIZES["full"]
    assert len(full["seeds"]) >= 3 and full["n_eval"] >= 500
    assert full["n_attack"] * 0.95 >= 100  # at the demo's >= 95% clean accuracy
    assert set(full["methods"]) == {"neural_model", "neural_data", "shuffle", "pixel", "pixel_threshold"}
    assert SIZES["fast"]["seeds"] == full["seeds"] and SIZES["fast"]["methods"] == full["methods"]


def test_demo_runs_the_whole_chain_and_reports_the_contract():
    home = Path(tempfile.mkdtemp(prefix="neureg_demo_test_"))  # not pytest's 0700 folders (embedded PG user)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJ_", "NEUREG_"))}
    env.update(NEUREG_HOME=str(home), NEUREG_BACKEND="embedded", OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "neureg.cli", "demo", "--fast", "--out", str(home / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    figures = home / "out" / "figures"
    results = (figures / "robustness_results.md").read_text()
    n_seeds = len(SIZES["fast"]["seeds"])
    for condition in CONDITIONS:  # every condition, every seed
        row = next(line for line in results.splitlines() if line.startswith(f"| {condition} |"))
        assert f"(n={n_seeds})" in row, row
    versus = (figures / "robustness_vs_none.md").read_text()
    compared = {line.split("|")[1].strip() for line in versus.splitlines()[2:] if line.startswith("| ")}
    assert compared == set(CONDITIONS) - {"None"}
    assert re.search(r"\[[-+][\d.e-]+, [-+][\d.e-]+\] p=", versus), "differences carry a 95% CI and a p value"
    assert "each condition against None" not in run.stdout and " p=" not in run.stdout  # plumbing only
    banner = "[demo] --fast checks the plumbing at the smallest sizes"
    lines = run.stdout.splitlines()
    first = next(line for line in lines if line.startswith("[demo]"))
    assert first.startswith(banner) and run.stdout.count(banner) == 3  # at the start, above both tables
    below = next(i for i, line in enumerate(lines) if line.startswith("[demo] results (mean"))
    assert lines[below - 1].startswith(banner)
    fig_1d = re.findall(r"S\^model (\S+) vs S\^data (\S+) .*median r\(predicted, true rate\) (\S+)", run.stdout)
    assert len(fig_1d) == SIZES["fast"]["cohort"]["scans_per_day"], run.stdout  # one line per scan
    expected = {
        "robustness_results.csv",
        "robustness_noise.png",
        "robustness_perturbation.png",
        "similarity_model.png",
        "similarity_scatter.png",
    }
    assert expected <= {p.name for p in figures.iterdir()}
    assert any(p.name.startswith("oracle_similarity_") for p in figures.iterdir())
