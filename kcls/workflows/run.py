"""`run_recipe`: data, model, the two training phases, evaluation and export, in one call.

This is what `kcls recipe run` and notebooks call. Each step is a library function;
this module only wires them together and writes the run directory:

    <run_dir>/config.json    the resolved recipe
    <run_dir>/run.json       versions, device, precision, per-phase history, metrics, timings
    <run_dir>/metrics.json   test-split metrics (per class, confusion matrix, calibration)
    <run_dir>/report.md      the metrics as tables, with the plots below
    <run_dir>/*.png          training curves, confusion matrix, reliability, confident mistakes
    <run_dir>/reference.json the test split's reference profile (`kcls.monitoring.profile`), exported
                             for `kcls monitor`
    <run_dir>/model.weights.h5  trained weights, re-exported by `kcls export RUN_DIR`
    <run_dir>/samples/       a few held-out test images as PNG, handy for `kcls predict`
    <run_dir>/logs/          TensorBoard logs of both training phases
    <run_dir>/best.weights.h5  classifier weights of the best validation epoch
    <run_dir>/lr_find_*.png  with train.learning_rate=auto: each phase's learning-rate
                             range test (loss against rate, the rate chosen marked)
    <run_dir>/backup/        resume state while training (see `kcls.train.phases`):
                             run again with the same run_dir to resume a killed run
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kcls import __version__
from kcls.config import (
    Calibrate,
    ClassWeights,
    ConfigError,
    DataConfig,
    Recipe,
    Task,
    parse_duration,
    require_choice,
    to_json,
)
from kcls.data.augment import build_augmentation, place_augmentation
from kcls.data.folder import skipped_files_line
from kcls.data.pipeline import (
    balanced_class_weights,
    eval_pipeline,
    prepare_image,
    train_pipeline,
)
from kcls.data.sources import (
    Splits,
    carve_calibration_split,
    load_splits,
    train_class_counts,
)
from kcls.evaluation.evaluate import evaluate_classifier, predict_logits, predict_multilabel
from kcls.evaluation.report import confident_mistakes, write_multilabel_report, write_report
from kcls.files import save_weights, write_json, write_text
from kcls.layout import (
    LR_FIND_FILE,
    LR_FIND_PHASE_PLOT,
    LR_FIND_PLOT,
    REPORT_FILE,
    RUN_CONFIG_FILE,
    RUN_INFO_FILE,
    RUN_REFERENCE_FILE,
    SAMPLES_DIR,
    WEIGHTS_FILE,
)
from kcls.metrics.calibration import fit_temperature
from kcls.metrics.classification import (
    Evaluation,
    class_balance_warning,
    summary_metrics,
)
from kcls.metrics.multilabel import DEFAULT_THRESHOLD, multilabel_metrics, tune_thresholds
from kcls.models.classifier import build_classifier
from kcls.monitoring.profile import reference_profile
from kcls.serving.export import export_saved_model
from kcls.train.budget import TimeBudget
from kcls.train.compute import (
    describe_devices,
    describe_strategy,
    make_strategy,
    resolve_jit_compile,
    resolve_precision,
)
from kcls.train.losses import task_loss_and_metrics
from kcls.train.lr_find import STEPS as LR_FIND_STEPS
from kcls.train.lr_find import LearningRateSearch, plot_learning_rate_search
from kcls.train.phases import TrainingResult, find_phase_learning_rate, fit_phases
from kcls.train.progress import check_resumable
from kcls.train.schedule import plan_phases, resolve_train_batchnorm
from kcls.workflows.run_directory import check_run_dir, claim_run_dir

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
        metrics: test-split metrics (`accuracy`, `nll`, ...).
        export_dir: Path of the SavedModel version written, or None when export is off.
        history: per-epoch metrics over both phases.
        classifier: the trained keras.Model (in the training precision).
        class_names: list[str].
    """

    run_dir: Path
    metrics: dict[str, Any]
    export_dir: Path | None
    history: dict[str, list[float]]
    classifier: keras.Model = field(repr=False)
    class_names: list[str] = field(default_factory=list)


