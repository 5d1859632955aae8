"""The mechanisms of `kcls tune` (`kcls.workflows.tune` composes them).

- `space`: search spaces (recipe keys to ranges), presets and `.py` space files;
- `pruning`: the run observer that reports each epoch's validation loss to the Optuna
  trial and stops the run when its pruner says so;
- `recipe_page`: the best recipe written as a readable recipe module;
- `report`: the trial table, parameter importance and the curves.

Optuna is an optional extra (`pip install "kcls[tune]"`): `import_optuna` names the
install when it is missing; nothing else here imports it at module level.
"""

from __future__ import annotations

from kcls.config import ConfigError

INSTALL_HINT = 'pip install "kcls[tune]"'


def import_optuna():
    """The `optuna` module, or a one-line ConfigError naming the install."""
    try:
        import optuna
    except ImportError:
        raise ConfigError(f"kcls tune searches with Optuna, which is not installed: "
                          f"{INSTALL_HINT}.") from None
    return optuna
