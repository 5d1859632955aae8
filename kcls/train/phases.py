"""Fitting the phases: compile, callbacks, fit, BatchNorm re-estimation, resuming and history.

`fit_phases` runs the phases of `kcls.train.schedule.plan_phases` (frozen, then unfrozen
backbone) as named steps: check the settings, open the resume state, then per phase
start it (weights, trainable layers), find its learning rate (`train.learning_rate=auto`),
compile the `kcls.train.trainer.Trainer`, build the callbacks, fit, and finish it
(`train.wise_ft`'s interpolation, BatchNorm re-estimation, its `PhaseRecord`, its end
weights); then finish the run.

With a run directory, `fit_phases` writes

    <run_dir>/logs/                TensorBoard logs (both phases, one epoch axis;
                                   `tensorboard --logdir <run_dir>/logs`)
    <run_dir>/best.weights.h5      classifier weights of the best epoch so far (lowest
                                   val_loss, or loss without validation data)
    <run_dir>/lr_find_<phase>.png  with `train.learning_rate=auto`: the phase's range test
    <run_dir>/backup/              resume state, deleted when all phases are done:
        progress.json              per-epoch logs, the phases already completed and the
                                   range tests' outcomes (`kcls.train.progress`)
        <phase>.weights.h5         classifier weights at the end of a completed phase
        <phase>/                   Keras BackupAndRestore of the running phase (model,
                                   optimizer and epoch at the last epoch end)

Under MultiWorkerMirroredStrategy every worker runs all of this, reads the resume state
from the chief's run directory (storage all workers share) and trains the same steps;
only the chief writes these files, the others write the callbacks' copies into their
scratch folders (`kcls.train.cluster.Worker.write_path`), deleted at the end. The
decisions are the chief's (a budget's plan, a learning rate found), or the same on every
worker because they read all-reduced logs (early stopping, the range test's stop).

and a killed run started again with the same run directory resumes: completed phases
are skipped (their end weights are loaded), the interrupted phase continues from its
last finished epoch, and the epoch counter and history come out as if uninterrupted.
`BackupAndRestore` alone cannot do this across phases: it deletes its backup at the
end of every `fit()` call and restores an optimizer of the phase it was saved in. A run
with a time budget keeps no backup and does not resume.

Example:

>>> result = fit_phases(classifier, train_batches, validation_batches, steps_per_epoch=20,
...                     config=recipe.train, run_dir="runs/demo")  # doctest: +SKIP
>>> [record.to_dict() for record in result.phases]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kcls.config import ConfigError, TrainConfig
from kcls.data.augment import Augmentation, compiles_with_xla
from kcls.layout import BACKUP_DIR, BEST_WEIGHTS_FILE, LOGS_DIR, LR_FIND_PHASE_PLOT
from kcls.tasks import LossWeights, Objective, SingleLabelTask
from kcls.train.batchnorm import PreciseBatchNorm, recalibrate_batchnorm, synchronize_batchnorm
from kcls.train.budget import MAX_EPOCHS, BudgetPlanner, BudgetProgress, TimeBudget
from kcls.train.cluster import (
    Worker,
    WorkerBackupAndRestore,
    barrier,
    broadcast_from_chief,
    is_multiworker,
    worker_of,
)
from kcls.train.interpolate import interpolate_weights, snapshot_weights
from kcls.train.layerwise import layer_decay_multipliers
from kcls.train.lr_find import (
    LearningRateSearch,
    find_learning_rate,
    plot_learning_rate_search,
)
from kcls.train.progress import PhaseRecord, TrainingProgress, schedule_fingerprint
from kcls.train.schedule import (
    Phase,
    WarmupCosine,
    make_optimizer,
    plan_phases,
    set_backbone_trainable,
)
from kcls.train.trainer import ClassifierCheckpoint, Trainer


@dataclass
class TrainingResult:
    """What `fit_phases` did.

    Attributes:
        history: metric name -> its per-epoch values over all phases (one epoch axis).
        phases: one PhaseRecord per phase, in order; run.json's `phases` holds their
            `to_dict()`.
        jit_compile: whether the compiled step used XLA (false when a layer of the
            classifier does not support it, even if requested).
        augmentation: where augmentation ran: `host` (empty here: `fit_phases` sees only
            the device's stages) and `device` stage names, `compiled` (augmentation under
            XLA, None without augmentation) and `model_step_compiled`, read from the
            traced training function by `Trainer.compiled_functions`; None when every
            phase was skipped on resume.
        resumed: whether earlier progress in the run directory was picked up.
        best_weights: path of the best checkpoint, or None (no run directory).
        time_budget: with a budget, its plan per phase next to the actual epochs and
            seconds (`TimeBudget.summary`); else None.
    """

    history: dict[str, list[float]]
    phases: list[PhaseRecord]
    jit_compile: bool
    augmentation: dict[str, Any] | None
    resumed: bool
    best_weights: str | None
    time_budget: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what a run directory keeps to resume after training."""
        return {**dataclasses.asdict(self), "phases": [phase.to_dict() for phase in self.phases]}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> TrainingResult:
        """The inverse of `to_dict`."""
        return cls(**{**record, "phases": [PhaseRecord(**phase) for phase in record["phases"]]})


