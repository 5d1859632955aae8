"""`run_recipe`: data, model, the two training phases, evaluation and export, in one call.

This is what `kcls recipe run` and notebooks call. It reads as the list of its steps:
prepare the recipe (`kcls.workflows.prepare`), claim the run directory, train the phases
(`kcls.train.phases`), fit the task on held-out data (a calibration temperature or
per-label thresholds), evaluate on the test split and write the report, then the samples,
the reference profile and the export. It writes the run directory:

    <run_dir>/config.json    the resolved recipe
    <run_dir>/run.json       versions, device, precision, per-phase history, metrics, timings
    <run_dir>/metrics.json   test-split metrics (per class, confusion matrix, calibration)
    <run_dir>/report.md      the metrics as tables, with the plots below
    <run_dir>/*.png          training curves and the task's plots (confusion matrix,
                             reliability, confident mistakes; PR curves for multi-label)
    <run_dir>/reference.json the reference profile of the held-out images (validation and
                             test; `kcls.monitoring.profile`), exported for `kcls monitor`
    <run_dir>/model.weights.h5  trained weights, re-exported by `kcls export RUN_DIR`
    <run_dir>/samples/       a few held-out test images as PNG, handy for `kcls predict`
    <run_dir>/logs/          TensorBoard logs of both training phases
    <run_dir>/best.weights.h5  classifier weights of the best validation epoch
    <run_dir>/lr_find_*.png  with train.learning_rate=auto: each phase's learning-rate
                             range test (loss against rate, the rate chosen marked)
    <run_dir>/backup/        resume state while training (see `kcls.train.phases`):
                             run again with the same run_dir to resume a killed run
    <run_dir>/state.json     the stages done (`kcls.workflows.run_state`): a run killed
                             after training resumes at calibration, and only as the
                             same run (same weight-shaping settings, same data)
    <run_dir>/tracking.json  with track.mlflow: the MLflow run (`kcls.tracking`)

Observers (`kcls.tracking`) are told of the steps: MLflow tracking with `track.mlflow`,
and whatever the caller adds (`kcls tune`'s pruning). With `evaluate.test=false` the run
is scored on the validation split and the test split is never read.

Under `train.strategy=multiworker` every worker calls `run_recipe` with the same run
directory, on storage they all share: all of them train, only the chief (`kcls.train.cluster`)
writes the files above, tells the observers, and then evaluates, calibrates and exports on
its own; the others return once training is done (`RunResult.worker`), after deleting the
copies they wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kcls import __version__
from kcls.config import ConfigError, Recipe, parse_duration, to_json
from kcls.data.folder import skipped_files_line
from kcls.data.pipeline import eval_pipeline, prepare_image
from kcls.data.sources import Splits
from kcls.data.tta import view_count
from kcls.environment import software_versions
from kcls.evaluation.evaluate import evaluate_classifier, fit_after_training
from kcls.evaluation.plots import confident_mistakes
from kcls.evaluation.report import write_report
from kcls.files import safe_file_name, save_weights, write_bytes, write_json, write_text
from kcls.layout import (
    LR_FIND_PHASE_PLOT,
    REPORT_FILE,
    RUN_CONFIG_FILE,
    RUN_INFO_FILE,
    RUN_REFERENCE_FILE,
    RUNS_DIR,
    SAMPLES_DIR,
    WEIGHTS_FILE,
)
from kcls.monitoring.drift import small_reference_warning
from kcls.monitoring.profile import REFERENCE_SPLITS, reference_profile
from kcls.serving.export import export_saved_model
from kcls.serving.onnx import onnx_line
from kcls.serving.publish import check_model_labels
from kcls.tasks import Evaluation, Task
from kcls.tracking import Observers, RunObserver, observers_for
from kcls.train.budget import TimeBudget
from kcls.train.cluster import (
    Worker,
    lost_worker_error,
    weights_digest,
    worker_from_environment,
)
from kcls.train.compute import describe_devices, describe_strategy
from kcls.train.phases import TrainingResult, fit_phases
from kcls.train.progress import check_resumable
from kcls.train.schedule import describe_normalization
from kcls.workflows.prepare import Calibration, Prepared, prepare
from kcls.workflows.run_directory import check_run_dir, claim_run_dir, unfinished_runs
from kcls.workflows.run_state import (
    check_same_run,
    exported_version,
    read_state,
    record_state,
    trained_result,
)

SAMPLE_IMAGES = 8
# With a time budget: seconds kept after training for the work that does not scale with
# the test images (weights, report plots, samples, SavedModel export; measured ~10-15 s
# on a 2-core CPU for a small network).
AFTER_TRAINING_SECONDS = 20.0


@dataclass
class RunResult:
    """What a run produced.

    Attributes:
        run_dir: Path of the run directory.
        metrics: test-split metrics (`accuracy`, `nll`, ... or `mAP`, `micro_f1`, ...).
        export_dir: Path of the SavedModel version written, or None when export is off.
        history: per-epoch metrics over both phases.
        classifier: the trained keras.Model (in the training precision).
        class_names: list[str].
        task: the fitted Task (its temperature or thresholds), which reads `metrics`.
        worker: the process of the cluster that returned this; a worker other than the
            chief returns after training: no metrics, no export, no task.
        weights_digest: `kcls.train.cluster.weights_digest` of the trained weights, the
            same on every worker (run.json records the chief's).
    """

    run_dir: Path
    metrics: dict[str, Any]
    export_dir: Path | None
    history: dict[str, list[float]]
    classifier: keras.Model = field(repr=False)
    class_names: list[str] = field(default_factory=list)
    task: Task | None = None
    worker: Worker = field(default_factory=Worker)
    weights_digest: str = ""

    def headline(self) -> str:
        """The test metric(s) the run is judged by, for one line (`accuracy 0.9900`)."""
        return self.task.headline(self.metrics)

    def summary_line(self, split: str = "test") -> str:
        """What the run did, in one line for the command line; `split` is the one
        `metrics` were measured on (`validation` with `evaluate.test=false`)."""
        if not self.worker.is_chief:
            return (f"done: {self.worker.name} trained (weights digest {self.weights_digest}); "
                    f"the chief evaluates and exports, run dir {self.run_dir}")
        return (f"done: {split} {self.headline()}; run dir {self.run_dir}"
                + (f"; export {self.export_dir}" if self.export_dir else ""))


def run_recipe(recipe: Recipe, run_dir: str | Path | None = None,
               log: Callable[[str], None] = print, verbose: int | str = "auto",
               splits: Splits | None = None,
               observers: Iterable[RunObserver] = (), resume: bool = False,
               command: str | None = None) -> RunResult:
    """Trains, evaluates and exports `recipe`.

    Args:
        recipe: Recipe, the resolved configuration.
        run_dir: where logs and reports go; default `runs/<recipe>/<timestamp>`. Required
            under `train.strategy=multiworker`: the same folder on every worker.
        log: receives one-line progress messages.
        verbose: Keras `fit()` verbosity (progress bar by default, 0 for none).
        splits: data to use instead of `recipe.data.source`, e.g. in-memory arrays from
            `kcls.data.sources.splits_from_arrays` in a notebook.
        observers: `kcls.tracking.RunObserver`s told of the run's steps, after those
            `track.*` asks for (`kcls.tracking.observers_for`).
        resume: without `run_dir`, resume the latest unfinished run of the recipe under
            `runs/<recipe>/` with the same settings and data (`same_unfinished_run`);
            without `resume` such a run is only named, with the command resuming it.
        command: the command line that started the run, without `--out` and `--resume`,
            for the lines saying how to resume (`kcls recipe run NAME --set ...`).

    Returns:
        RunResult with the metrics (of the validation split with `evaluate.test=false`)
        and the export path (on a worker other than the chief: after training, without
        them).

    Raises:
        ConfigError: data, backbone or weights that cannot be found, a run directory
            that cannot be used, or tracking without MLflow installed (raised before any
            training starts).
    """
    started = time.time()
    worker = worker_from_environment(recipe.train.strategy)
    if recipe.train.strategy == "multiworker" and run_dir is None:
        raise ConfigError("train.strategy=multiworker needs the run directory named, the same "
                          "on every worker and on storage they share: pass --out DIR (or "
                          "run_dir=...), or use `kcls recipe run NAME --workers N`.")
    # Everything that can refuse the run is checked before the run directory is written.
    if run_dir is not None:
        check_run_dir(run_dir, lock=worker.is_chief)
    # The chief alone reports: one tracked run (one tracking.json) for the whole cluster.
    observers = observers_for(recipe, observers) if worker.is_chief else Observers()
    prepared = prepare(recipe, splits)
    if recipe.export.enabled:  # a version of other classes is refused: before training
        check_model_labels(Path(recipe.export.base_dir) / recipe.model_name,
                           prepared.class_names)
    if run_dir is None:
        run_dir = offer_unfinished_run(prepared, resume, command, log)
    if run_dir is not None:  # an interrupted run there resumes only as the same run
        check_same_run_dir(prepared, run_dir)
    with (claim_run_dir(run_dir, recipe.name, log, lock=worker.is_chief) as run_dir,
          observers.watching(run_dir), resume_hint(run_dir, log, command)):
        if worker.is_chief:
            write_text(run_dir / RUN_CONFIG_FILE, to_json(recipe))
            if not read_state(run_dir):
                record_state(run_dir, source_fingerprint=prepared.splits.fingerprint)
        log_start(prepared, run_dir, log)
        observers.started(recipe, run_dir, prepared.record())
        training, time_budget = train_or_resume(prepared, run_dir, verbose, log,
                                                observers.callbacks(), worker.is_chief)
        digest = weights_digest(prepared.classifier)
        if not worker.is_chief:
            return RunResult(run_dir, {}, None, training.history, prepared.classifier,
                             prepared.class_names, worker=worker, weights_digest=digest)
        return evaluate_and_publish(prepared, training, run_dir, time_budget, digest, started,
                                    log, observers)


def evaluate_and_publish(prepared: Prepared, training: TrainingResult, run_dir: Path,
                         time_budget: TimeBudget | None, digest: str, started: float,
                         log: Callable[[str], None], observers: Observers) -> RunResult:
    """What the chief does after training, alone: fits the task,
    evaluates the test split and publishes (samples, reference profile, export), or with
    `evaluate.test=false` scores the validation split only; writes run.json last and
    tells the observers.

    Args:
        digest: the trained weights' `weights_digest`, recorded in run.json.
        started: `time.time()` when the run started.
    """
    seconds = {"training": round(time.time() - started, 1)}
    task = fit_task(prepared)
    if prepared.recipe.evaluate.test:
        evaluation = evaluate_test_split(prepared, task, training, run_dir, log,
                                         seconds["training"])
        export_dir = publish(prepared, task, evaluation.metrics, run_dir, log)
    else:  # e.g. a tuning trial: scored on validation, the test split never read
        evaluation, export_dir = evaluate_validation_split(prepared, task, log), None
    seconds["total"] = round(time.time() - started, 1)
    record = {**run_record(prepared, training, task, evaluation, export_dir, seconds,
                           time_budget), "weights_digest": digest}
    write_json(run_dir / RUN_INFO_FILE, record)
    observers.finished(run_dir, record)
    if time_budget is not None:
        log(budget_line(time_budget))
    return RunResult(run_dir, evaluation.metrics, export_dir, training.history,
                     prepared.classifier, prepared.class_names, task, prepared.worker, digest)


def log_start(prepared: Prepared, run_dir: Path, log: Callable[[str], None]) -> None:
    """The run's header line, then the choices it made that a user should know about."""
    recipe, splits, sizes = prepared.recipe, prepared.splits, prepared.splits.sizes
    workers = f" | {prepared.worker.name}" if prepared.worker.count > 1 else ""
    log(f"kcls {__version__} | recipe {recipe.name} | {describe_devices()} | "
        f"{describe_strategy(prepared.strategy)}{workers} | {prepared.precision} "
        f"({prepared.precision_reason}) | XLA "
        f"{'on' if prepared.train_config.jit_compile else 'off'} "
        f"({prepared.jit_compile_reason}) | {len(splits.class_names)} classes | train "
        f"{sizes['train']}, validation {sizes['validation']}, test {sizes['test']} | "
        f"run dir {run_dir}")
    if prepared.calibration.plan.carve_out:
        log(f"{prepared.calibration.count} training images held out to fit the calibration "
            "temperature or the rejection rule on (no validation split; "
            "evaluate.calibrate=temperature or export.reject_coverage set)")
    if prepared.host_augmentation is not None:
        log(f"augmentation {', '.join(prepared.host_augmentation.stage_names)} on the host "
            "(tf.data): TPUs run only XLA-compiled programs and these stages have ops XLA "
            "cannot compile")
    normalization = describe_normalization(prepared.classifier,
                                           prepared.train_config.train_batchnorm)
    if "LayerNormalization" in normalization:  # a transformer: say how it is fine-tuned
        log(f"normalization: {normalization}")
    weights = prepared.loss_weights.describe(prepared.class_names)
    if weights:
        log(weights)
    for warning in prepared.small_splits:
        log(f"warning: {warning}")
    leaks = prepared.leaks and prepared.leaks.warning()
    if leaks:
        log(f"warning: {leaks}")


def plan_time_budget(prepared: Prepared) -> TimeBudget | None:
    """The run's `train.time_budget`, with the time kept for what follows training."""
    recipe, test = prepared.recipe, prepared.splits.sizes["test"]
    if recipe.train.time_budget is None:
        return None
    calibration = prepared.calibration
    tested = test if recipe.evaluate.test else 0  # evaluate.test=false never reads it
    evaluated = (test * view_count(recipe.evaluate.flip_tta, recipe.evaluate.shift_tta)
                 if recipe.evaluate.test else prepared.splits.sizes["validation"])
    reference = (tested + calibration.count) * view_count(recipe.export.flip_tta,
                                                          recipe.export.shift_tta)
    return TimeBudget(
        parse_duration(recipe.train.time_budget),
        evaluation_images=evaluated + reference
        + (calibration.count if calibration.plan.fits_anything else 0)
        + (prepared.statistics_count() if calibration.plan.reject_coverage else 0),
        fixed_seconds=AFTER_TRAINING_SECONDS if recipe.export.enabled
        else AFTER_TRAINING_SECONDS / 2)


def check_same_run_dir(prepared: Prepared, run_dir: str | Path) -> None:
    """Raises unless an interrupted run in `run_dir` (if any) is the run `prepared`
    makes: the same training schedule and the same weight-shaping settings and data."""
    if prepared.recipe.train.time_budget is None:
        check_resumable(run_dir, prepared.train_config, prepared.steps_per_epoch)
    check_same_run(run_dir, prepared.recipe, prepared.splits.fingerprint)


def same_unfinished_run(prepared: Prepared) -> Path | None:
    """The latest unfinished run of the recipe under `runs/<recipe>/` that is the run
    `prepared` makes (`check_same_run_dir`), or None."""
    for run_dir in unfinished_runs(prepared.recipe.name):
        try:
            check_same_run_dir(prepared, run_dir)
        except ConfigError:
            continue
        return run_dir
    return None


def offer_unfinished_run(prepared: Prepared, resume: bool, command: str | None,
                         log: Callable[[str], None]) -> Path | None:
    """Without `--out`: the same unfinished run to resume with `resume`, else None (a
    new run directory), after a line naming it and the command that resumes it."""
    found = same_unfinished_run(prepared)
    name = prepared.recipe.name
    if found is None:
        if resume:
            log(f"--resume: no unfinished run of {name} with these settings and data under "
                f"{Path(RUNS_DIR) / name}; starting a new run")
        return None
    if resume:
        log(f"resuming the unfinished run {found} (the same recipe, settings and data)")
        return found
    rerun = command or "the same command with"
    log(f"{found} is an unfinished run of {name} with the same settings and data; this run "
        f"starts afresh in a new folder. To resume that one instead: {rerun} --resume "
        f"(or {rerun} --out {found})")
    return None


@contextlib.contextmanager
def resume_hint(run_dir: Path, log: Callable[[str], None],
                command: str | None = None) -> Iterator[None]:
    """On Ctrl-C, says how to resume the run before the interruption goes on."""
    try:
        yield
    except KeyboardInterrupt:
        rerun = f"`{command} --out {run_dir}`" if command else (
            f"the same command with --out {run_dir}")
        log(f"interrupted: run {rerun} to resume from its last finished epoch (or stage, "
            "once trained)")
        raise


def train_or_resume(prepared: Prepared, run_dir: Path, verbose: int | str,
                    log: Callable[[str], None], callbacks: list[keras.callbacks.Callback],
                    chief: bool = True) -> tuple[TrainingResult, TimeBudget | None]:
    """Trains and saves (the chief only) the weights and the training's record
    (`kcls.workflows.run_state`), or, in a run killed after training, loads them:
    `(training, time budget or None)`."""
    trained = trained_result(run_dir)
    if trained is not None:
        prepared.classifier.load_weights(run_dir / WEIGHTS_FILE)
        log(f"resumed after training: {WEIGHTS_FILE} as trained; calibration, evaluation "
            "and export run again")
        return trained, None
    time_budget = plan_time_budget(prepared)
    training = train(prepared, run_dir, time_budget, verbose, log, callbacks)
    if chief:
        save_weights(prepared.classifier, run_dir / WEIGHTS_FILE)  # for `kcls export RUN_DIR`
        record_state(run_dir, training=training.to_dict())
    return training, time_budget


def train(prepared: Prepared, run_dir: Path, time_budget: TimeBudget | None,
          verbose: int | str, log: Callable[[str], None],
          callbacks: list[keras.callbacks.Callback] | None = None) -> TrainingResult:
    """Fits the phases (`kcls.train.phases.fit_phases`, with the observers' `callbacks`)
    and says what resuming or the learning-rate search decided."""
    try:
        training = fit_phases(
            prepared.classifier, prepared.train_batches, prepared.validation_batches,
            prepared.steps_per_epoch, prepared.train_config, prepared.device_augmentation,
            callbacks, verbose=verbose, run_dir=run_dir, strategy=prepared.strategy,
            time_budget=time_budget, objective=prepared.objective(), log=log)
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError) as error:
        # A collective aborted: under several workers, one of them is gone.
        if prepared.worker.count == 1:
            raise
        raise lost_worker_error(error) from error
    if training.resumed:
        log("resumed an interrupted run: " + ", ".join(
            f"{phase.name} {'done before' if phase.skipped_on_resume else 'continued'}"
            for phase in training.phases))
    searched = [phase for phase in training.phases if phase.learning_rate_search is not None]
    if searched:
        log("learning rates found by the range test (minimum/10): " + ", ".join(
            f"{phase.name} {phase.learning_rate:.2e}" for phase in searched)
            + f"; plots {run_dir / LR_FIND_PHASE_PLOT.format(phase='*')}")
    return training


