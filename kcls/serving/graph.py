"""The graph every export serves: encoded images to prepared ones, prepared images to the
task's outputs.

One definition for the SavedModel's signatures (`kcls.serving.export`), the ONNX model
(`kcls.serving.onnx`) and local predictions (`kcls.serving.predict`), so all of them
decode, resize and serve the same probabilities, top-k and rejection.

Example:

>>> outputs = served_outputs(classifier, class_names, task, recipe)  # doctest: +SKIP
>>> sorted(outputs(images))  # doctest: +SKIP
['classes', 'embedding', 'known', 'known_score', 'labels', 'probabilities', 'scores']
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from kcls.config import Recipe, ResizeMode
from kcls.data.pipeline import prepare_image
from kcls.data.tta import tta_views
from kcls.models.classifier import embedding_model
from kcls.tasks import Task


def served_outputs(model: keras.Model, class_names: list[str], task: Task, recipe: Recipe
                   ) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
    """What every signature (and the ONNX model) computes from prepared images.

    Args:
        model: float32 keras.Model, images `[N, S, S, 3]` in [0, 255] -> logits `[N, C]`.
        class_names: list[str], the `labels` served.
        task: the fitted Task: probabilities, its outputs (`serving_outputs`) and, with a
            rejection rule, `known` and `known_score` (`rejection_outputs`).
        recipe: its `export.top_k`, `export.flip_tta` and `export.shift_tta` apply.

    Returns:
        A function of float32 images `[N, S, S, 3]` returning the task's outputs and
        `embedding` (float32 `[N, D]`).
    """
    with_embedding = embedding_model(model)

    def outputs(images: tf.Tensor) -> dict[str, tf.Tensor]:
        embedding, logits = with_embedding(images, training=False)
        probabilities = task.probabilities_graph(logits)
        if recipe.export.flip_tta:
            views = [task.probabilities_graph(model(view, training=False))
                     for view in tta_views(images, recipe.export.shift_tta)]
            probabilities = tf.add_n([probabilities, *views]) / float(1 + len(views))
        # Made inside the function: a constant of the graph, not a captured input (which
        # an ONNX converter would turn into a model input).
        label_table = tf.constant(class_names)
        served = task.serving_outputs(probabilities, label_table, recipe.export.top_k)
        return {**served, **task.rejection_outputs(logits, embedding), "embedding": embedding}

    return outputs


def decode_images(image_bytes: tf.Tensor, image_size: int, resize: ResizeMode) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP images, tf.string `[N]`, to float32 `[N, S, S, 3]` in [0, 255],
    each decoded (grey and RGBA to RGB, a GIF's first frame) and resized alone with
    `prepare_image`, as evaluation does. An undecodable image fails the whole call
    (`tf.errors.InvalidArgumentError`)."""
    def decode(encoded: tf.Tensor) -> tf.Tensor:
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return prepare_image(image, image_size, resize)

    return tf.map_fn(decode, image_bytes,
                     fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))


def image_decoder(image_size: int, resize: ResizeMode) -> Callable[[list[bytes]], tf.Tensor]:
    """`decode_images` as a compiled function of a list of encoded images: the SavedModel's
    own preprocessing, for models that take prepared images (ONNX, TFLite)."""
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def decoded(image_bytes: tf.Tensor) -> tf.Tensor:
        return decode_images(image_bytes, image_size, resize)

    return lambda images: decoded(tf.constant(images, tf.string))
