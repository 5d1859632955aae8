"""MLflow tracking of a run (`track.mlflow=URI`), through MLflow's client API.

One kcls run is one MLflow run in the experiment `track.experiment` (default: the
recipe name), named after the run directory:

- parameters: the resolved recipe, flattened (`data.image_size`, `train.learning_rate`,
  ...), and what the run resolved (`resolved.precision`, `resolved.jit_compile`, ...);
- metrics: every epoch's Keras logs of both phases on one epoch axis (`loss`,
  `val_loss`, `accuracy`, ...; step = epoch), then the final metrics prefixed by the
  split they come from (`test.accuracy`, `test.nll`, `test.per_class.<name>.f1`, or
  `validation.*` for a run with `evaluate.test=false`), and `seconds.total`;
- artifacts: config.json, run.json, metrics.json, report.md and the plots;
- tags: the run directory, the export's path and version, the phases' epochs, the kcls
  version and the git commit of the working directory (`mlflow.source.git.commit`)
  when it is in a git repository;
- status: FINISHED; FAILED with the error in the tag `kcls.error`; KILLED when
  interrupted (Ctrl-C, a pruned tuning trial). A run killed outright (SIGKILL) stays
  RUNNING; resumed in the same run directory, it reopens the same MLflow run (its id
  is kept in `<run_dir>/tracking.json`) and logs the epochs that follow.

Example:

>>> recipe = apply_overrides(load_recipe("quickstart"),
...                          ["track.mlflow=sqlite:///mlruns.db"])  # doctest: +SKIP
>>> run_recipe(recipe)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import keras

from kcls import __version__
from kcls.config import ConfigError, Recipe, TrackConfig, to_dict
from kcls.files import write_json
from kcls.layout import (
    METRICS_FILE,
    PLOT_FILES,
    PR_CURVES_PLOT,
    REPORT_FILE,
    RUN_CONFIG_FILE,
    RUN_INFO_FILE,
    TRACKING_FILE,
)
from kcls.tracking.base import is_interruption

INSTALL_HINT = 'pip install "kcls[mlflow]"'
# At most this many metrics, parameters and tags per log_batch call (MLflow takes 100
# parameters), and MLflow's longest parameter value.
BATCH_SIZE, PARAM_LENGTH = 100, 6000
_UNSAFE_KEY = re.compile(r"[^\w\-. /]")  # MLflow keys: alphanumerics, _ - . space /


def import_mlflow():
    """The `mlflow` module, or a one-line ConfigError naming the install."""
    try:
        import mlflow
    except ImportError:
        raise ConfigError(f"track.mlflow is set but MLflow is not installed: {INSTALL_HINT} "
                          "(or --set track.mlflow=none).") from None
    return mlflow


class MlflowTracker:
    """A `kcls.tracking.RunObserver` that records the run in MLflow (the module docstring).

    Args:
        config: TrackConfig with `mlflow` set (the tracking URI).

    Raises:
        ConfigError: MLflow is not installed.
    """

    def __init__(self, config: TrackConfig) -> None:
        self.mlflow = import_mlflow()
        self.config = config
        self.client = self.mlflow.MlflowClient(tracking_uri=config.mlflow)
        self.run_id: str | None = None

    def started(self, recipe: Recipe, run_dir: Path, settings: dict[str, Any]) -> None:
        """Creates the MLflow run (or reopens the one of an interrupted run) and logs
        its parameters and tags."""
        try:
            self.run_id = self._reopen(run_dir)
            if self.run_id is not None:
                self.client.update_run(self.run_id, status="RUNNING")
                return
            experiment_id = self._experiment_id(self.config.experiment or recipe.name)
            run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                         tags=self._start_tags(run_dir))
        except self.mlflow.exceptions.MlflowException as error:
            raise ConfigError(
                f"MLflow at {self.config.mlflow!r} refused the run: {_first_line(error)}; "
                "start the tracking server or fix --set track.mlflow=URI.") from None
        self.run_id = run.info.run_id
        write_json(run_dir / TRACKING_FILE, {"mlflow_run_id": self.run_id,
                                             "tracking_uri": self.config.mlflow})
        parameters = {**flatten(to_dict(recipe)),
                      **flatten(settings, prefix="resolved.")}
        self._log(params=[self.mlflow.entities.Param(key, str(value)[:PARAM_LENGTH])
                          for key, value in parameters.items()])

    def callbacks(self) -> list[keras.callbacks.Callback]:
        return [EpochLogger(self)]

    def finished(self, run_dir: Path, record: dict[str, Any]) -> None:
        """Logs the final metrics, the report's files and the export, then FINISHED."""
        split = record.get("evaluated_split", "test")
        metrics = {**flatten(record.get("metrics", {}), prefix=f"{split}."),
                   "seconds.total": record.get("seconds", {}).get("total")}
        self.log_metrics(metrics, step=None)
        for name in (RUN_CONFIG_FILE, RUN_INFO_FILE, METRICS_FILE, REPORT_FILE,
                     *PLOT_FILES, PR_CURVES_PLOT):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        tags = {"kcls.phases": "; ".join(
            f"{phase['name']}: epochs {phase['first_epoch']}-"
            f"{phase['first_epoch'] + phase['epochs'] - 1}" for phase in record.get("phases", []))}
        if record.get("export_dir"):
            tags |= {"kcls.export_dir": record["export_dir"],
                     "kcls.export_version": Path(record["export_dir"]).name}
        self._log(tags=[self.mlflow.entities.RunTag(key, value) for key, value in tags.items()])
        self.client.set_terminated(self.run_id, status="FINISHED")

    def failed(self, run_dir: Path, error: BaseException) -> None:
        """Marks the run KILLED (interrupted) or FAILED, with the error as a tag."""
        if self.run_id is None:
            return
        self.client.set_tag(self.run_id, "kcls.error",
                            f"{type(error).__name__}: {_first_line(error)}"[:PARAM_LENGTH])
        self.client.set_terminated(self.run_id,
                                   status="KILLED" if is_interruption(error) else "FAILED")

    def log_metrics(self, metrics: dict[str, Any], step: int | None) -> None:
        """Logs the numbers among `metrics` (others are skipped) at `step` (None: 0)."""
        now = int(time.time() * 1000)
        self._log(metrics=[self.mlflow.entities.Metric(key, float(value), now, step or 0)
                           for key, value in metrics.items() if _is_number(value)])

    def _log(self, metrics: Iterable = (), params: Iterable = (), tags: Iterable = ()) -> None:
        """`log_batch` in chunks MLflow accepts."""
        metrics, params, tags = list(metrics), list(params), list(tags)
        for start in range(0, max(len(metrics), len(params), len(tags), 1), BATCH_SIZE):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + BATCH_SIZE],
                                  params=params[start:start + BATCH_SIZE],
                                  tags=tags[start:start + BATCH_SIZE])

    def _reopen(self, run_dir: Path) -> str | None:
        """The MLflow run id an interrupted run in `run_dir` logged to, if it still exists."""
        path = run_dir / TRACKING_FILE
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        if saved.get("tracking_uri") != self.config.mlflow:
            return None
        try:
            return self.client.get_run(saved["mlflow_run_id"]).info.run_id
        except self.mlflow.exceptions.MlflowException:  # deleted since: start a new one
            return None

    def _experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except self.mlflow.exceptions.MlflowException:  # created by a run started meanwhile
            return self.client.get_experiment_by_name(name).experiment_id

    def _start_tags(self, run_dir: Path) -> dict[str, str]:
        tags = {"kcls.run_dir": str(run_dir.resolve()), "kcls.version": __version__}
        commit = git_commit()
        if commit is not None:
            tags["mlflow.source.git.commit"] = commit
        return tags


class EpochLogger(keras.callbacks.Callback):
    """Logs each epoch's Keras logs to the tracker's MLflow run, step = the epoch index."""

    def __init__(self, tracker: MlflowTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def on_epoch_end(self, epoch, logs=None):
        self.tracker.log_metrics(dict(logs or {}), step=epoch)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of MLflow-safe dotted keys; lists are left out.

    >>> flatten({"data": {"image_size": 32}, "per_class": {"a(1)": {"f1": 0.5}}})
    {'data.image_size': 32, 'per_class.a_1_.f1': 0.5}
    """
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = prefix + _UNSAFE_KEY.sub("_", str(key))
        if isinstance(value, dict):
            flat |= flatten(value, prefix=name + ".")
        elif not isinstance(value, (list, tuple)):
            flat[name] = value
    return flat


def git_commit(folder: Path | None = None) -> str | None:
    """The commit checked out in `folder` (default: the working directory), or None."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder or Path.cwd(),
                                capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):  # no git installed
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
