"""`pretrain`: SimCLR on a folder of unlabelled images, writing backbone weights for fine-tuning.

What `kcls pretrain` calls. Everything that can refuse the run (a folder with no
readable image, an unknown backbone, a bad kNN folder, a taken run directory) is
checked before the run directory is written or a step runs. The run directory
(default `runs/pretrain/<timestamp>`, see `kcls.layout`) then holds

    pretrain_config.json  the resolved `PretrainConfig`
    backbone.weights.h5   the pretrained backbone (projection head dropped), for
                          `--set model.weights=<run_dir>/backbone.weights.h5`
    pretrain_curves.png   loss (and kNN accuracy) per epoch
    run.json              versions, choices, per-epoch history, timings
    backup/               while it trains (without a time budget): the per-epoch logs
                          (`kcls.train.progress.TrainingProgress`) and Keras'
                          BackupAndRestore state (`pretrain/`), deleted at the end

A pretraining killed and started again with the same `--out` and settings resumes from
its last finished epoch, with the history of the epochs before the kill; other settings
are refused, naming them. A budgeted one is planned for one sitting and starts again.

Example:

>>> result = pretrain(PretrainConfig(source="folder:photos", epochs=50))  # doctest: +SKIP
>>> result.weights_path  # doctest: +SKIP
PosixPath('runs/pretrain/20260101-120000/backbone.weights.h5')
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kcls import __version__
from kcls.config import ConfigError, DataConfig, PretrainConfig, TrainConfig, parse_duration
from kcls.data.folder import decode_files, scan_folder, scan_images, skipped_files_line
from kcls.data.pipeline import prepare_image
from kcls.data.sources import split_indices
from kcls.environment import software_versions
from kcls.files import save_weights, write_json
from kcls.layout import (
    BACKBONE_WEIGHTS_FILE,
    BACKUP_DIR,
    PRETRAIN_CONFIG_FILE,
    PRETRAIN_CURVES_PLOT,
    RUN_INFO_FILE,
)
from kcls.models.backbones import build_backbone, check_backbone
from kcls.ssl.augment import ContrastiveAugment
from kcls.ssl.simclr import KnnMonitor, SimCLR
from kcls.train.budget import MAX_EPOCHS, BudgetPlanner, BudgetProgress, TimeBudget
from kcls.train.compute import describe_devices, resolve_jit_compile
from kcls.train.progress import TrainingProgress
from kcls.train.schedule import WarmupCosine, make_optimizer
from kcls.workflows.run_directory import check_run_dir, claim_run_dir

RUN_NAME = "pretrain"
KNN_HOLDOUT = 0.2  # share of the labelled kNN images classified by the others' votes
FEATURE_BATCH = 256  # images per batch when computing kNN features
# With a time budget: seconds kept after training for saving the weights and the plot.
AFTER_TRAINING_SECONDS = 5.0


@dataclass
class PretrainData:
    """What pretraining reads.

    Attributes:
        images: dataset of unlabelled uint8 `[H, W, 3]` images.
        count: number of images in `images`.
        skipped: files of the source that were unreadable or undecodable.
        knn_memory: dataset of labelled `(uint8 [H, W, 3], int64)` examples whose kNN
            votes classify `knn_query`, or None for no kNN accuracy.
        knn_query: dataset of the same structure, or None.
    """

    images: tf.data.Dataset
    count: int
    skipped: list[str] = field(default_factory=list)
    knn_memory: tf.data.Dataset | None = None
    knn_query: tf.data.Dataset | None = None


@dataclass
class PretrainResult:
    """What a pretraining run produced: `run_dir`, `weights_path` (the backbone's
    `.weights.h5`), `history` (per-epoch `loss`, `knn_accuracy`) and the `model`."""

    run_dir: Path
    weights_path: Path
    history: dict[str, list[float]]
    model: SimCLR = field(repr=False)


def load_pretrain_data(config: PretrainConfig) -> PretrainData:
    """Scans `config.source` (and `config.knn_source`) and checks them.

    Raises:
        ConfigError: no source, a missing folder, one without readable images, or a kNN folder
            that is not a labelled image folder with at least two classes.
    """
    if config.source is None:
        raise ConfigError("pretrain.source is not set: pass the folder of images to pretrain "
                          "on, e.g. pretrain.source=folder:photos (kcls pretrain FOLDER).")
    files = scan_images(config.source.partition(":")[2])
    def image_only(image: tf.Tensor, label: tf.Tensor) -> tf.Tensor:
        return image

    data = PretrainData(
        decode_files(files.paths, files.labels, files.skipped).map(
            image_only, num_parallel_calls=tf.data.AUTOTUNE),
        len(files.paths), files.skipped)
    if config.knn_source is not None:
        labelled = scan_folder(config.knn_source.partition(":")[2])
        try:
            memory, _, query = split_indices(labelled.labels, DataConfig(
                test_fraction=KNN_HOLDOUT, validation_fraction=0.0, seed=config.seed))
        except ValueError:
            raise ConfigError(
                f"pretrain.knn_source={config.knn_source!r} has too few images per class to "
                f"hold {KNN_HOLDOUT:.0%} of each class out; add images or leave "
                "knn_source out.") from None
        paths = np.asarray(labelled.paths)
        data.knn_memory = decode_files(paths[memory], labelled.labels[memory])
        data.knn_query = decode_files(paths[query], labelled.labels[query])
    return data


def pretrain(config: PretrainConfig, run_dir: str | Path | None = None,
             log: Callable[[str], None] = print, verbose: int | str = "auto",
             data: PretrainData | None = None) -> PretrainResult:
    """Pretrains `config.backbone` with SimCLR and writes its weights into the run directory.

    Args:
        config: PretrainConfig.
        run_dir: where to write; default a new `runs/pretrain/<timestamp>`. A directory
            holding a finished run (`run.json`) is refused.
        log: receives one-line progress messages.
        verbose: Keras `fit()` verbosity (a bar by default; 2: one line per epoch).
        data: images to use instead of `config.source` (and `config.knn_source`), e.g.
            in-memory arrays in a benchmark.

    Returns:
        PretrainResult; `weights_path` loads with `build_backbone(config.backbone,
        config.image_size, weights=str(weights_path))` and `model.weights=PATH`.

    Raises:
        ConfigError: anything `load_pretrain_data` refuses, an unknown backbone or
            unusable weights, or a run directory that is taken (all before training).
    """
    started = time.time()
    check_backbone(config.backbone)
    data = data or load_pretrain_data(config)
    steps_per_epoch = max(data.count // config.batch_size, 1)
    if run_dir is not None:
        check_run_dir(run_dir)
        pretrain_progress(config, steps_per_epoch, run_dir, write=False)  # same settings?
    jit_compile, jit_reason = resolve_jit_compile(config.jit_compile, config.backbone)
    model, schedule = build_simclr(config, steps_per_epoch, jit_compile)
    with claim_run_dir(run_dir, RUN_NAME, log) as run_dir:
        write_json(run_dir / PRETRAIN_CONFIG_FILE, dataclasses.asdict(config))
        log(f"kcls {__version__} | pretrain {config.backbone} (SimCLR, from "
            f"{config.weights or 'random initialisation'}) | {describe_devices()} | XLA "
            f"{'on' if jit_compile else 'off'} ({jit_reason}) | {data.count} images, "
            f"{steps_per_epoch} steps of {config.batch_size} per epoch | run dir {run_dir}")
        progress = pretrain_progress(config, steps_per_epoch, run_dir)
        if progress.started:
            log(f"resuming the interrupted pretraining in {run_dir} after its epoch "
                f"{progress.last_epoch(0, MAX_EPOCHS) + 1}")
        callbacks, epochs, budget = pretraining_callbacks(config, data, schedule,
                                                          steps_per_epoch)
        if progress.path is not None:  # first the epoch's logs, then Keras' backup
            callbacks += [progress.recorder(), keras.callbacks.BackupAndRestore(
                str(run_dir / BACKUP_DIR / RUN_NAME))]
        fitted = model.fit(_image_batches(data, config), steps_per_epoch=steps_per_epoch,
                           epochs=epochs, verbose=verbose, shuffle=False,
                           callbacks=callbacks).history
        seconds = {"training": round(time.time() - started, 1)}
        weights_path = save_weights(model.backbone, run_dir / BACKBONE_WEIGHTS_FILE)
        history = {name: [float(value) for value in values] for name, values in (
            progress.history() if progress.path is not None else fitted).items()}
        shutil.rmtree(run_dir / BACKUP_DIR, ignore_errors=True)
        plot_pretrain_curves(history, run_dir / PRETRAIN_CURVES_PLOT)
        run_info: dict[str, Any] = {
            **software_versions(), "devices": describe_devices(),
            "method": "simclr", "jit_compile": bool(model.jit_compile),
            "jit_compile_reason": jit_reason, "images": data.count,
            "steps_per_epoch": steps_per_epoch, "epochs": len(history.get("loss", [])),
            "history": history, "skipped_files": data.skipped,
            "backbone_weights": str(weights_path), "resumed": progress.started,
            "seconds": {**seconds, "total": round(time.time() - started, 1)}}
        if budget is not None:
            run_info["time_budget"] = budget.summary()
        write_json(run_dir / RUN_INFO_FILE, run_info)
        log_result(config, data, run_info, weights_path, log)
        return PretrainResult(run_dir, weights_path, history, model)


def pretrain_progress(config: PretrainConfig, steps_per_epoch: int, run_dir: Path,
                      write: bool = True) -> TrainingProgress:
    """The per-epoch logs of an interrupted pretraining in `run_dir` (empty when there are
    none, or with a time budget: a budgeted run is planned for one sitting).

    Raises:
        ConfigError: the interrupted pretraining had other settings (named).
    """
    backup_dir = Path(run_dir) / BACKUP_DIR if config.time_budget is None else None
    return TrainingProgress.load(backup_dir, {**dataclasses.asdict(config),
                                              "steps_per_epoch": steps_per_epoch}, write)


def build_simclr(config: PretrainConfig, steps_per_epoch: int, jit_compile: bool
                 ) -> tuple[SimCLR, WarmupCosine]:
    """The seeded backbone inside SimCLR, compiled with AdamW on a warm-up-cosine schedule
    (the fine-tuning optimizer, `kcls.train.schedule.make_optimizer`)."""
    keras.utils.set_random_seed(config.seed)
    backbone = build_backbone(config.backbone, config.image_size, config.weights)
    augment = ContrastiveAugment(config.crop_scale, config.color_jitter, config.grayscale,
                                 config.horizontal_flip, seed=config.seed)
    model = SimCLR(backbone, augment, config.temperature, config.projection_hidden,
                   config.projection_dim)
    schedule = WarmupCosine(config.learning_rate, config.epochs * steps_per_epoch,
                            config.warmup_fraction)
    model.compile(optimizer=make_optimizer(schedule, TrainConfig(
        optimizer="adamw", weight_decay=config.weight_decay)), jit_compile=jit_compile)
    # Built now, not in the first step: a lazily built optimizer makes Keras trace the
    # training step twice per fit() (measured: 11 s -> 6 s for a tiny pretraining run).
    model.optimizer.build(model.trainable_variables)
    return model, schedule


def pretraining_callbacks(config: PretrainConfig, data: PretrainData, schedule: WarmupCosine,
                          steps_per_epoch: int
                          ) -> tuple[list[keras.callbacks.Callback], int, TimeBudget | None]:
    """The callbacks of `fit()` (NaN guard, kNN monitor, budget planner), the epochs to
    ask for and the time budget, if any."""
    callbacks: list[keras.callbacks.Callback] = [keras.callbacks.TerminateOnNaN()]
    if data.knn_memory is not None and data.knn_query is not None:
        callbacks.append(KnnMonitor(_feature_batches(data.knn_memory, config),
                                    _feature_batches(data.knn_query, config),
                                    config.knn_neighbors))
    if config.time_budget is None:
        return callbacks, config.epochs, None
    budget = TimeBudget(parse_duration(config.time_budget), evaluation_images=0,
                        fixed_seconds=AFTER_TRAINING_SECONDS)
    planner = BudgetPlanner(budget, schedule, 0, steps_per_epoch, config.batch_size,
                            share=1.0, name=RUN_NAME)
    return callbacks + [BudgetProgress(planner), planner], MAX_EPOCHS, budget  # last: times all


def log_result(config: PretrainConfig, data: PretrainData, run_info: dict[str, Any],
               weights_path: Path, log: Callable[[str], None]) -> None:
    """The skipped files, then one line: epochs, loss, kNN accuracy, how to fine-tune."""
    if data.skipped:
        log(skipped_files_line(data.skipped))
    history = run_info["history"]
    knn = history.get("knn_accuracy")
    log(f"pretrained {run_info['epochs']} epochs in {run_info['seconds']['training']:.0f} s: "
        f"loss {history['loss'][-1]:.4f}" + (f", kNN accuracy {knn[-1]:.4f}" if knn else "")
        + f"; backbone weights {weights_path} (fine-tune with --set "
        f"model.backbone={config.backbone} --set model.weights={weights_path})")


def _image_batches(data: PretrainData, config: PretrainConfig) -> tf.data.Dataset:
    """Infinite, shuffled float32 `[B, S, S, 3]` batches in [0, 255] (views are made later)."""
    def prepare(image: tf.Tensor) -> tf.Tensor:
        return tf.cast(tf.round(prepare_image(image, config.image_size, config.resize)), tf.uint8)

    def as_float(batch: tf.Tensor) -> tf.Tensor:
        return tf.cast(batch, tf.float32)

    images = data.images.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    if config.cache == "memory":
        images = images.cache()
    images = images.shuffle(min(data.count, 10_000), seed=config.seed).repeat()
    batches = images.batch(config.batch_size, drop_remainder=True,
                           num_parallel_calls=tf.data.AUTOTUNE)
    return batches.map(as_float, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _feature_batches(examples: tf.data.Dataset, config: PretrainConfig) -> tf.data.Dataset:
    """One ordered, cached pass of `(float32 [B, S, S, 3], int64 [B])` for the kNN monitor."""
    def prepare(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return prepare_image(image, config.image_size, config.resize), label

    return (examples.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(FEATURE_BATCH)
            .cache().prefetch(tf.data.AUTOTUNE))


def plot_pretrain_curves(history: dict[str, list[float]], path: Path) -> Path:
    """Loss (and kNN accuracy, when measured) per epoch, as a PNG at `path`."""
    from kcls.figures import plt, save_figure  # matplotlib only when plotting

    metrics = [name for name in ("loss", "knn_accuracy") if history.get(name)]
    figure, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        axis.plot(np.arange(1, len(history[metric]) + 1), history[metric], marker="o")
        axis.set_xlabel("epoch")
        axis.set_title(metric)
    return save_figure(figure, path)
