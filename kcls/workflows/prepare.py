"""One preparation for every command that trains: a recipe resolved into what runs.

`prepare(recipe)` makes every decision a recipe leaves open, once, in this order:

1. the tf.distribute strategy, first: connecting to a TPU and configuring multi-worker
   collectives must happen before TensorFlow runs anything else; with it, which worker
   this process is (`kcls.train.cluster`);
2. the data splits (`kcls.data.sources`) with the leak check of sources of files
   (`kcls.data.leaks`: held-out images with a copy in training, whose training copies
   `data.drop_leaks=true` leaves out), checked against the problem type (the task,
   `kcls.tasks`), and what the task fits after training on held-out data: a calibration
   temperature or per-label thresholds and the rejection rule's coverage, with a
   carve-out of the training split when there is no validation split and the task
   needs one;
3. steps per epoch, precision, XLA and BatchNorm (each `auto` with its reason);
4. the classifier, built in the strategy's scope, seeded, and its layers that are fitted
   to the training images before the first step (a patch-whitening stem);
5. where augmentation runs (the device, or the TPU host), the loss weights
   (`train.class_weights`) and the training and validation pipelines, under several
   workers with how they are split between them (`input_sharding`).

`kcls recipe run` (`kcls.workflows.run`) and `kcls lr-find` (`kcls.workflows.lr_find`)
start from the same `Prepared`, and run.json records its `record()`, so a setting is
resolved in one place and written as it was resolved.

Example:

>>> prepared = prepare(load_recipe("quickstart"))  # doctest: +SKIP
>>> prepared.train_config.jit_compile, prepared.jit_compile_reason  # doctest: +SKIP
(False, 'auto: CPU, compact_resnet trained at 0.72x the speed with XLA (...)')
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kcls.config import Recipe, TrainConfig, check_global_batch
from kcls.data.augment import Augmentation, build_augmentation, place_augmentation
from kcls.data.leaks import LeakCheck, load_checked_splits
from kcls.data.pipeline import check_cache_writable, eval_pipeline, train_pipeline
from kcls.data.sources import Splits, carve_calibration_split, train_class_counts
from kcls.models.classifier import build_classifier
from kcls.models.whitening import fit_patch_whitening, patch_whitening_layers
from kcls.tasks import CalibrationPlan, LossWeights, Objective, Task, get_task
from kcls.train.cluster import (
    Worker,
    distributable,
    is_multiworker,
    shard_policy,
    worker_cache,
    worker_of,
)
from kcls.train.compute import (
    describe_devices,
    describe_strategy,
    make_strategy,
    resolve_jit_compile,
    resolve_precision,
)
from kcls.train.schedule import describe_normalization, resolve_train_batchnorm

# The most training images whose embeddings give the rejection rule's class means
# (`export.reject_coverage`): the means of a few thousand images are already stable.
STATISTICS_IMAGES = 10_000
# Enough for a stable 12x12 patch covariance (64 patches per image), in a few seconds.
DATA_INIT_IMAGES = 5_000
# Held-out splits of fewer images are named as too small in the log, run.json and
# report.md: a test score of 49 images is known to about +-14 points (95% interval at
# 50% accuracy), and thresholds or a temperature fitted on them move from run to run.
SMALL_SPLIT_IMAGES = 50
# Below this many validation images, `evaluate.calibrate=auto` fits no temperature (T=1,
# the reason recorded). Measured (`benchmarks/calibration_size.py`, a quickstart model,
# 200 random fitting sets per size, NLL on the other held-out images): fitted on 15
# images T made the NLL worse than T=1 in 23% of the draws (worse on average at 10), on
# 30 in 14%, on 50 in 4%, on 100 never.
MIN_TEMPERATURE_IMAGES = 50


@dataclass
class Calibration:
    """What the task fits after training, and on which held-out examples.

    Attributes:
        plan: the task's `CalibrationPlan` (`temperature`, `thresholds` or `none`).
        examples: unbatched held-out examples to fit on (the validation split or the
            training carve-out), or None.
        count: how many examples that is.
        fitted_on: where they come from, for logs and reports.
    """

    plan: CalibrationPlan
    examples: tf.data.Dataset | None
    count: int
    fitted_on: str

    def record(self) -> dict[str, Any]:
        """What run.json records of the calibration when none was fitted: T=1 and why."""
        return {"method": "none", "skipped": self.plan.skipped}


@dataclass
class Prepared:
    """A recipe with every decision made: what a training command runs.

    Attributes:
        recipe: the Recipe as given.
        strategy: the tf.distribute strategy everything below was built under.
        splits: the data, after any calibration carve-out.
        task: the unfitted Task of `model.task`.
        calibration: what the task fits after training.
        steps_per_epoch: training steps per epoch.
        precision: the Keras dtype policy name.
        train_config: `recipe.train` with `jit_compile` and `train_batchnorm` resolved.
        jit_compile_reason: why XLA is on or off (for logs and run.json).
        precision_reason: why training runs in `precision` (for logs and run.json).
        classifier: the keras.Model to train (pretrained backbone, new head).
        host_augmentation: augmentation run in the tf.data pipeline (TPU hosts), or None.
        device_augmentation: augmentation run on the device before the model step, or None.
        loss_weights: the task's weights of examples or labels in the loss.
        train_batches: infinite training batches; validation_batches: finite, or None.
        worker: which process of the cluster this is (the chief of one without
            `train.strategy=multiworker`).
        input_sharding: under several workers, how the pipelines are split between them
            (`input_sharding`); None for one process.
        small_splits: one warning per held-out split too small for what it is used for
            (`small_split_warnings`), for the log, run.json and report.md.
        leaks: the leak check of the data (`kcls.data.leaks`), or None when not made
            (`data.check_leaks=false`, a source without files, or splits given).
    """

    recipe: Recipe
    strategy: tf.distribute.Strategy
    splits: Splits
    task: Task
    calibration: Calibration
    steps_per_epoch: int
    precision: str
    train_config: TrainConfig
    jit_compile_reason: str
    precision_reason: str
    classifier: keras.Model
    host_augmentation: Augmentation | None
    device_augmentation: Augmentation | None
    loss_weights: LossWeights
    train_batches: tf.data.Dataset
    validation_batches: tf.data.Dataset | None
    worker: Worker = dataclasses.field(default_factory=Worker)
    input_sharding: dict[str, Any] | None = None
    small_splits: list[str] = dataclasses.field(default_factory=list)
    leaks: LeakCheck | None = None

    @property
    def class_names(self) -> list[str]:
        return self.splits.class_names

    def statistics_count(self) -> int:
        """How many training images the rejection rule's class means are computed on."""
        return min(self.splits.sizes["train"], STATISTICS_IMAGES)

    def statistics_batches(self) -> tf.data.Dataset:
        """Those training images in evaluation mode (no augmentation), batched."""
        data = dataclasses.replace(self.recipe.data, cache="none")
        return eval_pipeline(self.splits.train.take(STATISTICS_IMAGES), len(self.class_names),
                             data)

    def objective(self) -> Objective:
        """The task's loss and training metrics with the recipe's smoothing and weights."""
        return self.task.objective(self.recipe.train.label_smoothing, self.loss_weights)

    def record(self) -> dict[str, Any]:
        """The resolved settings as run.json records them."""
        return {"devices": describe_devices(), "strategy": describe_strategy(self.strategy),
                "workers": self.worker.count, "input_sharding": self.input_sharding,
                "precision": self.precision, "precision_reason": self.precision_reason,
                "jit_compile": self.train_config.jit_compile,
                "jit_compile_reason": self.jit_compile_reason,
                "train_batchnorm": self.train_config.train_batchnorm,
                "normalization": describe_normalization(self.classifier,
                                                        self.train_config.train_batchnorm),
                "seed": self.recipe.train.seed, "steps_per_epoch": self.steps_per_epoch,
                "global_batch_size": self.recipe.data.batch_size, "task": self.task.name,
                "splits": self.splits.sizes, "test_source": self.recipe.data.test_source
                or self.recipe.data.source, "small_splits": self.small_splits,
                **self.loss_weights.record(self.class_names),
                "data_leaks": self.leaks.record() if self.leaks else None}


