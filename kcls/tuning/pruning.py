"""Pruning a tuning trial on its epoch curve: a run observer that feeds Optuna.

`PruningObserver(trial)` is a `kcls.tracking.RunObserver` whose Keras callback reports
each epoch's validation loss to the Optuna trial (`trial.report(val_loss, epoch)`, one
epoch axis over both phases) and asks its pruner (`trial.should_prune()`); when the
pruner says so it raises `TrialPruned`, a `kcls.tracking.RunStopped`: the run stops at
once, tracking marks it interrupted, and `kcls tune` tells the study it was pruned.

Example:

>>> run_recipe(recipe, run_dir, observers=[PruningObserver(trial)])  # doctest: +SKIP
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import keras

from kcls.config import Recipe
from kcls.tracking import RunStopped

MONITOR = "val_loss"


class TrialPruned(RunStopped):
    """The trial's pruner stopped it: its curve was worse than the other trials' so far.

    Attributes:
        epoch: the epoch (0-based, over both phases) it was stopped after.
        value: its validation loss then.
    """

    def __init__(self, epoch: int, value: float) -> None:
        super().__init__(f"pruned after epoch {epoch + 1}: {MONITOR} {value:.4f}")
        self.epoch, self.value = epoch, value


class PruningObserver:
    """Reports a run's per-epoch validation loss to an Optuna `trial` and prunes it.

    Args:
        trial: optuna.trial.Trial of the running study (its pruner decides).
    """

    def __init__(self, trial: Any) -> None:
        self.trial = trial

    def started(self, recipe: Recipe, run_dir: Path, settings: dict[str, Any]) -> None:
        pass

    def callbacks(self) -> list[keras.callbacks.Callback]:
        return [PruningCallback(self.trial)]

    def finished(self, run_dir: Path, record: dict[str, Any]) -> None:
        pass

    def failed(self, run_dir: Path, error: BaseException) -> None:
        pass


class PruningCallback(keras.callbacks.Callback):
    """`trial.report(logs["val_loss"], epoch)`, then `TrialPruned` if `trial.should_prune()`.

    A loss that is not finite (a diverged trial) is reported as infinity, so the pruner
    ranks it last instead of failing on it.
    """

    def __init__(self, trial: Any) -> None:
        super().__init__()
        self.trial = trial

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(MONITOR)
        if value is None:  # no validation split: nothing to judge the curve by
            return
        value = float(value) if math.isfinite(float(value)) else math.inf
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            raise TrialPruned(epoch, value)