def run_recipe(recipe: Recipe, run_dir: str | Path | None = None,
               log: Callable[[str], None] = print, verbose: int | str = "auto",
               splits: Splits | None = None) -> RunResult:
    """Trains, evaluates and exports `recipe`.

    Args:
        recipe: Recipe, the resolved configuration.
        run_dir: where logs and reports go; default `runs/<recipe>/<timestamp>`.
        log: receives one-line progress messages.
        verbose: Keras `fit()` verbosity (progress bar by default, 0 for none).
        splits: data to use instead of `recipe.data.source`, e.g. in-memory arrays from
            `kcls.data.sources.splits_from_arrays` in a notebook.

    Returns:
        RunResult with the metrics and the export path.

    Raises:
        ConfigError: data, backbone or weights that cannot be found (raised before
            any training starts).
    """
    started = time.time()
    # First: multi-worker and TPU strategies must be set up before TensorFlow runs anything.
    strategy = make_strategy(recipe.train.strategy)
    # Everything that can refuse the run is checked before the run directory is written.
    if run_dir is not None:
        check_run_dir(run_dir)
    check_cache_writable(recipe.data)
    splits = splits or load_splits(recipe.data)
    multilabel = recipe.model.task == "multilabel"
    check_task(splits, recipe.model.task, recipe.data.source)
    calibrate = resolve_calibrate(recipe.evaluate.calibrate,
                                  splits.validation is not None and not multilabel)
    calibration_examples, calibration_count = splits.validation, splits.sizes["validation"]
    if calibrate == "temperature" and splits.validation is None:
        train_count = splits.sizes["train"]
        splits, calibration_examples = carve_calibration_split(splits)
        calibration_count = train_count - splits.sizes["train"]
    num_classes = len(splits.class_names)
    steps_per_epoch = max(splits.sizes["train"] // recipe.data.batch_size, 1)
    if recipe.train.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, recipe.train.steps_per_epoch)
    precision = resolve_precision(recipe.train.precision)
    jit_compile, jit_compile_reason = resolve_jit_compile(recipe.train.jit_compile,
                                                          recipe.model.backbone)
    train_config = dataclasses.replace(
        recipe.train, jit_compile=jit_compile,
        train_batchnorm=resolve_train_batchnorm(recipe.train, recipe.model.weights))
    if run_dir is not None and recipe.train.time_budget is None:
        check_resumable(run_dir, train_config, steps_per_epoch)
    keras.utils.set_random_seed(recipe.train.seed)
    with strategy.scope():
        classifier = build_classifier(recipe.model, num_classes, recipe.data.image_size,
                                      precision)
    with claim_run_dir(run_dir, recipe.name, log) as run_dir:
        write_text(run_dir / RUN_CONFIG_FILE, to_json(recipe))
        log(f"kcls {__version__} | recipe {recipe.name} | {describe_devices()} | "
            f"{describe_strategy(strategy)} | {precision} | XLA {'on' if jit_compile else 'off'} "
            f"({jit_compile_reason}) | "
            f"{len(splits.class_names)} classes | train {splits.sizes['train']}, "
            f"validation {splits.sizes['validation']}, test {splits.sizes['test']} | "
            f"run dir {run_dir}")
        if calibrate == "temperature" and splits.validation is None:
            log(f"{calibration_count} training images held out to fit the calibration "
                "temperature (no validation split; evaluate.calibrate=temperature)")

        augmentation = build_augmentation(recipe.data.augment, recipe.data.horizontal_flip,
                                          recipe.data.seed, recipe.data.mixup, recipe.data.cutmix)
        host_augmentation, augmentation = place_augmentation(augmentation, strategy)
        if host_augmentation is not None:
            log(f"augmentation {', '.join(host_augmentation.stage_names)} on the host (tf.data): "
                "TPUs run only XLA-compiled programs and these stages have ops XLA cannot compile")
        class_weights, positive_weights = loss_weights(recipe, splits)
        if positive_weights is not None:
            log("positive weights per label (balanced): " + ", ".join(
                f"{name} {weight:.2f}"
                for name, weight in zip(splits.class_names, positive_weights)))
        if class_weights is not None:
            log("class weights (balanced): " + ", ".join(
                f"{name} {weight:.2f}" for name, weight in zip(splits.class_names, class_weights)))
        time_budget = None
        if recipe.train.time_budget is not None:
            time_budget = TimeBudget(
                parse_duration(recipe.train.time_budget),
                evaluation_images=splits.sizes["test"] * (2 if recipe.evaluate.flip_tta else 1)
                + splits.sizes["test"] * (2 if recipe.export.flip_tta else 1)  # the profile
                + (calibration_count if calibrate == "temperature" else 0),
                fixed_seconds=AFTER_TRAINING_SECONDS if recipe.export.enabled
                else AFTER_TRAINING_SECONDS / 2)
        validation_batches = None
        if splits.validation is not None:
            validation_batches = eval_pipeline(splits.validation, num_classes, recipe.data,
                                               "validation", splits.fingerprint)
        training = fit_phases(
            classifier,
            train_pipeline(splits.train, num_classes, recipe.data, class_weights,
                           splits.fingerprint, host_augment=host_augmentation),
            validation_batches,
            steps_per_epoch, train_config, augmentation, verbose=verbose, run_dir=run_dir,
            strategy=strategy, time_budget=time_budget,
            objective=lambda: task_loss_and_metrics(recipe.model.task,
                                                    recipe.train.label_smoothing,
                                                    positive_weights))
        if training.resumed:
            log("resumed an interrupted run: " + ", ".join(
                f"{phase.name} {'done before' if phase.skipped_on_resume else 'continued'}"
                for phase in training.phases))
        searched = [phase for phase in training.phases if phase.learning_rate_search is not None]
        if searched:
            log("learning rates found by the range test (minimum/10): " + ", ".join(
                f"{phase.name} {phase.learning_rate:.2e}" for phase in searched)
                + f"; plots {run_dir / LR_FIND_PHASE_PLOT.format(phase='*')}")
        trained = time.time()
        save_weights(classifier, run_dir / WEIGHTS_FILE)  # for `kcls export RUN_DIR`

        temperature, calibration = None, {"method": "none"}
        if multilabel:
            metrics, export_dir = _evaluate_multilabel(
                classifier, recipe, splits, validation_batches, training, run_dir, log)
        else:
            if calibrate == "temperature":
                calibration_batches = validation_batches or eval_pipeline(
                    calibration_examples, num_classes,
                    dataclasses.replace(recipe.data, cache="none"))
                temperature, calibration = fit_calibration(
                    classifier, calibration_batches,
                    "validation split" if splits.validation is not None
                    else "training carve-out (no validation split)")
            test_batches = eval_pipeline(splits.test, num_classes, recipe.data, "test",
                                         splits.fingerprint)
            evaluation = evaluate_classifier(classifier, test_batches, splits.class_names,
                                             flip_tta=recipe.evaluate.flip_tta,
                                             temperature=temperature)
            metrics = evaluation.metrics
            if temperature is not None:
                metrics["calibration"].update(calibration)
                before, after = metrics["calibration"]["before"], metrics["calibration"]["after"]
                log(f"temperature scaling: T {temperature:.3f} fitted on "
                    f"{calibration['fitted_on']} "
                    f"({calibration['fit_examples']} images); test nll {before['nll']:.4f} -> "
                    f"{after['nll']:.4f}, ece {before['ece']:.4f} -> {after['ece']:.4f}")
            calibration = metrics.get("calibration", calibration)
            support = {name: row["support"] for name, row in metrics["per_class"].items()}
            log("test support per class: " + ", ".join(f"{n} {c}" for n, c in support.items()))
            imbalance = class_balance_warning(support)
            if imbalance:
                log(f"warning: {imbalance}")
            evaluation.skipped = list(splits.skipped)  # the report names them too
            write_report(run_dir, evaluation, splits.class_names, training.history,
                         [phase.to_dict() for phase in training.phases],
                         _mistake_images(splits, recipe, evaluation),
                         mistakes=recipe.evaluate.mistakes)
            log(f"test accuracy {metrics['accuracy']:.4f} on {metrics['examples']} held-out "
                f"images (chance {1 / num_classes:.4f}), nll {metrics['nll']:.4f}, ece "
                f"{metrics['ece']:.4f}"
                + (f"; flip TTA accuracy {metrics['tta']['accuracy']:.4f}"
                   if "tta" in metrics else "")
                + f"; report {run_dir / REPORT_FILE}")
            if splits.skipped:
                log(skipped_files_line(splits.skipped))
            _write_samples(splits, recipe, run_dir / SAMPLES_DIR)
            reference = reference_profile(classifier, test_batches, splits.class_names,
                                          temperature, recipe.export.flip_tta)
            write_json(run_dir / RUN_REFERENCE_FILE, reference)

            export_dir = None
            if recipe.export.enabled:
                export_dir = export_saved_model(classifier, recipe, splits.class_names, metrics,
                                                temperature=temperature, reference=reference)
                log(f"exported float32 SavedModel to {export_dir}")

        run_info = {
            "kcls_version": __version__, "tensorflow_version": tf.__version__,
            "keras_version": keras.__version__, "devices": describe_devices(),
            "strategy": describe_strategy(strategy),
            "precision": precision, "jit_compile": training.jit_compile,
            "jit_compile_reason": jit_compile_reason if training.jit_compile == jit_compile
            else f"{jit_compile_reason}; off: a layer of the classifier does not support XLA",
            "augmentation": training.augmentation and {
                **training.augmentation,
                "host": host_augmentation.stage_names if host_augmentation else []},
            "train_batchnorm": train_config.train_batchnorm,
            "seed": recipe.train.seed, "steps_per_epoch": steps_per_epoch,
            "global_batch_size": recipe.data.batch_size,
            "class_weights": None if class_weights is None else dict(
                zip(splits.class_names, np.round(class_weights, 4).tolist())),
            "task": recipe.model.task,
            "positive_weights": None if positive_weights is None else dict(
                zip(splits.class_names, np.round(positive_weights, 4).tolist())),
            "phases": [phase.to_dict() for phase in training.phases],
            "history": training.history,
            "resumed": training.resumed, "best_weights": training.best_weights,
            "metrics": metrics, "temperature": temperature, "calibration": calibration,
            "class_names": splits.class_names,
            "skipped_files": splits.skipped, "export_dir": str(export_dir) if export_dir else None,
            "seconds": {"training": round(trained - started, 1),
                        "total": round(time.time() - started, 1)},
        }
        if time_budget is not None:
            run_info["time_budget"] = time_budget.summary()
            log(_budget_line(time_budget))
        write_json(run_dir / RUN_INFO_FILE, run_info)
        return RunResult(run_dir, metrics, export_dir, training.history, classifier,
                         splits.class_names)