@dataclass
class _PhaseRun:
    """What the steps of one `fit_phases` call share: its inputs and its resume state."""

    classifier: keras.Model
    train_batches: tf.data.Dataset
    validation_batches: tf.data.Dataset | None
    steps_per_epoch: int
    config: TrainConfig
    device_augment: Augmentation | None
    extra_callbacks: list[keras.callbacks.Callback]
    verbose: int | str
    strategy: tf.distribute.Strategy
    worker: Worker
    time_budget: TimeBudget | None
    objective: Objective
    run_dir: Path | None
    backup_dir: Path | None  # the chief's; None when the run cannot resume
    progress: TrainingProgress
    resumed: bool
    monitor: str  # the log the best checkpoint and early stopping watch
    best_checkpoint: ClassifierCheckpoint | None  # one for all phases: it keeps the best
    log: Callable[[str], None]  # the phases' announcements and the planner's warnings
    # With train.wise_ft: the weights the frozen phase ended with, taken as the
    # backbone-training phase starts (`kcls.train.interpolate`).
    frozen_end_weights: list[np.ndarray] | None = None


def fit_phases(classifier: keras.Model, train_batches: tf.data.Dataset,
               validation_batches: tf.data.Dataset | None, steps_per_epoch: int,
               config: TrainConfig, device_augment: Augmentation | None = None,
               callbacks: list[keras.callbacks.Callback] | None = None,
               verbose: int | str = "auto", *, run_dir: str | Path | None = None,
               strategy: tf.distribute.Strategy | None = None,
               time_budget: TimeBudget | None = None,
               objective: Objective | None = None,
               log: Callable[[str], None] | None = None) -> TrainingResult:
    """Runs the frozen and unfrozen phases with `fit()`, continuing one epoch counter.

    Args:
        classifier: keras.Model from `build_classifier`, built in `strategy.scope()`.
        train_batches: infinite dataset of `(float32 [B, S, S, 3], float32 [B, C] labels)`,
            B the global batch size, optionally with float32 `[B]` per-example loss weights.
        validation_batches: finite dataset of the same structure, or None.
        steps_per_epoch: int, training steps per epoch.
        config: TrainConfig, the schedule, with its automatic settings resolved:
            `jit_compile` true or false (`kcls.train.compute.resolve_jit_compile`) and,
            when a phase trains the backbone, `train_batchnorm` true or false
            (`kcls.train.schedule.resolve_train_batchnorm`); `run_recipe` resolves both.
            `learning_rate=auto` runs the range test (`find_phase_learning_rate`) before
            each phase, plotted into `run_dir` (`lr_find_<phase>.png`); `layer_decay`
            gives the backbone blocks layer-wise rates (`kcls.train.layerwise`).
        device_augment: augmentation (`kcls.data.augment.build_augmentation`) run on
            the device by the training function, before the model step; or None.
        callbacks: extra callbacks for every phase.
        verbose: `fit()` verbosity (progress bar by default).
        run_dir: where TensorBoard logs, the best weights and the resume backup go (see
            the module docstring); None keeps everything in memory and cannot resume.
        strategy: the strategy `classifier` was built under; None for the current one.
        time_budget: plan each phase's epochs from the measured step time to fit this
            budget (see `kcls.train.budget`); the configured epochs then only set the
            phases' shares, and a phase stops on a validation plateau (`_patience`). A
            budgeted run is planned for one sitting: it does not resume.
        objective: called once per compile (in the strategy's scope), returns a fresh
            loss on logits and fresh training metrics, `(keras.losses.Loss,
            list[keras.metrics.Metric])`; None for single-label softmax cross-entropy on
            one-hot labels with `config.label_smoothing`, and accuracy.
        log: receives each phase's `phase_line`, early stops and budget warnings.

    Returns:
        TrainingResult: the history over all phases, one PhaseRecord per phase, what
        the compiled step ran, whether the run resumed, and the best checkpoint.

    Raises:
        ConfigError: a TPU strategy with augmentation ops XLA cannot compile, or a run
            directory whose interrupted run had another schedule.
        ValueError: `jit_compile` or (with a backbone-training phase) `train_batchnorm`
            left unresolved.
    """
    phases = plan_phases(config)
    strategy = strategy or tf.distribute.get_strategy()
    _check_settings(config, phases, strategy, device_augment)
    objective = objective or _default_objective(config)
    run = _open_run(classifier, train_batches, validation_batches, steps_per_epoch, config,
                    device_augment, callbacks or [], verbose, strategy, time_budget,
                    objective, run_dir, log)
    records: list[PhaseRecord] = []
    jit_compile, compiled = config.jit_compile, None
    for index, phase in enumerate(phases):
        first_epoch = records[-1].end_epoch if records else 0
        if phase.name in run.progress.completed:
            records.append(dataclasses.replace(run.progress.completed[phase.name],
                                               skipped_on_resume=True))
            continue
        _start_phase(run, phase, records)
        learning_rate = _peak_learning_rate(run, phase)
        trainer, schedule = _compile_trainer(run, phase, learning_rate)
        phase_callbacks, epochs = _phase_callbacks(run, phase, phases[index:], schedule,
                                                   first_epoch)
        run.log(phase_line(phase, index, len(phases), first_epoch, epochs, learning_rate,
                           run.config, run.time_budget, _patience(run)))
        _fit(run, trainer, phase_callbacks, first_epoch, epochs)
        jit_compile = jit_compile and bool(trainer.jit_compile)
        if trainer.train_graph is not None:  # None when a resumed phase had no epoch left
            compiled = trainer.compiled_functions()
        records.append(_finish_phase(run, phase, first_epoch, epochs, learning_rate,
                                     _stopped_early(run, phase, phase_callbacks)))
    return _finish(run, records, jit_compile, compiled)


