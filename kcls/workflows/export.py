"""`kcls export RUN_DIR`: the next SavedModel version of a finished run.

Example:

>>> version_dir = export_run("runs/quickstart/20260101-120000")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kcls.layout import RUN_REFERENCE_FILE
from kcls.load import load_run, load_run_metrics, read_reference
from kcls.monitoring.profile import recipe_reference_profile
from kcls.serving.export import export_saved_model

# A run's reference profile can always be computed again.
REFERENCE_FIX = ("delete it, and `kcls export` computes the profile again on the recipe's "
                 "held-out images")


def export_run(run_dir: str | Path, base_dir: str | Path | None = None,
               model_name: str | None = None) -> Path:
    """Exports the next version of the model trained in `run_dir` (what `kcls export` does).

    Rebuilds the classifier in float32 from `<run_dir>/config.json`, loads
    `<run_dir>/model.weights.h5` and exports it with the class names and calibration
    temperature of `run.json` (or the thresholds of `metrics.json`), the test metrics of
    `metrics.json` and, for a task `kcls monitor` supports, the reference profile of
    `reference.json`; a run without that profile (from an older kcls) gets one computed
    on its recipe's test split. Training code is never imported.

    Args:
        run_dir: a run directory written by `kcls recipe run` (or `kcls.workflows.run.run_recipe`).
        base_dir: export base directory; defaults to the run's `export.base_dir`.
        model_name: the name to serve it under instead of the run's
            (`kcls.config.Recipe.model_name`); it is recorded in `kcls.json`.

    Returns:
        Path of the new version directory, e.g. `saved_models/quickstart/4`.

    Raises:
        FileNotFoundError: `run_dir` lacks one of the files above (the message names it).
        DamagedFileError: one of them cannot be read (the message names it and the fix).
        ConfigError: the run's `config.json` does not match this kcls version's config,
            `model_name` is not one folder name, or the model's latest version serves
            other classes (`kcls.serving.publish.check_model_labels`).
    """
    loaded = load_run(run_dir)
    if model_name is not None:
        loaded.recipe = dataclasses.replace(loaded.recipe, export=dataclasses.replace(
            loaded.recipe.export, model_name=model_name))
    reference = None
    if loaded.task.supports_monitoring:
        reference_file = Path(run_dir) / RUN_REFERENCE_FILE
        reference = (read_reference(reference_file, REFERENCE_FIX) if reference_file.is_file() else
                     recipe_reference_profile(loaded.classifier, loaded.recipe,
                                              loaded.class_names, loaded.task))
    return export_saved_model(loaded.classifier, loaded.recipe, loaded.class_names,
                              load_run_metrics(run_dir), base_dir, loaded.task, reference,
                              loaded.metadata.get("test_files"))
