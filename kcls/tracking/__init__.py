"""What a run reports to while it runs: observers called at its step boundaries.

`kcls.workflows.run.run_recipe` calls its `Observers` at four points and nowhere else:

    started(recipe, run_dir, settings)   the run directory is claimed: the resolved
                                         recipe and `Prepared.record()` (precision, XLA, ...)
    callbacks()                          Keras callbacks for both phases' `fit()`
                                         (per-epoch logs on one epoch axis)
    finished(run_dir, record)            run.json is written: `record` is its content
    failed(run_dir, error)               the run raised; `is_interruption(error)` tells
                                         a stop on purpose (Ctrl-C, a pruned tuning trial)
                                         from a failure

`observers_for(recipe)` builds a recipe's own observers: an MLflow tracker when
`track.mlflow` is set (`kcls.tracking.mlflow_tracker`, imported only then, so MLflow is
an optional extra); `kcls tune` adds its pruning observer (`kcls.tuning.pruning`).
This package knows nothing of training: observers see what the run hands them.

Example:

>>> observers = observers_for(recipe)  # doctest: +SKIP
>>> with observers.watching(run_dir):  # doctest: +SKIP
...     observers.started(recipe, run_dir, prepared.record())
...     fit_phases(..., callbacks=observers.callbacks())
"""

from __future__ import annotations

from collections.abc import Iterable

from kcls.config import Recipe
from kcls.tracking.base import Observers, RunObserver, RunStopped, is_interruption


def observers_for(recipe: Recipe, extra: Iterable[RunObserver] = ()) -> Observers:
    """The observers `recipe` asks for (`track.*`), then `extra`.

    Raises:
        ConfigError: `track.mlflow` is set and MLflow is not installed.
    """
    observers: list[RunObserver] = []
    if recipe.track.mlflow is not None:
        from kcls.tracking.mlflow_tracker import MlflowTracker

        observers.append(MlflowTracker(recipe.track))
    return Observers([*observers, *extra])


__all__ = ["Observers", "RunObserver", "RunStopped", "is_interruption", "observers_for"]
