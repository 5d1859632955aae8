"""TFLite conversion: a float32 Keras classifier to a flatbuffer, plain or quantized.

`write_probability_saved_model` writes the one-signature SavedModel the converter takes
(float32 images `[1, S, S, 3]` in [0, 255] -> `probabilities` float32 `[1, C]`;
`tf.lite.TFLiteConverter.from_keras_model` does not take Keras 3 models, and the export's
own signatures take encoded bytes or resize inside); `convert` turns it into float32
TFLite or applies a post-training quantization (`PTQ_METHODS`), calibrating `ptq-int8`
on `representative_images` of the training split.

Example:

>>> saved_model = write_probability_saved_model(classifier, 32, "/tmp/sm")  # doctest: +SKIP
>>> int8_model = convert(saved_model, "ptq-int8", representative_images(recipe))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from kcls.config import Recipe
from kcls.data.pipeline import prepare_image
from kcls.data.sources import load_splits
from kcls.environment import native_logs_wanted, native_stderr_muted
from kcls.models.classifier import embedding_model
from kcls.tasks import SingleLabelTask, Task

PTQ_METHODS = ("ptq-dynamic", "ptq-float16", "ptq-int8")
IO_TYPES = ("int8", "uint8", "float32")
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"


class OptimizeError(ValueError):
    """A request `optimize` cannot carry out, with what to do instead in its message."""


def write_probability_saved_model(classifier: keras.Model, image_size: int,
                                  directory: str | Path,
                                  task: Task | None = None) -> Path:
    """Writes a SavedModel the TFLite converter takes: one fixed-shape float signature.

    Args:
        classifier: float32 keras.Model, images `[B, S, S, 3]` in [0, 255] -> logits `[B, C]`.
        image_size: int, S.
        directory: where to write it.
        task: the fitted Task whose probabilities the export serves (softmax at the
            calibration temperature, or one sigmoid per label); default single-label,
            uncalibrated.

    Returns:
        `directory`, whose `serving_default` maps `images` float32 `[1, S, S, 3]` to
        `probabilities` float32 `[1, C]` and, for a task with a rejection rule,
        `known_score` float32 `[1]` (the threshold is in the task's metadata).
    """
    task = task or SingleLabelTask()
    with_embedding = embedding_model(classifier)

    def probabilities(images: tf.Tensor) -> dict[str, tf.Tensor]:
        embedding, logits = with_embedding(images, training=False)
        outputs = {OUTPUT_NAME: task.probabilities_graph(logits)}
        rejection = task.rejection_outputs(logits, embedding)
        if rejection:  # a bool would not quantize: the score, thresholded by the reader
            outputs["known_score"] = rejection["known_score"]
        return outputs

    archive = keras.export.ExportArchive()
    archive.track(classifier)
    # Batch 1, static: edge runtimes allocate once, and a dynamic batch keeps the
    # converter from folding shapes.
    archive.add_endpoint("serving_default", probabilities, input_signature=[
        tf.TensorSpec([1, image_size, image_size, 3], tf.float32, name=INPUT_NAME)])
    archive.write_out(str(directory), verbose=False)
    return Path(directory)


def convert(saved_model_dir: str | Path, method: str | None = None,
            representative_images: Callable[[], Iterator[np.ndarray]] | None = None,
            io_type: str = "int8", per_channel: bool = True) -> bytes:
    """Converts a SavedModel from `write_probability_saved_model` to a TFLite flatbuffer.

    Args:
        saved_model_dir: the SavedModel.
        method: `None` (float32), `ptq-dynamic`, `ptq-float16` or `ptq-int8`.
        representative_images: for `ptq-int8`, a callable yielding float32 `[1, S, S, 3]`
            calibration images in [0, 255].
        io_type: for `ptq-int8`, the model's input and output type: `int8`, `uint8` or
            `float32` (float32 keeps quantize/dequantize ops inside the model).
        per_channel: for `ptq-int8`, one weight scale per output channel (the converter's
            default). `False`: one scale per tensor, which drops a float32 scale and an
            int64 zero point per channel from the file (about 45 KB, 15%, on quickstart's
            resnet_v2_tiny) but can cost accuracy, notably with depthwise convolutions.

    Returns:
        The `.tflite` flatbuffer.
    """
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))
    if method in PTQ_METHODS:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if method == "ptq-float16":
        converter.target_spec.supported_types = [tf.float16]
    elif method == "ptq-int8":
        if representative_images is None:
            raise OptimizeError("ptq-int8 needs representative images for calibration.")
        converter.representative_dataset = lambda: ([image] for image in representative_images())
        # Full integer: fail at conversion rather than silently keep float ops.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # Private but long-standing converter switch; there is no public one.
        converter._experimental_disable_per_channel = not per_channel
        if io_type != "float32":
            converter.inference_input_type = getattr(tf, io_type)
            converter.inference_output_type = getattr(tf, io_type)
    elif method is not None and method not in PTQ_METHODS:
        raise OptimizeError(f"Unknown post-training method {method!r}; use one of "
                            f"{', '.join(PTQ_METHODS)}.")
    with native_stderr_muted(not native_logs_wanted()):  # "Ignored output_format." ...
        return converter.convert()


def representative_images(recipe: Recipe, count: int = 200,
                          skipped: list[str] | None = None
                          ) -> Callable[[], Iterator[np.ndarray]]:
    """Calibration images from the recipe's TRAINING split, never the test split.

    Args:
        recipe: Recipe, whose data and seed pick the images.
        count: int, how many.
        skipped: list[str] that receives the source's files that did not reach the
            calibration (`Splits.skipped`), once the images have been read.

    Returns:
        A callable yielding `count` (or fewer) float32 `[1, S, S, 3]` images in [0, 255],
        shuffled with the recipe's seed, prepared exactly as in evaluation.
    """
    def images() -> Iterator[np.ndarray]:
        splits = load_splits(recipe.data, recipe.label_format)
        train = splits.train.shuffle(10_000, seed=recipe.data.seed)
        prepared = train.take(count).map(
            lambda image, _: prepare_image(image, recipe.data.image_size, recipe.data.resize),
            num_parallel_calls=tf.data.AUTOTUNE)
        for image in prepared.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
            yield image[np.newaxis].astype(np.float32)
        if skipped is not None:
            skipped.extend(name for name in splits.skipped if name not in skipped)

    return images