def headline(metrics: dict[str, Any]) -> str:
    """The test metric(s) a run is judged by, for one line: accuracy, or for a multi-label
    model mAP and micro F1."""
    if metrics.get("task") == "multilabel":
        return f"mAP {metrics['mAP']:.4f}, micro F1 {metrics['micro_f1']:.4f}"
    return f"accuracy {metrics['accuracy']:.4f}"


def check_task(splits: Splits, task: str, source: str) -> None:
    """Raises unless the labels of `splits` suit `task` (`model.task`).

    Raises:
        ConfigError: multi-hot labels (a manifest) with `multiclass`, or class indices
            with `multilabel`, naming the setting to change.
    """
    require_choice(task, Task, "model.task")
    label_rank = len(splits.train.element_spec[1].shape)
    if task == "multiclass" and label_rank == 1:
        raise ConfigError(
            f"data.source={source!r} gives each image a set of labels: set "
            "model.task=multilabel.")
    if task == "multilabel" and label_rank == 0:
        raise ConfigError(
            f"data.source={source!r} gives each image one class; model.task=multilabel "
            "needs sets of labels: use a manifest (data.source=manifest:PATH.csv, see "
            "docs/multilabel.md) or model.task=multiclass.")


def loss_weights(recipe: Recipe, splits: Splits) -> tuple[np.ndarray | None, np.ndarray | None]:
    """`train.class_weights` for the data of `splits`: `(class_weights, positive_weights)`.

    Returns:
        With `balanced`, per-class weights float `[C]` for single-label data
        (`balanced_class_weights`) or per-label positive weights float `[C]` for
        multi-label data (`balanced_positive_weights`), the other None; `(None, None)`
        with `none`.
    """
    require_choice(recipe.train.class_weights, ClassWeights, "train.class_weights")
    if recipe.train.class_weights != "balanced":
        return None, None
    if recipe.model.task == "multilabel":
        targets = splits.train_labels  # TFDS keeps none: one pass over the labels
        if targets is None:
            targets = np.stack([label for _, label in splits.train.as_numpy_iterator()])
        return None, balanced_positive_weights(targets)
    return balanced_class_weights(train_class_counts(splits)), None


