"""Fitting the phases: the training wrapper, compile, callbacks, resuming and history.

With a run directory, `fit_phases` writes

    <run_dir>/logs/                TensorBoard logs (both phases, one epoch axis;
                                   `tensorboard --logdir <run_dir>/logs`)
    <run_dir>/best.weights.h5      classifier weights of the best epoch so far (lowest
                                   val_loss, or loss without validation data)
    <run_dir>/backup/              resume state, deleted when all phases are done:
        progress.json              per-epoch logs and the phases already completed
        <phase>.weights.h5         classifier weights at the end of a completed phase
        <phase>/                   Keras BackupAndRestore of the running phase (model,
                                   optimizer and epoch at the last epoch end)

and a killed run started again with the same run directory resumes: completed phases
are skipped (their end weights are loaded), the interrupted phase continues from its
last finished epoch, and the epoch counter and history come out as if uninterrupted.
`BackupAndRestore` alone cannot do this across phases: it deletes its backup at the
end of every `fit()` call and restores an optimizer of the phase it was saved in.

Example:

>>> history = fit_phases(classifier, train_batches, validation_batches, steps_per_epoch=20,
...                      config=recipe.train, run_dir="runs/demo")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kcls.config import ConfigError, TrainConfig
from kcls.data.augment import Augmentation, compiles_with_xla
from kcls.files import write_json
from kcls.layout import (
    BACKUP_DIR,
    BEST_WEIGHTS_FILE,
    LOGS_DIR,
    LR_FIND_PHASE_PLOT,
    PROGRESS_FILE,
)
from kcls.tasks import LossWeights, get_task
from kcls.train.batchnorm import PreciseBatchNorm, recalibrate_batchnorm
from kcls.train.budget import MAX_EPOCHS, BudgetPlanner, BudgetProgress, TimeBudget
from kcls.train.layerwise import layer_decay_multipliers
from kcls.train.lr_find import (
    STEPS,
    LearningRateSearch,
    find_learning_rate,
    plot_learning_rate_search,
)
from kcls.train.schedule import (
    Phase,
    WarmupCosine,
    make_optimizer,
    plan_phases,
    set_backbone_trainable,
)


class Trainer(keras.Model):
    """Trains `classifier`, augmenting each batch on the device before the compiled step.

    The training function (`make_train_function`) is an ordinary `tf.function` that, per
    step, draws one augmentation seed, runs `device_augment` on every replica's share
    of the batch (the replica id folded into the seed, so replicas draw differently) as
    plain TensorFlow ops on the replica's device, and then calls Keras's own one-step
    function, which runs the forward pass, the gradients and the update under
    `tf.function(jit_compile=self.jit_compile)`. XLA therefore compiles the model step
    even when augmentation ops have no XLA kernel (RandAugment, MixUp, CutMix);
    `jit_compile` only depends on the classifier's layers.

    `device_augment` takes and returns `{"images", "labels"}` batches, so label-mixing
    layers (MixUp) can change the labels; per-example loss weights pass through
    unchanged. Inference and evaluation call the bare classifier: augmentation never
    reaches an export. After the first training step, `compiled_functions()` tells what
    the training function actually compiled.
    """

    def __init__(self, classifier: keras.Model, device_augment: Augmentation | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.classifier = classifier
        self.device_augment = device_augment
        self.train_graph: tf.Graph | None = None
        self.build(classifier.input_shape)

    def build(self, input_shape):
        # Nothing to create: the classifier is built, and augmentation layers keep only
        # random-generator state. BackupAndRestore needs a built model before fit().
        self.built = True

    def call(self, images, training=False):
        return self.classifier(images, training=training)

    @property
    def jit_compile(self) -> bool:
        return keras.Model.jit_compile.fget(self)

    @jit_compile.setter
    def jit_compile(self, value: bool) -> None:
        # Keras asks every layer of the model, augmentation included; only the
        # classifier's layers run in the compiled step.
        self._jit_compile = bool(value) and compiles_with_xla(self.classifier)

    def make_train_function(self, force: bool = False):
        if self.train_function is not None and not force:
            return self.train_function
        if self.steps_per_execution != 1:
            raise ValueError("kcls's Trainer runs one step per call: compile it with "
                             "steps_per_execution=1.")
        # Keras's train function, given a list of one batch instead of an iterator, runs
        # its one-step function on it: strategy.run(train_step), reduced across replicas,
        # in a tf.function with jit_compile=self.jit_compile.
        model_step = super().make_train_function(force=True) or self.train_function
        strategy = self.distribute_strategy
        augmentation = self.device_augment

        @tf.function(reduce_retracing=True)
        def augment_and_step(iterator):
            self.train_graph = tf.compat.v1.get_default_graph()
            data = iterator.get_next()
            if augmentation is not None:
                data = strategy.run(self.augment_batch,
                                    args=(data, augmentation.seed_generator.next()))
            return model_step([data])

        def train_function(iterator):
            try:
                return augment_and_step(iterator)
            except tf.errors.OutOfRangeError:
                raise StopIteration from None

        self.train_function = train_function
        return train_function

    def augment_batch(self, data: tuple[tf.Tensor, ...], seed: tf.Tensor) -> tuple[tf.Tensor, ...]:
        """Augments one replica's `(images, labels[, sample_weights])` batch, in replica context.

        Args:
            data: float32 `[B, H, W, 3]` images, float32 `[B, C]` labels, optionally
                float32 `[B]` loss weights (passed through).
            seed: int `[2]`, the step's seed; the replica id is folded in.
        """
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        images, labels, sample_weights = keras.utils.unpack_x_y_sample_weight(data)
        augmented = self.device_augment(
            {"images": images, "labels": labels}, training=True,
            seed=tf.random.experimental.stateless_fold_in(seed, replica))
        return keras.utils.pack_x_y_sample_weight(augmented["images"], augmented["labels"],
                                                  sample_weights)

    def compiled_functions(self) -> dict[str, bool | None]:
        """What the traced training function runs under XLA.

        Read from the graph the training function traced (its call ops marked
        `_XlaMustCompile`, as `tf.function(jit_compile=True)` marks them), so it is what
        ran, not what was asked for.

        Returns:
            `{"augmentation": bool or None, "model_step": bool}`: whether the
            augmentation ops (None without augmentation) and Keras's one-step function
            (forward pass, gradients, update) are XLA-compiled.

        Raises:
            ValueError: before the training function was traced (before `fit()`).
        """
        if self.train_graph is None:
            raise ValueError("The training function has not been traced yet: call fit() first.")
        nodes = self.train_graph.as_graph_def().node
        compiled = [node for node in nodes if node.attr["_XlaMustCompile"].b]
        augmentation = None
        if self.device_augment is not None:
            # The augmentation's ops sit in the outer graph, named in its layer's scope.
            scope = self.device_augment.name
            augmentation = any(node.name.startswith(scope) for node in compiled)
        return {"augmentation": augmentation,
                "model_step": any("one_step_on_data" in node.attr["f"].func.name
                                  for node in compiled)}


def fit_phases(classifier: keras.Model, train_batches: tf.data.Dataset,
               validation_batches: tf.data.Dataset | None, steps_per_epoch: int,
               config: TrainConfig, device_augment: Augmentation | None = None,
               callbacks: list[keras.callbacks.Callback] | None = None,
               verbose: int | str = "auto", *, run_dir: str | Path | None = None,
               strategy: tf.distribute.Strategy | None = None,
               time_budget: TimeBudget | None = None, task: str = "multiclass",
               positive_weights: np.ndarray | None = None) -> dict[str, Any]:
    """Runs the frozen and unfrozen phases with `fit()`, continuing one epoch counter.

    Args:
        classifier: keras.Model from `build_classifier`, built in `strategy.scope()`.
        train_batches: infinite dataset of `(float32 [B, S, S, 3], float32 one-hot [B, C])`,
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
            phases' shares. A budgeted run is planned for one sitting: it does not resume.
        task: `model.task`: `multiclass` (softmax cross-entropy, accuracy) or
            `multilabel` (binary cross-entropy on multi-hot labels, PR AUC); see
            `kcls.train.losses`.
        positive_weights: float `[C]` per-label weights of the positives in the
            multilabel loss (`train.class_weights=balanced`), or None.

    Returns:
        dict with `history` (metric name -> per-epoch list over both phases), `phases`
        (per phase: name, first_epoch, epochs, learning_rate, unfreeze,
        trainable_params, batchnorm_recalibrated_on (training images the BatchNorm
        statistics were re-estimated on after the phase, see `kcls.train.batchnorm`; 0
        when BatchNorm did not train), skipped_on_resume, and with
        `train.learning_rate=auto` learning_rate_search: the range test's summary, whose
        suggestion is the phase's learning_rate), `jit_compile` (what the compiled step
        actually used), `augmentation` (where augmentation ran: `host` and `device`
        stage names, `compiled` (augmentation under XLA) and `model_step_compiled`, read
        from the traced training function by `Trainer.compiled_functions`; None when
        every phase was skipped on resume), `resumed` (whether earlier progress was
        picked up) and `best_weights` (path of the best checkpoint, or None), and with a
        budget `time_budget` (its plan per phase next to the actual epochs and seconds).

    Raises:
        ConfigError: a TPU strategy with augmentation ops XLA cannot compile.
    """
    phases = plan_phases(config)
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
    strategy = strategy or tf.distribute.get_strategy()
    if (isinstance(strategy, tf.distribute.TPUStrategy) and device_augment is not None
            and not compiles_with_xla(device_augment)):
        raise ConfigError(
            f"Augmentation stages {device_augment.stage_names} have ops without an XLA kernel, "
            "and TPUs run only XLA-compiled programs: augment in the tf.data pipeline instead "
            "(kcls.data.augment.place_augmentation and train_pipeline(host_augment=...), as "
            "run_recipe does), or use data.augment=light.")
    run_dir = Path(run_dir) if run_dir is not None else None
    resumable = run_dir is not None and time_budget is None
    backup_dir = run_dir / BACKUP_DIR if resumable else None
    progress = _Progress.load(backup_dir, _schedule(config, steps_per_epoch))
    resumed = progress.started
    monitor = "val_loss" if validation_batches is not None else "loss"
    checkpoint = None
    if run_dir is not None:
        checkpoint = _ClassifierCheckpoint(
            run_dir / BEST_WEIGHTS_FILE, monitor=monitor, save_best_only=True,
            save_weights_only=True, initial_value_threshold=progress.best(monitor))

    phases_run: list[dict[str, Any]] = []
    jit_compile = config.jit_compile
    compiled: dict[str, bool | None] | None = None
    epoch = 0
    pending_weights: Path | None = None
    for index, phase in enumerate(phases):
        if phase.name in progress.completed:
            record = progress.completed[phase.name]
            phases_run.append({**record, "skipped_on_resume": True})
            epoch = record["first_epoch"] + record["epochs"]
            pending_weights = backup_dir / f"{phase.name}.weights.h5"
            continue
        if pending_weights is not None:
            classifier.load_weights(pending_weights)
            pending_weights = None
        set_backbone_trainable(classifier, phase.backbone_trainable, config.unfreeze,
                               bool(config.train_batchnorm))
        learning_rate = phase.learning_rate
        if learning_rate is None:  # train.learning_rate=auto
            learning_rate = _found_learning_rate(
                progress, phase, classifier, train_batches, config, device_augment, strategy,
                run_dir, time_budget, task, positive_weights)
        # A fresh Trainer per phase: BackupAndRestore leaves the restored epoch on the
        # model it restored, and fit() would start the next phase there.
        with strategy.scope():
            schedule = WarmupCosine(learning_rate, phase.epochs * steps_per_epoch,
                                    config.warmup_fraction)
            trainer = Trainer(classifier, device_augment)
            loss, metrics = get_task(task).objective(config.label_smoothing, LossWeights(
                positives=positive_weights))()
            trainer.compile(
                optimizer=_optimizer(classifier, schedule, config),
                loss=loss,
                metrics=metrics,
                jit_compile=config.jit_compile)
        if config.jit_compile and not trainer.jit_compile:
            warnings.warn("XLA was requested but a layer of the classifier does not support "
                          "it; training without jit_compile.", stacklevel=2)
        jit_compile = jit_compile and bool(trainer.jit_compile)

        phase_callbacks: list[keras.callbacks.Callback] = [
            keras.callbacks.TerminateOnNaN(), progress.recorder()]
        if backup_dir is not None:
            phase_callbacks.append(keras.callbacks.BackupAndRestore(backup_dir / phase.name))
        if run_dir is not None:
            phase_callbacks += [checkpoint,
                                keras.callbacks.TensorBoard(run_dir / LOGS_DIR, write_graph=False)]
        if (phase.backbone_trainable and config.train_batchnorm
                and validation_batches is not None):
            phase_callbacks.append(PreciseBatchNorm(classifier, train_batches, steps_per_epoch))
        if config.early_stopping_patience:
            # With EMA the phase ends on the averaged weights, not on one epoch's raw ones.
            phase_callbacks.append(keras.callbacks.EarlyStopping(
                monitor=monitor, patience=config.early_stopping_patience,
                restore_best_weights=not config.ema))
        phase_callbacks += callbacks or []
        epochs = phase.epochs
        if time_budget is not None:
            # Last, so that its epoch times include the other callbacks' work.
            planner = BudgetPlanner(
                time_budget, schedule, epoch, steps_per_epoch, _batch_size(train_batches),
                share=phase.epochs / sum(later.epochs for later in phases[index:]),
                name=phase.name)
            phase_callbacks += [BudgetProgress(planner), planner]
            epochs = MAX_EPOCHS
        with warnings.catch_warnings():
            if train_batches.cardinality() == tf.data.INFINITE_CARDINALITY:
                # Then only the validation pass can end: Keras warns at the end of a finite
                # dataset of unknown length (a folder source filters unreadable files).
                warnings.filterwarnings("ignore", message="Your input ran out of data")
            trainer.fit(
                train_batches, validation_data=validation_batches,
                steps_per_epoch=steps_per_epoch, initial_epoch=epoch, epochs=epoch + epochs,
                verbose=verbose, shuffle=False, callbacks=phase_callbacks)

        if trainer.train_graph is not None:  # None when a resumed phase had no epoch left
            compiled = trainer.compiled_functions()
        # Early stopping or a budget may end a phase early: the next starts after its last epoch.
        end = max(progress.last_epoch(epoch, epoch + epochs) + 1, epoch)
        recalibrated = 0
        if phase.backbone_trainable and config.train_batchnorm:
            recalibrated = recalibrate_batchnorm(classifier, train_batches,
                                                 max_batches=(end - epoch) * steps_per_epoch)
        record = {"name": phase.name, "first_epoch": epoch, "epochs": end - epoch,
                  "learning_rate": learning_rate,
                  "unfreeze": config.unfreeze if phase.backbone_trainable else "none",
                  "trainable_params": _count(classifier.trainable_weights),
                  "batchnorm_recalibrated_on": recalibrated,
                  "skipped_on_resume": False}
        if phase.name in progress.searches:
            record["learning_rate_search"] = progress.searches[phase.name]
        phases_run.append(record)
        if backup_dir is not None:
            classifier.save_weights(backup_dir / f"{phase.name}.weights.h5")
        progress.complete(phase, record)
        epoch = end

    if pending_weights is not None:  # killed after the last phase, before cleaning up
        classifier.load_weights(pending_weights)
    if backup_dir is not None:
        shutil.rmtree(backup_dir, ignore_errors=True)
    best = run_dir / BEST_WEIGHTS_FILE if run_dir is not None else None
    augmentation = None if compiled is None else {
        "host": [], "device": device_augment.stage_names if device_augment else [],
        "compiled": compiled["augmentation"], "model_step_compiled": compiled["model_step"]}
    result = {"history": progress.history(), "phases": phases_run, "jit_compile": jit_compile,
              "augmentation": augmentation,
              "resumed": resumed, "best_weights": str(best) if best and best.exists() else None}
    if time_budget is not None:
        result["time_budget"] = time_budget.summary()
    return result


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
    _Progress.load(Path(run_dir) / BACKUP_DIR, _schedule(config, steps_per_epoch))


def _schedule(config: TrainConfig, steps_per_epoch: int) -> dict[str, Any]:
    """What must not change for a run to resume: the training settings and epoch length."""
    return {**dataclasses.asdict(config), "steps_per_epoch": steps_per_epoch}


def find_phase_learning_rate(classifier: keras.Model, train_batches: tf.data.Dataset,
                             config: TrainConfig, phase: Phase,
                             device_augment: keras.Layer | None = None,
                             strategy: tf.distribute.Strategy | None = None,
                             steps: int = STEPS, verbose: int | str = 0,
                             task: str = "multiclass",
                             positive_weights: np.ndarray | None = None) -> LearningRateSearch:
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
        steps: int, the most steps the test takes.
        verbose: `fit()` verbosity.
        task, positive_weights: the loss, as `fit_phases` takes them.

    Returns:
        LearningRateSearch with the curve and its suggestion (a peak rate for the phase).
    """
    strategy = strategy or tf.distribute.get_strategy()
    set_backbone_trainable(classifier, phase.backbone_trainable, config.unfreeze,
                           bool(config.train_batchnorm))
    with strategy.scope():
        trainer = Trainer(classifier, device_augment)
        return find_learning_rate(
            trainer, train_batches, lambda ramp: _optimizer(classifier, ramp, config),
            get_task(task).objective(config.label_smoothing,
                                     LossWeights(positives=positive_weights))()[0],
            steps=steps, jit_compile=bool(config.jit_compile), verbose=verbose)


