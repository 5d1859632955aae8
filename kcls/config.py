"""Recipe configuration: frozen dataclasses, strict typed overrides, JSON.

A recipe is data. Each section is a frozen dataclass whose fields carry their
type and default; `apply_overrides` parses `section.field=value` strings with the
field's type, so `--set train.frozen_epochs=3` becomes an `int` and a typo fails
with the list of valid keys instead of being silently ignored.

Example:

>>> recipe = Recipe(name="demo")
>>> recipe = apply_overrides(recipe, ["train.frozen_epochs=3", "data.batch_size=32"])
>>> recipe.train.frozen_epochs, recipe.data.batch_size
(3, 32)
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

Precision = Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"]
Optimizer = Literal["adamw", "sgd"]
Strategy = Literal["auto", "mirrored", "multiworker", "default"]
AugmentPolicy = Literal["none", "light", "randaugment", "strong"]
ResizeMode = Literal["resize", "center_crop", "pad"]
ClassWeights = Literal["none", "balanced"]
Calibrate = Literal["auto", "temperature", "none"]
Task = Literal["multiclass", "multilabel"]
# How a source's labels are read: one class index per image, or a multi-hot label set.
LabelFormat = Literal["class_index", "multi_hot"]
DownloadPolicy = Literal["auto", "never"]
JitCompile = Union[bool, Literal["auto"]]
CheckLeaks = Union[bool, Literal["auto"]]
LearningRate = Union[float, Literal["auto"]]
RejectCoverage = Union[float, Literal["auto"]]



@dataclass(frozen=True)
class TaskCapabilities:
    """What a problem type (`model.task`, a `kcls.tasks.Task`) supports: the dataclasses
    check recipes against it, the task reads it back.

    Attributes:
        calibrations: the `evaluate.calibrate` values it accepts.
        calibration_note: why others are refused.
        flip_tta: whether flip test-time augmentation is measured (`evaluate.flip_tta`).
        rejection: whether exports learn a rule for unknown images (`export.reject_coverage`).
        label_format: how the sources read labels for it (`Recipe.label_format`): a
            manifest's `label` column as one class index, or its `labels` column as a
            multi-hot set.
    """

    calibrations: tuple[str, ...]
    calibration_note: str
    flip_tta: bool
    rejection: bool
    label_format: LabelFormat


TASK_CAPABILITIES = {
    "multiclass": TaskCapabilities(("auto", "temperature", "none"),
                                   "temperature scaling of the softmax", True, True,
                                   "class_index"),
    # One temperature rescales a softmax; per-label sigmoids get per-label thresholds.
    # A multi-label model already answers "no label" when none reaches its threshold.
    "multilabel": TaskCapabilities(("auto", "none"), "per-label thresholds are tuned on the "
                                   "validation split instead", False, False, "multi_hot"),
}

class ConfigError(ValueError):
    """A configuration value or override that cannot be used, with the fix in its message."""


MIN_IMAGE_SIZE = 16
# Every image becomes a square of `image_size` pixels before the network: at 2048 px a
# batch of 64 float32 images alone is 3.2 GB, and the activations are many times that.
# Larger inputs exhaust the memory of any single device: downscale or tile the images.
MAX_IMAGE_SIZE = 2048
# NumPy's and Python's seeding accept 0 <= seed < 2**32 (TensorFlow more).
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are batched.

    Attributes:
        source: `sklearn:digits` (bundled, offline), `tfds:NAME`, `folder:PATH` (class
            folders, or split folders `train/`, `val/`, `test/` of class folders),
            `manifest:PATH.csv` (a CSV of `path,label` rows, or `path,labels` with
            `model.task=multilabel`; `kcls.data.manifest`) or `tfrecord:DIR`
            (a pack of TFRecord shards written by `kcls data pack`, whose splits are the
            ones frozen at pack time; see docs/data.md).
        data_dir: TFDS data directory; `None` means the TFDS default (`~/tensorflow_datasets`).
        download: what a `tfds:NAME` source that is not prepared in `data_dir` does: `auto`
            downloads and prepares it through TFDS itself (its checksums and progress bars;
            once, then it is read from `data_dir`), `never` stops before training with
            the commands that prepare it elsewhere.
        train_split: TFDS split (slicing allowed, e.g. `train[:90%]`) for training and
            validation.
        test_split: TFDS split held out for the final evaluation. Sources without
            splits carve `test_fraction` of the data off instead.
        validation_fraction: share of the training split carved off (stratified,
            seeded) for validation.
        test_fraction: share held out for testing by sources that have no test split.
        test_source: a separate test set, `folder:PATH` or `manifest:PATH.csv`, with the
            classes of `source`: every image of it is the test split, and none is carved
            from `source` (a `folder:` or `manifest:` source without its own test split),
            which gives training and validation only. `None`: the test split comes from
            `source`.
        image_size: side of the square model input, in pixels: 16 to 2048 (larger
            inputs exhaust a device's memory; downscale or tile large images).
        resize: how images become squares: `resize` (stretch), `center_crop` (keep the
            aspect ratio, crop the longer side) or `pad` (keep the aspect ratio, pad with black).
        batch_size: global batch size (summed over replicas).
        augment: augmentation policy name (see `kcls.data.augment`).
        horizontal_flip: whether mirror images are still the same class (False for digits, text).
        mixup: probability that a `strong` batch is mixed with MixUp.
        cutmix: probability that a `strong` batch is mixed with CutMix (mixup + cutmix <= 1).
        cutout: side of the square erased from every training image
            (`kcls.data.augment.Cutout`), as a fraction of the image side, in [0, 0.9];
            0 erases nothing.
        cache: `memory` keeps decoded examples in RAM after the first epoch, `none`
            decodes every epoch, any other value is a file prefix for an on-disk cache
            (a file per split, named after a digest of the data and of the settings that
            shape the cached examples, so a changed seed or source never replays it).
        shuffle_buffer: number of examples in the shuffle buffer.
        deterministic: same seed, same batches in the same order (slower: ordered tf.data).
        seed: seed for splitting, shuffling and augmentation (whose random draws derive
            from it, one seed per training step and replica); 0 to 2**32 - 1.
        check_leaks: whether a run of a `folder:` or `manifest:` source looks for
            validation and test images that have an exact or near copy in another split
            before training (one decode of every image: ~2.5 s per 10,000 small JPEGs;
            `kcls.data.leaks`), warns about them and names them in run.json and the report:
            `true`, `false`, or `auto` (the default): up to 20,000 images
            (`kcls.data.leaks.LEAK_CHECK_MAX_IMAGES`; larger sources are checked once
            with `kcls data check`, and the run says so).
        drop_leaks: remove the training copies of leaked validation and test images from
            the training split, for every command that reads it (runs, `kcls optimize`,
            `kcls data pack`); needs `check_leaks`.
    """

    source: str = "sklearn:digits"
    data_dir: Optional[str] = None
    download: DownloadPolicy = "auto"
    train_split: str = "train"
    test_split: str = "test"
    validation_fraction: float = 0.1
    test_fraction: float = 0.2
    test_source: Optional[str] = None
    image_size: int = 32
    resize: ResizeMode = "resize"
    batch_size: int = 64
    augment: AugmentPolicy = "light"
    horizontal_flip: bool = True
    mixup: float = 0.5
    cutmix: float = 0.5
    cutout: float = 0.0
    cache: str = "memory"
    shuffle_buffer: int = 10_000
    deterministic: bool = False
    seed: int = 0
    check_leaks: CheckLeaks = "auto"
    drop_leaks: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "data")
        kind, separator, _ = self.source.partition(":")
        _require(kind in ("sklearn", "tfds", "folder", "manifest", "tfrecord")
                 and bool(separator), "data.source", self.source,
                 "one of 'sklearn:digits', 'tfds:NAME', 'folder:PATH', "
                 "'manifest:PATH.csv' or 'tfrecord:DIR' (a pack, kcls data pack)")
        _require(self.test_source is None
                 or (self.test_source.partition(":")[0] in ("folder", "manifest")
                     and bool(self.test_source.partition(":")[2])), "data.test_source",
                 self.test_source, "'folder:PATH' or 'manifest:PATH.csv' (or none)")
        _require(self.test_source is None
                 or self.source.partition(":")[0] in ("folder", "manifest"), "data.test_source",
                 self.test_source, f"none with data.source={self.source} (a separate test "
                 "source goes with a folder: or manifest: source; TFDS has data.test_split)")
        _require(0.0 <= self.validation_fraction < 1.0, "data.validation_fraction",
                 self.validation_fraction, "a number in [0, 1)")
        _require(0.0 < self.test_fraction < 1.0, "data.test_fraction", self.test_fraction,
                 "a number in (0, 1)")
        check_image_size(self.image_size, "data.image_size")
        _require(self.batch_size >= 1, "data.batch_size", self.batch_size, "a positive integer")
        _require(self.shuffle_buffer >= 1, "data.shuffle_buffer", self.shuffle_buffer,
                 "a positive integer")
        _require(0.0 <= self.mixup and 0.0 <= self.cutmix and self.mixup + self.cutmix <= 1.0,
                 "data.mixup", (self.mixup, self.cutmix),
                 "probabilities data.mixup and data.cutmix >= 0 with a sum of at most 1")
        _require(0.0 <= self.cutout <= 0.9, "data.cutout", self.cutout,
                 "a fraction of the image side in [0, 0.9] (0: no Cutout)")
        _require(self.cutout == 0.0 or self.augment != "none", "data.cutout", self.cutout,
                 "0 with data.augment=none (Cutout is a stage of an augmentation policy)")
        _require(bool(self.cache.strip()), "data.cache", self.cache,
                 "'memory', 'none' or a file prefix for an on-disk cache")
        _require(self.check_leaks is not False or not self.drop_leaks, "data.drop_leaks",
                 self.drop_leaks,
                 "false when data.check_leaks=false (drop_leaks drops the leaks the check "
                 "finds: set data.check_leaks=true)")


