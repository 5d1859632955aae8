"""Named augmentation policies that run on whole batches on the training device.

A policy is one `Augmentation` layer: a list of stages applied in order to
`{"images": float [B, H, W, 3] in [0, 255], "labels": float [B, C]}` batches. The tf.data
pipeline never augments (it decodes, resizes, caches, batches and prefetches); the
training function runs the policy as ordinary TensorFlow ops on the device, then calls
the XLA-compiled model step (`kcls.train.trainer.Trainer`). So XLA's limits no longer
decide where an augmentation runs: RandAugment's geometric ops (no XLA kernel) and
MixUp/CutMix's Beta draws (StatelessRandomGammaV3, no XLA kernel) run next to a model
step that XLA still compiles.

Policies (`DataConfig.augment`):
    none:        nothing (`build_augmentation` returns None).
    light:       horizontal flips when the data allows, + random shifts of up to 1/8 of
                 the side, reflect-padded (the classic pad-and-crop).
    randaugment: light + RandAugment (2 ops, factor 0.3), ops and magnitudes per image.
    strong:      randaugment + per batch MixUp (probability `mixup`) or CutMix
                 (probability `cutmix`), which make soft labels.
Any policy but `none` ends with `Cutout` when `DataConfig.cutout` > 0.

Randomness: every stage draws from a `BatchSeeds`, stateless random streams derived
from one int seed per call. The training function draws that seed once per step from
`Augmentation.seed_generator` (a Keras SeedGenerator, saved with the model, so a
resumed run does not replay the draws) and folds the replica id into it, so every
replica of a distribution strategy augments its share differently. Called alone
(`augmentation(batch)`), a layer draws from its own seed generator.

Exported models contain no augmentation: these layers wrap the classifier only during
training.

Example:

>>> augmentation = build_augmentation("randaugment", seed=0)
>>> batch = {"images": tf.zeros([8, 32, 32, 3]), "labels": tf.one_hot(tf.range(8), 8)}
>>> augmentation(batch)["images"].shape
TensorShape([8, 32, 32, 3])
"""

from __future__ import annotations

import keras
import tensorflow as tf

from kcls.config import AugmentPolicy, require_choice


def build_augmentation(policy: AugmentPolicy, horizontal_flip: bool = True, seed: int = 0,
                       mixup: float = 0.5, cutmix: float = 0.5,
                       cutout: float = 0.0) -> Augmentation | None:
    """Builds the stages of `policy` for float images in [0, 255].

    Args:
        policy: one of `none`, `light`, `randaugment`, `strong`.
        horizontal_flip: bool, whether mirrored images keep their class.
        seed: int, base seed of the random draws.
        mixup: float, probability of MixUp per batch (`strong` only).
        cutmix: float, probability of CutMix per batch (`strong` only).
        cutout: float in [0, 0.9], side of the square `Cutout` erases from every image,
            as a fraction of the image side; 0 erases nothing.

    Returns:
        Augmentation taking and returning `{"images": float [B, H, W, 3], "labels":
        float [B, C]}` dicts, or None for `none`.
    """
    require_choice(policy, AugmentPolicy, "data.augment")
    if policy == "none":
        return None
    stages: list[BatchAugmentation] = []
    if horizontal_flip:
        stages.append(RandomFlip(seed=seed))
    stages.append(RandomShift(0.125, seed=seed + 1))
    if policy in ("randaugment", "strong"):
        stages.append(RandAugment(num_ops=2, factor=0.3, seed=seed + 2))
    if policy == "strong" and mixup + cutmix > 0:
        stages.append(MixUpOrCutMix(mixup, cutmix, seed=seed + 3))
    if cutout > 0:
        stages.append(Cutout(cutout, seed=seed + 4))
    return Augmentation(stages, seed=seed)


def place_augmentation(augmentation: Augmentation | None, strategy: tf.distribute.Strategy
                       ) -> tuple[Augmentation | None, Augmentation | None]:
    """Where `augmentation` runs under `strategy`: `(host, device)`, one of them None.

    On the device (the training function, `kcls.train.trainer.Trainer`), except on TPUs
    when a stage has ops without an XLA kernel (RandAugment, MixUp/CutMix): TPUs run only
    XLA-compiled programs, so the whole policy then runs in the tf.data pipeline
    (`kcls.data.pipeline.train_pipeline(host_augment=...)`), as on the host CPUs of
    Cloud TPU VMs.
    """
    if (augmentation is not None and isinstance(strategy, tf.distribute.TPUStrategy)
            and not compiles_with_xla(augmentation)):
        return augmentation, None
    return None, augmentation