def _found_learning_rate(progress: _Progress, phase: Phase, classifier: keras.Model,
                         train_batches: tf.data.Dataset, config: TrainConfig,
                         device_augment: keras.Layer | None, strategy: tf.distribute.Strategy,
                         run_dir: Path | None, time_budget: TimeBudget | None,
                         task: str, positive_weights: np.ndarray | None) -> float:
    """The phase's peak rate under `train.learning_rate=auto`: the range test's suggestion,
    or on resume the one found before the interruption."""
    if phase.name not in progress.searches:
        if time_budget is not None and time_budget.started is None:
            time_budget.started = time_budget.clock()  # the search spends the budget too
        search = find_phase_learning_rate(classifier, train_batches, config, phase,
                                          device_augment, strategy, task=task,
                                          positive_weights=positive_weights)
        if run_dir is not None:
            plot_learning_rate_search(search, run_dir / LR_FIND_PHASE_PLOT.format(phase=phase.name),
                                      title=f"learning-rate range test, {phase.name} phase")
        progress.searched(phase, search.summary())
    return float(progress.searches[phase.name]["suggestion"])


def _optimizer(classifier: keras.Model,
               schedule: keras.optimizers.schedules.LearningRateSchedule,
               config: TrainConfig) -> keras.Optimizer:
    multipliers = None
    if config.layer_decay is not None and config.layer_decay != 1.0:
        multipliers = layer_decay_multipliers(classifier, config.layer_decay)
    optimizer = make_optimizer(schedule, config, multipliers)
    # compile() adds loss scaling only when the *Trainer's* policy is mixed_float16, and
    # the Trainer is float32 (so images enter the classifier unrounded).
    if classifier.dtype_policy.name == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _batch_size(batches: tf.data.Dataset) -> int:
    size = batches.element_spec[0].shape[0]
    if size is None:
        raise ValueError("A time budget needs training batches of one static size (batch "
                         "with drop_remainder=True, as kcls.data.pipeline.train_pipeline does).")
    return int(size)


