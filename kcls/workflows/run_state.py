"""What a run has done so far, so that a killed run resumes as the same run, at its stage.

`<run_dir>/state.json` (`kcls.layout.RUN_STATE_FILE`) is rewritten atomically at each
stage boundary of `kcls.workflows.run.run_recipe`:

    source_fingerprint   the data's fingerprint when the run started (its files with
                         their sizes and modification times, the arrays, the TFDS
                         version: `kcls.data.sources.Splits.fingerprint`)
    training             once trained: the `TrainingResult` (`TrainingResult.to_dict`),
                         written right after `model.weights.h5`
    export_dir           once exported: the version written

A run started again in the same directory:

- is refused when it would train another model than the interrupted one: any setting
  of `data`, `model` or `train` (or `evaluate.calibrate`, which decides the training
  split) that differs from the interrupted run's `config.json`, or data whose
  fingerprint changed; the message names each difference (`check_same_run`);
- skips training when `training` is there: it loads `model.weights.h5` and goes on
  with calibration, evaluation and export (`trained_result`);
- exports nothing again when `export_dir` is there (`exported_version`).

Example:

>>> check_same_run("runs/quickstart/20260101-120000", recipe, splits.fingerprint)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kcls.config import ConfigError, Recipe, to_dict
from kcls.files import write_json
from kcls.layout import RUN_CONFIG_FILE, RUN_STATE_FILE
from kcls.load import read_json, read_run_config
from kcls.train.phases import TrainingResult

# Sections (and single settings) whose values shape the trained weights.
WEIGHT_SHAPING = ("data", "model", "train", "evaluate.calibrate")
# Settings of those sections that do not: where data and caches live, downloading.
NOT_WEIGHT_SHAPING = ("data.cache", "data.download", "data.data_dir")
STATE_FIX = "delete the run directory and run the recipe again"


def read_state(run_dir: str | Path) -> dict[str, Any]:
    """The run's state (see the module docstring); `{}` before the run started."""
    path = Path(run_dir) / RUN_STATE_FILE
    return read_json(path, STATE_FIX) if path.is_file() else {}


def record_state(run_dir: str | Path, **entries: Any) -> None:
    """Adds `entries` to the run's state, atomically."""
    write_json(Path(run_dir) / RUN_STATE_FILE, {**read_state(run_dir), **entries})


def trained_result(run_dir: str | Path) -> TrainingResult | None:
    """The training result of a run killed after training, or None if it did not finish
    training (or never started)."""
    training = read_state(run_dir).get("training")
    return None if training is None else TrainingResult.from_dict(training)


def exported_version(run_dir: str | Path) -> Path | None:
    """The version a run killed after its export wrote, if that folder is still there."""
    export_dir = read_state(run_dir).get("export_dir")
    return Path(export_dir) if export_dir and Path(export_dir).is_dir() else None


def check_same_run(run_dir: str | Path, recipe: Recipe, source_fingerprint: str) -> None:
    """Raises unless `recipe` on data of `source_fingerprint` is the run interrupted in
    `run_dir` (nothing to check when no run started there).

    Raises:
        ConfigError: settings that shape the weights differ (each is named with the
            interrupted run's value and the new one), or the data changed.
    """
    run_dir = Path(run_dir)
    if not (run_dir / RUN_CONFIG_FILE).is_file():
        return
    before, now = _shaping(to_dict(read_run_config(run_dir))), _shaping(to_dict(recipe))
    changed = [f"{key} {before.get(key)!r} -> {now.get(key)!r}"
               for key in sorted(before.keys() | now.keys()) if before.get(key) != now.get(key)]
    if changed:
        raise ConfigError(
            f"{run_dir} holds an interrupted run with other settings ({'; '.join(changed)}): "
            "resuming it would mix two models. Run with the settings of its config.json to "
            "resume it, or use another --out.")
    started_on = read_state(run_dir).get("source_fingerprint")
    if started_on is not None and started_on != source_fingerprint:
        raise ConfigError(
            f"The files of data.source {recipe.data.source} changed since the run in "
            f"{run_dir} started (images added, removed or modified): resuming it would train "
            "one model on two datasets. Restore the data to resume, or use another --out.")


def _shaping(recipe: dict[str, Any]) -> dict[str, Any]:
    """The weight-shaping settings of a recipe's `to_dict`, as `section.key -> value`."""
    flat = {f"{section}.{key}": value for section, values in recipe.items()
            if isinstance(values, dict) for key, value in values.items()}
    return {key: value for key, value in flat.items()
            if key.startswith(tuple(f"{name}." if "." not in name else name
                                    for name in WEIGHT_SHAPING))
            and key not in NOT_WEIGHT_SHAPING}