def balanced_positive_weights(targets: np.ndarray) -> np.ndarray:
    """Per-label weights of the positives, `negatives / positives` of the training labels
    (float `[N, C]` multi-hot), so that each label's positives and negatives weigh the
    same in the loss; 1 for a label without positives."""
    positives = np.asarray(targets, np.float64).sum(axis=0)
    negatives = len(targets) - positives
    return np.where(positives > 0, negatives / np.maximum(positives, 1), 1.0)


def _evaluate_multilabel(classifier: keras.Model, recipe: Recipe, splits: Splits,
                         validation_batches: tf.data.Dataset | None,
                         training: TrainingResult, run_dir: Path,
                         log: Callable[[str], None]) -> tuple[dict[str, Any], Path | None]:
    """Tunes per-label thresholds on the validation split (0.5 without one), evaluates the
    test split, writes the report and the samples, and exports.

    Returns:
        `(test metrics, export version directory or None)`.
    """
    num_classes = len(splits.class_names)
    thresholds, tuned_on = np.full(num_classes, DEFAULT_THRESHOLD), "default 0.5"
    if validation_batches is not None:
        thresholds = tune_thresholds(*predict_multilabel(classifier, validation_batches))
        tuned_on = f"validation split ({splits.sizes['validation']} images)"
    test_batches = eval_pipeline(splits.test, num_classes, recipe.data, "test",
                                 splits.fingerprint)
    probabilities, targets = predict_multilabel(classifier, test_batches)
    metrics = multilabel_metrics(probabilities, targets, thresholds, splits.class_names)
    metrics["thresholds_tuned_on"] = tuned_on
    write_multilabel_report(run_dir, metrics, probabilities, targets, splits.class_names,
                            training.history, [phase.to_dict() for phase in training.phases],
                            list(splits.skipped))
    log(f"test mAP {metrics['mAP']:.4f}, micro F1 {metrics['micro_f1']:.4f}, macro F1 "
        f"{metrics['macro_f1']:.4f} on {metrics['examples']} held-out images (thresholds "
        f"tuned on the {tuned_on}; label cardinality {metrics['label_cardinality']:.2f}, "
        f"predicted {metrics['predicted_cardinality']:.2f}); report {run_dir / REPORT_FILE}")
    if splits.skipped:
        log(skipped_files_line(splits.skipped))
    _write_samples(splits, recipe, run_dir / SAMPLES_DIR)
    export_dir = None
    if recipe.export.enabled:
        export_dir = export_saved_model(classifier, recipe, splits.class_names, metrics,
                                        thresholds=thresholds.tolist())
        log(f"exported float32 SavedModel to {export_dir} (no reference profile: "
            "`kcls monitor` handles single-label models only)")
    return metrics, export_dir


