"""The generated configuration reference stays in sync with the config dataclasses."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
from pathlib import Path

from kcls.config import SECTIONS, Recipe

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def configuration_reference() -> str:
    """The output of tools/configuration_reference.py (a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location(
        "configuration_reference", ROOT / "tools" / "configuration_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.configuration_reference()


def test_configuration_reference_is_up_to_date():
    committed = (DOCS / "configuration.md").read_text()
    assert committed == configuration_reference(), (
        "docs/configuration.md is stale: run "
        "`python tools/configuration_reference.py > docs/configuration.md`.")


def test_every_key_is_documented_with_a_description():
    reference = configuration_reference()
    recipe = Recipe(name="reference")
    for section in SECTIONS:
        for field in dataclasses.fields(getattr(recipe, section)):
            (row,) = [line for line in reference.splitlines()
                      if line.startswith(f"| `{section}.{field.name}` |")]
            description = row.rstrip(" |").rsplit(" | ", 1)[-1]
            assert description and not description.startswith("`" + section), row


def test_docs_link_to_existing_files():
    for page in DOCS.glob("*.md"):
        for target in _relative_links(page.read_text()):
            assert (page.parent / target.split("#")[0]).exists(), f"{page.name}: {target}"


def _relative_links(text: str) -> list[str]:
    return [target for target in re.findall(r"\]\(([^)]+)\)", text)
            if "://" not in target and not target.startswith("#")]


# Names that are not Python: the MLflow tags kcls.tracking.mlflow_tracker sets, kcls.json.
NOT_PYTHON = {"kcls.json", "kcls.error", "kcls.phases", "kcls.version", "kcls.run_dir",
              "kcls.export_dir", "kcls.export_version"}


def test_every_module_or_name_the_docs_cite_exists():
    # `kcls.train.phases.fit_phases` in a page or a docstring must still be there.
    pages = [*DOCS.glob("*.md"), ROOT / "README.md", *(ROOT / "notebooks").glob("*.ipynb"),
             *(ROOT / "kcls").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    stale = {(page.name, reference) for page in pages
             for reference in re.findall(r"`(kcls(?:\.[A-Za-z_]\w*)+)", page.read_text())
             if reference not in NOT_PYTHON and not _resolves(reference)}
    assert not stale, sorted(stale)


def _resolves(reference: str) -> bool:
    parts = reference.split(".")
    for count in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:count]))
        except ImportError:
            continue
        for name in parts[count:]:
            if not hasattr(target, name) and name not in getattr(target, "__annotations__", {}):
                return False
            target = getattr(target, name, None)
        return True
    return False