# Layers whose `supports_jit` is True but whose ops have no XLA kernel.
_NOT_XLA_COMPILABLE = (keras.layers.MixUp, keras.layers.CutMix)


def compiles_with_xla(layer: keras.Layer) -> bool:
    """Whether `layer` and all its sub-layers can run inside an XLA-compiled function.

    `supports_jit` of every sub-layer; the exceptions list adds layers that claim
    support but fail to compile.
    """
    return all(sublayer.supports_jit and not isinstance(sublayer, _NOT_XLA_COMPILABLE)
               for sublayer in layer._flatten_layers())


class BatchSeeds(keras.random.SeedGenerator):
    """Stateless random streams derived from one seed tensor, for Keras random ops.

    Draw k returns `stateless_fold_in(seed, k)`: the same `seed` gives the same draws,
    and nothing is written to a variable, so the draws of a step depend only on the seed
    the training function passes in (one per step and replica). Pass it as the `seed` of
    `keras.random` functions and of Keras preprocessing layers' `get_random_transformation`.

    Args:
        seed: int `[2]` tensor.
    """

    def __init__(self, seed: tf.Tensor) -> None:
        # No super().__init__(): a SeedGenerator's state variable is what this avoids.
        self.name = "batch_seeds"
        self.seed = tf.cast(seed, tf.int64)
        self.draws = 0

    def next(self, ordered: bool = True) -> tf.Tensor:
        self.draws += 1
        return tf.random.experimental.stateless_fold_in(self.seed, self.draws)


class BatchAugmentation(keras.layers.Layer):
    """A random transformation of `{"images", "labels"}` batches drawing from given seeds.

    Subclasses implement `augment(data, seeds)`; calling the layer augments with its own
    seed generator (training) or returns the batch unchanged (inference).

    Args:
        seed: int, seed of the layer's own generator.
    """

    def __init__(self, seed: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        # Nothing to create: the state is the seed generator and Keras ops' generators.
        self.built = True

    def call(self, data, training=True):
        return self.augment(data, self.seed_generator) if training else data

    def augment(self, data: dict[str, tf.Tensor],
                seeds: keras.random.SeedGenerator) -> dict[str, tf.Tensor]:
        """Returns the augmented `{"images", "labels"}` batch; random draws use `seeds`."""
        raise NotImplementedError

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "seed": self.seed}


class Augmentation(keras.layers.Layer):
    """A policy: `stages` applied in order to `{"images", "labels"}` batches.

    Args:
        stages: the BatchAugmentation layers, in order.
        seed: int, seed of `seed_generator`, which gives one seed per call.

    Call arguments:
        data: `{"images": float [B, H, W, 3], "labels": float [B, C]}`.
        training: bool; False returns `data` unchanged.
        seed: int `[2]` tensor to derive this call's draws from (the training function
            passes one per step and replica); None draws it from `seed_generator`.
    """

    def __init__(self, stages: list[BatchAugmentation], seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stages = list(stages)
        self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def stage_names(self) -> list[str]:
        """The stages' class names, e.g. `["RandomFlip", "RandomShift", "RandAugment"]`."""
        return [type(stage).__name__ for stage in self.stages]

    def build(self, input_shape):
        self.built = True  # the stages hold no weights, only random-generator state

    def call(self, data, training=True, seed=None):
        if not training:
            return data
        if seed is None:
            seed = self.seed_generator.next()
        for index, stage in enumerate(self.stages):
            data = stage.augment(data, BatchSeeds(
                tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), index)))
        return data

    def compute_output_shape(self, input_shape):
        return input_shape


class RandomFlip(BatchAugmentation):
    """Mirrors each image left-right with probability 1/2, independently per image."""

    def augment(self, data, seeds):
        images = data["images"]
        flips = keras.random.uniform(tf.shape(images)[:1], seed=seeds) < 0.5
        return {**data, "images": tf.where(flips[:, None, None, None],
                                           tf.reverse(images, axis=[2]), images)}