@dataclass(frozen=True)
class ModelConfig:
    """The network: a named backbone and a classification head.

    Attributes:
        backbone: a name from `kcls.models.backbones.BACKBONES`, or a preset:
            `keras_hub:PRESET_OR_PATH` (a KerasHub image backbone preset, e.g.
            `keras_hub:resnet_50_imagenet`, or a local preset folder; its image converter's
            scale and offset are folded into the model; `pip install "kcls[hub]"`) or
            `keras_cv:PRESET_OR_PATH` (a KerasCV backbone preset or folder).
        weights: `None` (random init), `imagenet` (offline for `efficientnet_lite0`,
            `efficientnet_lite1` and `efficientnet_lite2`, whose weights ship with kcls; for
            the others the KerasCV preset, downloaded once and cached; for a `keras_hub:` or
            `keras_cv:` backbone the preset's own pretrained weights), a KerasCV preset
            folder of the backbone's architecture (its ImageNet preset copied from a
            machine that downloaded it) or a path to a `.weights.h5` file saved from the
            same backbone.
        dropout: dropout rate before the classification layer.
        task: `multiclass` (one label per image: softmax and categorical cross-entropy)
            or `multilabel` (any set of labels per image: one sigmoid per label and
            binary cross-entropy; see docs/multilabel.md).
    """

    backbone: str = "resnet_v2_tiny"
    weights: Optional[str] = None
    dropout: float = 0.2
    task: Task = "multiclass"

    def __post_init__(self) -> None:
        check_fields(self, "model")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a number in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """The two-phase fine-tuning schedule and how it is computed.

    Phase 1 trains the head on a frozen backbone; phase 2 unfreezes the backbone (all
    of it or its top blocks; BatchNorm trains from scratch and stays in inference mode
    on pretrained weights, see `train_batchnorm`) at `learning_rate * unfrozen_lr_factor`.
    Durations are in epochs; `steps_per_epoch` only caps an epoch for quick runs.

    Attributes:
        frozen_epochs: epochs of phase 1 (0 skips it).
        unfrozen_epochs: epochs of phase 2 (0 skips it).
        unfreeze: what phase 2 trains: `all` of the backbone, or `N`, its top N blocks
            (see `kcls.models.backbones.backbone_blocks` for what a block is per family).
        train_batchnorm: let the BatchNorm layers of the unfrozen blocks train in phase 2
            (batch statistics, updated moving averages); off keeps them in inference mode.
            `None` (auto): train them when the backbone starts from random initialisation
            (`model.weights` none), whose statistics must be learned, and keep them in
            inference mode on pretrained weights, whose statistics small fine-tuning
            batches would spoil. After a phase that trained them, their statistics are
            re-estimated with the final weights (`kcls.train.batchnorm`). `run.json`
            records the value used.
        optimizer: `adamw`, or `sgd` with Nesterov momentum 0.9; both decay weights decoupled.
        learning_rate: peak learning rate of phase 1, or `auto`: before each phase the
            learning-rate range test (`kcls lr-find`, `kcls.train.lr_find`) runs on the
            phase's model and data, and its suggestion is the phase's peak rate
            (`unfrozen_lr_factor` is then unused); `run.json` records the rates chosen.
        lr_find_steps: with `learning_rate=auto`, the most steps each phase's range test
            takes (it stops sooner when the loss diverges; at least 5). Each is a training
            step, all-reduced between workers under `strategy=multiworker`: fewer save
            time on slow steps but give a coarser curve and a less reliable rate
            (quickstart trained 3 epochs of 10 steps: with 30 steps of range test it
            chose 1.7e-3 and scored 0.66-0.69; with 100, 6.6e-3 and 0.87-0.91).
        unfrozen_lr_factor: phase 2 peak learning rate as a fraction of phase 1's.
        layer_decay: layer-wise learning rates: backbone block `k` counted from the top
            (the last block `k = 1`, the stem `k = n`) trains at the phase's rate times
            `layer_decay**k`, the head at the full rate (BEiT/timm's `--layer-decay`;
            see `kcls.train.layerwise`). `None` (or 1): one rate for every layer.
        warmup_fraction: share of each phase spent in linear warm-up before cosine decay.
        weight_decay: decoupled weight decay (not applied to biases and norms).
        clipnorm: clip each gradient to this L2 norm; `None` does not clip.
        ema: keep an exponential moving average of the weights (momentum 0.99) and write
            it into the model at the end of each phase, so evaluation and export use it.
        wise_ft: at the end of the backbone-training phase, move the weights back toward
            the ones the frozen phase ended with: `(1 - wise_ft) * frozen + wise_ft *
            fine-tuned`, every weight of backbone and head (WiSE-FT, Wortsman et al. 2022,
            with the frozen phase's probe as the starting model; `kcls.train.interpolate`).
            It keeps more of the pretrained features, at no cost in training or inference:
            0.5 scored 0.935 against 0.926 on hymenoptera photos (3 seeds), but 0.863
            against 0.884 on CIFAR-10, whose backbone must move further (0.9: 0.886;
            docs/transfer.md). `None`: the fine-tuned weights. Needs pretrained weights, a
            frozen phase and an unfrozen one.
        label_smoothing: label smoothing of the cross-entropy loss.
        class_weights: `balanced` weighs each training example's loss by
            `n / (classes * n_class)` (scikit-learn's formula: every class counts as
            much in total, the mean weight stays 1) so rare classes are not ignored;
            `none` weighs all examples alike. Training loss and accuracy are then weighted.
        steps_per_epoch: cap on training steps per epoch; `None` uses the whole split.
        time_budget: wall-clock budget from the first training step to the end of the
            export (`480`, `90s`, `8m`, `1.5h`, `1h30m`): the epochs of each phase are then
            planned from the measured step time, the configured epochs only set the phases'
            shares of the time (see `kcls.train.budget`). `None`: epochs as configured.
        early_stopping_patience: end a phase after this many epochs without a better
            validation loss, keeping the best weights; 0 turns early stopping off.
        precision: `auto` picks mixed precision where the device has fast low-precision
            math: TPUs and GPUs, and CPUs with AVX512-BF16 or AMX-BF16 for the backbones
            measured faster in `mixed_bfloat16` there (`kcls.train.compute.BF16_CPU_SPEEDUP`;
            the compact ResNets, not EfficientNet-Lite0); `run.json` records the choice and
            why (`precision_reason`).
        jit_compile: compile the training step with XLA: `true`, `false`, or `auto`: XLA on
            GPUs and TPUs, and on CPUs only for the backbones measured faster with it
            there (`kcls.train.compute.XLA_CPU_SPEEDUP`; none so far: on a 2-core CPU
            EfficientNetV2-B0 trained at 0.41x the speed with XLA, `resnet_v2_tiny` at
            0.77x, `compact_resnet` at 0.72x; under `multiworker` XLA cannot compile the
            workers' collectives for CPUs, so `auto` is off there and `true` an error).
            `run.json` records the value used and why.
        strategy: `auto` (TPUStrategy when a TPU is configured, MirroredStrategy on several
            GPUs, else the default), `mirrored` (all local GPUs, or all logical CPUs),
            `multiworker` (MultiWorkerMirroredStrategy from `TF_CONFIG`, every worker with
            the same `--out` on shared storage, or `kcls recipe run NAME --workers N`; see
            docs/distributed.md) or `default`.
        seed: seed for weight initialisation and dropout; 0 to 2**32 - 1.
    """

    frozen_epochs: int = 2
    unfrozen_epochs: int = 3
    unfreeze: str = "all"
    train_batchnorm: Optional[bool] = None
    optimizer: Optimizer = "adamw"
    learning_rate: LearningRate = 1e-3
    lr_find_steps: int = 100
    unfrozen_lr_factor: float = 0.1
    layer_decay: Optional[float] = None
    warmup_fraction: float = 0.1
    weight_decay: float = 1e-4
    clipnorm: Optional[float] = None
    ema: bool = False
    wise_ft: Optional[float] = None
    label_smoothing: float = 0.1
    class_weights: ClassWeights = "none"
    steps_per_epoch: Optional[int] = None
    time_budget: Optional[str] = None
    early_stopping_patience: int = 0
    precision: Precision = "auto"
    jit_compile: JitCompile = "auto"
    strategy: Strategy = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, "train")
        _require(self.frozen_epochs >= 0, "train.frozen_epochs", self.frozen_epochs, "0 or more")
        _require(self.unfrozen_epochs >= 0, "train.unfrozen_epochs", self.unfrozen_epochs,
                 "0 or more")
        _require(self.frozen_epochs + self.unfrozen_epochs > 0, "train.frozen_epochs",
                 self.frozen_epochs, "at least one epoch in one of the two phases")
        _require(self.learning_rate == "auto" or self.learning_rate > 0, "train.learning_rate",
                 self.learning_rate, "a positive number or auto (the learning-rate finder)")
        _require(self.lr_find_steps >= 5, "train.lr_find_steps", self.lr_find_steps,
                 "5 or more")
        _require(self.layer_decay is None or 0.0 < self.layer_decay <= 1.0, "train.layer_decay",
                 self.layer_decay, "a number in (0, 1], e.g. 0.75, or none")
        _require(self.wise_ft is None or 0.0 <= self.wise_ft <= 1.0, "train.wise_ft",
                 self.wise_ft, "a number in [0, 1], e.g. 0.5, or none")
        _require(self.wise_ft is None or (self.frozen_epochs > 0 and self.unfrozen_epochs > 0),
                 "train.wise_ft", self.wise_ft, "none unless train.frozen_epochs and "
                 "train.unfrozen_epochs are both above 0 (it interpolates between the ends "
                 "of the two phases)")
        _require(self.unfrozen_lr_factor > 0, "train.unfrozen_lr_factor",
                 self.unfrozen_lr_factor, "a positive number")
        _require(0.0 <= self.warmup_fraction < 1.0, "train.warmup_fraction",
                 self.warmup_fraction, "a number in [0, 1)")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "0 or more")
        _require(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing",
                 self.label_smoothing, "a number in [0, 1)")
        _require(self.steps_per_epoch is None or self.steps_per_epoch >= 1,
                 "train.steps_per_epoch", self.steps_per_epoch, "a positive integer or none")
        _require(self.unfreeze == "all" or (self.unfreeze.isdigit() and int(self.unfreeze) >= 1),
                 "train.unfreeze", self.unfreeze,
                 "'all' or a positive number of top backbone blocks")
        _require(self.clipnorm is None or self.clipnorm > 0, "train.clipnorm", self.clipnorm,
                 "a positive number or none")
        _check_duration(self.time_budget, "train.time_budget")
        _require(self.early_stopping_patience >= 0, "train.early_stopping_patience",
                 self.early_stopping_patience, "0 (off) or a positive number of epochs")


