"""The resume state of `kcls.train.phases.fit_phases`: what an interrupted run had done.

`TrainingProgress` mirrors to `<run_dir>/backup/progress.json`, rewritten at every epoch
end:

    schedule                   the settings the run trains with (`schedule_fingerprint`):
                               a run resumes only with the same ones
    epochs                     per epoch index, the logs of `fit()` (loss, metrics)
    completed                  per completed phase, its `PhaseRecord` (without
                               `skipped_on_resume`)
    learning_rate_searches     per phase, the range test's summary under
                               `train.learning_rate=auto`, so a resumed phase trains at
                               the rate found before the interruption

`check_resumable` tells before anything is written whether a run directory's interrupted
run can be resumed with the given settings. Under several workers every worker reads the
chief's progress and only the chief writes it (`TrainingProgress.load(..., write=False)`
on the others).

Example:

>>> schedule = schedule_fingerprint(config, steps_per_epoch)
>>> progress = TrainingProgress.load(run_dir / BACKUP_DIR, schedule)  # doctest: +SKIP
>>> progress.started, progress.history()  # doctest: +SKIP
(True, {'loss': [1.9, 1.4], 'accuracy': [0.31, 0.52]})
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from kcls.config import ConfigError, TrainConfig
from kcls.files import write_json
from kcls.layout import BACKUP_DIR, PROGRESS_FILE


@dataclass
class PhaseRecord:
    """What one phase did: an entry of run.json's `phases` list.

    Attributes:
        name: the phase (`frozen` or `unfrozen`, see `kcls.train.schedule.plan_phases`).
        first_epoch: int, the epoch index the phase started at (one counter over phases).
        epochs: int, the epochs it trained (fewer than configured when early stopping or
            a time budget ended it).
        learning_rate: float, its peak learning rate.
        unfreeze: `train.unfreeze` when the phase trains the backbone, else `none`.
        trainable_params: int, the classifier's trainable parameters in the phase.
        batchnorm_recalibrated_on: int, the training images the BatchNorm statistics were
            re-estimated on after the phase (`kcls.train.batchnorm`); 0 when BatchNorm
            did not train.
        skipped_on_resume: the phase had completed before the run was interrupted and
            was skipped when it resumed (its end weights loaded instead).
        learning_rate_search: under `train.learning_rate=auto`, the range test's summary
            (`kcls.train.lr_find.LearningRateSearch.summary`), whose suggestion is
            `learning_rate`; else None.
        stopped_early: why the phase stopped before its configured or planned epochs
            (early stopping on a plateau of the validation loss), or None.
    """

    name: str
    first_epoch: int
    epochs: int
    learning_rate: float
    unfreeze: str
    trainable_params: int
    batchnorm_recalibrated_on: int
    skipped_on_resume: bool = False
    learning_rate_search: dict[str, Any] | None = None
    stopped_early: str | None = None

    @property
    def end_epoch(self) -> int:
        """The epoch index after the phase's last: where the next phase starts."""
        return self.first_epoch + self.epochs

    def to_dict(self) -> dict[str, Any]:
        """The record as run.json holds it: every field, `learning_rate_search` and
        `stopped_early` only when set."""
        record = dataclasses.asdict(self)
        for optional in ("learning_rate_search", "stopped_early"):
            if record[optional] is None:
                del record[optional]
        return record