def fit_task(prepared: Prepared) -> Task:
    """The task fitted on the held-out calibration examples (its temperature or
    thresholds, and the rejection rule), or as it is when its plan fits nothing."""
    calibration = prepared.calibration
    if not calibration.plan.fits_anything or calibration.examples is None:
        return prepared.task
    batches = prepared.validation_batches
    if calibration.plan.carve_out:
        batches = eval_pipeline(calibration.examples, len(prepared.class_names),
                                dataclasses.replace(prepared.recipe.data, cache="none"))
    return fit_after_training(prepared.classifier, prepared.task, calibration.plan, batches,
                              calibration.fitted_on, prepared.statistics_batches())


def evaluate_test_split(prepared: Prepared, task: Task, training: TrainingResult,
                        run_dir: Path, log: Callable[[str], None],
                        training_seconds: float | None = None) -> Evaluation:
    """Scores the test split with the fitted task, writes the report (with `report_about`
    and the small splits' warnings), logs the summary."""
    recipe, splits = prepared.recipe, prepared.splits
    evaluation = evaluate_classifier(prepared.classifier, test_batches(prepared),
                                     splits.class_names, recipe.evaluate.flip_tta, task,
                                     recipe.evaluate.shift_tta)
    for line in task.notes(evaluation.metrics):
        log(line)
    evaluation.skipped = list(splits.skipped)  # the report names them too
    evaluation.files = splits.evaluated_test_files()  # the mistakes' file names
    images = (mistake_images(splits, recipe, evaluation)
              if "confident_mistakes" in task.plots else None)
    write_report(run_dir, evaluation, task, splits.class_names, training.history,
                 [phase.to_dict() for phase in training.phases], images,
                 mistakes=recipe.evaluate.mistakes,
                 about=report_about(prepared, training, training_seconds),
                 warnings=prepared.small_splits,
                 sections=prepared.leaks.report_section() if prepared.leaks else None)
    log(f"{task.summary_line(evaluation.metrics, 1 / len(splits.class_names))}; report "
        f"{run_dir / REPORT_FILE}")
    if splits.skipped:
        log(skipped_files_line(splits.skipped))
    return evaluation


