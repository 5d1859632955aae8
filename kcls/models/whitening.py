"""Patch whitening: a frozen first convolution fitted to the training images.

The first layer of airbench (Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU",
arXiv:2404.00498), from hlb-CIFAR10 before it: a 2x2 convolution whose filters are the
eigenvectors of the covariance of the training images' 2x2x3 patches, each divided by
the square root of its eigenvalue, followed by the same filters negated (so that the
ReLU after it passes both signs). Its outputs are decorrelated with unit variance from
the first step, which the rest of the network learns on faster; the kernel stays frozen
and only its bias trains.

`PatchWhitening` is that layer; `fit_patch_whitening` sets the kernel of every such layer
of a model from a sample of images. A model without one is left alone.

Example:

>>> layer = PatchWhitening(name="whitening")
>>> outputs = layer(np.zeros([1, 32, 32, 3], "float32"))
>>> fit_patch_whitening(keras.Sequential([layer]), np.random.rand(64, 32, 32, 3))
1
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

# KerasCV's own switch (private in keras-cv 0.9, which is pinned): the layer is built
# with the Keras that builds the backbone around it (see kcls.models.compact_resnet).
from keras_cv.src.backend import keras

PATCH_SIZE = 2
# Added to each eigenvalue before the division: the smallest eigenvalues of natural
# image patches are near zero, and their filters would otherwise amplify noise.
EIGENVALUE_EPSILON = 5e-4
# Patches sampled per image, for a covariance over many images at little cost.
PATCHES_PER_IMAGE = 64


class PatchWhitening(keras.layers.Layer):
    """A 2x2 convolution with `2 * 4C` filters for `C` input channels: kernel frozen, bias
    trained.

    Input `[B, H, W, C]`, output `[B, H, W, 8C]` ("same" padding, so the side is kept).
    Until `fit_patch_whitening` sets its kernel it is a random (Glorot) projection. The
    kernel is a non-trainable weight, so unfreezing the backbone leaves it frozen.
    """

    def build(self, input_shape: Any) -> None:
        channels = input_shape[-1]
        filters = 2 * PATCH_SIZE * PATCH_SIZE * channels
        self.kernel = self.add_weight(name="kernel", initializer="glorot_uniform",
                                      shape=(PATCH_SIZE, PATCH_SIZE, channels, filters),
                                      trainable=False)
        self.bias = self.add_weight(name="bias", shape=(filters,), initializer="zeros")

    def call(self, inputs: Any) -> Any:
        # tf.nn, not keras.ops: the same layer builds under tf-keras (the TF-MOT process).
        return tf.nn.bias_add(tf.nn.conv2d(inputs, tf.cast(self.kernel, inputs.dtype), 1,
                                           "SAME"), tf.cast(self.bias, inputs.dtype))

    def compute_output_shape(self, input_shape: Any) -> Any:
        return (*input_shape[:-1], 2 * PATCH_SIZE * PATCH_SIZE * input_shape[-1])


def fit_patch_whitening(model: keras.Model, images: np.ndarray, seed: int = 0) -> int:
    """Sets the kernel of every `PatchWhitening` layer of `model` from `images`.

    Each layer is fitted to what it receives: `images` are run through the (sub)model
    holding it up to that layer's input, so a `Rescaling` before it is applied first. A
    nested model holding one (a classifier's backbone) must receive `model`'s inputs
    unchanged, as kcls's classifiers feed their backbone.

    Args:
        model: a built keras.Model (a classifier or a backbone), searched recursively.
        images: float array `[N, H, W, 3]`, the model's input (e.g. [0, 255] pixels),
            a sample of the training images (a few thousand are plenty).
        seed: seed of the patch sampling.

    Returns:
        How many layers were fitted (0: the model has none).
    """
    found = _whitening_layers_with_models(model)
    for layer, holder in found:
        inputs = keras.Model(holder.inputs, layer.input).predict(images, verbose=0,
                                                                batch_size=256)
        kernel = whitening_kernel(np.asarray(inputs, "float64"), seed)
        layer.kernel.assign(kernel.astype(layer.kernel.dtype))
    return len(found)


def whitening_kernel(inputs: np.ndarray, seed: int = 0) -> np.ndarray:
    """The whitening filters of the 2x2 patches of `inputs`.

    Args:
        inputs: float array `[N, H, W, C]`.
        seed: seed of the patch sampling.

    Returns:
        float32 `[2, 2, C, 2 * 4C]`: the `4C` eigenvectors of the patches' second-moment
        matrix, largest eigenvalue first, each divided by `sqrt(eigenvalue + 5e-4)`, then
        the same filters negated.
    """
    patches = _sample_patches(inputs, seed)  # [P, 2, 2, C]
    flat = patches.reshape(len(patches), -1)
    eigenvalues, eigenvectors = np.linalg.eigh(flat.T @ flat / len(flat))
    order = np.argsort(eigenvalues)[::-1]
    filters = eigenvectors[:, order] / np.sqrt(eigenvalues[order] + EIGENVALUE_EPSILON)
    kernel = filters.reshape(PATCH_SIZE, PATCH_SIZE, inputs.shape[-1], -1)
    return np.concatenate([kernel, -kernel], axis=-1).astype("float32")


def _sample_patches(inputs: np.ndarray, seed: int) -> np.ndarray:
    """`PATCHES_PER_IMAGE` random 2x2 patches of each image: `[N * 64, 2, 2, C]`."""
    count, height, width, _ = inputs.shape
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, height - PATCH_SIZE + 1, (count, PATCHES_PER_IMAGE))
    columns = rng.integers(0, width - PATCH_SIZE + 1, (count, PATCHES_PER_IMAGE))
    image_index = np.arange(count)[:, None]
    patches = [inputs[image_index, rows + dy, columns + dx]
               for dy in range(PATCH_SIZE) for dx in range(PATCH_SIZE)]  # 4 x [N, 64, C]
    stacked = np.stack(patches, axis=2)  # [N, 64, 4, C], (dy, dx) row-major
    return stacked.reshape(-1, PATCH_SIZE, PATCH_SIZE, inputs.shape[-1])


def patch_whitening_layers(model: keras.Model) -> list[PatchWhitening]:
    """The `PatchWhitening` layers of `model`, nested models searched too."""
    return [layer for layer, _ in _whitening_layers_with_models(model)]


def _whitening_layers_with_models(model: Any) -> list[tuple[PatchWhitening, Any]]:
    """Each `PatchWhitening` layer of `model` with the (nested) model whose graph holds it."""
    found = []
    for layer in model.layers:
        if isinstance(layer, PatchWhitening):
            found.append((layer, model))
        elif hasattr(layer, "layers"):
            found.extend(_whitening_layers_with_models(layer))
    return found
