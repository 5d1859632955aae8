"""What pyproject.toml promises: every library kcls imports is declared, warnings stay visible."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
ROOT = Path(__file__).resolve().parents[1]
SETTINGS = tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")
            for requirement in requirements}


def imported_modules(folder: Path) -> set[str]:
    """Top-level names of the modules imported anywhere under `folder`."""
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"kcls", "kcls_recipes"}


def test_every_library_kcls_imports_is_a_declared_dependency():
    required = requirement_names(SETTINGS["project"]["dependencies"])
    optional = set().union(*map(requirement_names,
                                SETTINGS["project"]["optional-dependencies"].values()))
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for module in imported_modules(ROOT / "kcls"):
        names = {name.lower().replace("_", "-") for name in distributions.get(module, [module])}
        if not names & (required | optional):
            undeclared[module] = sorted(names)
    assert not undeclared, f"imported but not in pyproject.toml: {undeclared}"
    # Not imported, but the TensorBoard callback writes nothing without it.
    assert "tensorboard" in required


def test_pytest_does_not_hide_deprecation_warnings():
    filters = SETTINGS["tool"]["pytest"]["ini_options"].get("filterwarnings", [])
    assert "ignore::DeprecationWarning" not in filters


def test_every_kcls_package_is_listed_for_the_wheel():
    # An editable install finds unlisted sub-packages; a wheel (pip install .) leaves them out.
    packages = {".".join(path.parent.relative_to(ROOT).parts)
                for path in (ROOT / "kcls").rglob("__init__.py")}
    assert packages <= set(SETTINGS["tool"]["setuptools"]["packages"])
