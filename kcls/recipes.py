"""Find, list and load recipes.

Recipes are found by convention, not registration: a recipe named `NAME` is the
module `recipes/NAME.py`, which defines `get_config() -> kcls.config.Recipe`. The
repository's `recipes/` folder is installed as the package `kcls_recipes` (see
`[tool.setuptools.package-dir]` in pyproject.toml), so the same names work from a
checkout (editable install) and from an installed wheel. Other packages add recipes
through the `kcls.recipes` entry-point group (`name = "module"`), and a path to a
`.py` file is accepted wherever a name is.

Example:

>>> from kcls.recipes import load_recipe
>>> load_recipe("quickstart").data.source
'sklearn:digits'
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pkgutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from kcls.config import ConfigError, Recipe

BUILTIN_PACKAGE = "kcls_recipes"
ENTRY_POINT_GROUP = "kcls.recipes"


@dataclass(frozen=True)
class RecipeInfo:
    """A recipe's name, its one-line description and the module that defines it."""

    name: str
    description: str
    module: str


def list_recipes() -> list[RecipeInfo]:
    """Every built-in and entry-point recipe, sorted by name (imports each module: cheap)."""
    modules = _recipe_modules()
    return [RecipeInfo(name, _first_line(importlib.import_module(module).__doc__), module)
            for name, module in sorted(modules.items())]


def load_recipe(name_or_path: str) -> Recipe:
    """Returns the configuration of the recipe `name_or_path`.

    Args:
        name_or_path: str, a recipe name (`quickstart`) or a path to a recipe file.

    Raises:
        ConfigError: no such recipe (the message lists the available ones), the module
            has no `get_config()` returning a `Recipe`, or importing it or calling
            `get_config()` raised: the one-line message names the recipe file and line,
            and the original exception is the `__cause__` (`kcls --debug` prints it).
    """
    module = load_recipe_module(name_or_path)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"Recipe module {module.__name__!r} has no get_config() function.")
    try:
        recipe = get_config()
    except ConfigError:
        raise
    except Exception as error:
        raise _recipe_error(error, module.__file__) from error
    if not isinstance(recipe, Recipe):
        raise ConfigError(
            f"get_config() of recipe {module.__name__!r} returned {type(recipe).__name__}, "
            "expected kcls.config.Recipe.")
    return recipe


def load_recipe_module(name_or_path: str) -> ModuleType:
    """Imports the module that defines recipe `name_or_path` (a name or a `.py` path)."""
    if name_or_path.endswith(".py"):
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"Recipe file {name_or_path!r} does not exist.")
        spec = importlib.util.spec_from_file_location(f"kcls_user_recipe_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            raise _recipe_error(error, str(path)) from error
        return module
    modules = _recipe_modules()
    if name_or_path not in modules:
        raise ConfigError(
            f"Unknown recipe {name_or_path!r}. Available recipes: {', '.join(sorted(modules))}. "
            "Run `kcls recipe list` to see them, or pass a path to a recipe .py file.")
    try:
        return importlib.import_module(modules[name_or_path])
    except Exception as error:
        spec = importlib.util.find_spec(modules[name_or_path])
        raise _recipe_error(error, spec.origin if spec else None) from error


def _recipe_error(error: Exception, recipe_file: str | None) -> ConfigError:
    """A one-line `ConfigError` naming the recipe file and line where `error` happened.

    The line is the deepest one of the recipe file in the traceback (or the line of a
    `SyntaxError`), so a mistake in the recipe points at the recipe, not at kcls.
    """
    location = recipe_file or "recipe"
    if isinstance(error, SyntaxError) and error.filename:
        location = f"{error.filename}, line {error.lineno}"
        message = error.msg
    else:
        frames = traceback.extract_tb(error.__traceback__)
        lines = [frame.lineno for frame in frames
                 if recipe_file and Path(frame.filename) == Path(recipe_file)]
        if lines:
            location = f"{recipe_file}, line {lines[-1]}"
        message = str(error)
    first_line = message.strip().splitlines()[0] if message.strip() else ""
    return ConfigError(f"{location}: {type(error).__name__}: {first_line} "
                       "(run `kcls --debug ...` for the full traceback)")


def _recipe_modules() -> dict[str, str]:
    """Maps recipe names to module names: built-ins first, entry points may add more."""
    package = importlib.import_module(BUILTIN_PACKAGE)
    modules = {info.name: f"{BUILTIN_PACKAGE}.{info.name}"
               for info in pkgutil.iter_modules(package.__path__)
               if not info.name.startswith("_")}
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        modules.setdefault(entry_point.name, entry_point.value)
    return modules


def _first_line(docstring: str | None) -> str:
    return (docstring or "").strip().splitlines()[0] if docstring and docstring.strip() else ""