def _check_settings(config: TrainConfig, phases: list[Phase], strategy: tf.distribute.Strategy,
                    device_augment: Augmentation | None) -> None:
    """Raises on settings `fit_phases` cannot train with (see its Raises)."""
    if not isinstance(config.jit_compile, bool):
        raise ValueError(
            f"train.jit_compile={config.jit_compile!r} depends on the backbone and the device: "
            "resolve it with kcls.train.compute.resolve_jit_compile (run_recipe does), or "
            "pass true or false.")
    if config.train_batchnorm is None and any(phase.backbone_trainable for phase in phases):
        raise ValueError(
            "train.train_batchnorm=None (auto) depends on whether the backbone is pretrained, "
            "which fit_phases cannot see: resolve it with "
            "kcls.train.schedule.resolve_train_batchnorm (run_recipe does), or pass true or "
            "false.")
    if (isinstance(strategy, tf.distribute.TPUStrategy) and device_augment is not None
            and not compiles_with_xla(device_augment)):
        raise ConfigError(
            f"Augmentation stages {device_augment.stage_names} have ops without an XLA kernel, "
            "and TPUs run only XLA-compiled programs: augment in the tf.data pipeline instead "
            "(kcls.data.augment.place_augmentation and train_pipeline(host_augment=...), as "
            "run_recipe does), or use data.augment=light.")


