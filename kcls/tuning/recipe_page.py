"""The best recipe of a search, written as a recipe page the user can read and run.

`recipe_page(recipe, header, base)` is the source of a module like `recipes/*.py`: a
header docstring (what it is, the command to run it, what the search measured), then
`get_config()` building the `Recipe` from its dataclasses, listing only the fields that
differ from the dataclasses' defaults, the tuned ones marked with the base recipe's
value. `load_recipe(path)` of the written file gives back `recipe`.

Example:

>>> print(recipe_page(tuned, "finetune tuned by kcls tune.", base))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from kcls.config import SECTIONS, Recipe


def recipe_page(recipe: Recipe, header: str, base: Recipe) -> str:
    """The Python source of a recipe module whose `get_config()` returns `recipe`.

    Args:
        recipe: Recipe, what the page builds.
        header: str, the module docstring: a one-line description, a blank line, more.
        base: Recipe the search started from; fields that differ from it get a comment.

    Returns:
        str, a module that `kcls.recipes.load_recipe` loads; its recipe equals `recipe`
        when `recipe.description` is the header's first line.
    """
    sections = {type(getattr(recipe, name)).__name__: _section_lines(
        name, getattr(recipe, name), getattr(base, name)) for name in SECTIONS}
    imported = sorted(name for name, section_lines in sections.items() if section_lines)
    lines = [f'"""{_docstring_text(header)}"""', "", "from kcls.config import (",
             *[f"    {name}," for name in [*imported, "Recipe"]], ")", "", "",
             "def get_config() -> Recipe:", "    return Recipe(",
             f"        name={_literal(recipe.name)},",
             "        description=__doc__.splitlines()[0],"]
    for section_lines in sections.values():
        lines += section_lines
    lines.append("    )")
    return "\n".join(lines) + "\n"


def _section_lines(name: str, section: Any, base_section: Any) -> list[str]:
    """`data=DataConfig(` with one line per field that is not the default, or nothing."""
    default = type(section)()
    fields = [field.name for field in dataclasses.fields(section)
              if getattr(section, field.name) != getattr(default, field.name)]
    if not fields:
        return []
    lines = [f"        {name}={type(section).__name__}("]
    for field in fields:
        value, before = getattr(section, field), getattr(base_section, field)
        note = f"  # tuned (the base recipe: {_literal(before)})" if value != before else ""
        lines.append(f"            {field}={_literal(value)},{note}")
    return lines + ["        ),"]


def _literal(value: Any) -> str:
    """`value` as Python source, strings in double quotes as in the recipes."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _docstring_text(text: str) -> str:
    """`text` safe inside a triple-quoted docstring."""
    return text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