def report_about(prepared: Prepared, training: TrainingResult,
                 training_seconds: float | None) -> list[str]:
    """What report.md says the run was: its data, image size, epochs and duration."""
    recipe, sizes = prepared.recipe, prepared.splits.sizes
    test_source = recipe.data.test_source
    lines = [f"recipe `{recipe.name}`, data `{recipe.data.source}`"
             + (f", test data `{test_source}`" if test_source else "")
             + f": train {sizes['train']}, validation {sizes['validation']}, test "
             f"{sizes['test']} images, {len(prepared.class_names)} classes",
             f"image size {recipe.data.image_size} px ({recipe.data.resize}), backbone "
             f"`{recipe.model.backbone}`",
             "epochs: " + ", ".join(f"{phase.name} {phase.epochs}"
                                    + (" (stopped early)" if phase.stopped_early else "")
                                    for phase in training.phases)
             + (f" (time budget {recipe.train.time_budget})" if recipe.train.time_budget
                else "")]
    if training_seconds is not None:
        lines.append(f"duration: {training_seconds:.0f} s from the start of the run to the end "
                     "of training (the whole run's: `seconds` in run.json)")
    return lines


def evaluate_validation_split(prepared: Prepared, task: Task,
                              log: Callable[[str], None]) -> Evaluation:
    """Scores the validation split with the fitted task (a run with `evaluate.test=false`)."""
    if prepared.validation_batches is None:
        raise ConfigError("evaluate.test=false scores the run on the validation split, and "
                          "this recipe has none: set data.validation_fraction above 0.")
    evaluation = evaluate_classifier(prepared.classifier, prepared.validation_batches,
                                     prepared.class_names, task=task)
    log(f"validation {task.headline(evaluation.metrics)} (evaluate.test=false: the test "
        "split was not read, no report or export)")
    return evaluation