def _open_run(classifier: keras.Model, train_batches: tf.data.Dataset,
              validation_batches: tf.data.Dataset | None, steps_per_epoch: int,
              config: TrainConfig, device_augment: Augmentation | None,
              extra_callbacks: list[keras.callbacks.Callback], verbose: int | str,
              strategy: tf.distribute.Strategy, time_budget: TimeBudget | None,
              objective: Objective, run_dir: str | Path | None,
              log: Callable[[str], None] | None = None) -> _PhaseRun:
    """The run's inputs with its saved progress (empty when nothing is saved) and checkpoint.

    Args: as `fit_phases` takes them, `strategy` and `objective` resolved.

    Raises:
        ConfigError: the run directory holds an interrupted run with another schedule.
    """
    run_dir = Path(run_dir) if run_dir is not None else None
    worker = worker_of(strategy)
    if is_multiworker(strategy):
        synchronize_batchnorm(classifier)
    # A budgeted run is planned for one sitting: started again, it would plan a new budget.
    backup_dir = run_dir / BACKUP_DIR if run_dir is not None and time_budget is None else None
    progress = TrainingProgress.load(backup_dir, schedule_fingerprint(config, steps_per_epoch),
                                     write=worker.is_chief)
    monitor = "val_loss" if validation_batches is not None else "loss"
    best_checkpoint = None
    if run_dir is not None:
        best_checkpoint = ClassifierCheckpoint(
            worker.write_path(run_dir / BEST_WEIGHTS_FILE, run_dir), monitor=monitor,
            save_best_only=True, save_weights_only=True,
            initial_value_threshold=progress.best(monitor))
    return _PhaseRun(
        classifier=classifier, train_batches=train_batches,
        validation_batches=validation_batches, steps_per_epoch=steps_per_epoch, config=config,
        device_augment=device_augment, extra_callbacks=extra_callbacks,
        verbose=verbose if worker.is_chief else 0, strategy=strategy, worker=worker,
        time_budget=time_budget, objective=objective, run_dir=run_dir,
        backup_dir=backup_dir, progress=progress, resumed=progress.started, monitor=monitor,
        best_checkpoint=best_checkpoint,
        log=(log or (lambda message: None)) if worker.is_chief else (lambda message: None))


def _patience(run: _PhaseRun) -> int:
    """Epochs without a better `run.monitor` after which a phase stops: the configured
    `train.early_stopping_patience`, else with a time budget its plateau rule, else 0 (off)."""
    if run.config.early_stopping_patience:
        return run.config.early_stopping_patience
    return run.time_budget.patience if run.time_budget is not None else 0


