"""`kcls export RUN_DIR`: the next SavedModel version of a finished run.

Example:

>>> version_dir = export_run("runs/quickstart/20260101-120000")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from kcls.layout import RUN_INFO_FILE, RUN_REFERENCE_FILE
from kcls.load import load_run, load_run_metrics, read_reference, read_run_config
from kcls.monitoring.profile import recipe_reference_profile
from kcls.serving.export import export_saved_model
from kcls.workflows.run_state import read_state

# A run's reference profile can always be computed again.
REFERENCE_FIX = ("delete it, and `kcls export` computes the profile again on the recipe's "
                 "held-out images")


def export_run(run_dir: str | Path, base_dir: str | Path | None = None,
               model_name: str | None = None, onnx: bool = False,
               log: Callable[[str], None] = print) -> Path:
    """Exports the next version of the model trained in `run_dir` (what `kcls export` does).

    Rebuilds the classifier in float32 from `<run_dir>/config.json`, loads
    `<run_dir>/model.weights.h5` and exports it with the class names and calibration
    temperature of `run.json` (or the thresholds of `metrics.json`), the test metrics of
    `metrics.json` and, for a task `kcls monitor` supports, the reference profile of
    `reference.json`; a run without that profile (from an older kcls) gets one computed
    on its recipe's test split. A run killed after training, before its `run.json`
    (during calibration, evaluation or export), is finished instead: its remaining stages
    run (`kcls.workflows.run.run_recipe` resumes it) and export it.

    Args:
        run_dir: a run directory written by `kcls recipe run` (or `kcls.workflows.run.run_recipe`).
        base_dir: export base directory; defaults to the run's `export.base_dir`.
        model_name: the name to serve it under instead of the run's
            (`kcls.config.Recipe.model_name`); it is recorded in `kcls.json`.
        onnx: also write `model.onnx` into the version (`export.onnx`), checked against
            the SavedModel on the recipe's test split (`kcls.serving.onnx`); the run's
            own `export.onnx` applies either way.
        log: receives the progress lines of a run being finished.

    Returns:
        Path of the new version directory, e.g. `saved_models/quickstart/4`.

    Raises:
        FileNotFoundError: `run_dir` lacks one of the files above (the message names it).
        DamagedFileError: one of them cannot be read (the message names it and the fix).
        ConfigError: the run's `config.json` does not match this kcls version's config,
            `model_name` is not one folder name, or the model's latest version serves
            other classes (`kcls.serving.publish.check_model_labels`).
        MissingOnnxError, OnnxError: with ONNX, its packages are missing or the ONNX
            model disagrees with the SavedModel (nothing is published).
    """
    if not (Path(run_dir) / RUN_INFO_FILE).is_file() and "training" in read_state(run_dir):
        return finish_run(Path(run_dir), base_dir, model_name, onnx, log)
    loaded = load_run(run_dir)
    export = loaded.recipe.export
    if model_name is not None:
        export = dataclasses.replace(export, model_name=model_name)
    if onnx:
        export = dataclasses.replace(export, onnx=True)
    loaded.recipe = dataclasses.replace(loaded.recipe, export=export)
    reference = None
    if loaded.task.supports_monitoring:
        reference_file = Path(run_dir) / RUN_REFERENCE_FILE
        reference = (read_reference(reference_file, REFERENCE_FIX) if reference_file.is_file() else
                     recipe_reference_profile(loaded.classifier, loaded.recipe,
                                              loaded.class_names, loaded.task))
    return export_saved_model(loaded.classifier, loaded.recipe, loaded.class_names,
                              load_run_metrics(run_dir), base_dir, loaded.task, reference,
                              loaded.metadata.get("test_files"))


def finish_run(run_dir: Path, base_dir: str | Path | None, model_name: str | None,
               onnx: bool, log: Callable[[str], None]) -> Path:
    """Runs the stages after training of a run killed after it, with export on."""
    from kcls.workflows.run import run_recipe  # training code: only to finish a run

    recipe = read_run_config(run_dir)
    export = dataclasses.replace(recipe.export, enabled=True,
                                 base_dir=str(base_dir or recipe.export.base_dir),
                                 model_name=model_name or recipe.export.model_name,
                                 onnx=onnx or recipe.export.onnx)
    log(f"{run_dir} was stopped after training, before its run.json: finishing it "
        "(calibration, evaluation, export)")
    return run_recipe(dataclasses.replace(recipe, export=export), run_dir, log=log,
                      verbose=0).export_dir
