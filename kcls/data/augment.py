"""Named augmentation policies built from core Keras 3 layers, split by where they run.

XLA cannot compile some layers (`supports_jit=False`: RandomTranslation, RandomZoom,
RandomRotation, RandomCrop, and RandAugment through its geometric sub-layers), and one
such layer in a compiled model silently turns `jit_compile=True` off for the whole
training step. MixUp and CutMix claim XLA support but sample their Beta weights with
StatelessRandomGammaV3, which has no XLA kernel (measured: the compiled step fails).
So a policy is two stacks:

- `device`: layers XLA compiles; they run on `{"images", "labels"}` batches inside the
  compiled training step, on the accelerator (`kcls.train.runner.Trainer`).
- `host`: the others; they run on whole `{"images", "labels"}` batches in the tf.data
  pipeline, in parallel and overlapped with the training step by `prefetch`.

Policies (`DataConfig.augment`):
    none:        nothing.
    light:       random shifts of up to 1/8 of the side, reflect-padded (the classic
                 pad-and-crop; on the device), + horizontal flips when the data allows.
    randaugment: light + RandAugment (2 ops, factor 0.3).
    strong:      randaugment + per batch MixUp (probability `mixup`) or CutMix
                 (probability `cutmix`), which make soft labels.

Exported models contain no augmentation: these layers wrap the classifier only during
training.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import tensorflow as tf

from kcls.config import AugmentPolicy, require_choice


@dataclass
class Augmentation:
    """A policy split into `host` (tf.data) and `device` (compiled step) stacks, each maybe None."""

    host: keras.Sequential | None
    device: keras.Sequential | None


def build_augmentation(policy: AugmentPolicy, horizontal_flip: bool = True, seed: int = 0,
                       mixup: float = 0.5, cutmix: float = 0.5) -> Augmentation:
    """Builds the layers of `policy` for float images in [0, 255].

    Args:
        policy: one of `none`, `light`, `randaugment`, `strong`.
        horizontal_flip: bool, whether mirrored images keep their class.
        seed: int, base seed of the random layers.
        mixup: float, probability of MixUp per batch (`strong` only).
        cutmix: float, probability of CutMix per batch (`strong` only).

    Returns:
        Augmentation whose stacks take and return `{"images": float [B, H, W, 3],
        "labels": float [B, C]}` dicts.
    """
    require_choice(policy, AugmentPolicy, "data.augment")
    if policy == "none":
        return Augmentation(None, None)
    layers: list[keras.Layer] = []
    if horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    layers.append(RandomShift(0.125, seed=seed + 1))
    if policy in ("randaugment", "strong"):
        layers.append(keras.layers.RandAugment(value_range=(0, 255), num_ops=2, factor=0.3,
                                               seed=seed + 2))
    if policy == "strong" and mixup + cutmix > 0:
        layers.append(MixUpOrCutMix(mixup, cutmix, seed=seed + 3))
    host = [layer for layer in layers if not compiles_with_xla(layer)]
    device = [layer for layer in layers if compiles_with_xla(layer)]
    return Augmentation(keras.Sequential(host, name="host_augmentation") if host else None,
                        keras.Sequential(device, name="device_augmentation") if device else None)


# Layers whose `supports_jit` is True but whose ops have no XLA kernel.
_NOT_XLA_COMPILABLE = (keras.layers.MixUp, keras.layers.CutMix)


def compiles_with_xla(layer: keras.Layer) -> bool:
    """Whether `layer` and all its sub-layers can run inside an XLA-compiled step.

    `Model.compile(jit_compile=True)` checks `supports_jit` on every layer; the
    exceptions list adds layers that claim support but fail to compile.
    """
    return all(sublayer.supports_jit and not isinstance(sublayer, _NOT_XLA_COMPILABLE)
               for sublayer in layer._flatten_layers())


class MixUpOrCutMix(keras.layers.Layer):
    """Mixes a `{"images", "labels"}` batch with MixUp or CutMix, or leaves it alone.

    Per batch, MixUp is chosen with probability `mixup`, CutMix with probability
    `cutmix`, and nothing otherwise. Runs in the tf.data pipeline (see module docstring).

    Args:
        mixup: float, probability of MixUp (Beta(0.2, 0.2) weights).
        cutmix: float, probability of CutMix; `mixup + cutmix <= 1`.
        seed: int, seed of the choice and of both mixing layers.
    """

    def __init__(self, mixup: float, cutmix: float, seed: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mixup_probability = mixup
        self.cutmix_probability = cutmix
        self.mixup = keras.layers.MixUp(alpha=0.2, seed=seed)
        self.cutmix = keras.layers.CutMix(factor=1.0, seed=None if seed is None else seed + 1)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, data, training=True):
        if not training:
            return data
        draw = keras.random.uniform((), seed=self.seed_generator)
        return tf.cond(
            draw < self.mixup_probability,
            lambda: self.mixup(data, training=True),
            lambda: tf.cond(draw < self.mixup_probability + self.cutmix_probability,
                            lambda: self.cutmix(data, training=True), lambda: data))

    def get_config(self) -> dict:
        return {**super().get_config(), "mixup": self.mixup_probability,
                "cutmix": self.cutmix_probability}


class RandomShift(keras.layers.Layer):
    """Shifts each image by a random whole number of pixels, reflecting at the borders.

    The classic CIFAR "pad and random crop", written with pad and batched gathers so XLA
    compiles it (Keras' RandomTranslation uses an op XLA cannot compile). Takes float
    images `[B, H, W, C]` or `{"images", "labels"}` dicts; shifts are at most
    `factor * H` rows and `factor * W` columns, independently per image.

    Args:
        factor: float in (0, 0.5), largest shift as a fraction of the side.
        seed: int, seed of the shifts.
    """

    def __init__(self, factor: float, seed: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.factor = factor
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, data, training=True):
        if not training:
            return data
        if isinstance(data, dict):
            return {**data, "images": self.call(data["images"], training=training)}
        images = data
        _, height, width, _ = images.shape
        pad_rows, pad_columns = int(height * self.factor), int(width * self.factor)
        padded = tf.pad(images, [[0, 0], [pad_rows, pad_rows], [pad_columns, pad_columns],
                                 [0, 0]], mode="REFLECT")
        batch = tf.shape(images)[:1]
        rows = keras.random.randint(batch, 0, 2 * pad_rows + 1, seed=self.seed_generator)
        columns = keras.random.randint(batch, 0, 2 * pad_columns + 1, seed=self.seed_generator)
        row_indices = rows[:, None] + tf.range(height)[None, :]  # [B, H]
        column_indices = columns[:, None] + tf.range(width)[None, :]  # [B, W]
        shifted = tf.gather(padded, row_indices, axis=1, batch_dims=1)
        return tf.gather(shifted, column_indices, axis=2, batch_dims=1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "factor": self.factor, "seed": self.seed}