@dataclass(frozen=True)
class EvaluateConfig:
    """The final evaluation on the held-out split.

    Attributes:
        flip_tta: also report metrics with horizontal-flip test-time augmentation
            (averaged probabilities of each image and its mirror), beside the plain ones.
        shift_tta: with `flip_tta`, also average the image and its mirror shifted by one
            pixel up-left and down-right (six views; `kcls.data.tta`).
        mistakes: how many of the most confident mistakes the report shows.
        calibrate: `temperature` fits one temperature T on held-out data after training
            (the validation split; without one, 10% of the training split is held out
            for it, `kcls.data.sources.carve_calibration_split`) by minimising the NLL,
            and the export serves `softmax(logits / T)` (Guo et al. 2017; accuracy is
            unchanged); `none` serves `softmax(logits)`; `auto`: `temperature` when the
            recipe has a validation split, else `none`. `run.json`, `kcls.json` and the
            report record T and the test NLL and ECE before and after it.
        test: evaluate on the test split at the end (metrics, report, samples, reference
            profile, export). `false` never reads the test split: the run is scored on
            the validation split (`run.json` `metrics`, `evaluated_split`) and writes no
            report, samples or export (`export.enabled` must be false). Every trial of
            `kcls tune` runs so (docs/tuning.md); the test split is read once, for the winner.
    """

    flip_tta: bool = False
    shift_tta: bool = False
    mistakes: int = 16
    calibrate: Calibrate = "auto"
    test: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "evaluate")
        _require_flip_for_shifts(self.flip_tta, self.shift_tta, "evaluate")
        _require(self.mistakes >= 0, "evaluate.mistakes", self.mistakes, "0 or more")