def resolve_calibrate(calibrate: str, has_validation: bool) -> str:
    """`temperature` or `none`: what `evaluate.calibrate` (`auto` included) means here."""
    require_choice(calibrate, Calibrate, "evaluate.calibrate")
    if calibrate == "auto":
        return "temperature" if has_validation else "none"
    return calibrate


def fit_calibration(classifier: keras.Model, batches: tf.data.Dataset,
                    fitted_on: str) -> tuple[float, dict[str, Any]]:
    """The temperature of `classifier` fitted on held-out `batches`, and what to record.

    Returns:
        `(T, {"fitted_on", "fit_examples", "fit_nll_before", "fit_nll_after"})`, the NLLs
        on the fitting examples themselves.
    """
    logits, labels = predict_logits(classifier, batches)
    temperature = fit_temperature(logits, labels)
    return temperature, {
        "fitted_on": fitted_on, "fit_examples": int(len(labels)),
        "fit_nll_before": summary_metrics(logits, labels)["nll"],
        "fit_nll_after": summary_metrics(logits / temperature, labels)["nll"]}


def find_recipe_learning_rate(recipe: Recipe, phase: str | None = None,
                              out_dir: str | Path = ".", steps: int = LR_FIND_STEPS,
                              overwrite: bool = False, log: Callable[[str], None] = print,
                              verbose: int | str = 0,
                              splits: Splits | None = None) -> LearningRateSearch:
    """The learning-rate range test of one phase of `recipe`, on its data and model.

    `kcls lr-find` calls it. The model is the recipe's (pretrained weights, new head)
    frozen or unfrozen as `phase` trains it, with the recipe's optimizer, layer decay,
    loss, augmentation and batches; its weights are left unchanged. Writes
    `<out_dir>/lr_find.png` (loss against rate, the suggestion marked) and
    `<out_dir>/lr_find.json` (the curve and the suggestion). Under
    `train.learning_rate=auto` a run does this itself before each phase, the unfrozen
    phase's test then starting from the head the frozen phase trained.

    Args:
        recipe: Recipe, the resolved configuration.
        phase: `frozen` or `unfrozen`; None: the recipe's first phase.
        out_dir: folder for the plot and the JSON.
        steps: int, the most steps the test takes (one batch each).
        overwrite: replace an existing plot and JSON in `out_dir`.
        log: receives one-line progress messages.
        verbose: `fit()` verbosity.
        splits: data to use instead of `recipe.data.source`.

    Returns:
        LearningRateSearch: the curve and `suggestion`, the phase's peak rate.

    Raises:
        ConfigError: an unknown or empty phase, files in the way, or data, backbone or
            weights that cannot be found.
    """
    phases = {planned.name: planned for planned in plan_phases(recipe.train)}
    phase = phase or next(iter(phases))
    if phase not in phases:
        raise ConfigError(f"The recipe {recipe.name!r} has no {phase!r} phase (it trains "
                          f"{', '.join(phases)}): pick one of those, or give the phase epochs "
                          f"with --set train.{phase}_epochs=N.")
    out_dir = Path(out_dir)
    targets = [out_dir / LR_FIND_PLOT, out_dir / LR_FIND_FILE]
    existing = [str(path) for path in targets if path.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{', '.join(existing)} already exist: pass --overwrite to replace "
                          "them, or another --out folder.")
    strategy = make_strategy(recipe.train.strategy)
    check_cache_writable(recipe.data)
    splits = splits or load_splits(recipe.data)
    num_classes = len(splits.class_names)
    precision = resolve_precision(recipe.train.precision)
    jit_compile, _ = resolve_jit_compile(recipe.train.jit_compile, recipe.model.backbone)
    train_config = dataclasses.replace(
        recipe.train, jit_compile=jit_compile,
        train_batchnorm=resolve_train_batchnorm(recipe.train, recipe.model.weights))
    keras.utils.set_random_seed(recipe.train.seed)
    with strategy.scope():
        classifier = build_classifier(recipe.model, num_classes, recipe.data.image_size,
                                      precision)
    host_augmentation, augmentation = place_augmentation(build_augmentation(
        recipe.data.augment, recipe.data.horizontal_flip, recipe.data.seed, recipe.data.mixup,
        recipe.data.cutmix), strategy)
    class_weights, positive_weights = loss_weights(recipe, splits)
    log(f"learning-rate range test | recipe {recipe.name} | {phase} phase | at most {steps} "
        f"steps of batch {recipe.data.batch_size} | {precision} | train {splits.sizes['train']}")
    search = find_phase_learning_rate(
        classifier, train_pipeline(splits.train, num_classes, recipe.data, class_weights,
                                   splits.fingerprint, host_augment=host_augmentation),
        train_config, phases[phase], augmentation, strategy, steps=steps, verbose=verbose,
        objective=lambda: task_loss_and_metrics(recipe.model.task, recipe.train.label_smoothing,
                                                positive_weights))
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_learning_rate_search(search, targets[0],
                              title=f"{recipe.name}: learning-rate range test, {phase} phase")
    write_json(targets[1], {"recipe": recipe.name, "phase": phase, **asdict(search)}, indent=1)
    return search


