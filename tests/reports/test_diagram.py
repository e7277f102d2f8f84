"""`neureg diagram`: DataJoint's diagram of every pipeline table; the README's copy lists the same tables."""

from __future__ import annotations

import re
from pathlib import Path

from neureg.populate.stages import pipeline_tables


def _node_names(mermaid: str) -> set[str]:
    """Table classes named in a DataJoint Mermaid diagram (``module.Class`` labels, parts by their own name)."""
    return set(re.findall(r"\[(?:[\w.]+\.)?(\w+)\]\)?:::", mermaid))


def test_diagram_names_every_table_and_the_readme_shows_it(pipeline, tmp_path, neureg_cli):
    out = tmp_path / "pipe.mmd"
    run = neureg_cli("diagram", str(out), timeout=300)
    assert run.returncode == 0, run.stderr
    text = out.read_text()
    assert text.startswith("flowchart")
    tables = {entry.table.__name__ for entry in pipeline_tables(pipeline)}
    assert tables <= _node_names(text)
    assert "-->" in text  # foreign keys are drawn
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    shown = re.search(r"```mermaid\n(.*?)```", readme, re.S)
    assert shown and tables <= _node_names(shown.group(1)), "README's diagram is stale: run `neureg diagram`"


def test_unknown_or_unrenderable_format_is_a_clear_error(pipeline, tmp_path, neureg_cli):
    run = neureg_cli("diagram", str(tmp_path / "pipe.gif"), timeout=300)
    assert run.returncode == 2 and "unknown diagram format '.gif'" in run.stderr and "Traceback" not in run.stderr


def test_svg_diagram_draws_every_table_with_graphviz(pipeline, tmp_path, neureg_cli):
    """SVG through Graphviz's dot (.ci/run installs it); the README's picture is one such file."""
    import os
    import shutil

    if shutil.which("dot") is None:
        if os.environ.get("CI"):
            raise AssertionError("CI installs Graphviz (.ci/run); 'dot' is missing")
        import pytest

        pytest.skip("Graphviz's dot is not installed here (apt install graphviz)")
    out = tmp_path / "pipe.svg"
    run = neureg_cli("diagram", str(out), "--json", timeout=300)
    assert run.returncode == 0, run.stderr
    svg = out.read_text()
    assert svg.lstrip().startswith("<svg") and svg.rstrip().endswith("</svg>")
    titles = set(re.findall(r"<title>(?:\w+\.)+?(\w+)</title>", svg))
    tables = {entry.table.__name__ for entry in pipeline_tables(pipeline)}
    assert tables <= titles, tables - titles
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "](docs/pipeline.svg)" in readme
    shown = (Path(__file__).resolve().parents[2] / "docs" / "pipeline.svg").read_text()
    assert tables <= set(re.findall(r"<title>(?:\w+\.)+?(\w+)</title>", shown)), "docs/pipeline.svg is stale"