@dataclass(frozen=True)
class ExportConfig:
    """Where and how the float32 SavedModel is written.

    Attributes:
        enabled: export at the end of `recipe run`.
        base_dir: TF Serving base path; versions land in `<base_dir>/<model_name>/<N>/`.
        model_name: name of the served model, one folder name (no `/`, `\\`, leading `.` or
            control characters); `None`: the image folder's name for `data.source=folder:PATH`
            (`hymenoptera-train` for `.../hymenoptera/train`, so two data sets never become
            versions of one served model), else the recipe name.
        top_k: number of classes the signatures return.
        flip_tta: serve the average of the probabilities of each image and its mirror
            (what `evaluate.flip_tta` measures), at twice the inference cost.
        shift_tta: with `flip_tta`, serve the average over six views (the image and its
            mirror, each also shifted by one pixel up-left and down-right: what
            `evaluate.shift_tta` measures), at six times the inference cost.
        reject_coverage: the share of in-distribution images the rejection rule keeps
            as known: after training, a threshold on the cosine similarity of an image's
            embedding to the nearest class mean (means of the training images) is chosen
            on the held-out validation images to keep this share, and every export serves
            `known` (False: the image looks like none of the classes; `kcls predict` says
            `unknown`) and `known_score` (docs/serving.md, "Rejecting unknown images").
            `auto`: 0.95 when the recipe has a validation split (single-label models),
            else none; a number without a validation split holds 10% of the training
            split out for it; `none`: no rule.
        onnx: also write `model.onnx` into each export version (ONNX Runtime, OpenVINO,
            TensorRT, Triton; `pip install "kcls[onnx]"`), checked against the SavedModel
            on the test split: under 99.9% top-1 agreement the export is refused.
    """

    enabled: bool = True
    base_dir: str = "saved_models"
    model_name: Optional[str] = None
    top_k: int = 5
    flip_tta: bool = False
    shift_tta: bool = False
    reject_coverage: Optional[RejectCoverage] = "auto"
    onnx: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "export")
        if self.model_name is not None:
            check_name(self.model_name, "export.model_name")
        _require(self.top_k >= 1, "export.top_k", self.top_k, "a positive integer")
        _require_flip_for_shifts(self.flip_tta, self.shift_tta, "export")
        _require(self.reject_coverage in ("auto", None) or 0.0 < self.reject_coverage < 1.0,
                 "export.reject_coverage", self.reject_coverage,
                 "a share of images in (0, 1), e.g. 0.95, auto or none")