def _count(variables: list[keras.Variable]) -> int:
    return int(sum(np.prod(variable.shape) for variable in variables))


class _ClassifierCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint of the classifier inside the Trainer, loadable into `build_classifier`."""

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model.classifier if isinstance(model, Trainer) else model)


class _Progress:
    """Per-epoch logs and completed phases, mirrored to `<backup_dir>/progress.json`."""

    def __init__(self, path: Path | None, state: dict[str, Any],
                 schedule: dict[str, Any]) -> None:
        self.path = path
        self.schedule = schedule
        self.epochs: dict[int, dict[str, float]] = {
            int(epoch): logs for epoch, logs in state.get("epochs", {}).items()}
        self.completed: dict[str, dict[str, Any]] = state.get("completed", {})
        # Per phase, the range test's outcome under train.learning_rate=auto.
        self.searches: dict[str, dict[str, Any]] = state.get("learning_rate_searches", {})

    @classmethod
    def load(cls, backup_dir: Path | None, schedule: dict[str, Any]) -> _Progress:
        """The saved progress of the run in `backup_dir`, which must have had `schedule`."""
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
        return cls(path, state, schedule)

    @property
    def started(self) -> bool:
        return bool(self.epochs or self.completed)

    def recorder(self) -> keras.callbacks.Callback:
        return keras.callbacks.LambdaCallback(on_epoch_end=self._record)

    def _record(self, epoch: int, logs: dict[str, Any] | None) -> None:
        self.epochs[epoch] = {name: float(value) for name, value in (logs or {}).items()}
        self._save()

    def last_epoch(self, first: int, stop: int) -> int:
        """The last recorded epoch in `[first, stop)`, or -1."""
        return max((epoch for epoch in self.epochs if first <= epoch < stop), default=-1)

    def complete(self, phase: Phase, record: dict[str, Any]) -> None:
        self.completed[phase.name] = {key: value for key, value in record.items()
                                      if key != "skipped_on_resume"}
        self._save()

    def searched(self, phase: Phase, summary: dict[str, Any]) -> None:
        self.searches[phase.name] = summary
        self._save()

    def best(self, monitor: str) -> float | None:
        values = [logs[monitor] for logs in self.epochs.values() if monitor in logs]
        return min(values) if values else None

    def history(self) -> dict[str, list[float]]:
        history: dict[str, list[float]] = {}
        for epoch in sorted(self.epochs):
            for name, value in self.epochs[epoch].items():
                history.setdefault(name, []).append(value)
        return history

    def _save(self) -> None:
        if self.path is None:
            return
        state = {"schedule": self.schedule, "completed": self.completed,
                 "learning_rate_searches": self.searches,
                 "epochs": {str(epoch): logs for epoch, logs in sorted(self.epochs.items())}}
        write_json(self.path, state, indent=1)
