"""Loading back what kcls wrote: the trained classifier of a run directory or an export.

Both hold the recipe (`config.json` in a run directory, the `recipe` of `kcls.json` in an
export), the class names (`run.json`, `kcls.json`) and the trained weights in Keras'
own weights file (`model.weights.h5`), which addresses every variable by its layer, so
loading never depends on the order variables are listed in. The architecture is rebuilt
in float32 from the recipe; no training code is imported. File names: `kcls.layout`.

Example:

>>> loaded = load_classifier("saved_models/quickstart")  # doctest: +SKIP
>>> loaded.class_names[:3], loaded.recipe.data.image_size  # doctest: +SKIP
(['0', '1', '2'], 32)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import keras

from kcls.config import ConfigError, Recipe, from_dict
from kcls.layout import (
    METADATA_FILE,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    RUN_INFO_FILE,
    WEIGHTS_FILE,
    IncompleteExportError,
    is_run_dir,
    resolve_export_dir,
)
from kcls.models.classifier import build_classifier
from kcls.tasks import Task, task_from_metadata


@dataclasses.dataclass
class LoadedClassifier:
    """A float32 Keras classifier rebuilt from a run directory or an export, with its recipe.

    `task` is the model's problem type with what was fitted after training (a
    calibration temperature, per-label thresholds): it reads the logits as the export
    serves them.
    """

    classifier: keras.Model
    recipe: Recipe
    class_names: list[str]
    task: Task


def load_classifier(path: str | Path) -> LoadedClassifier:
    """Rebuilds the trained Keras classifier from a run directory or an export.

    Args:
        path: a run directory, an export version directory, or a model folder (its
            latest version).

    Raises:
        FileNotFoundError: `path` is neither, or lacks a file (the message names it).
        ConfigError: the recorded configuration or weights do not fit this kcls version.
    """
    path = Path(path)
    if is_run_dir(path):
        return load_run(path)
    try:
        export_dir = resolve_export_dir(path)
    except IncompleteExportError:
        raise  # its message names the version and the fix
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{str(path)!r} is neither a kcls run directory ({RUN_CONFIG_FILE}, "
            f"{WEIGHTS_FILE}) nor an export (saved_models/NAME or saved_models/NAME/N "
            f"with {METADATA_FILE}).") from None
    return load_export(export_dir)


def load_run(run_dir: str | Path) -> LoadedClassifier:
    """The classifier trained in `run_dir` (`config.json`, `run.json`, `model.weights.h5`)."""
    run_dir = Path(run_dir)
    for name in (RUN_CONFIG_FILE, RUN_INFO_FILE, WEIGHTS_FILE):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(
                f"{str(run_dir)!r} is not a finished kcls run directory: {name} is missing. "
                "Runs save it at the end of training; re-run the recipe with "
                "`kcls recipe run NAME` to get one.")
    recipe = _recipe_from(json.loads((run_dir / RUN_CONFIG_FILE).read_text()),
                          run_dir / RUN_CONFIG_FILE)
    run_info = json.loads((run_dir / RUN_INFO_FILE).read_text())
    class_names = run_info.get("class_names")
    if not class_names:
        raise FileNotFoundError(f"{run_dir / RUN_INFO_FILE} does not list the class names; "
                                "re-run the recipe with `kcls recipe run NAME`.")
    tuned = load_run_metrics(run_dir).get("thresholds")
    task = task_from_metadata(recipe.model.task, {
        "temperature": run_info.get("temperature"), "rejection": run_info.get("rejection"),
        "thresholds": [tuned[name] for name in class_names] if tuned else None})
    return _rebuild(recipe, class_names, task, run_dir / WEIGHTS_FILE, run_dir / RUN_CONFIG_FILE)


def load_export(export_dir: str | Path) -> LoadedClassifier:
    """The classifier of one export version (`kcls.json`, `model.weights.h5`)."""
    export_dir = Path(export_dir)
    metadata = json.loads((export_dir / METADATA_FILE).read_text())
    if not (export_dir / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"The export {str(export_dir)!r} has no {WEIGHTS_FILE} (older kcls exports kept "
            "the weights in the SavedModel only); export the run again with "
            "`kcls export RUN_DIR`.")
    recipe = _recipe_from(metadata["recipe"], export_dir / METADATA_FILE)
    return _rebuild(recipe, metadata["class_names"],
                    task_from_metadata(recipe.model.task, metadata),
                    export_dir / WEIGHTS_FILE, export_dir / METADATA_FILE)


def load_run_metrics(run_dir: str | Path) -> dict[str, Any]:
    """The test metrics a run wrote (`metrics.json`), or `{}` when it wrote none."""
    metrics_file = Path(run_dir) / METRICS_FILE
    return json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}


def float32_architecture(recipe: Recipe, num_classes: int) -> keras.Model:
    """The recipe's classifier in float32 with random weights (nothing downloaded)."""
    return build_classifier(dataclasses.replace(recipe.model, weights=None), num_classes,
                            recipe.data.image_size, "float32")


def _rebuild(recipe: Recipe, class_names: list[str], task: Task, weights_file: Path,
             config_file: Path) -> LoadedClassifier:
    classifier = float32_architecture(recipe, len(class_names))
    try:
        classifier.load_weights(weights_file)
    except ValueError as error:
        raise ConfigError(f"The weights {str(weights_file)!r} do not fit the architecture "
                          f"{config_file} describes: {error}") from None
    return LoadedClassifier(classifier, recipe, class_names, task)


def _recipe_from(data: dict[str, Any], source: Path) -> Recipe:
    try:
        return from_dict(data)
    except (TypeError, KeyError, ValueError) as error:
        raise ConfigError(f"{source}: not a configuration this kcls version reads "
                          f"({error}).") from None