def phase_line(phase: Phase, index: int, count: int, first_epoch: int, epochs: int,
               learning_rate: float, config: TrainConfig, time_budget: TimeBudget | None,
               patience: int) -> str:
    """The line announcing a phase as it starts: what trains, its epochs and peak rate
    (`phase 2/2, unfrozen: the backbone trains too (...), epochs 3-10, peak learning rate ...`)."""
    if phase.backbone_trainable:
        what = ("the backbone trains too (" + ("all its layers" if config.unfreeze == "all"
                                                else f"its top {config.unfreeze} blocks")
                + ", BatchNorm " + ("training" if config.train_batchnorm else "in inference mode")
                + ")")
    else:
        what = "the head trains on the frozen backbone"
    if time_budget is None:
        span = f"epochs {first_epoch + 1}-{first_epoch + epochs}"
    else:
        span = (f"from epoch {first_epoch + 1}, its epochs planned from the time budget after "
                "its first steps")
    stop = (f"; stops after {patience} epochs without a better validation loss, keeping the "
            "best" if patience else "")
    return (f"phase {index + 1}/{count}, {phase.name}: {what}, {span}, peak learning rate "
            f"{learning_rate:.2e}{stop}")


def _stopped_early(run: _PhaseRun, phase: Phase,
                   callbacks: list[keras.callbacks.Callback]) -> str | None:
    """Why early stopping ended the phase that just ran (logged, and in the budget's plan
    with a time budget), or None when it ran its epochs."""
    stopper = next((callback for callback in callbacks
                    if isinstance(callback, keras.callbacks.EarlyStopping)), None)
    if stopper is None or not stopper.stopped_epoch:
        return None
    restored = "; its weights restored" if stopper.restore_best_weights else ""
    reason = (f"{stopper.monitor} did not improve for {stopper.patience} epochs (best "
              f"{float(stopper.best):.4g} at epoch {stopper.best_epoch + 1}{restored})")
    run.log(f"{phase.name} phase stopped early after epoch {stopper.stopped_epoch + 1}: "
            f"{reason}")
    planner = next((callback for callback in callbacks
                    if isinstance(callback, BudgetPlanner)), None)
    if planner is not None:
        planner.plan["stopped_early"] = reason
    return reason


def _start_phase(run: _PhaseRun, phase: Phase, records: list[PhaseRecord]) -> None:
    """Loads the end weights of a phase skipped on resume, then freezes or unfreezes.

    With `train.wise_ft`, a backbone-training phase after the frozen one first keeps a
    copy of the weights it starts from: the frozen phase's end (trained in this process
    or, on resume, loaded from its backup).
    """
    _load_skipped_phase_weights(run, records)
    # TrainConfig allows wise_ft only with a frozen phase, which comes first.
    if run.config.wise_ft is not None and phase.backbone_trainable:
        run.frozen_end_weights = snapshot_weights(run.classifier)
    set_backbone_trainable(run.classifier, phase.backbone_trainable, run.config.unfreeze,
                           bool(run.config.train_batchnorm))


def _load_skipped_phase_weights(run: _PhaseRun, records: list[PhaseRecord]) -> None:
    """Loads the weights the last phase ended with when it was skipped on resume.

    Only the phase before the one about to run (or, at the end, the last) matters: its
    end weights include every earlier phase's training.
    """
    if records and records[-1].skipped_on_resume:
        run.classifier.load_weights(_phase_weights(run.backup_dir, records[-1].name))


def _peak_learning_rate(run: _PhaseRun, phase: Phase) -> float:
    """The phase's peak rate: configured, or under `train.learning_rate=auto` the range
    test's suggestion (on resume the one found before the interruption)."""
    if phase.learning_rate is not None:
        return phase.learning_rate
    progress, time_budget = run.progress, run.time_budget
    if phase.name not in progress.searches:
        if time_budget is not None and time_budget.started is None:
            time_budget.started = time_budget.clock()  # the search spends the budget too
        search = find_phase_learning_rate(run.classifier, run.train_batches, run.config, phase,
                                          run.device_augment, run.strategy,
                                          objective=run.objective)
        if run.run_dir is not None and run.worker.is_chief:
            plot_learning_rate_search(
                search, run.run_dir / LR_FIND_PHASE_PLOT.format(phase=phase.name),
                title=f"learning-rate range test, {phase.name} phase")
        # The workers' curves are the same (their losses are all-reduced); the chief's
        # rate is the one every worker trains at, whatever rounding says.
        summary = {**search.summary(),
                   "suggestion": broadcast_from_chief(run.strategy, search.suggestion)}
        progress.searched(phase.name, summary)
    return float(progress.searches[phase.name]["suggestion"])