@dataclass(frozen=True)
class TrackConfig:
    """Where a run reports its parameters, curves, metrics and files (`kcls.tracking`).

    Attributes:
        mlflow: MLflow tracking URI: `sqlite:///mlruns.db`, a folder (`./mlruns`,
            `file:///...`) or a tracking server (`http://HOST:5000`). Each run becomes an
            MLflow run with the resolved recipe as parameters, per-epoch metrics of both
            phases, the final metrics, the report and plots as artifacts, the export's
            path and version and the git commit; failed or interrupted runs are marked
            so. Needs `pip install "kcls[mlflow]"`. `None`: no tracking.
        experiment: MLflow experiment name; `None` uses the recipe name.
    """

    mlflow: Optional[str] = None
    experiment: Optional[str] = None

    def __post_init__(self) -> None:
        check_fields(self, "track")
        _require(self.mlflow is None or bool(self.mlflow.strip()), "track.mlflow", self.mlflow,
                 "an MLflow tracking URI (sqlite:///mlruns.db, ./mlruns, http://HOST:5000) "
                 "or none")
        _require(self.experiment is None or bool(self.experiment.strip()), "track.experiment",
                 self.experiment, "an experiment name or none (the recipe name)")


@dataclass(frozen=True)
class Recipe:
    """A complete, runnable recipe: what to train on, what to train, how, and where to export."""

    name: str
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def __post_init__(self) -> None:
        require_choice(self.name, str, "name")
        check_name(self.name, "name")
        require_choice(self.description, str, "description")
        for section_name in SECTIONS:
            section = getattr(self, section_name)
            expected = _SECTION_TYPES[section_name]
            if not isinstance(section, expected):
                raise ConfigError(
                    f"Invalid value {section!r} for {section_name!r}: expected a "
                    f"kcls.config.{expected.__name__}, e.g. {section_name}="
                    f"{expected.__name__}(...).")
        capabilities = TASK_CAPABILITIES[self.model.task]
        task = f"model.task={self.model.task}"
        _require(self.evaluate.calibrate in capabilities.calibrations, "evaluate.calibrate",
                 self.evaluate.calibrate, f"{' or '.join(capabilities.calibrations)} with "
                 f"{task} ({capabilities.calibration_note})")
        _require(capabilities.flip_tta or not self.evaluate.flip_tta, "evaluate.flip_tta",
                 self.evaluate.flip_tta, f"false with {task} (not supported yet)")
        _require(capabilities.rejection or self.export.reject_coverage in ("auto", None),
                 "export.reject_coverage", self.export.reject_coverage,
                 f"auto or none with {task} (an image whose labels all stay under their "
                 "thresholds already gets no label)")
        _require(self.train.wise_ft is None or self.model.weights is not None, "train.wise_ft",
                 self.train.wise_ft, "none with model.weights=none (it interpolates back "
                 "toward pretrained weights)")
        # The export carries the test metrics and the test split's reference profile.
        _require(self.evaluate.test or not self.export.enabled, "export.enabled",
                 self.export.enabled, "false with evaluate.test=false (an export records the "
                 "test metrics and the test split's reference profile)")
        _require(self.evaluate.test or self.data.validation_fraction > 0,
                 "data.validation_fraction", self.data.validation_fraction,
                 "above 0 with evaluate.test=false (the run is scored on the validation split)")

    @property
    def label_format(self) -> LabelFormat:
        """How the data's labels are read for `model.task` (`TaskCapabilities.label_format`):
        the one place a manifest's columns are chosen, passed to `kcls.data.sources`'
        `load_splits` by every command that reads the recipe's data."""
        return TASK_CAPABILITIES[self.model.task].label_format

    @property
    def model_name(self) -> str:
        """The name exports are served under: `export.model_name`, else, for an image
        folder (`data.source=folder:PATH`), the folder's name (`default_model_name`),
        else the recipe name."""
        return self.export.model_name or default_model_name(self.name, self.data.source)


