"""The architecture rules, checked on the tree as it is: each test fails when a rule is broken.

- every Python file is at most ``MAX_LINES`` lines, so each reads in one sitting;
- ``models/`` is pure numpy/torch: nothing there imports DataJoint;
- code and docs stand on their own: no citing of design notes (``DESIGN.md``), of the scratch folder
  (``shared/``) or of issue numbers, which a reader of the repository cannot follow;
- every public module-level function and class in the package's modules says why it exists;
- ``populate/`` uses DataJoint's public API only: no private jobs tables (``~~``), no ``datajoint.condition``;
- the package root holds only ``__init__``, ``__main__`` and ``errors``; every other concern is a folder;
- the floors: a module imports its own layer and the layers below (:data:`LAYERS`), never one above, and
  no two modules import each other, however indirectly;
- tests, benchmarks and docs are not importable as ``neureg.*``, and the version is written once.

Each checker is a plain function of one file's text, tested on small examples first, so a rule that stops
catching what it should fails here too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450
EXCLUDED_DIRS = {"notebooks", "__pycache__", "build", "dist"}  # and every hidden folder (.venv, .devsite, .git)
DOCSTRING_PACKAGES = (
    "schemas",
    "models",
    "populate",
    "database",
    "ingestion",
    "upkeep",
    "experiments",
    "cli",
    "reports",
)  # plus the modules at the root
ROOT_MODULES = {"__init__.py", "__main__.py", "errors.py", "setup.py"}  # setup.py: the build script, not a module
# The floors, lowest first: a module may import from its own layer and those below it, never from above.
LAYERS = ("errors", "models", "database", "schemas", "ingestion", "populate", "upkeep", "reports", "experiments", "cli")


def _skipped(path: Path) -> bool:
    """Folders that are not the package's source: environments, site builds, notebooks, build outputs."""
    parts = path.relative_to(ROOT).parts[:-1]
    return any(p.startswith(".") or p in EXCLUDED_DIRS or p.endswith(".egg-info") for p in parts)


def python_files(under: Path = ROOT) -> list[Path]:
    """Every .py file of the repository below ``under``, sorted, without the excluded folders."""
    return sorted(p for p in under.rglob("*.py") if not _skipped(p))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


# ------------------------------------------------------------------------------------------ checkers
CITATION_PATTERNS = {
    "DESIGN.md": re.compile(r"DESIGN\.md"),
    "shared/": re.compile(r"(?<![\w.-])shared/"),
    "issue number": re.compile(r"\bissues?\s*(?:no\.?\s*)?#?\s*\d+|(?<![\w&#/:])#\d+\b(?![\w-])", re.IGNORECASE),
}


def citations(text: str) -> list[str]:
    """``line: what`` for every citation of design notes, the scratch folder or an issue number."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        found += [f"{number}: {what}" for what, pattern in CITATION_PATTERNS.items() if pattern.search(line)]
    return found


def _datajoint_aliases(tree: ast.Module) -> set[str]:
    """Names the module binds to the datajoint package (``import datajoint as dj`` binds ``dj``)."""
    return {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name == "datajoint"
    }


def imported_modules(tree: ast.Module) -> set[str]:
    """Every module an import statement names, including ``from a import b`` as ``a`` and ``a.b``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def datajoint_imports(tree: ast.Module) -> list[str]:
    """The DataJoint modules imported, statically or through ``importlib.import_module("datajoint...")``."""
    found = [m for m in imported_modules(tree) if m == "datajoint" or m.startswith("datajoint.")]
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and node.args[0].value.split(".")[0] == "datajoint"
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
        ):
            found.append(node.args[0].value)
    return sorted(set(found))


def _docstring_nodes(tree: ast.Module) -> set[int]:
    """ids of the string constants that are docstrings (prose about DataJoint, not a use of it)."""
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    owners = [tree] + [node for node in ast.walk(tree) if isinstance(node, kinds)]
    return {
        id(owner.body[0].value)
        for owner in owners
        if owner.body
        and isinstance(owner.body[0], ast.Expr)
        and isinstance(owner.body[0].value, ast.Constant)
        and isinstance(owner.body[0].value.value, str)
    }


def private_datajoint_uses(tree: ast.Module) -> list[str]:
    """DataJoint internals in code: a private jobs table (a ``~~name`` string) or ``datajoint.condition``.

    Docstrings and comments may explain the jobs tables; code must reach them through the public API.
    """
    prose = _docstring_nodes(tree)
    found = [
        f"{node.lineno}: '~~' (a private jobs table)"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and "~~" in node.value
        and id(node) not in prose
    ]
    found += [
        f"imports {m}"
        for m in sorted(imported_modules(tree))
        if m == "datajoint.condition" or m.startswith("datajoint.condition.")
    ]
    aliases = _datajoint_aliases(tree)
    found += [
        f"{node.lineno}: uses datajoint.condition"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr == "condition"
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
    ]
    return found