class TrainingProgress:
    """Per-epoch logs, completed phases and range tests, mirrored to `progress.json`.

    Args:
        path: the `progress.json` to mirror to, or None to keep the progress in memory.
        state: the saved progress (the file's content, see the module docstring), or `{}`.
        schedule: the run's `schedule_fingerprint`, saved with the progress.
    """

    def __init__(self, path: Path | None, state: dict[str, Any],
                 schedule: dict[str, Any]) -> None:
        self.path = path
        self.schedule = schedule
        self.epochs: dict[int, dict[str, float]] = {
            int(epoch): logs for epoch, logs in state.get("epochs", {}).items()}
        self.completed: dict[str, PhaseRecord] = {
            name: PhaseRecord(**record) for name, record in state.get("completed", {}).items()}
        # Per phase, the range test's outcome under train.learning_rate=auto.
        self.searches: dict[str, dict[str, Any]] = state.get("learning_rate_searches", {})

    @classmethod
    def load(cls, backup_dir: Path | None, schedule: dict[str, Any],
             write: bool = True) -> TrainingProgress:
        """The saved progress of the run in `backup_dir`, which must have had `schedule`.

        Args:
            backup_dir: the run directory's `backup/` folder (which may not exist yet),
                or None for a run that keeps no backup (the progress stays in memory).
            schedule: the run's `schedule_fingerprint`.
            write: mirror the progress to `backup_dir` (False: read it only, as workers
                other than the chief do).

        Returns:
            TrainingProgress, empty when there is nothing saved.

        Raises:
            ConfigError: the saved run had another schedule (the message lists the
                changed settings and the fix).
        """
        if backup_dir is None:
            return cls(None, {}, schedule)
        path = backup_dir / PROGRESS_FILE
        state = json.loads(path.read_text()) if path.is_file() else {}
        if state and state.get("schedule") != schedule:
            changed = sorted(key for key in schedule
                             if state.get("schedule", {}).get(key) != schedule[key])
            raise ConfigError(
                f"{backup_dir.parent} holds an interrupted run with a different training "
                f"schedule ({', '.join(changed)} changed), which cannot be resumed. Resume with "
                f"the same settings, or start afresh in a new run directory (or delete "
                f"{backup_dir}).")
        return cls(path if write else None, state, schedule)

    @property
    def started(self) -> bool:
        """Whether an earlier run recorded an epoch or completed a phase."""
        return bool(self.epochs or self.completed)

    def recorder(self) -> keras.callbacks.Callback:
        """A callback recording (and saving) every epoch's logs."""
        return keras.callbacks.LambdaCallback(on_epoch_end=self._record)

    def _record(self, epoch: int, logs: dict[str, Any] | None) -> None:
        self.epochs[epoch] = {name: float(value) for name, value in (logs or {}).items()}
        self._save()

    def last_epoch(self, first: int, stop: int) -> int:
        """The last recorded epoch in `[first, stop)`, or -1."""
        return max((epoch for epoch in self.epochs if first <= epoch < stop), default=-1)

    def complete(self, record: PhaseRecord) -> None:
        """Records (and saves) that the phase `record.name` is done."""
        self.completed[record.name] = record
        self._save()

    def searched(self, phase_name: str, summary: dict[str, Any]) -> None:
        """Records (and saves) the range test's summary for the phase `phase_name`."""
        self.searches[phase_name] = summary
        self._save()

    def best(self, monitor: str) -> float | None:
        """The lowest recorded value of the log `monitor`, or None."""
        values = [logs[monitor] for logs in self.epochs.values() if monitor in logs]
        return min(values) if values else None

    def history(self) -> dict[str, list[float]]:
        """Log name -> its per-epoch values, in epoch order (as `History.history`)."""
        history: dict[str, list[float]] = {}
        for epoch in sorted(self.epochs):
            for name, value in self.epochs[epoch].items():
                history.setdefault(name, []).append(value)
        return history

    def _save(self) -> None:
        if self.path is None:
            return
        completed = {name: {key: value for key, value in record.to_dict().items()
                            if key != "skipped_on_resume"}
                     for name, record in self.completed.items()}
        state = {"schedule": self.schedule, "completed": completed,
                 "learning_rate_searches": self.searches,
                 "epochs": {str(epoch): logs for epoch, logs in sorted(self.epochs.items())}}
        write_json(self.path, state, indent=1)


def schedule_fingerprint(config: TrainConfig, steps_per_epoch: int) -> dict[str, Any]:
    """What must not change for a run to resume: the training settings and epoch length.

    Args:
        config: TrainConfig with its automatic settings resolved, as `fit_phases` gets it.
        steps_per_epoch: int, as `fit_phases` gets it.

    Returns:
        dict of every `train.*` setting plus `steps_per_epoch` (JSON-serialisable).
    """
    return {**dataclasses.asdict(config), "steps_per_epoch": steps_per_epoch}


def check_resumable(run_dir: str | Path, config: TrainConfig, steps_per_epoch: int) -> None:
    """Raises if `run_dir` holds an interrupted run that `fit_phases` would refuse to resume.

    `run_recipe` calls it before writing anything into the run directory, so a refused
    resume leaves the interrupted run's files (its `config.json` included) untouched.

    Args:
        run_dir: the run directory.
        config: TrainConfig with its automatic settings resolved, as `fit_phases` gets it.
        steps_per_epoch: int, as `fit_phases` gets it.

    Raises:
        ConfigError: the interrupted run had another schedule (the message lists the
            changed settings and the fix).
    """
    TrainingProgress.load(Path(run_dir) / BACKUP_DIR, schedule_fingerprint(config, steps_per_epoch))