# Folder names that say which split a folder is, not what is in it: a model is named
# after the folder above them too (`hymenoptera/train` serves as `hymenoptera-train`).
GENERIC_FOLDER_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test",
                                  "testing", "images", "imgs", "photos", "data", "dataset",
                                  "all"})


def default_model_name(recipe_name: str, source: str) -> str:
    """The served model's name when `export.model_name` is not set.

    A model trained on an image folder is named after it, so that two data sets trained
    with one recipe (say `finetune`) never become versions of one served model; other
    sources keep the recipe name. Characters other than letters, digits, `.`, `+`, `-`
    and `_` become `_`.

    >>> default_model_name("finetune", "folder:../shared/data/hymenoptera/train")
    'hymenoptera-train'
    >>> default_model_name("finetune", "folder:~/birds"), default_model_name("q", "sklearn:digits")
    ('birds', 'q')
    """
    kind, _, path = source.partition(":")
    if kind != "folder":
        return recipe_name
    parts = [re.sub(r"[^\w.+-]+", "_", part).strip("._") for part in
             path.replace("\\", "/").split("/") if part not in ("", ".", "..", "~")]
    parts = [part for part in parts if part]
    if not parts:
        return recipe_name
    if parts[-1].lower() in GENERIC_FOLDER_NAMES and len(parts) > 1:
        return f"{parts[-2]}-{parts[-1]}"
    return parts[-1]


SECTIONS = ("data", "model", "train", "evaluate", "export", "track")


def valid_keys(recipe: Recipe) -> list[str]:
    """Every `section.field` key that `apply_overrides` accepts, in declaration order."""
    return [f"{section}.{f.name}" for section in SECTIONS
            for f in dataclasses.fields(getattr(recipe, section))]