def _public_definitions(body: list[ast.stmt]):
    """Module-level functions and classes, including those defined under a module-level if / try."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if not node.name.startswith("_"):
                yield node
        elif isinstance(node, (ast.If, ast.Try)):
            for block in (
                node.body,
                node.orelse,
                getattr(node, "finalbody", []),
                *[h.body for h in getattr(node, "handlers", [])],
            ):
                yield from _public_definitions(block)


def module_name(path: Path) -> str:
    """The dotted name a package file is imported as (``neureg.models.digests``, ``neureg.cli``)."""
    parts = ["neureg", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(name: str, is_package: bool, tree: ast.Module) -> set[str]:
    """Every ``neureg`` name a module imports (relative imports resolved), at any depth of the module."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "neureg")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "neureg":
                module = node.module
            else:
                continue
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def layer_of(module: str) -> str | None:
    """The layer (:data:`LAYERS`) of a ``neureg`` module; None for the package itself (its version)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _is_deprecated_alias(tree: ast.Module) -> bool:
    return (ast.get_docstring(tree) or "").startswith("Deprecated alias")


def import_graph() -> dict[str, set[str]]:
    """Package module -> the package modules it imports (attributes of a module count as the module)."""
    files = [p for p in python_files() if _rel(p).split("/")[0] in LAYERS or _rel(p) in ROOT_MODULES - {"setup.py"}]
    files = [p for p in files if not _rel(p).startswith(("tests/", "bench/"))]
    names = {module_name(p): p for p in files}
    graph = {}
    for name, path in names.items():
        tree = _tree(path)
        if _is_deprecated_alias(tree):
            continue
        imported = package_imports(name, path.name == "__init__.py", tree)
        graph[name] = {m for m in imported if m in names and m != name}
    return graph


def floor_violations(graph: dict[str, set[str]]) -> list[str]:
    """``importer -> imported`` for every import of a module from a higher layer."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    found = []
    for importer, imported in graph.items():
        low = layer_of(importer)
        if low is None:
            continue
        found += [f"{importer} -> {m}" for m in sorted(imported) if layer_of(m) and rank[layer_of(m)] > rank[low]]
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of two or more modules (Tarjan's algorithm): modules importing each other."""
    index, low, stack, on_stack, groups, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def undocumented(tree: ast.Module) -> list[str]:
    """``line: name`` of each public module-level function or class without a docstring."""
    return [
        f"{node.lineno}: {node.name}"
        for node in _public_definitions(tree.body)
        if not (ast.get_docstring(node) or "").strip()
    ]


# --------------------------------------------------------------------------- the checkers themselves
def test_checkers_catch_what_they_should():
    cited = "see DESIGN.md\nin shared/notes\nfixed by issue 12\n(#12)\ngh issues #7\n"
    assert [c.split(": ")[1] for c in citations(cited)] == [
        "DESIGN.md",
        "shared/",
        "issue number",
        "issue number",
        "issue number",
    ]
    assert citations("x = 1  # 12 px\ncolor = '#1f77b4'\n## Heading\nnoqa: E731\nissues are logged\n") == []

    models_like = ast.parse(
        "import numpy\nimport datajoint as dj\nfrom datajoint.errors import X\n"
        "import importlib\nimportlib.import_module('datajoint.table')\n"
    )
    assert datajoint_imports(models_like) == ["datajoint", "datajoint.errors", "datajoint.errors.X", "datajoint.table"]
    assert datajoint_imports(ast.parse("import numpy as np\nfrom .stimuli import shift_images\n")) == []

    source = (
        "import datajoint as dj\nfrom datajoint import condition\nq = dj.condition.AndList\n"
        "jobs = f'`{db}`.`~~{name}`'\n"
    )
    assert private_datajoint_uses(ast.parse(source)) == [
        "4: '~~' (a private jobs table)",
        "imports datajoint.condition",
        "3: uses datajoint.condition",
    ]
    clean = '"""The ``~~name`` jobs tables, explained."""\nimport datajoint as dj\nq = dj.AndList  # not ~~jobs\n'
    assert private_datajoint_uses(ast.parse(clean)) == []

    module = ast.parse(
        'def a():\n    """Why."""\n\ndef b():\n    pass\n\nclass C:\n    pass\n\n'
        "def _private():\n    pass\n\ntry:\n    def d():\n        pass\nexcept ImportError:\n"
        '    pass\n\ndef e():\n    def inner():\n        pass\n    """not a docstring"""\n'
    )
    assert undocumented(module) == ["4: b", "7: C", "14: d", "19: e"]

    relative = ast.parse(
        "from ..errors import X\nfrom . import common\nfrom .. import __version__\nimport neureg.models\n"
    )
    assert package_imports("neureg.cli.data", False, relative) == {
        "neureg.errors",
        "neureg.errors.X",
        "neureg.cli",
        "neureg.cli.common",
        "neureg",
        "neureg.__version__",
        "neureg.models",
    }
    assert package_imports("neureg.cli", True, ast.parse("from .data import f\n")) == {
        "neureg.cli.data",
        "neureg.cli.data.f",
    }
    toy = {"neureg.models.a": {"neureg.schemas.b"}, "neureg.schemas.b": {"neureg.models.a"}, "neureg.cli.c": set()}
    assert floor_violations(toy) == ["neureg.models.a -> neureg.schemas.b"]
    assert import_cycles(toy) == [["neureg.models.a", "neureg.schemas.b"]]


def test_the_tree_is_where_the_rules_look():
    files = {_rel(p) for p in python_files()}
    assert {
        "cli/__init__.py",
        "ingestion/folder.py",
        "models/neural/simulator.py",
        "tests/test_architecture.py",
    } <= files
    assert not any(f.startswith((".venv/", ".devsite/", "notebooks/")) for f in files)


# ----------------------------------------------------------------------------------------- the rules
def test_the_package_root_holds_no_loose_module():
    """Every concern has a folder a newcomer can name; the root is the package's front door only."""
    loose = sorted(p.name for p in ROOT.glob("*.py") if p.name not in ROOT_MODULES)
    assert not loose, f"modules at the package root (give each a folder): {loose}"
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert set(LAYERS) - {"errors"} <= folders, "every layer is a package"


def test_nothing_imports_from_a_higher_floor():
    graph = import_graph()
    assert len(graph) > 50, "the graph must cover the package"
    found = floor_violations(graph)
    assert not found, f"imports from a higher layer (order: {' < '.join(LAYERS)}):\n" + "\n".join(found)


def test_no_modules_import_each_other():
    cycles = import_cycles(import_graph())
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_tests_benches_and_docs_are_not_importable_as_the_package():
    import importlib.util

    for name in ("tests", "bench", "docs", "deploy", "notebooks"):
        assert importlib.util.find_spec(f"neureg.{name}") is None, f"neureg.{name} is importable"


def test_the_version_is_written_once():
    import importlib.metadata
    import tomllib

    import neureg

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("neureg") == neureg.__version__


def test_no_python_file_is_over_the_line_limit():
    """A module over the limit does several jobs: split it by responsibility, not by arbitrary cuts."""
    long = [
        f"{_rel(p)}: {n} lines"
        for p in python_files()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    ]
    assert not long, f"over {MAX_LINES} lines:\n" + "\n".join(long)


def test_models_never_import_datajoint():
    """models/ is the pure computation: testable and reusable without a database."""
    found = [
        f"{_rel(p)}: {', '.join(names)}"
        for p in python_files(ROOT / "models")
        if (names := datajoint_imports(_tree(p)))
    ]
    assert not found, "models/ imports DataJoint:\n" + "\n".join(found)


def _documents() -> list[Path]:
    """The code and the prose a reader gets: every Python file, README.md and docs/*.md."""
    this = Path(__file__).resolve()
    docs = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
    return [p for p in python_files() if p.resolve() != this] + [p for p in docs if p.is_file()]


def test_nothing_cites_design_notes_scratch_files_or_issue_numbers():
    """Explanations belong where they are read; a pointer to a note or an issue rots and cannot be followed."""
    found = [f"{_rel(p)}:{hit}" for p in _documents() for hit in citations(p.read_text(encoding="utf-8"))]
    assert not found, "citations to remove (say the reason itself):\n" + "\n".join(found)


def _docstring_modules() -> list[Path]:
    """The package's modules: schemas/, models/, populate/ and the modules at the repository root."""
    modules = [p for p in sorted(ROOT.glob("*.py"))]
    for package in DOCSTRING_PACKAGES:
        modules += python_files(ROOT / package)
    return modules


def test_public_functions_and_classes_say_why_they_exist():
    found = [f"{_rel(p)}:{hit}" for p in _docstring_modules() for hit in undocumented(_tree(p))]
    assert not found, "public functions and classes without a docstring:\n" + "\n".join(found)


def test_populate_uses_only_public_datajoint():
    """Private jobs tables and datajoint.condition change between DataJoint releases without notice."""
    found = [f"{_rel(p)}:{what}" for p in python_files(ROOT / "populate") for what in private_datajoint_uses(_tree(p))]
    assert not found, "populate/ relies on DataJoint internals:\n" + "\n".join(found)


@pytest.mark.parametrize("package", DOCSTRING_PACKAGES)
def test_checked_packages_exist(package):
    """A renamed package would silently leave the docstring and import rules with nothing to check."""
    assert python_files(ROOT / package), f"{package}/ has no Python files"
