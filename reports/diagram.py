"""`neureg diagram`: the pipeline's tables and foreign keys as DataJoint draws them.

DataJoint's own ``dj.Diagram`` over every schema of the pipeline, saved by its ``save``: Mermaid text
(``.mmd``; GitHub and most Markdown viewers render it, no extra program), or SVG/PNG through Graphviz's
``dot`` program, which is not a Python package and must be installed on the machine (``apt install
graphviz``). Without it an SVG or PNG request is a clear error that suggests ``.mmd``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

FORMATS = {".mmd": "mermaid", ".mermaid": "mermaid", ".svg": "svg", ".png": "png"}


def pipeline_diagram(pipeline):
    """One ``dj.Diagram`` of every schema of the connected pipeline."""
    import datajoint as dj

    modules = pipeline.modules()
    diagram = None
    for module in modules.values():
        part = dj.Diagram(module.schema, context=modules)  # tables named stage.Class, as neureg spells them
        diagram = part if diagram is None else diagram + part
    return diagram


def save_diagram(pipeline, path: Path) -> Path:
    """Write the diagram to ``path``; the format is the suffix's (.mmd/.mermaid, .svg, .png)."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown diagram format {path.suffix!r}; use one of {', '.join(FORMATS)}")
    if fmt != "mermaid" and shutil.which("dot") is None:
        raise ValueError(
            f"{path}: {fmt.upper()} needs Graphviz's 'dot' program, which is not installed here "
            "(apt install graphviz); a .mmd file needs nothing"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    pipeline_diagram(pipeline).save(str(path), format=fmt)
    return path