def check_cache_writable(config: DataConfig) -> None:
    """Raises unless the folder of an on-disk `data.cache` prefix exists and can be written.

    tf.data neither creates the folder nor checks it before the first epoch ends, by
    which time the run directory exists: `run_recipe` checks first.

    Raises:
        ConfigError: naming the folder, the reason and the alternatives.
    """
    if config.cache in ("memory", "none"):
        return
    folder = Path(config.cache).expanduser().parent
    fix = "Use a writable folder, data.cache=memory (RAM) or data.cache=none."
    if not folder.is_dir():
        raise ConfigError(f"data.cache={config.cache!r}: the folder {str(folder)!r} does not "
                          f"exist. Create it (mkdir -p {folder}), or: {fix}")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ConfigError(f"data.cache={config.cache!r}: cannot write into {str(folder)!r} "
                          f"({error.strerror or error}). {fix}") from None


def _budget_line(budget: TimeBudget) -> str:
    """One line: planned vs actual epochs per phase, and the time used of the budget."""
    phases = ", ".join(
        f"{plan['phase']} {plan.get('actual_epochs')} epochs (first planned "
        f"{plan.get('first_planned_epochs')}, {1000 * plan.get('step_seconds', 0):.0f} ms/step)"
        for plan in budget.plans)
    return (f"time budget {budget.seconds:.0f} s from the first training step: {phases}; "
            f"used {budget.elapsed():.0f} s")