def _compile_trainer(run: _PhaseRun, phase: Phase,
                     learning_rate: float) -> tuple[Trainer, WarmupCosine]:
    """A Trainer of the phase compiled with its optimizer, loss and metrics.

    Returns:
        `(trainer, schedule)`: the compiled Trainer and its learning-rate schedule.
    """
    config = run.config
    # A fresh Trainer per phase: BackupAndRestore leaves the restored epoch on the
    # model it restored, and fit() would start the next phase there.
    with run.strategy.scope():
        schedule = WarmupCosine(learning_rate, phase.epochs * run.steps_per_epoch,
                                config.warmup_fraction)
        trainer = Trainer(run.classifier, run.device_augment)
        loss, metrics = run.objective()
        trainer.compile(
            optimizer=_optimizer(run.classifier, schedule, config),
            loss=loss,
            metrics=metrics,
            jit_compile=config.jit_compile)
    if config.jit_compile and not trainer.jit_compile:
        # stacklevel 3: the warning points at fit_phases's caller.
        warnings.warn("XLA was requested but a layer of the classifier does not support "
                      "it; training without jit_compile.", stacklevel=3)
    return trainer, schedule


def _phase_callbacks(run: _PhaseRun, phase: Phase, phases_left: list[Phase],
                     schedule: WarmupCosine,
                     first_epoch: int) -> tuple[list[keras.callbacks.Callback], int]:
    """The phase's callbacks, in the order they run, and the `epochs` its `fit()` gets.

    Args:
        phases_left: this phase and the ones after it (their epochs share a time budget).
        schedule: the phase's learning-rate schedule (a time budget sets its length).
        first_epoch: int, the epoch index the phase starts at.

    Returns:
        `(callbacks, epochs)`: epochs is the phase's configured epochs, or with a time
        budget `MAX_EPOCHS` (the budget's planner stops the phase).
    """
    config, worker = run.config, run.worker
    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.TerminateOnNaN(), run.progress.recorder()]
    if run.backup_dir is not None:
        chief_backup = run.backup_dir / phase.name
        callbacks.append(WorkerBackupAndRestore(worker.write_path(chief_backup, run.run_dir),
                                                chief_backup))
    if run.run_dir is not None:
        logs = worker.write_path(run.run_dir / LOGS_DIR, run.run_dir)
        callbacks += [run.best_checkpoint, keras.callbacks.TensorBoard(logs, write_graph=False)]
    if (phase.backbone_trainable and config.train_batchnorm
            and run.validation_batches is not None):
        callbacks.append(PreciseBatchNorm(run.classifier, run.train_batches,
                                          run.steps_per_epoch, run.strategy))
    patience = _patience(run)
    if patience:
        # With EMA the phase ends on the averaged weights, not on one epoch's raw ones.
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=run.monitor, patience=patience, restore_best_weights=not config.ema))
    callbacks += run.extra_callbacks
    if run.time_budget is None:
        return callbacks, phase.epochs
    # Last, so that its epoch times include the other callbacks' work.
    planner = BudgetPlanner(
        run.time_budget, schedule, first_epoch, run.steps_per_epoch,
        _batch_size(run.train_batches),
        share=phase.epochs / sum(later.epochs for later in phases_left), name=phase.name,
        agree=lambda planned: broadcast_from_chief(run.strategy, planned), log=run.log)
    return callbacks + [BudgetProgress(planner), planner], MAX_EPOCHS


