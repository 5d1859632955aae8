"""The two-phase fine-tuning plan, learning-rate schedules, optimizers and freezing; no fitting.

Phase 1 (`frozen`) trains the head on a frozen backbone. Phase 2 (`unfrozen`) trains
the backbone too (all of it, or its top `N` blocks with `train.unfreeze=N`) at a lower
learning rate. On a pretrained backbone its BatchNorm layers stay in inference mode:
their moving statistics were estimated on the pretraining data, and updating them from
small fine-tuning batches destroys what the backbone learned (the Keras
transfer-learning guide's advice). A backbone trained from random initialisation has no
statistics worth keeping, so its BatchNorm layers train (`resolve_train_batchnorm`; their
statistics are re-estimated after the phase, see `kcls.train.batchnorm`);
`train.train_batchnorm=true/false` decides explicitly.

Example:

>>> phases = plan_phases(TrainConfig(frozen_epochs=2, unfrozen_epochs=3))
>>> [(phase.name, phase.epochs, phase.learning_rate) for phase in phases]
[('frozen', 2, 0.001), ('unfrozen', 3, 0.0001)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras

from kcls.config import Optimizer, TrainConfig, require_choice
from kcls.models.backbones import backbone_blocks
from kcls.models.classifier import BACKBONE_LAYER
from kcls.train.layerwise import LayerwiseAdamW, LayerwiseSGD

SGD_MOMENTUM = 0.9
EMA_MOMENTUM = 0.99
# Variable names (Keras 3 `variable.name`, regular expressions) kept out of weight decay:
# shrinking biases and normalisation scales/offsets towards 0 only hurts, and so it does
# for a transformer's position embeddings, class/register tokens and layer scales
# (`embeddings`, `class_token`, `cls_token`, `register_tokens`, `lambda1` in KerasHub's
# ViT and DINOv2; timm and BEiT exclude the same).
NO_WEIGHT_DECAY = ("bias", "gamma", "beta", "embeddings", "token", "lambda")


@dataclass(frozen=True)
class Phase:
    """One `fit()` call of the schedule.

    Attributes:
        name: `frozen` or `unfrozen`.
        epochs: number of epochs of this phase.
        learning_rate: peak learning rate (after warm-up); None with
            `train.learning_rate=auto`: the range test finds it when the phase starts.
        backbone_trainable: whether backbone weights are trained.
    """

    name: str
    epochs: int
    learning_rate: float | None
    backbone_trainable: bool


def plan_phases(config: TrainConfig) -> list[Phase]:
    """The phases with at least one epoch, in order."""
    automatic = config.learning_rate == "auto"
    phases = [Phase("frozen", config.frozen_epochs,
                    None if automatic else config.learning_rate, False),
              Phase("unfrozen", config.unfrozen_epochs,
                    None if automatic else config.learning_rate * config.unfrozen_lr_factor,
                    True)]
    return [phase for phase in phases if phase.epochs > 0]


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `peak` over `warmup_fraction` of the steps, then cosine to 0.

    `total_steps` is a variable: a time budget (`kcls.train.budget`) sets it once the
    step time is measured, without retracing or recompiling the training step.

    Args:
        peak: float, the learning rate at the end of the warm-up.
        total_steps: int, optimizer steps of the whole schedule.
        warmup_fraction: float in [0, 1), share of the steps spent warming up.
    """

    def __init__(self, peak: float, total_steps: int, warmup_fraction: float) -> None:
        self.peak = float(peak)
        self.warmup_fraction = float(warmup_fraction)
        self.total_steps = keras.Variable(float(total_steps), dtype="float32", trainable=False,
                                          name="schedule_total_steps")

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        total = keras.ops.maximum(keras.ops.convert_to_tensor(self.total_steps), 1.0)
        warmup = keras.ops.floor(total * self.warmup_fraction)
        warming = self.peak * step / keras.ops.maximum(warmup, 1.0)
        progress = keras.ops.clip((step - warmup) / keras.ops.maximum(total - warmup, 1.0),
                                  0.0, 1.0)
        cosine = 0.5 * self.peak * (1.0 + keras.ops.cos(math.pi * progress))
        return keras.ops.where(step < warmup, warming, cosine)

    def get_config(self) -> dict:
        return {"peak": self.peak, "total_steps": int(self.total_steps.numpy()),
                "warmup_fraction": self.warmup_fraction}