def prepare(recipe: Recipe, splits: Splits | None = None) -> Prepared:
    """Resolves `recipe` into a `Prepared` (the steps of the module docstring).

    Args:
        recipe: Recipe, the configuration.
        splits: data to use instead of `recipe.data.source`, e.g. in-memory arrays from
            `kcls.data.sources.splits_from_arrays` in a notebook.

    Raises:
        ConfigError: data, labels, backbone or weights that cannot be used (raised
            before anything is written).
    """
    strategy = make_strategy(recipe.train.strategy)
    worker = worker_of(strategy)
    check_cache_writable(recipe.data)
    if is_multiworker(strategy):
        check_global_batch(recipe.data.batch_size, strategy.num_replicas_in_sync)
    leaks = None
    if splits is None:
        splits, leaks = load_checked_splits(recipe.data, recipe.label_format)
    task = get_task(recipe.model.task)
    task.check_labels(len(splits.train.element_spec[1].shape), recipe.data.source)
    splits, calibration = plan_calibration(task, recipe, splits)
    precision, precision_reason = resolve_precision(recipe.train.precision,
                                                    recipe.model.backbone)
    jit_compile, jit_compile_reason = resolve_jit_compile(recipe.train.jit_compile,
                                                          recipe.model.backbone, strategy)
    train_config = dataclasses.replace(
        recipe.train, jit_compile=jit_compile,
        train_batchnorm=resolve_train_batchnorm(recipe.train, recipe.model.weights))
    keras.utils.set_random_seed(recipe.train.seed)
    with strategy.scope():
        classifier = build_classifier(recipe.model, len(splits.class_names),
                                      recipe.data.image_size, precision)
    fit_data_dependent_layers(classifier, splits, recipe)
    host_augmentation, device_augmentation = place_augmentation(build_augmentation(
        recipe.data.augment, recipe.data.horizontal_flip, recipe.data.seed, recipe.data.mixup,
        recipe.data.cutmix, recipe.data.cutout), strategy)
    loss_weights = balanced_loss_weights(task, recipe, splits)
    sharding = input_sharding(recipe, strategy)
    train_batches, validation_batches = pipelines(recipe, splits, loss_weights,
                                                  host_augmentation, sharding, worker)
    return Prepared(recipe, strategy, splits, task, calibration,
                    steps_per_epoch(recipe, splits), precision, train_config, jit_compile_reason,
                    precision_reason, classifier, host_augmentation, device_augmentation,
                    loss_weights, train_batches, validation_batches, worker, sharding,
                    small_split_warnings(recipe, splits, calibration), leaks)