def apply_overrides(recipe: Recipe, overrides: list[str] | tuple[str, ...]) -> Recipe:
    """Returns `recipe` with `section.field=value` overrides applied.

    Args:
        recipe: Recipe, the starting configuration.
        overrides: list of `key=value` strings; values are parsed with the field's type
            (`none` for optional fields, `true/false` for booleans).

    Returns:
        A new `Recipe`; the input is unchanged.

    Raises:
        ConfigError: malformed override, unknown key (the message lists the valid keys)
            or a value that does not parse as the field's type or fails validation.
    """
    sections = {name: getattr(recipe, name) for name in SECTIONS}
    for override in overrides:
        key, separator, raw_value = override.partition("=")
        key = key.strip()
        if not separator or not key:
            raise ConfigError(
                f"Override {override!r} is not of the form key=value, "
                "e.g. --set train.frozen_epochs=3.")
        section_name, _, field_name = key.partition(".")
        section = sections.get(section_name)
        field_types = typing.get_type_hints(type(section)) if section is not None else {}
        if field_name not in field_types:
            raise ConfigError(
                f"Unknown override key {key!r}. Valid keys: {', '.join(valid_keys(recipe))}.")
        value = _parse_value(key, raw_value.strip(), field_types[field_name])
        try:
            sections[section_name] = dataclasses.replace(section, **{field_name: value})
        except ConfigError:
            raise
        except (TypeError, ValueError) as error:
            raise ConfigError(f"Invalid value for {key!r}: {error}") from None
    return dataclasses.replace(recipe, **sections)


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain JSON-serialisable data."""
    return dataclasses.asdict(recipe)


def to_json(recipe: Recipe) -> str:
    """The recipe as indented JSON, the form written into run directories and exports."""
    return json.dumps(to_dict(recipe), indent=2)


def from_dict(data: dict[str, Any]) -> Recipe:
    """Rebuilds a `Recipe` from `to_dict` output (e.g. a `kcls.json` in an export)."""
    sections = {name: _SECTION_TYPES[name](**data[name]) for name in SECTIONS if name in data}
    return Recipe(name=data["name"], description=data.get("description", ""), **sections)


@dataclass(frozen=True)
class PretrainConfig:
    """Self-supervised pretraining of a backbone on unlabelled images (`kcls pretrain`).

    SimCLR (see `kcls.ssl`): two augmented views of every image, a projection head,
    the NT-Xent loss; the head is dropped and the backbone's weights are written for
    `model.weights=PATH`. Set with `kcls pretrain FOLDER --set pretrain.FIELD=VALUE`.

    Attributes:
        source: `folder:PATH`, a folder of images, searched recursively; sub-folder
            names (labels) are ignored. Required (`kcls pretrain FOLDER` sets it).
        backbone: a name from `kcls.models.backbones.BACKBONES`, or a `keras_hub:` or
            `keras_cv:` preset (as `model.backbone`).
        weights: where the backbone starts: `None` (random initialisation), `imagenet`
            (domain-adaptive pretraining) or a `.weights.h5` file from the same backbone.
        image_size: side of the square input, in pixels, 16 to 2048 (use the fine-tune's
            `data.image_size`).
        resize: how images become squares (as `data.resize`).
        batch_size: images per step (each gives two views); larger batches give the loss
            more negatives, smaller ones more steps per epoch. On 8,000 CIFAR-10 images
            (`compact_resnet`) 128 with learning rate 2e-3 learned faster per epoch than 256
            with 1e-3 (kNN accuracy 0.476 vs 0.442 after 25 epochs; docs/pretraining.md).
        epochs: passes over the images; with `time_budget` they are planned instead.
        learning_rate: peak AdamW learning rate (linear warm-up, then cosine decay).
        warmup_fraction: share of the steps spent warming up.
        weight_decay: decoupled weight decay (not on biases and norms).
        temperature: NT-Xent softmax temperature.
        projection_hidden: width of the projection head's hidden layer.
        projection_dim: size of the projections the loss compares.
        crop_scale: smallest random crop, as a fraction of the image area.
        color_jitter: colour jitter strength (0 turns it off).
        grayscale: probability of a greyscale view.
        horizontal_flip: mirror half of the views (off for text, digits).
        knn_source: `folder:PATH` of labelled images (one sub-folder per class) to
            report a kNN accuracy per epoch on: 20% of them (stratified, seeded) are
            classified by the votes of the other 80%. `None`: no kNN accuracy.
        knn_neighbors: k of the kNN vote.
        time_budget: wall-clock budget from the first step (`30m`, `1h`): the epochs
            are planned from the measured step time (see `kcls.train.budget`).
        cache: `memory` keeps the resized images in RAM, `none` decodes every epoch.
        jit_compile: compile the step with XLA: `true`, `false` or `auto` (as
            `train.jit_compile`).
        seed: seed of the initialisation, shuffling and augmentation; 0 to 2**32 - 1.
    """

    source: Optional[str] = None
    backbone: str = "resnet_v2_tiny"
    weights: Optional[str] = None
    image_size: int = 32
    resize: ResizeMode = "resize"
    batch_size: int = 128
    epochs: int = 100
    learning_rate: float = 2e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 1e-4
    temperature: float = 0.2
    projection_hidden: int = 512
    projection_dim: int = 128
    crop_scale: float = 0.2
    color_jitter: float = 0.5
    grayscale: float = 0.2
    horizontal_flip: bool = True
    knn_source: Optional[str] = None
    knn_neighbors: int = 20
    time_budget: Optional[str] = None
    cache: Literal["memory", "none"] = "memory"
    jit_compile: JitCompile = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, "pretrain")
        for key in ("source", "knn_source"):
            value = getattr(self, key)
            _require(value is None or value.startswith("folder:")
                     and bool(value[len("folder:"):].strip()),
                     f"pretrain.{key}", value, "'folder:PATH', a folder of images")
        check_image_size(self.image_size, "pretrain.image_size")
        _require(self.batch_size >= 2, "pretrain.batch_size", self.batch_size,
                 "at least 2 images (the loss contrasts images of a batch)")
        _require(self.epochs >= 1, "pretrain.epochs", self.epochs, "a positive integer")
        for key in ("learning_rate", "temperature"):
            _require(getattr(self, key) > 0, f"pretrain.{key}", getattr(self, key),
                     "a positive number")
        _require(0.0 <= self.warmup_fraction < 1.0, "pretrain.warmup_fraction",
                 self.warmup_fraction, "a number in [0, 1)")
        _require(self.weight_decay >= 0, "pretrain.weight_decay", self.weight_decay,
                 "0 or more")
        for key in ("projection_hidden", "projection_dim", "knn_neighbors"):
            _require(getattr(self, key) >= 1, f"pretrain.{key}", getattr(self, key),
                     "a positive integer")
        _require(0.0 < self.crop_scale <= 1.0, "pretrain.crop_scale", self.crop_scale,
                 "a fraction of the area in (0, 1]")
        _require(self.color_jitter >= 0, "pretrain.color_jitter", self.color_jitter, "0 or more")
        _require(0.0 <= self.grayscale <= 1.0, "pretrain.grayscale", self.grayscale,
                 "a probability in [0, 1]")
        _check_duration(self.time_budget, "pretrain.time_budget")


def apply_pretrain_overrides(config: PretrainConfig,
                             overrides: list[str] | tuple[str, ...]) -> PretrainConfig:
    """Returns `config` with `pretrain.field=value` overrides applied (see `apply_overrides`).

    Raises:
        ConfigError: malformed override, unknown key (the message lists the valid keys),
            or a value that does not parse or fails validation.
    """
    field_types = typing.get_type_hints(PretrainConfig)
    for override in overrides:
        key, separator, raw_value = override.partition("=")
        key = key.strip()
        section_name, _, field_name = key.partition(".")
        if not separator or section_name != "pretrain" or field_name not in field_types:
            raise ConfigError(
                f"Unknown or malformed override {override!r}: expected pretrain.FIELD=VALUE "
                f"with FIELD one of {', '.join(field_types)}.")
        value = _parse_value(key, raw_value.strip(), field_types[field_name])
        config = dataclasses.replace(config, **{field_name: value})
    return config


_SECTION_TYPES = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig,
                  "evaluate": EvaluateConfig, "export": ExportConfig, "track": TrackConfig}

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_value(key: str, raw: str, annotation: Any) -> Any:
    """Parses `raw` as `annotation` (int, float, str, bool, Literal, Optional of those)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
        if raw.lower() in ("none", "null") and len(arguments) < len(_arms(annotation)):
            return None
        for argument in arguments:  # e.g. bool | Literal["auto"]: the first that parses
            try:
                return _parse_value(key, raw, argument)
            except ConfigError:
                pass
        raise ConfigError(f"Invalid value {raw!r} for {key!r}: expected {_expected(annotation)}.")
    if origin is Literal:
        require_choice(raw, annotation, key)
        return raw
    if annotation is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ConfigError(f"Invalid value {raw!r} for {key!r}: expected a boolean (true/false).")
    if annotation in (int, float):
        try:
            return annotation(raw)
        except ValueError:
            kind = "an integer" if annotation is int else "a number"
            raise ConfigError(f"Invalid value {raw!r} for {key!r}: expected {kind}.") from None
    if annotation is str:
        return raw
    raise AssertionError(f"unsupported config field type {annotation!r} for {key}")


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str) -> float:
    """Seconds in `text`: `90`, `90s`, `8m`, `1.5h`, `1h30m`.

    >>> parse_duration("8m"), parse_duration("1h30m"), parse_duration("90")
    (480.0, 5400.0, 90.0)

    Raises:
        ValueError: text that is not a positive duration.
    """
    match = _DURATION.match(text.strip().lower())
    if match is None or not any(match.groups()):
        raise ValueError(f"{text!r} is not a duration like 480, 480s, 8m, 1.5h or 1h30m")
    hours, minutes, seconds = (float(group or 0) for group in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return total


def _check_duration(value: str | None, key: str) -> None:
    """Raises `ConfigError` unless `value` is None or a duration `parse_duration` reads."""
    if value is not None:
        try:
            parse_duration(value)
        except ValueError as error:
            raise ConfigError(f"Invalid value for {key!r}: {error}.") from None


def check_fields(section: Any, section_name: str) -> None:
    """Checks that every field of a config dataclass holds a value of its type.

    Types are those of the annotations: `int` (not `bool`), `float` (an `int` is
    accepted; `inf` and `nan` are not), `bool`, `str`, `Optional[...]` and `Literal`
    choices, possibly beside other types (`bool | Literal["auto"]`); every `seed` is in
    `[0, MAX_SEED]`. Called by each section's `__post_init__`, so
    recipe files, `--set` overrides and configurations read back from run directories
    and exports meet the same check.

    Raises:
        ConfigError: naming the field, the value and what it accepts.
    """
    hints = typing.get_type_hints(type(section))
    for config_field in dataclasses.fields(section):
        key, value = f"{section_name}.{config_field.name}", getattr(section, config_field.name)
        require_choice(value, hints[config_field.name], key)
        # inf and nan parse as floats and pass every `>` check (nan fails none).
        _require(not isinstance(value, float) or math.isfinite(value), key, value,
                 "a finite number")
        if config_field.name == "seed":
            _require(0 <= value <= MAX_SEED, key, value, f"an integer from 0 to {MAX_SEED}")


def check_image_size(value: int, key: str) -> None:
    """Raises `ConfigError` unless `value` is a side from `MIN_IMAGE_SIZE` to
    `MAX_IMAGE_SIZE` pixels (the reason for the ceiling is in the message)."""
    _require(value >= MIN_IMAGE_SIZE, key, value, f"at least {MIN_IMAGE_SIZE} pixels")
    _require(value <= MAX_IMAGE_SIZE, key, value,
             f"at most {MAX_IMAGE_SIZE} pixels: images are resized to squares of this side, "
             "and larger ones exhaust the memory of a device (a batch of 64 at 2048 px is "
             "3.2 GB before the network); downscale or tile large images")


def check_name(value: Any, key: str) -> None:
    """Checks that `value` can be used as one folder name: a single, safe path component.

    Recipe and model names become folders (`runs/<recipe>/`, `<base_dir>/<model_name>/`):
    a name with a separator or `..` would write outside them, a name starting with `.`
    is hidden (and skipped by `models.config`), control characters break logs and shells.

    >>> check_name("quickstart", "name")  # fine: returns None
    >>> check_name("../x", "export.model_name")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    kcls.config.ConfigError: Invalid value '../x' for 'export.model_name': ...

    Raises:
        ConfigError: naming the key, the value and what a name may hold.
    """
    if not isinstance(value, str):
        return  # check_fields reports the type
    unsafe = (not value.strip() or value.startswith(".") or value != value.strip()
              or any(character in "/\\" or ord(character) < 32 or ord(character) == 127
                     for character in value))
    _require(not unsafe, key, value,
             "a single folder name: not empty, not starting with '.', without '/', '\\', "
             "control characters or surrounding spaces")


def check_global_batch(batch_size: int, replicas: int) -> None:
    """Raises unless `replicas` (of several workers) can share the global `batch_size` equally.

    Raises:
        ConfigError: naming the batch size and one that works.
    """
    if batch_size % replicas:
        suggestion = max(batch_size // replicas, 1) * replicas
        raise ConfigError(f"data.batch_size={batch_size} is the global batch and cannot be "
                          f"split equally between {replicas} replicas: use a multiple of "
                          f"{replicas}, e.g. data.batch_size={suggestion}.")


def require_choice(value: Any, choices: Any, key: str) -> None:
    """Raises `ConfigError` unless `value` is one of the `choices`.

    Args:
        value: the value to check.
        choices: a `Literal` type, a plain type (`int`, `float`, `bool`, `str`), or a
            union of those (`Optional[int]`, `bool | Literal["auto"]`).
        key: the `section.field` the value is for, named in the message.

    Consumers of a choice call it too (`require_choice(policy, AugmentPolicy,
    "data.augment")`) instead of treating an unknown value as their last branch.
    """
    if not any(_is_instance(value, arm) for arm in _arms(choices)):
        raise ConfigError(f"Invalid value {value!r} for {key!r}: expected "
                          f"{_expected(choices)}.")


def _arms(annotation: Any) -> tuple[Any, ...]:
    """The types of a union (`Optional[X]` included), or `(annotation,)`."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _is_instance(value: Any, annotation: Any) -> bool:
    if typing.get_origin(annotation) is Literal:
        return isinstance(value, str) and value in typing.get_args(annotation)
    if annotation is float:  # an int is a fine float; a bool is not a number here
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is type(None):
        return value is None
    return isinstance(value, annotation)


def _expected(annotation: Any) -> str:
    """What a field of type `annotation` accepts, in the words of the error messages."""
    words = {bool: "a boolean (true/false)", int: "an integer", float: "a number",
             str: "a string", type(None): "none"}
    described = []
    for arm in _arms(annotation):
        if typing.get_origin(arm) is Literal:
            choices = typing.get_args(arm)
            described.append(f"one of {', '.join(choices)}" if len(choices) > 1 else choices[0])
        else:
            described.append(words[arm])
    return " or ".join(described)


def _require_flip_for_shifts(flip_tta: bool, shift_tta: bool, section: str) -> None:
    _require(flip_tta or not shift_tta, f"{section}.shift_tta", shift_tta,
             f"false unless {section}.flip_tta=true (the shifted views are added to the "
             "mirror)")


def _require(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"Invalid value {value!r} for {key!r}: expected {expected}.")
