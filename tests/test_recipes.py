from pathlib import Path

import pytest

from kcls.config import ConfigError, Recipe
from kcls.models.backbones import BACKBONES
from kcls.recipes import list_recipes, load_recipe

ALL_RECIPES = [info.name for info in list_recipes()]


def test_builtin_recipes_are_discovered_with_descriptions():
    infos = {info.name: info for info in list_recipes()}
    assert {"quickstart", "cifar10_effnet"} <= set(infos)
    assert all(info.description for info in infos.values())


@pytest.mark.parametrize("name", ALL_RECIPES)
def test_every_recipe_config_is_valid(name):
    recipe = load_recipe(name)
    assert isinstance(recipe, Recipe)
    assert recipe.name == name
    assert recipe.model.backbone in BACKBONES


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(ConfigError) as error:
        load_recipe("nope")
    assert "'nope'" in str(error.value) and "quickstart" in str(error.value)


def test_recipe_from_a_file_path(tmp_path: Path):
    path = tmp_path / "my_recipe.py"
    path.write_text(
        '"""My recipe."""\n'
        "from kcls.config import Recipe, TrainConfig\n"
        "def get_config():\n"
        "    return Recipe(name='mine', train=TrainConfig(frozen_epochs=0))\n")
    recipe = load_recipe(str(path))
    assert recipe.name == "mine" and recipe.train.frozen_epochs == 0


def test_recipe_file_without_get_config_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "broken.py"
    path.write_text("X = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        load_recipe(str(path))


def test_a_recipe_file_with_a_syntax_error_names_file_and_line(tmp_path: Path):
    path = tmp_path / "typo.py"
    path.write_text("from kcls.config import Recipe\n\ndef get_config(:\n    pass\n")
    with pytest.raises(ConfigError, match=rf"{path}, line 3: SyntaxError") as error:
        load_recipe(str(path))
    assert "\n" not in str(error.value)
    assert isinstance(error.value.__cause__, SyntaxError)  # kept for `kcls --debug`


def test_a_recipe_whose_get_config_raises_names_file_and_line(tmp_path: Path):
    path = tmp_path / "raises.py"
    path.write_text("from kcls.config import Recipe\n\n\ndef get_config():\n"
                    "    return Recipe(name='x', description=1 / 0)\n")
    with pytest.raises(ConfigError,
                       match=rf"{path}, line 5: ZeroDivisionError: division by zero") as error:
        load_recipe(str(path))
    assert "\n" not in str(error.value)