def fit_data_dependent_layers(classifier: keras.Model, splits: Splits, recipe: Recipe) -> int:
    """Fits the classifier's layers that are set from the training images before the first
    step (the patch-whitening stem of `compact_resnet_whitened`), on up to
    `DATA_INIT_IMAGES` of them as evaluation sees them; returns how many were fitted."""
    if not patch_whitening_layers(classifier):
        return 0
    data = dataclasses.replace(recipe.data, cache="none")
    batches = eval_pipeline(splits.train.take(DATA_INIT_IMAGES), len(splits.class_names), data)
    images = np.concatenate([images for images, *_ in batches.as_numpy_iterator()])
    return fit_patch_whitening(classifier, images, recipe.train.seed)


def input_sharding(recipe: Recipe, strategy: tf.distribute.Strategy) -> dict[str, Any] | None:
    """How the pipelines are split between the workers of `strategy`, or None for one process.

    The training input by file where the source has a file per worker to split (a pack:
    `kcls.train.cluster.shard_policy`), by element otherwise; the validation input by
    element. Splitting by element keeps each worker's share of a global batch, so every
    worker must read the same examples in the same order: the pipelines are then ordered
    (`deterministic`), and the seeded shuffle does the rest.

    Returns:
        `{"train": "FILE" or "DATA", "validation": "DATA", "deterministic": bool,
        "replica_batch_size": int}`, as run.json records it.
    """
    if not is_multiworker(strategy):
        return None
    train = shard_policy(recipe.data.source, worker_of(strategy).count).name
    return {"train": train, "validation": "DATA",
            "deterministic": recipe.data.deterministic or train == "DATA",
            "replica_batch_size": recipe.data.batch_size // strategy.num_replicas_in_sync}


def plan_calibration(task: Task, recipe: Recipe, splits: Splits) -> tuple[Splits, Calibration]:
    """The task's calibration plan for `evaluate.calibrate` and the data, and the splits
    left after carving its examples off the training split when it needs to."""
    plan = task.calibration_plan(recipe.evaluate.calibrate, splits.validation is not None,
                                 recipe.export.reject_coverage)
    if not plan.carve_out:
        validation = splits.sizes["validation"]
        if (plan.method == "temperature" and recipe.evaluate.calibrate == "auto"
                and validation < MIN_TEMPERATURE_IMAGES):
            plan = dataclasses.replace(plan, method="none", skipped=(
                f"the validation split has {validation} images, under "
                f"{MIN_TEMPERATURE_IMAGES}: a temperature fitted on so few moves from run to "
                "run, so none is fitted (T=1); evaluate.calibrate=temperature fits one anyway"))
        return splits, Calibration(plan, splits.validation, validation, "validation split")
    train_count = splits.sizes["train"]
    splits, examples = carve_calibration_split(splits)
    return splits, Calibration(plan, examples, train_count - splits.sizes["train"],
                               "training carve-out (no validation split)")


def small_split_warnings(recipe: Recipe, splits: Splits, calibration: Calibration) -> list[str]:
    """One warning per held-out split under `SMALL_SPLIT_IMAGES` images that the run uses:
    the test split it is judged on, the examples it fits a temperature, thresholds or
    a rejection rule on, the validation split it is scored on with `evaluate.test=false`."""
    warnings = []
    test = splits.sizes["test"]
    if recipe.evaluate.test and test < SMALL_SPLIT_IMAGES:
        margin = 100 * 1.96 * math.sqrt(0.25 / max(test, 1))
        warnings.append(
            f"the test split has {test} images (under {SMALL_SPLIT_IMAGES}): its score is "
            f"known to about +-{margin:.0f} points (95% interval at 50%); give more test "
            "images (a separate folder: data.test_source=folder:PATH) before judging it")
    plan, count = calibration.plan, calibration.count
    uses = [what for what, used in (
        ("fit a calibration temperature", plan.method == "temperature"),
        ("tune per-label thresholds", plan.method == "thresholds"),
        ("fit the rejection threshold", plan.reject_coverage is not None),
        ("score the run (evaluate.test=false)", not recipe.evaluate.test)) if used]
    if plan.skipped:
        warnings.append(plan.skipped)
    elif uses and calibration.examples is not None and count < SMALL_SPLIT_IMAGES:
        warnings.append(
            f"the {calibration.fitted_on} has {count} images (under {SMALL_SPLIT_IMAGES}) to "
            f"{' and '.join(uses)} on: too few for a stable result; add images or raise "
            "data.validation_fraction")
    return warnings


def steps_per_epoch(recipe: Recipe, splits: Splits) -> int:
    """Whole batches in the training split, capped by `train.steps_per_epoch`."""
    steps = max(splits.sizes["train"] // recipe.data.batch_size, 1)
    return min(steps, recipe.train.steps_per_epoch) if recipe.train.steps_per_epoch else steps


def balanced_loss_weights(task: Task, recipe: Recipe, splits: Splits) -> LossWeights:
    """The task's `balanced` loss weights of the training split, or none (`train.class_weights`)."""
    if recipe.train.class_weights != "balanced":
        return LossWeights()

    def targets():  # TFDS keeps no labels aside: one pass over them
        if splits.train_labels is not None:
            return splits.train_labels
        return [label for _, label in splits.train.as_numpy_iterator()]

    return task.balanced_weights(lambda: train_class_counts(splits), targets)


def pipelines(recipe: Recipe, splits: Splits, loss_weights: LossWeights,
              host_augmentation: Augmentation | None, sharding: dict[str, Any] | None = None,
              worker: Worker | None = None) -> tuple[tf.data.Dataset, tf.data.Dataset | None]:
    """The infinite training batches and the finite validation batches (or None), split
    between workers as `sharding` (`input_sharding`) says, cached in `worker`'s own
    files (`kcls.train.cluster.worker_cache`)."""
    num_classes = len(splits.class_names)
    data = recipe.data
    if sharding is not None:
        data = dataclasses.replace(data, deterministic=sharding["deterministic"],
                                   cache=worker_cache(data.cache, worker or Worker()))
    train_batches = train_pipeline(splits.train, num_classes, data, loss_weights.per_class,
                                   splits.fingerprint, host_augment=host_augmentation)
    validation_batches = None
    if splits.validation is not None:
        validation_batches = eval_pipeline(splits.validation, num_classes, data,
                                           "validation", splits.fingerprint)
    if sharding is not None:
        policy = tf.data.experimental.AutoShardPolicy
        train_batches = distributable(train_batches, policy[sharding["train"]])
        if validation_batches is not None:
            validation_batches = distributable(validation_batches,
                                               policy[sharding["validation"]])
    return train_batches, validation_batches
