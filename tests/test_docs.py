"""The generated configuration reference stays in sync with the config dataclasses."""

from __future__ import annotations

import dataclasses
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
