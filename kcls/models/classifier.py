"""Image classifier: backbone + global average pooling + dropout + float32 logits.

`build_imagenet_classifier` builds a backbone with its original ImageNet-1k classifier
instead, for ImageNet predictions and for checking a weight port.

Example:

>>> model = build_classifier(ModelConfig(backbone="resnet_v2_tiny"), num_classes=10,
...                          image_size=32)
>>> model.output.dtype
'float32'
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kcls.config import ConfigError, ModelConfig
from kcls.models.backbones import build_backbone, get_spec
from kcls.models.pretrained import load_imagenet_weights

BACKBONE_LAYER = "backbone"
EMBEDDING_LAYER = "pool"  # its output, the pooled backbone features, is the embedding
_INFERENCE_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def build_classifier(config: ModelConfig, num_classes: int, image_size: int,
                     precision: str = "float32") -> keras.Model:
    """Builds the classifier under dtype policy `precision`.

    Args:
        config: ModelConfig, backbone name, weights and dropout.
        num_classes: int, number of output classes.
        image_size: int, input side in pixels.
        precision: Keras dtype policy name (`float32`, `mixed_bfloat16`, `mixed_float16`).

    Returns:
        A functional `keras.Model`: float32 images `[B, S, S, 3]` in [0, 255] -> float32
        logits `[B, num_classes]`. The backbone is the layer named `backbone`; the layer
        named `pool` outputs the penultimate-layer embedding (`embedding_model`). The logits
        layer computes in float32 whatever the policy, for a stable softmax and loss.
        Variables are created under the current strategy: call inside `strategy.scope()`
        to train with a `tf.distribute` strategy.
    """
    with dtype_policy(precision):
        backbone = build_backbone(config.backbone, image_size, config.weights)
        backbone.name = BACKBONE_LAYER
        images = keras.Input((image_size, image_size, 3), name="images")
        logits = classification_head(keras.layers, backbone(images), num_classes,
                                     config.dropout, dtype="float32")
        # Preset backbones (`keras_hub:PATH`) hold characters Keras names may not.
        name = re.sub(r"[^\w.-]+", "_", config.backbone).strip("_")
        return keras.Model(images, logits, name=f"{name}_classifier")


def classification_head(layers: Any, features: Any, num_classes: int, dropout: float,
                        dtype: str | None = None, name: str = "logits") -> Any:
    """Global average pooling, dropout and the logits layer on backbone `features`.

    One definition for Keras 3 (`layers=keras.layers`) and for the tf-keras rebuild of
    the TF-MOT child process (`tf.keras.layers`): the layer names (`pool`, `dropout`,
    `logits`) are what weights are matched by.

    Args:
        layers: the Keras layers module to build with.
        features: the backbone's output, `[B, h, w, D]`.
        num_classes: int, C.
        dropout: the dropout rate before the logits layer (a layer even at 0).
        dtype: the logits layer's dtype (`float32` under mixed precision), or None.
        name: the logits layer's name.

    Returns:
        The logits `[B, C]`.
    """
    pooled = layers.GlobalAveragePooling2D(name=EMBEDDING_LAYER)(features)
    pooled = layers.Dropout(dropout, name="dropout")(pooled)
    return layers.Dense(num_classes, dtype=dtype, name=name)(pooled)


def embedding_model(classifier: keras.Model) -> keras.Model:
    """The classifier with two outputs: `(embedding float32 [B, D], logits float32 [B, C])`.

    The embedding is the pooled backbone output that the head's dropout and logits layer
    read (the penultimate layer); the returned model shares the classifier's layers and
    weights.
    """
    embedding = classifier.get_layer(EMBEDDING_LAYER).output
    return keras.Model(classifier.inputs, [keras.ops.cast(embedding, "float32"),
                                           classifier.outputs[0]],
                       name=f"{classifier.name}_with_embedding")


def inference_function(model: keras.Model) -> Callable[[Any], Any]:
    """`model(images, training=False)` as NumPy, runnable by one worker of several alone.

    Keras's `predict_on_batch` runs a model through the strategy its weights were made
    under, and under MultiWorkerMirroredStrategy that gathers every worker's batch (a
    collective), which hangs or fails when only the chief evaluates. For such weights this
    is a compiled call (once per model) that reads the local copy of the weights on the
    local device; for any other model, `predict_on_batch` itself (TPUs need it).

    Args:
        model: keras.Model, float32 images `[B, H, W, 3]` -> one output or a list of them.

    Returns:
        A function of an image batch returning the model's output(s) as np.ndarray.
    """
    if not _has_multiworker_weights(model):
        return model.predict_on_batch
    if model not in _INFERENCE_FUNCTIONS:
        _INFERENCE_FUNCTIONS[model] = tf.function(lambda images: model(images, training=False),
                                                  reduce_retracing=True)
    compiled = _INFERENCE_FUNCTIONS[model]
    return lambda images: tf.nest.map_structure(np.asarray, compiled(images))


def _has_multiworker_weights(model: keras.Model) -> bool:
    """Whether `model`'s weights are MultiWorkerMirroredStrategy variables."""
    value = getattr(model.weights[0], "value", None) if model.weights else None
    strategy = getattr(value, "distribute_strategy", None)  # of tf.distribute variables
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def build_imagenet_classifier(backbone_name: str, image_size: int | None = None) -> keras.Model:
    """The backbone with the ImageNet-1k classifier its pip-shipped checkpoint holds.

    Args:
        backbone_name: str, a backbone whose ImageNet weights ship in a pip package
            (`efficientnet_lite0`).
        image_size: int, input side in pixels; None for the size the weights were
            trained at (224).

    Returns:
        A `keras.Model`: float32 images `[B, S, S, 3]` in [0, 255] -> float32 logits
        `[B, 1000]` in the ImageNet-1k class order (e.g. 309 `bee`, 310 `ant`).

    Raises:
        ConfigError: a backbone without pip-shipped ImageNet weights.

    Example:

    >>> model = build_imagenet_classifier("efficientnet_lite0")  # doctest: +SKIP
    >>> model.output.shape  # doctest: +SKIP
    (None, 1000)
    """
    spec = get_spec(backbone_name)
    if spec.pip_weights is None:
        raise ConfigError(f"Backbone {backbone_name!r} has no ImageNet classifier that ships "
                          "offline; only backbones with pip-shipped weights do.")
    image_size = image_size or spec.image_size
    backbone = build_backbone(backbone_name, image_size)
    images = keras.Input((image_size, image_size, 3), name="images")
    logits = classification_head(keras.layers, backbone(images), spec.pip_weights.head_classes,
                                 dropout=0.0, name="imagenet_logits")
    model = keras.Model(images, logits, name=f"{backbone_name}_imagenet")
    load_imagenet_weights(backbone, spec.pip_weights, model.get_layer("imagenet_logits"))
    return model


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Sets the global Keras dtype policy for the layers built inside the block."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