def publish(prepared: Prepared, task: Task, metrics: dict[str, Any], run_dir: Path,
            log: Callable[[str], None]) -> Path | None:
    """Writes the samples and, for a task `kcls monitor` supports, the reference profile,
    then exports; returns the version written, or None with export off."""
    recipe = prepared.recipe
    exported = exported_version(run_dir)
    if exported is not None:  # killed after its export: that version is this run's
        log(f"the export of this run is there already: {exported}")
        return exported
    write_samples(prepared.splits, recipe, task, run_dir / SAMPLES_DIR)
    reference = None
    if task.supports_monitoring:
        reference = reference_profile(prepared.classifier, reference_batches(prepared),
                                      prepared.class_names, task, recipe.export.flip_tta,
                                      split=REFERENCE_SPLITS if recipe.evaluate.test
                                      else "validation", shift_tta=recipe.export.shift_tta)
        write_json(run_dir / RUN_REFERENCE_FILE, reference, indent=None)
        warning = small_reference_warning(reference["examples"])
        if warning:
            log(f"warning: {warning}")
    if not recipe.export.enabled:
        return None
    export_dir = export_saved_model(prepared.classifier, recipe, prepared.class_names, metrics,
                                    task=task, reference=reference,
                                    test_files=prepared.splits.test_files,
                                    parity_examples=prepared.splits.test)
    record_state(run_dir, export_dir=str(export_dir))
    log(f"exported float32 SavedModel to {export_dir}" + (
        "" if reference is not None else " (no reference profile: `kcls monitor` handles "
        "single-label models only)"))
    if recipe.export.onnx:
        log(onnx_line(export_dir))
    return export_dir


