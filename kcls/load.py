"""Loading back what kcls wrote: the trained classifier of a run directory or an export,
and one reader per file kcls reads back.

Both hold the recipe (`config.json` in a run directory, the `recipe` of `kcls.json` in an
export), the class names (`run.json`, `kcls.json`) and the trained weights in Keras'
own weights file (`model.weights.h5`), which addresses every variable by its layer, so
loading never depends on the order variables are listed in. The architecture is rebuilt
in float32 from the recipe; no training code is imported. File names: `kcls.layout`.

Every file kcls reads back goes through one reader here (`read_run_config`,
`read_run_info`, `load_run_metrics`, `read_export_metadata`, `read_export_labels`,
`read_reference`, `load_weights`, `load_saved_model`). A file that exists but cannot
be read (cut short by a full disk or an interrupted copy, overwritten, not what kcls
writes there) is a `DamagedFileError` whose one-line message names the file and how to
get a good one; a missing one is a `FileNotFoundError` naming it.

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
import tensorflow as tf

from kcls.config import ConfigError, Recipe, from_dict
from kcls.layout import (
    BEST_WEIGHTS_FILE,
    LABELS_FILE,
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

# How to get a good copy of a damaged file, by where it is.
RUN_FIX = ("restore it from a copy of the run directory, or train again with "
           "`kcls recipe run NAME`")
EXPORT_FIX = ("export the run again with `kcls export RUN_DIR`, or copy this version "
              "again from where it was exported")
# The keys every reference profile holds (`kcls.monitoring.drift.build_profile`).
REFERENCE_KEYS = ("examples", "class_names", "predicted_counts", "confidences")


class DamagedFileError(ValueError):
    """A file kcls wrote that cannot be read back (cut short, overwritten, or not what kcls
    writes there); the message names the file and how to get a good one."""


@dataclasses.dataclass
class LoadedClassifier:
    """A float32 Keras classifier rebuilt from a run directory or an export, with its recipe.

    `task` is the model's problem type with what was fitted after training (a
    calibration temperature, per-label thresholds): it reads the logits as the export
    serves them. `metadata` is what the model's directory records of it (`run.json` of a
    run, `kcls.json` of an export).
    """

    classifier: keras.Model
    recipe: Recipe
    class_names: list[str]
    task: Task
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


def load_classifier(path: str | Path) -> LoadedClassifier:
    """Rebuilds the trained Keras classifier from a run directory or an export.

    Args:
        path: a run directory, an export version directory, or a model folder (its
            latest version).

    Raises:
        FileNotFoundError: `path` is neither, or lacks a file (the message names it).
        DamagedFileError: a file of it cannot be read (the message names it and the fix).
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
    recipe = read_run_config(run_dir)
    run_info = read_run_info(run_dir)
    class_names = run_info["class_names"]
    tuned = load_run_metrics(run_dir).get("thresholds")
    try:
        thresholds = [tuned[name] for name in class_names] if tuned else None
    except (KeyError, TypeError):
        raise _damaged(run_dir / METRICS_FILE, "its thresholds do not name the run's "
                       "classes", RUN_FIX) from None
    task = task_from_metadata(recipe.model.task, {"temperature": run_info.get("temperature"),
                                                  "thresholds": thresholds})
    weights_fix = RUN_FIX
    if (run_dir / BEST_WEIGHTS_FILE).is_file():
        weights_fix = (f"copy {BEST_WEIGHTS_FILE} (the best validation epoch's weights) over "
                       f"it, or {RUN_FIX}")
    classifier = float32_architecture(recipe, len(class_names))
    load_weights(classifier, run_dir / WEIGHTS_FILE, run_dir / RUN_CONFIG_FILE, weights_fix)
    return LoadedClassifier(classifier, recipe, class_names, task, run_info)


def load_export(export_dir: str | Path) -> LoadedClassifier:
    """The classifier of one export version (`kcls.json`, `model.weights.h5`)."""
    export_dir = Path(export_dir)
    metadata = read_export_metadata(export_dir)
    if not (export_dir / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"The export {str(export_dir)!r} has no {WEIGHTS_FILE} (older kcls exports kept "
            "the weights in the SavedModel only); export the run again with "
            "`kcls export RUN_DIR`.")
    recipe = _recipe_from(metadata["recipe"], export_dir / METADATA_FILE)
    classifier = float32_architecture(recipe, len(metadata["class_names"]))
    load_weights(classifier, export_dir / WEIGHTS_FILE, export_dir / METADATA_FILE, EXPORT_FIX)
    return LoadedClassifier(classifier, recipe, metadata["class_names"],
                            task_from_metadata(recipe.model.task, metadata), metadata)


