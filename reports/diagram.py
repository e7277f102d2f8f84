"""`neureg diagram`: the pipeline's tables and foreign keys as DataJoint draws them.

DataJoint's own ``dj.Diagram`` over every schema of the pipeline, saved by its ``save``: Mermaid text
(``.mmd``; GitHub and most Markdown viewers render it, no extra program), or SVG/PNG through Graphviz's
``dot`` program, which is not a Python package and must be installed on the machine (``apt install
graphviz``). Without it an SVG or PNG request is a clear error that suggests ``.mmd``.
"""

from __future__ import annotations

import shutil
import json
import sys
from pathlib import Path

FORMATS = {".mmd": "mermaid", ".mermaid": "mermaid", ".svg": "svg", ".png": "png"}


def pipeline_diagram(pipeline):
    """One ``dj.Diagram`` of every schema of the connected pipeline."""
    import datajoint as dj

    from ..populate.stages import stage_modules

    modules = stage_modules(pipeline)
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
        raise ValueError(f"{path}: {fmt.upper()} needs Graphviz's 'dot' program, which is not installed here "
                         "(apt install graphviz); a .mmd file needs nothing")
    path.parent.mkdir(parents=True, exist_ok=True)
    pipeline_diagram(pipeline).save(str(path), format=fmt)
    return path


def cmd_diagram(args) -> int:
    """`neureg diagram [OUT]`: write the pipeline's diagram; exit 2 for a format this machine cannot write."""
    from ..connection import connect

    pipeline = connect(home=args.home, prefix=args.prefix)
    try:
        path = save_diagram(pipeline, args.out)
        print(json.dumps({"diagram": str(path), "format": path.suffix.lstrip(".")}) if args.json else path)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def register_cli(subparsers) -> None:
    """Add the ``diagram`` command to neureg's argparse subparsers."""
    p = subparsers.add_parser(
        "diagram", help="write the pipeline's DataJoint diagram (.mmd, .svg, .png)",
        description="DataJoint's diagram of every neureg schema: tables, parts and foreign keys. .mmd (Mermaid) "
        "needs nothing; .svg and .png need Graphviz's dot program.")
    p.add_argument("out", nargs="?", type=Path, default=Path("neureg-pipeline.mmd"),
                   help="output file; its suffix picks the format (default neureg-pipeline.mmd)")
    p.add_argument("--json", action="store_true", help="print one JSON object: diagram, format")
    p.set_defaults(func=cmd_diagram)