def _mistake_images(splits: Splits, recipe: Recipe,
                    evaluation: Evaluation) -> dict[int, np.ndarray]:
    """The test images (uint8, model input size) of the report's confident mistakes."""
    wanted = set(confident_mistakes(evaluation, recipe.evaluate.mistakes).tolist())
    return {index: tf.cast(tf.round(prepare_image(image, recipe.data.image_size,
                                                  recipe.data.resize)), tf.uint8).numpy()
            for index, (image, _) in enumerate(splits.test.as_numpy_iterator())
            if index in wanted}


def _write_samples(splits: Splits, recipe: Recipe, folder: Path) -> None:
    """Saves the first test images as `<index>_<class>.png`, resized to the model input."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(splits.test.take(SAMPLE_IMAGES)):
        resized = tf.cast(tf.round(prepare_image(image, recipe.data.image_size,
                                                 recipe.data.resize)), tf.uint8)
        names = ([splits.class_names[int(label)]] if np.ndim(label) == 0 else
                 [splits.class_names[i] for i in np.flatnonzero(label.numpy() > 0.5)])
        name = f"{index}_{'+'.join(names)}.png".replace("/", "_")
        tf.io.write_file(str(folder / name), tf.io.encode_png(resized))


__all__ = ["RunResult", "check_cache_writable", "find_recipe_learning_rate", "headline",
           "run_recipe"]