def _fit(run: _PhaseRun, trainer: Trainer, callbacks: list[keras.callbacks.Callback],
         first_epoch: int, epochs: int) -> None:
    """Fits the phase: epochs `[first_epoch, first_epoch + epochs)` (fewer if stopped)."""
    with warnings.catch_warnings():
        if run.train_batches.cardinality() == tf.data.INFINITE_CARDINALITY:
            # Then only the validation pass can end: Keras warns at the end of a finite
            # dataset of unknown length (a folder source filters unreadable files).
            warnings.filterwarnings("ignore", message="Your input ran out of data")
        trainer.fit(
            run.train_batches, validation_data=run.validation_batches,
            steps_per_epoch=run.steps_per_epoch, initial_epoch=first_epoch,
            epochs=first_epoch + epochs, verbose=run.verbose, shuffle=False,
            callbacks=callbacks)


def _finish_phase(run: _PhaseRun, phase: Phase, first_epoch: int, epochs: int,
                  learning_rate: float, stopped_early: str | None = None) -> PhaseRecord:
    """Interpolates the weights (`train.wise_ft`), re-estimates BatchNorm, records the
    phase and backs up its end weights.

    Args:
        first_epoch: int, the epoch index the phase started at.
        epochs: int, the `epochs` its `fit()` got (an upper bound of what it trained).
        learning_rate: float, its peak rate.
        stopped_early: why early stopping ended it, or None.
    """
    config, classifier = run.config, run.classifier
    if phase.backbone_trainable and run.frozen_end_weights is not None:
        interpolate_weights(classifier, run.frozen_end_weights, config.wise_ft)
        run.frozen_end_weights = None
        run.log(f"{phase.name} phase ends on {config.wise_ft:g} x its fine-tuned weights + "
                f"{1 - config.wise_ft:g} x the frozen phase's (train.wise_ft)")
    # Early stopping or a budget may end a phase early: the next starts after its last epoch.
    end = max(run.progress.last_epoch(first_epoch, first_epoch + epochs) + 1, first_epoch)
    recalibrated = 0
    if phase.backbone_trainable and config.train_batchnorm:
        recalibrated = recalibrate_batchnorm(classifier, run.train_batches,
                                             max_batches=(end - first_epoch) * run.steps_per_epoch,
                                             strategy=run.strategy)
    record = PhaseRecord(
        name=phase.name, first_epoch=first_epoch, epochs=end - first_epoch,
        learning_rate=learning_rate,
        unfreeze=config.unfreeze if phase.backbone_trainable else "none",
        trainable_params=_count(classifier.trainable_weights),
        batchnorm_recalibrated_on=recalibrated,
        learning_rate_search=run.progress.searches.get(phase.name), stopped_early=stopped_early)
    if run.backup_dir is not None and run.worker.is_chief:
        classifier.save_weights(_phase_weights(run.backup_dir, phase.name))
    run.progress.complete(record)
    return record


def _finish(run: _PhaseRun, records: list[PhaseRecord], jit_compile: bool,
            compiled: dict[str, bool | None] | None) -> TrainingResult:
    """Leaves the classifier at the last phase's end, deletes the backup, sums up.

    Args:
        records: one PhaseRecord per phase.
        jit_compile: whether every phase's compiled step used XLA.
        compiled: the last traced training function's `Trainer.compiled_functions()`, or
            None when no phase traced one.
    """
    _load_skipped_phase_weights(run, records)  # killed after the last phase, before cleaning up
    if run.worker.count > 1:
        barrier(run.strategy)  # every worker has read the chief's backup before it goes
    if run.run_dir is not None and not run.worker.is_chief:
        shutil.rmtree(run.worker.scratch_dir(run.run_dir), ignore_errors=True)
    if run.backup_dir is not None and run.worker.is_chief:
        shutil.rmtree(run.backup_dir, ignore_errors=True)
    best = run.run_dir / BEST_WEIGHTS_FILE if run.run_dir is not None else None
    augmentation = None if compiled is None else {
        "host": [], "device": run.device_augment.stage_names if run.device_augment else [],
        "compiled": compiled["augmentation"], "model_step_compiled": compiled["model_step"]}
    return TrainingResult(
        history=run.progress.history(), phases=records, jit_compile=jit_compile,
        augmentation=augmentation, resumed=run.resumed,
        best_weights=str(best) if best and best.exists() else None,
        time_budget=run.time_budget.summary() if run.time_budget is not None else None)