def read_json(path: str | Path, fix: str) -> dict[str, Any]:
    """The JSON object in the file `path`.

    Args:
        path: a JSON file kcls wrote.
        fix: how to get a good copy, for the message of a damaged file.

    Raises:
        FileNotFoundError: no file at `path`.
        DamagedFileError: not UTF-8 JSON holding an object (the message names the file).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _damaged(path, _first_line(error), fix) from None
    if not isinstance(data, dict):
        raise _damaged(path, f"it holds a JSON {type(data).__name__}, not an object", fix)
    return data


def read_run_config(run_dir: str | Path) -> Recipe:
    """The resolved recipe a run recorded (`config.json`)."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    return _recipe_from(read_json(path, RUN_FIX), path)


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    """What a finished run recorded (`run.json`): at least its `class_names`."""
    path = Path(run_dir) / RUN_INFO_FILE
    run_info = read_json(path, RUN_FIX)
    names = run_info.get("class_names")
    if not names or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _damaged(path, "it does not list the class names", RUN_FIX)
    return run_info


def load_run_metrics(run_dir: str | Path) -> dict[str, Any]:
    """The test metrics a run wrote (`metrics.json`), or `{}` when it wrote none."""
    metrics_file = Path(run_dir) / METRICS_FILE
    if not metrics_file.is_file():
        return {}
    return read_json(metrics_file, f"delete it to go on without the run's recorded test "
                     f"metrics, or {RUN_FIX}")


def read_export_metadata(export_dir: str | Path) -> dict[str, Any]:
    """What an export records (`kcls.json`): at least its `recipe` and `class_names`."""
    path = Path(export_dir) / METADATA_FILE
    metadata = read_json(path, EXPORT_FIX)
    names = metadata.get("class_names")
    if (not isinstance(metadata.get("recipe"), dict) or not isinstance(names, list)
            or not names or not all(isinstance(name, str) for name in names)):
        raise _damaged(path, "it lacks the recipe or the class names", EXPORT_FIX)
    return metadata


def read_export_labels(export_dir: str | Path) -> list[str] | None:
    """The class names an export serves (`assets/labels.txt`, one per line), or None for
    a version without the file. Lines are split on newlines only (class names never hold
    one; `str.splitlines` would also split on U+2028 and others)."""
    path = Path(export_dir) / LABELS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise _damaged(path, _first_line(error), EXPORT_FIX) from None
    return text.removesuffix("\n").split("\n")


def read_reference(path: str | Path, fix: str = EXPORT_FIX) -> dict[str, Any]:
    """A reference profile (`reference.json`, `kcls.monitoring.profile`).

    Raises:
        FileNotFoundError: no file at `path`.
        DamagedFileError: not JSON, or without the keys of a profile (`REFERENCE_KEYS`).
    """
    profile = read_json(path, fix)
    missing = [key for key in REFERENCE_KEYS if key not in profile]
    if missing:
        raise _damaged(path, f"it is not a kcls reference profile (no {', '.join(missing)})",
                       fix)
    return profile


def load_weights(classifier: keras.Model, weights_file: Path, config_file: Path,
                 fix: str) -> None:
    """Loads `weights_file` (`model.weights.h5`) into `classifier`.

    Raises:
        DamagedFileError: the file is not a readable weights file (cut short, overwritten).
        ConfigError: its weights do not fit the architecture `config_file` describes.
    """
    try:
        classifier.load_weights(weights_file)
    except OSError as error:  # h5py: truncated, or not an HDF5 file at all
        raise _damaged(weights_file, _first_line(error), fix) from None
    except ValueError as error:
        raise ConfigError(f"The weights {str(weights_file)!r} do not fit the architecture "
                          f"{config_file} describes: {error}") from None


def load_saved_model(export_dir: str | Path, signature: str) -> tuple[Any, Any]:
    """An export's SavedModel and one of its signatures, e.g. `serving_default`.

    Returns:
        `(loaded, function)`: keep `loaded` alive while calling `function`.

    Raises:
        DamagedFileError: `saved_model.pb` or `variables/` cannot be read, or the
            signature is missing; the message names the folder and the fix.
    """
    try:
        loaded = tf.saved_model.load(str(export_dir))
        return loaded, loaded.signatures[signature]
    except (OSError, ValueError, KeyError, IndexError, tf.errors.OpError) as error:
        detail = _first_line(error) if str(error).strip() else repr(error)
        raise DamagedFileError(
            f"The export {str(export_dir)!r} cannot be loaded ({detail}): {EXPORT_FIX}, or "
            "pass another version folder.") from None


def float32_architecture(recipe: Recipe, num_classes: int) -> keras.Model:
    """The recipe's classifier in float32 with random weights (nothing downloaded)."""
    return build_classifier(dataclasses.replace(recipe.model, weights=None), num_classes,
                            recipe.data.image_size, "float32")


def _recipe_from(data: dict[str, Any], source: Path) -> Recipe:
    try:
        return from_dict(data)
    except (TypeError, KeyError, ValueError) as error:
        raise ConfigError(f"{source}: not a configuration this kcls version reads "
                          f"({error}).") from None


def _damaged(path: Path, detail: str, fix: str) -> DamagedFileError:
    return DamagedFileError(f"{path} is damaged ({detail}): {fix}.")


def _first_line(error: Exception) -> str:
    """The first line of an error's message, at most 160 characters."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