def make_optimizer(learning_rate: keras.optimizers.schedules.LearningRateSchedule | float,
                   config: TrainConfig,
                   learning_rate_multipliers: dict[str, float] | None = None) -> keras.Optimizer:
    """An optimizer for one phase: AdamW or SGD (momentum 0.9), fresh for every phase.

    Both decay weights decoupled from the gradient (`weight_decay * learning_rate * w`
    per step), on kernels only: variables named like `NO_WEIGHT_DECAY` are excluded.
    `config.clipnorm` clips each gradient's norm; `config.ema` keeps an exponential
    moving average of the trained weights, which `fit()` writes into the model at the
    end of the phase.

    Args:
        learning_rate: the phase's schedule (`WarmupCosine`) or a constant.
        config: TrainConfig, optimizer choice, decay, clipping and EMA.
        learning_rate_multipliers: variable path -> learning-rate multiplier (see
            `kcls.train.layerwise`, e.g. from `layer_decay_multipliers`); variables not
            in it, or all when None, train at the plain rate.

    Returns:
        An unbuilt `keras.Optimizer`.
    """
    common = dict(learning_rate=learning_rate, weight_decay=config.weight_decay,
                  clipnorm=config.clipnorm, use_ema=config.ema, ema_momentum=EMA_MOMENTUM)
    require_choice(config.optimizer, Optimizer, "train.optimizer")
    sgd, adamw = keras.optimizers.SGD, keras.optimizers.AdamW
    if learning_rate_multipliers:
        sgd, adamw = LayerwiseSGD, LayerwiseAdamW
        common["learning_rate_multipliers"] = learning_rate_multipliers
    if config.optimizer == "sgd":
        optimizer = sgd(momentum=SGD_MOMENTUM, nesterov=True, **common)
    else:
        optimizer = adamw(**common)
    optimizer.exclude_from_weight_decay(var_names=list(NO_WEIGHT_DECAY))
    return optimizer


def resolve_train_batchnorm(config: TrainConfig, weights: str | None) -> bool:
    """Whether BatchNorm layers train in phase 2: `config.train_batchnorm`, or when it is
    `None` (auto), whether the backbone starts from random initialisation.

    Args:
        config: TrainConfig.
        weights: the backbone's `model.weights` (`None`: random initialisation).
    """
    if config.train_batchnorm is not None:
        return config.train_batchnorm
    return weights is None


def describe_normalization(classifier: keras.Model, train_batchnorm: bool) -> str:
    """What the backbone's normalization layers do in phase 2, for logs and run.json.

    BatchNorm follows `train_batchnorm`; LayerNorm (transformers: KerasHub's ViT,
    DINOv2 ...) keeps no running statistics that fine-tuning batches could spoil, so it
    always trains with its block (and stays out of weight decay, `NO_WEIGHT_DECAY`).

    Returns:
        E.g. `49 BatchNormalization layers in inference mode` or `13 LayerNormalization
        layers train with their blocks; no BatchNormalization`.
    """
    layers = list(classifier.get_layer(BACKBONE_LAYER)._flatten_layers())
    batchnorm = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in layers)
    layernorm = sum(isinstance(layer, keras.layers.LayerNormalization) for layer in layers)
    parts = []
    if batchnorm:
        parts.append(f"{batchnorm} BatchNormalization layers "
                     + ("train" if train_batchnorm else "in inference mode"))
    if layernorm:
        parts.append(f"{layernorm} LayerNormalization layers train with their blocks")
        if not batchnorm:
            parts.append("no BatchNormalization")
    return "; ".join(parts) or "no normalization layers"


def set_backbone_trainable(classifier: keras.Model, trainable: bool, unfreeze: str = "all",
                           train_batchnorm: bool = False) -> None:
    """Freezes or (partly) unfreezes the backbone of `classifier`.

    A frozen Keras 3 layer, BatchNormalization included, neither trains nor updates
    its state, and a frozen BatchNormalization runs in inference mode even when the
    model is called with `training=True`.

    Args:
        classifier: keras.Model from `build_classifier` (backbone layer `backbone`).
        trainable: bool, False freezes the whole backbone (phase 1).
        unfreeze: `all`, or `N` to train only the top N blocks of the backbone (see
            `kcls.models.backbones.backbone_blocks`; N >= the block count means all).
        train_batchnorm: bool, whether BatchNorm layers of the trained blocks train too.
    """
    backbone = classifier.get_layer(BACKBONE_LAYER)
    backbone.trainable = trainable
    if not trainable:
        return
    if unfreeze != "all":
        blocks = backbone_blocks(backbone)
        for block in blocks[:max(len(blocks) - int(unfreeze), 0)]:
            for layer in block:
                layer.trainable = False
    if not train_batchnorm:
        for layer in backbone._flatten_layers():
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