def test_batches(prepared: Prepared) -> tf.data.Dataset:
    """The test split's evaluation batches (cached like the other splits)."""
    splits = prepared.splits
    return eval_pipeline(splits.test, len(splits.class_names), prepared.recipe.data, "test",
                         splits.fingerprint)


def reference_batches(prepared: Prepared) -> tf.data.Dataset:
    """Every image the run held out from training, the reference profile's data: the
    test split and the validation split (or, without one, the calibration carve-out);
    the validation images only with `evaluate.test=false`, which never reads the test split."""
    examples, held_out = prepared.splits.test, prepared.calibration.examples
    if not prepared.recipe.evaluate.test:
        examples, held_out = held_out, None
    if held_out is not None:
        examples = examples.concatenate(held_out)
    return eval_pipeline(examples, len(prepared.class_names),
                         dataclasses.replace(prepared.recipe.data, cache="none"))


def run_record(prepared: Prepared, training: TrainingResult, task: Task,
               evaluation: Evaluation, export_dir: Path | None, seconds: dict[str, float],
               time_budget: TimeBudget | None) -> dict[str, Any]:
    """run.json: versions, the resolved settings (`Prepared.record`), the training, the
    fitted task, the test metrics, the data's skipped files, the export and timings."""
    record = {**software_versions(), **prepared.record(), **training_record(training, prepared),
              "metrics": evaluation.metrics, **task_record(task, evaluation.metrics,
                                                           prepared.calibration),
              "class_names": prepared.class_names, "skipped_files": prepared.splits.skipped,
              "test_files": prepared.splits.test_files,  # what `kcls evaluate` scores
              "evaluated_split": "test" if prepared.recipe.evaluate.test else "validation",
              "export_dir": str(export_dir) if export_dir else None, "seconds": seconds}
    if training.jit_compile != prepared.train_config.jit_compile:
        record["jit_compile_reason"] = (f"{prepared.jit_compile_reason}; off: a layer of the "
                                        "classifier does not support XLA")
    if time_budget is not None:
        record["time_budget"] = time_budget.summary()
    elif training.time_budget is not None:  # resumed after training
        record["time_budget"] = training.time_budget
    return record


