"""Package discovery for neureg, whose repository root is the ``neureg`` package itself (pyproject.toml says
why). Every folder with an ``__init__.py`` below the root is a subpackage; tests, benchmarks, docs, deploy
files and notebooks have none, so they are never installed (and never importable as ``neureg.*``)."""

from setuptools import find_packages, setup

setup(
    package_dir={"neureg": "."},
    packages=["neureg", *(f"neureg.{name}" for name in find_packages())],
    # an editable install links exactly the installed files (setuptools' "strict" mode): the folders beside
    # the code stay out of `neureg.*` there too. A new module needs `pip install -e .` again.
    options={"editable_wheel": {"mode": "strict"}},
)
