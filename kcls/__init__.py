"""kcls: runnable Keras/TensorFlow image-classification recipes.

Example:

>>> import kcls
>>> recipe = kcls.apply_overrides(kcls.load_recipe("quickstart"), ["train.unfrozen_epochs=1"])
>>> result = kcls.run_recipe(recipe)  # doctest: +SKIP
"""

__version__ = "0.1.0"

from kcls.config import Recipe, apply_overrides
from kcls.recipes import list_recipes, load_recipe


def run_recipe(*args, **kwargs):
    """See `kcls.workflows.run.run_recipe` (imported lazily: it loads TensorFlow)."""
    from kcls.workflows.run import run_recipe as run

    return run(*args, **kwargs)


def find_learning_rate(*args, **kwargs):
    """See `kcls.workflows.lr_find.find_recipe_learning_rate`: the learning-rate range test
    of a recipe (`kcls lr-find`; imported lazily: it loads TensorFlow)."""
    from kcls.workflows.lr_find import find_recipe_learning_rate

    return find_recipe_learning_rate(*args, **kwargs)


__all__ = ["Recipe", "apply_overrides", "find_learning_rate", "list_recipes", "load_recipe",
           "run_recipe"]