def training_record(training: TrainingResult, prepared: Prepared) -> dict[str, Any]:
    """What run.json records of the training phases, with where augmentation ran (the
    stages the pipeline ran on the host beside those the training step ran)."""
    host = prepared.host_augmentation.stage_names if prepared.host_augmentation else []
    augmentation = training.augmentation and {**training.augmentation, "host": host}
    return {"jit_compile": training.jit_compile, "augmentation": augmentation,
            "phases": [phase.to_dict() for phase in training.phases],
            "history": training.history, "resumed": training.resumed,
            "best_weights": training.best_weights}


def task_record(task: Task, metrics: dict[str, Any],
                calibration: Calibration | None = None) -> dict[str, Any]:
    """What run.json records of the fitted task: the temperature, the calibration (with
    why none was fitted when too few images were held out: T=1) and the rejection rule."""
    if calibration is not None and calibration.plan.skipped:
        return {"temperature": 1.0, "calibration": calibration.record(),
                "rejection": task.metadata()["rejection"]}
    return {"temperature": task.metadata()["temperature"],
            "calibration": metrics.get("calibration", {"method": "none"}),
            "rejection": task.metadata()["rejection"]}


def budget_line(budget: TimeBudget) -> str:
    """One line: planned vs actual epochs per phase, and the time used of the budget."""
    phases = ", ".join(
        f"{plan['phase']} {plan.get('actual_epochs')} epochs (first planned "
        f"{plan.get('first_planned_epochs')}, {1000 * plan.get('step_seconds', 0):.0f} ms/step"
        + ("; stopped early on a validation plateau" if plan.get("stopped_early") else "")
        + ")" for plan in budget.plans)
    overrun = budget.overrun()
    return (f"time budget {budget.seconds:.0f} s from the first training step: {phases}; "
            f"used {budget.elapsed():.0f} s" + (f": {overrun}" if overrun else ""))