class RandomShift(BatchAugmentation):
    """Shifts each image by a random whole number of pixels, reflecting at the borders.

    The classic CIFAR "pad and random crop", written with pad and batched gathers (XLA
    compiles it). Shifts are at most `factor * H` rows and `factor * W` columns,
    independently per image. Also takes a bare float image batch `[B, H, W, C]`.

    Args:
        factor: float in (0, 0.5), largest shift as a fraction of the side.
        seed: int, seed of the layer's own generator.
    """

    def __init__(self, factor: float, seed: int | None = None, **kwargs) -> None:
        super().__init__(seed, **kwargs)
        self.factor = factor

    def call(self, data, training=True):
        if isinstance(data, dict) or not training:
            return super().call(data, training)
        return self.augment({"images": data}, self.seed_generator)["images"]

    def augment(self, data, seeds):
        images = data["images"]
        _, height, width, _ = images.shape
        pad_rows, pad_columns = int(height * self.factor), int(width * self.factor)
        padded = tf.pad(images, [[0, 0], [pad_rows, pad_rows], [pad_columns, pad_columns],
                                 [0, 0]], mode="REFLECT")
        batch = tf.shape(images)[:1]
        rows = keras.random.randint(batch, 0, 2 * pad_rows + 1, seed=seeds)
        columns = keras.random.randint(batch, 0, 2 * pad_columns + 1, seed=seeds)
        row_indices = rows[:, None] + tf.range(height)[None, :]  # [B, H]
        column_indices = columns[:, None] + tf.range(width)[None, :]  # [B, W]
        shifted = tf.gather(padded, row_indices, axis=1, batch_dims=1)
        return {**data, "images": tf.gather(shifted, column_indices, axis=2, batch_dims=1)}

    def get_config(self) -> dict:
        return {**super().get_config(), "factor": self.factor}


