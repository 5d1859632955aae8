"""The observer protocol of a run, and several observers called as one (see `kcls.tracking`)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import keras

from kcls.config import Recipe


class RunStopped(Exception):  # noqa: N818 (a stop on purpose, not an error)
    """A run ended on purpose before its end, e.g. a tuning trial pruned on its curve."""


class RunObserver(Protocol):
    """Something a run reports to (see the module docstring for when each is called)."""

    def started(self, recipe: Recipe, run_dir: Path, settings: dict[str, Any]) -> None: ...

    def callbacks(self) -> list[keras.callbacks.Callback]: ...

    def finished(self, run_dir: Path, record: dict[str, Any]) -> None: ...

    def failed(self, run_dir: Path, error: BaseException) -> None: ...


def is_interruption(error: BaseException) -> bool:
    """Whether `error` stopped a run on purpose (Ctrl-C, `RunStopped`) rather than failing it."""
    return isinstance(error, (KeyboardInterrupt, RunStopped))


class Observers:
    """Several `RunObserver`s called as one, in order.

    Args:
        observers: the observers, e.g. `observers_for(recipe).observers`.
    """

    def __init__(self, observers: Iterable[RunObserver] = ()) -> None:
        self.observers = list(observers)

    def started(self, recipe: Recipe, run_dir: Path, settings: dict[str, Any]) -> None:
        for observer in self.observers:
            observer.started(recipe, run_dir, settings)

    def callbacks(self) -> list[keras.callbacks.Callback]:
        return [callback for observer in self.observers for callback in observer.callbacks()]

    def finished(self, run_dir: Path, record: dict[str, Any]) -> None:
        for observer in self.observers:
            observer.finished(run_dir, record)

    @contextlib.contextmanager
    def watching(self, run_dir: Path) -> Iterator[Observers]:
        """Calls every observer's `failed` when the block raises, then re-raises.

        An observer that fails to record the failure (a tracking server gone) warns
        instead of hiding the run's own error.
        """
        try:
            yield self
        except BaseException as error:
            for observer in self.observers:
                try:
                    observer.failed(run_dir, error)
                except Exception as report_error:  # the run's error matters more
                    warnings.warn(f"{type(observer).__name__} could not record the run's "
                                  f"failure: {report_error}", stacklevel=3)
            raise