def find_phase_learning_rate(classifier: keras.Model, train_batches: tf.data.Dataset,
                             config: TrainConfig, phase: Phase,
                             device_augment: keras.Layer | None = None,
                             strategy: tf.distribute.Strategy | None = None,
                             steps: int | None = None, verbose: int | str = 0,
                             objective: Objective | None = None) -> LearningRateSearch:
    """The learning-rate range test (`kcls.train.lr_find`) for one phase of `config`.

    The classifier is frozen or unfrozen as the phase trains it and trained with the
    phase's optimizer (weight decay, layer decay, loss scaling), loss and augmentation;
    its weights are restored afterwards.

    Args:
        classifier: keras.Model from `build_classifier`, built in `strategy.scope()`.
        train_batches: infinite training dataset, as `fit_phases` takes it.
        config: TrainConfig with `jit_compile` and `train_batchnorm` resolved.
        phase: the phase to test (from `plan_phases`).
        device_augment: the augmentation run inside the step, or None.
        strategy: the strategy `classifier` was built under; None for the current one.
        steps: int, the most steps the test takes; None: `config.lr_find_steps`.
        verbose: `fit()` verbosity.
        objective: the loss (and metrics, unused here), as `fit_phases` takes it.

    Returns:
        LearningRateSearch with the curve and its suggestion (a peak rate for the phase).
    """
    strategy = strategy or tf.distribute.get_strategy()
    objective = objective or _default_objective(config)
    set_backbone_trainable(classifier, phase.backbone_trainable, config.unfreeze,
                           bool(config.train_batchnorm))
    with strategy.scope():
        trainer = Trainer(classifier, device_augment)
        return find_learning_rate(
            trainer, train_batches, lambda ramp: _optimizer(classifier, ramp, config),
            objective()[0], steps=config.lr_find_steps if steps is None else steps,
            jit_compile=bool(config.jit_compile), verbose=verbose)


def _default_objective(config: TrainConfig) -> Objective:
    """Single-label softmax cross-entropy with `config.label_smoothing`, and accuracy."""
    return SingleLabelTask().objective(config.label_smoothing, LossWeights())


def _optimizer(classifier: keras.Model,
               schedule: keras.optimizers.schedules.LearningRateSchedule,
               config: TrainConfig) -> keras.Optimizer:
    """The phase's optimizer (`make_optimizer`), with layer decay and loss scaling if set."""
    multipliers = None
    if config.layer_decay is not None and config.layer_decay != 1.0:
        multipliers = layer_decay_multipliers(classifier, config.layer_decay)
    optimizer = make_optimizer(schedule, config, multipliers)
    # compile() adds loss scaling only when the *Trainer's* policy is mixed_float16, and
    # the Trainer is float32 (so images enter the classifier unrounded).
    if classifier.dtype_policy.name == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _phase_weights(backup_dir: Path, phase_name: str) -> Path:
    """Where the classifier's weights at the end of a completed phase are backed up."""
    return backup_dir / f"{phase_name}.weights.h5"


def _batch_size(batches: tf.data.Dataset) -> int:
    size = batches.element_spec[0].shape[0]
    if size is None:
        raise ValueError("A time budget needs training batches of one static size (batch "
                         "with drop_remainder=True, as kcls.data.pipeline.train_pipeline does).")
    return int(size)


def _count(variables: list[keras.Variable]) -> int:
    return int(sum(np.prod(variable.shape) for variable in variables))
