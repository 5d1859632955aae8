"""Training and evaluation `tf.data` pipelines, following the tf.data performance guide.

Both pipelines turn source examples `(uint8 [H, W, 3], int64 label)` into batches
`(float32 [B, S, S, 3] in [0, 255], float32 one-hot [B, C])`. Labels are one-hot so
that MixUp/CutMix soft labels and label smoothing use the same loss. Multi-label
sources (`model.task=multilabel`) give float32 multi-hot `[C]` labels instead, which
pass through unchanged (`targets`).

Order of the training pipeline: resize in parallel, cache the resized examples as
uint8 (memory or file: the resize, the costly part, runs once, and the cache stays
small), a first pass in the source's (seeded random) order through a shuffle buffer of
four batches, then passes shuffled with the full seeded buffer, batch (dropping the
remainder, so XLA sees one static shape), prefetch. The first batch thereby waits for
four batches of images, not for a full shuffle buffer (10,000 by default).
No augmentation runs here: the training function augments whole batches on the device
(`kcls.data.augment`, `kcls.train.trainer.Trainer`), so the host CPU only decodes and
resizes. Evaluation caches the float32 resized images, unrounded.

An on-disk cache (`data.cache=PREFIX`) is a file per split,
`PREFIX.<split>.<key>`, whose key is a digest of the source's fingerprint (its files or
arrays, `Splits.fingerprint`) and of every `DataConfig` field that shapes the cached
examples: tf.data replays a cache file without checking what made it, and a stale one
made with another seed or fraction would put today's test images in training.

`prepare_image` is the single definition of evaluation preprocessing: the exported
serving signature calls it too, so served predictions match evaluation exactly.

Example:

>>> batches = eval_pipeline(splits.test, 10, DataConfig())  # doctest: +SKIP
>>> images, labels = next(iter(batches))  # float32 [64, 32, 32, 3], float32 [64, 10]
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from kcls.config import ConfigError, DataConfig, ResizeMode, require_choice
from kcls.data.folder import graph_only
from kcls.data.sources import fingerprint

# Batches in the shuffle buffer of the training split's first pass (see `train_pipeline`).
FIRST_PASS_BUFFER_BATCHES = 4
# DataConfig fields that act after the cache (batching, augmentation, shuffling): every
# other field, present or future, keys on-disk cache files.
_AFTER_CACHE_FIELDS = ("batch_size", "augment", "horizontal_flip", "mixup", "cutmix", "cache",
                       "shuffle_buffer", "deterministic")


def prepare_image(image: tf.Tensor, image_size: int, mode: ResizeMode = "resize") -> tf.Tensor:
    """Resizes uint8 image(s) to the model input.

    Args:
        image: uint8 `[H, W, 3]` or `[B, H, W, 3]`.
        image_size: int, output side in pixels.
        mode: `resize` stretches to a square; `center_crop` scales the shorter side to
            `image_size` and crops the centre; `pad` scales the longer side to
            `image_size` and pads with zeros.

    Returns:
        float32 `[image_size, image_size, 3]` (or batched), values in [0, 255].
    """
    require_choice(mode, ResizeMode, "data.resize")
    size = (image_size, image_size)
    if mode == "pad":
        resized = tf.image.resize_with_pad(tf.cast(image, tf.float32), *size, antialias=True)
    elif mode == "center_crop":
        height_width = tf.cast(tf.shape(image)[-3:-1], tf.float32)
        scale = image_size / tf.reduce_min(height_width)
        scaled_size = tf.cast(tf.math.ceil(height_width * scale), tf.int32)
        resized = tf.image.resize_with_crop_or_pad(_resize(image, scaled_size), *size)
    else:
        resized = _resize(image, tf.constant(size))
    return tf.clip_by_value(resized, 0.0, 255.0)


def _resize(image: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """Area averaging when shrinking (anti-aliased, 2x faster than antialias=True), bilinear
    when enlarging (area would repeat pixels like nearest-neighbour)."""
    shrinking = tf.reduce_all(tf.shape(image)[-3:-1] >= size)
    return tf.cond(shrinking, lambda: tf.image.resize(image, size, method="area"),
                   lambda: tf.image.resize(image, size, method="bilinear"))


def prepare_images_by_products(images: tf.Tensor, image_size: int,
                               mode: ResizeMode = "resize") -> tf.Tensor:
    """`prepare_image` of a batch, computed with matrix products only, for ONNX.

    ONNX converters do not translate `prepare_image`'s resizes faithfully: tf2onnx 1.17
    turns TensorFlow's area resize into a different one (pixels up to 190 of 255 off)
    and cannot convert the antialiased resize of `pad` at all. Each of those resizes is
    a weighted sum of input rows, then of columns, so here it is `rows @ image @
    columns^T` with the same weights, computed in the graph from the input's shape;
    the result matches `prepare_image` in a graph with unknown image sizes (the SavedModel's
    and tf.data's case) to 0.013 of 255 (tests/test_onnx.py).

    Args:
        images: float or uint8 `[B, H, W, 3]`, one size for the batch.
        image_size: int, output side in pixels.
        mode: as `prepare_image`.

    Returns:
        float32 `[B, image_size, image_size, 3]`, values in [0, 255].
    """
    require_choice(mode, ResizeMode, "data.resize")
    shape = tf.shape(images)
    rows, columns = _resize_weights(shape[1], shape[2], image_size, mode)
    resized = tf.einsum("yh,bhwc->bywc", rows, tf.cast(images, tf.float32))
    resized = tf.einsum("xw,bywc->byxc", columns, resized)
    return tf.clip_by_value(resized, 0.0, 255.0)


def _resize_weights(height: tf.Tensor, width: tf.Tensor, image_size: int,
                    mode: ResizeMode) -> tuple[tf.Tensor, tf.Tensor]:
    """The row and column weights, float32 `[S, H]` and `[S, W]`, of `prepare_image`."""
    if mode == "pad":  # tf.image.resize_with_pad's arithmetic, then its padding
        sizes = tf.cast(tf.stack([height, width]), tf.float32)
        ratio = tf.reduce_max(sizes / float(image_size))
        resized = tf.cast(tf.floor(sizes / ratio), tf.int32)
        padding = tf.maximum(tf.cast(tf.floor((image_size - sizes / ratio) / 2), tf.int32), 0)
        return tuple(tf.pad(_triangle_weights(size, resized[axis]),
                            [[padding[axis], image_size - resized[axis] - padding[axis]],
                             [0, 0]])
                     for axis, size in enumerate((height, width)))
    if mode == "center_crop":
        sizes = tf.cast(tf.stack([height, width]), tf.float32)
        scaled = tf.cast(tf.math.ceil(sizes * (image_size / tf.reduce_min(sizes))), tf.int32)
    else:
        scaled = tf.constant([image_size, image_size])
    shrinking = tf.logical_and(height >= scaled[0], width >= scaled[1])  # as `_resize`
    weights = []
    for axis, size in enumerate((height, width)):
        axis_weights = tf.where(shrinking, _area_weights(size, scaled[axis]),
                                _bilinear_weights(size, scaled[axis]))
        start = (scaled[axis] - image_size) // 2  # the centre crop (0 for `resize`)
        weights.append(axis_weights[start:start + image_size])
    return weights[0], weights[1]


def _area_weights(size: tf.Tensor, output_size: tf.Tensor) -> tf.Tensor:
    """`[output, size]`: TensorFlow's area resize (`ResizeArea`): each output pixel averages
    the input pixels its span covers, weighed by the overlap."""
    scale = tf.cast(size, tf.float32) / tf.cast(output_size, tf.float32)
    start = tf.cast(tf.range(output_size), tf.float32)[:, None] * scale
    end = tf.minimum(start + scale, tf.cast(size, tf.float32))
    source = tf.cast(tf.range(size), tf.float32)[None, :]
    return tf.maximum(tf.minimum(source + 1.0, end) - tf.maximum(source, start), 0.0) / scale


def _bilinear_weights(size: tf.Tensor, output_size: tf.Tensor) -> tf.Tensor:
    """`[output, size]`: bilinear interpolation with half-pixel centres (`tf.image.resize`)."""
    scale = tf.cast(size, tf.float32) / tf.cast(output_size, tf.float32)
    position = (tf.cast(tf.range(output_size), tf.float32) + 0.5) * scale - 0.5
    fraction = position - tf.floor(position)
    low = tf.maximum(tf.cast(tf.floor(position), tf.int32), 0)
    high = tf.minimum(tf.cast(tf.math.ceil(position), tf.int32), size - 1)
    return (tf.one_hot(low, size) * (1.0 - fraction)[:, None]
            + tf.one_hot(high, size) * fraction[:, None])


def _triangle_weights(size: tf.Tensor, output_size: tf.Tensor) -> tf.Tensor:
    """`[output, size]`: the antialiased bilinear resize (`ScaleAndTranslate` with the
    triangle kernel widened by the shrink factor, each row normalised)."""
    inverse_scale = tf.cast(size, tf.float32) / tf.cast(output_size, tf.float32)
    kernel_scale = tf.maximum(inverse_scale, 1.0)
    sample = (tf.cast(tf.range(output_size), tf.float32) + 0.5) * inverse_scale
    source = tf.cast(tf.range(size), tf.float32) + 0.5
    weights = tf.maximum(1.0 - tf.abs(source[None, :] - sample[:, None]) / kernel_scale, 0.0)
    return weights / tf.reduce_sum(weights, axis=1, keepdims=True)


def train_pipeline(examples: tf.data.Dataset, num_classes: int, config: DataConfig,
                   class_weights: np.ndarray | None = None,
                   source_fingerprint: str | None = None, *,
                   host_augment: keras.Layer | None = None) -> tf.data.Dataset:
    """Infinite, shuffled, batched training data; size an epoch with `steps_per_epoch`.

    Args:
        examples: `(uint8 [H, W, 3], int64)` examples.
        num_classes: int, depth of the one-hot labels.
        config: DataConfig, for batch size, cache, shuffle buffer, image size and seed.
        class_weights: float `[num_classes]` loss weight per class (e.g.
            `balanced_class_weights`); batches then carry a third element, the float32
            `[B]` weights of their examples' original classes (before MixUp/CutMix).
        source_fingerprint: `Splits.fingerprint` of the source of `examples`; required
            when `config.cache` is a file prefix (it keys the cache file).
        host_augment: an `kcls.data.augment.Augmentation` to run here, on the host,
            instead of on the device: only for TPUs with a policy XLA cannot compile
            (`kcls.data.augment.place_augmentation`). Batch k draws from the seed
            `(data.seed, k)`, so parallel calls stay reproducible.
    """
    @graph_only
    def prepare(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        resized = prepare_image(image, config.image_size, config.resize)
        return tf.cast(tf.round(resized), tf.uint8), label

    examples = examples.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    examples = _cache(examples, config, "train", source_fingerprint)
    # The first pass reads the source's order, already a seeded random one (arrays,
    # folders, manifests and packs are split here or by `kcls data pack`; TFDS stores
    # examples shuffled), through a buffer of a few batches, seeded too: a full buffer
    # would decode `shuffle_buffer` images before the first step. Later passes shuffle
    # the cached examples with the full buffer.
    first_buffer = min(config.shuffle_buffer, FIRST_PASS_BUFFER_BATCHES * config.batch_size)
    examples = examples.shuffle(first_buffer, seed=config.seed).concatenate(examples.shuffle(
        config.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True).repeat())
    batches = examples.batch(config.batch_size, drop_remainder=True,
                             num_parallel_calls=tf.data.AUTOTUNE)
    weights = None if class_weights is None else tf.constant(class_weights, tf.float32)

    @graph_only
    def model_inputs(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, ...]:
        batch = (tf.cast(images, tf.float32), targets(labels, num_classes))
        return batch if weights is None else (*batch, tf.gather(weights, labels))

    batches = batches.map(model_inputs, num_parallel_calls=tf.data.AUTOTUNE)
    if host_augment is not None:
        def augment(index: tf.Tensor, batch: tuple[tf.Tensor, ...]) -> tuple[tf.Tensor, ...]:
            images, labels, *sample_weights = batch
            seed = tf.stack([tf.constant(config.seed, tf.int64), index])
            augmented = host_augment({"images": images, "labels": labels}, training=True,
                                     seed=seed)
            return (augmented["images"], augmented["labels"], *sample_weights)

        batches = batches.enumerate().map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    return _with_options(batches, config).prefetch(tf.data.AUTOTUNE)


def targets(labels: tf.Tensor, num_classes: int) -> tf.Tensor:
    """float32 training targets: int class indices (`[...]`) one-hot, multi-hot label
    vectors (float `[..., C]`, one more dimension than a class index) as they are.

    Args:
        labels: int64 `[]`/`[B]` class indices, or float32 `[C]`/`[B, C]` multi-hot.
        num_classes: int, C.
    """
    if labels.dtype.is_integer:
        return tf.one_hot(labels, num_classes)
    return tf.cast(labels, tf.float32)


def balanced_class_weights(counts: np.ndarray) -> np.ndarray:
    """scikit-learn's `balanced` weights `n / (C * n_c)` for per-class example counts `[C]`.

    Every class then weighs the same in total and the mean weight per example is 1, so
    the learning rate keeps its meaning. A class without examples gets weight 0.

    >>> balanced_class_weights(np.array([90, 10])).tolist()
    [0.5555555555555556, 5.0]
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def eval_pipeline(examples: tf.data.Dataset, num_classes: int, config: DataConfig,
                  split: str = "eval", source_fingerprint: str | None = None
                  ) -> tf.data.Dataset:
    """One ordered pass over `examples`, batched, with no augmentation.

    `split` (`validation`, `test`) and `source_fingerprint` (`Splits.fingerprint`) name
    the on-disk cache file when `config.cache` is a file prefix; the fingerprint is
    required then.
    """
    @graph_only
    def prepare(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return (prepare_image(image, config.image_size, config.resize),
                targets(label, num_classes))

    examples = examples.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    batches = _cache(examples, config, split, source_fingerprint).batch(config.batch_size)
    return _with_options(batches, config, deterministic=True).prefetch(tf.data.AUTOTUNE)


def cache_file(config: DataConfig, split: str, source_fingerprint: str) -> str:
    """The on-disk cache file of `split`: `<data.cache>.<split>.<key>` (see module docstring).

    Raises:
        ValueError: `config.cache` is `memory` or `none`, not a file prefix.
    """
    if config.cache in ("memory", "none"):
        raise ValueError(f"data.cache={config.cache!r} is not a file prefix.")
    shaping = {name: value for name, value in dataclasses.asdict(config).items()
               if name not in _AFTER_CACHE_FIELDS}
    return f"{config.cache}.{split}.{fingerprint(shaping, source_fingerprint)[:16]}"


def _cache(examples: tf.data.Dataset, config: DataConfig, split: str,
           source_fingerprint: str | None) -> tf.data.Dataset:
    if config.cache == "none":
        return examples
    if config.cache == "memory":
        return examples.cache()
    if not source_fingerprint:
        raise ValueError(
            f"data.cache={config.cache!r} caches to files, which are keyed on the data they "
            "hold: pass source_fingerprint=splits.fingerprint (kcls.workflows.prepare does), or "
            "use data.cache=memory.")
    return examples.cache(cache_file(config, split, source_fingerprint))


def _with_options(dataset: tf.data.Dataset, config: DataConfig,
                  deterministic: bool | None = None) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = config.deterministic if deterministic is None else deterministic
    return dataset.with_options(options)


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