class Cutout(BatchAugmentation):
    """Erases one square of every image (DeVries & Taylor, arXiv:1708.04552).

    The square's centre is uniform over the image, so near a border part of the square
    falls outside and less is erased, as in the paper. Erased pixels take the batch's
    mean colour, which the model's normalisation maps to about zero (the paper erases to
    zero after normalising). Masks are comparisons against a pixel grid: XLA compiles it.

    Args:
        size: float in (0, 0.9], side of the square as a fraction of the image side.
        seed: int, seed of the layer's own generator.
    """

    def __init__(self, size: float, seed: int | None = None, **kwargs) -> None:
        super().__init__(seed, **kwargs)
        self.size = size

    def augment(self, data, seeds):
        images = data["images"]
        _, height, width, _ = images.shape
        batch = tf.shape(images)[:1]
        centre_rows = keras.random.randint(batch, 0, height, seed=seeds)
        centre_columns = keras.random.randint(batch, 0, width, seed=seeds)
        side_rows = max(round(self.size * height), 1)
        side_columns = max(round(self.size * width), 1)
        in_rows = _in_span(tf.range(height), centre_rows - side_rows // 2, side_rows)  # [B, H]
        in_columns = _in_span(tf.range(width), centre_columns - side_columns // 2,
                              side_columns)  # [B, W]
        erased = in_rows[:, :, None, None] & in_columns[:, None, :, None]  # [B, H, W, 1]
        mean_colour = tf.reduce_mean(images, axis=[0, 1, 2], keepdims=True)
        return {**data, "images": tf.where(erased, mean_colour, images)}

    def get_config(self) -> dict:
        return {**super().get_config(), "size": self.size}


def _in_span(positions: tf.Tensor, starts: tf.Tensor, length: int) -> tf.Tensor:
    """bool `[B, N]`: whether `positions` `[N]` lie in `[starts[b], starts[b] + length)`."""
    offsets = positions[None, :] - tf.cast(starts, positions.dtype)[:, None]
    return (offsets >= 0) & (offsets < length)


class RandAugment(BatchAugmentation):
    """RandAugment with the ops and magnitudes drawn per image.

    `keras.layers.RandAugment` (Keras 3.15) draws its `num_ops` op indices once per
    batch, so every image of a batch gets the same two ops. This layer uses the same 11
    Keras ops with the same magnitudes (taken from a `keras.layers.RandAugment`), but
    draws the op of every round for every image: each round partitions the batch by op,
    transforms each part with its op (per-image magnitudes, as the Keras op draws them)
    and stitches the batch back together. Each image is transformed `num_ops` times, no
    more: the Keras layer computes all 11 ops on the whole batch and selects.

    Args:
        num_ops: int, ops per image.
        factor: float in [0, 1], strength of the ops.
        value_range: pixel value range of the images.
        seed: int, seed of the layer's own generator.
    """

    OPERATIONS = ("random_shear", "random_translation", "random_rotation", "random_brightness",
                  "random_color_degeneration", "random_contrast", "random_sharpness",
                  "random_posterization", "solarization", "auto_contrast", "equalization")

    def __init__(self, num_ops: int = 2, factor: float = 0.5,
                 value_range: tuple[float, float] = (0, 255), seed: int | None = None,
                 **kwargs) -> None:
        super().__init__(seed, **kwargs)
        self.num_ops = num_ops
        self.factor = factor
        self.value_range = value_range
        keras_rand_augment = keras.layers.RandAugment(value_range=value_range, num_ops=num_ops,
                                                      factor=factor)
        self.operations = [getattr(keras_rand_augment, name) for name in self.OPERATIONS]

    def augment(self, data, seeds):
        images = data["images"]
        batch = tf.shape(images)[0]
        for _ in range(self.num_ops):
            choices = tf.cast(keras.random.randint([batch], 0, len(self.operations),
                                                   seed=seeds), tf.int32)
            positions = tf.dynamic_partition(tf.range(batch), choices, len(self.operations))
            parts = tf.dynamic_partition(images, choices, len(self.operations))
            transformed = [self._transform(operation, part, seeds.next())
                           for operation, part in zip(self.operations, parts)]
            images = tf.ensure_shape(tf.dynamic_stitch(positions, transformed), images.shape)
        return {**data, "images": images}

    @staticmethod
    def _transform(operation: keras.Layer, images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        def apply() -> tf.Tensor:
            transformation = operation.get_random_transformation(
                images, training=True, seed=BatchSeeds(seed))
            return tf.cast(operation.transform_images(images, transformation, training=True),
                           images.dtype)

        # An op no image drew gets an empty part, which some Keras ops cannot take.
        return tf.cond(tf.shape(images)[0] > 0, apply, lambda: images)

    def get_config(self) -> dict:
        return {**super().get_config(), "num_ops": self.num_ops, "factor": self.factor,
                "value_range": self.value_range}


class MixUpOrCutMix(BatchAugmentation):
    """Mixes a `{"images", "labels"}` batch with MixUp or CutMix, or leaves it alone.

    Per batch (per replica under a distribution strategy), MixUp is chosen with
    probability `mixup`, CutMix with probability `cutmix`, and nothing otherwise; the
    mixing weights and partners are drawn per image.

    Args:
        mixup: float, probability of MixUp (Beta(0.2, 0.2) weights).
        cutmix: float, probability of CutMix; `mixup + cutmix <= 1`.
        seed: int, seed of the layer's own generator.
    """

    def __init__(self, mixup: float, cutmix: float, seed: int | None = None, **kwargs) -> None:
        super().__init__(seed, **kwargs)
        self.mixup_probability = mixup
        self.cutmix_probability = cutmix
        self.mixup = keras.layers.MixUp(alpha=0.2)
        self.cutmix = keras.layers.CutMix(factor=1.0)

    def augment(self, data, seeds):
        draw = keras.random.uniform((), seed=seeds)
        mixup_seed, cutmix_seed = seeds.next(), seeds.next()
        return tf.cond(
            draw < self.mixup_probability,
            lambda: self._mix(self.mixup, data, mixup_seed),
            lambda: tf.cond(draw < self.mixup_probability + self.cutmix_probability,
                            lambda: self._mix(self.cutmix, data, cutmix_seed), lambda: data))

    @staticmethod
    def _mix(layer: keras.Layer, data: dict[str, tf.Tensor],
             seed: tf.Tensor) -> dict[str, tf.Tensor]:
        transformation = layer.get_random_transformation(data, training=True,
                                                         seed=BatchSeeds(seed))
        return {**data,
                "images": layer.transform_images(data["images"], transformation, training=True),
                "labels": layer.transform_labels(data["labels"], transformation, training=True)}

    def get_config(self) -> dict:
        return {**super().get_config(), "mixup": self.mixup_probability,
                "cutmix": self.cutmix_probability}