def mistake_images(splits: Splits, recipe: Recipe,
                   evaluation: Evaluation) -> dict[int, np.ndarray]:
    """The test images (uint8, model input size) of the report's confident mistakes."""
    wanted = set(confident_mistakes(evaluation, recipe.evaluate.mistakes).tolist())
    return {index: tf.cast(tf.round(prepare_image(image, recipe.data.image_size,
                                                  recipe.data.resize)), tf.uint8).numpy()
            for index, (image, _) in enumerate(splits.test.as_numpy_iterator())
            if index in wanted}


def write_samples(splits: Splits, recipe: Recipe, task: Task, folder: Path) -> None:
    """Saves `SAMPLE_IMAGES` test images as `<index>_<class>.png`, resized to the model
    input (the class name escaped by `kcls.files.safe_file_name`), drawn across the
    classes: at most `ceil(SAMPLE_IMAGES / classes)` of each (a folder's test split is
    listed class by class), in one pass that stops when they are found."""
    folder.mkdir(parents=True, exist_ok=True)
    quota = math.ceil(SAMPLE_IMAGES / max(len(splits.class_names), 1))
    taken: dict[str, int] = {}
    for index, (image, label) in enumerate(splits.test.as_numpy_iterator()):
        names = task.label_names(label, splits.class_names)
        key = "+".join(names)
        if taken.get(key, 0) >= quota:
            continue
        taken[key] = taken.get(key, 0) + 1
        resized = tf.cast(tf.round(prepare_image(image, recipe.data.image_size,
                                                 recipe.data.resize)), tf.uint8)
        write_bytes(folder / f"{index}_{safe_file_name(key)}.png",
                    tf.io.encode_png(resized).numpy())
        if sum(taken.values()) == SAMPLE_IMAGES:
            break


__all__ = ["RunResult", "run_recipe"]
