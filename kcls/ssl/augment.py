"""SimCLR's view augmentation as one XLA-compilable layer: crop, flip, colour jitter, greyscale.

Two views of each image are made by this layer inside the pretraining step
(`kcls.ssl.simclr.SimCLR`), on the device, so the tf.data pipeline only decodes and
batches. Every operation is written with matrix products and element-wise math, so XLA
compiles it (Keras' RandomCrop/RandomZoom use ImageProjectiveTransform, which it cannot):

- random resized crop: a box of `crop_scale`..1 of the area and aspect ratio 3/4..4/3,
  resized back to the input side with bilinear interpolation written as two
  per-image interpolation matrices, `out = rows @ image @ columns^T`;
- horizontal flip (probability 1/2), folded into the column matrix;
- colour jitter (probability 0.8, strength `color_jitter` = s): brightness and contrast
  factors in [1 - 0.8 s, 1 + 0.8 s], saturation in [1 - 0.8 s, 1 + 0.8 s], hue rotated by
  up to 0.2 s of a turn (a rotation of the chroma plane in YIQ space);
- greyscale (probability `grayscale`).

These are the SimCLR paper's CIFAR settings (Chen et al. 2020, appendix B.9: no blur at
32 px, jitter strength 0.5), with the minimum crop area raised from 0.08 to 0.2 as
MoCo's and most small-compute CIFAR reproductions do.

Example:

>>> layer = ContrastiveAugment(seed=0)
>>> views = layer(tf.zeros([8, 32, 32, 3]), training=True)  # float32 [8, 32, 32, 3]
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

# ITU-R BT.601 luma weights (what tf.image.rgb_to_grayscale uses).
_LUMA = (0.299, 0.587, 0.114)
# RGB -> YIQ and back: hue is the angle of the (I, Q) chroma vector.
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
JITTER_PROBABILITY = 0.8


class ContrastiveAugment(keras.layers.Layer):
    """Random SimCLR views of float images `[B, H, W, 3]` in [0, 255] (same shape and range).

    Args:
        crop_scale: float in (0, 1], the smallest crop as a fraction of the image area.
        color_jitter: float >= 0, colour jitter strength s (0 turns jitter off).
        grayscale: float in [0, 1], probability of a greyscale view.
        horizontal_flip: bool, mirror half of the views.
        seed: int, seed of the random draws.
    """

    def __init__(self, crop_scale: float = 0.2, color_jitter: float = 0.5,
                 grayscale: float = 0.2, horizontal_flip: bool = True,
                 seed: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.crop_scale = crop_scale
        self.color_jitter = color_jitter
        self.grayscale = grayscale
        self.horizontal_flip = horizontal_flip
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        images = self._crop_and_flip(images)
        colours = images / 255.0
        if self.color_jitter > 0:
            colours = self._jitter(colours)
        if self.grayscale > 0:
            grey = self._uniform(tf.shape(colours)[:1]) < self.grayscale
            colours = tf.where(grey[:, None, None, None], _gray(colours), colours)
        return tf.clip_by_value(colours, 0.0, 1.0) * 255.0

    def _uniform(self, shape, low: float = 0.0, high: float = 1.0) -> tf.Tensor:
        return keras.random.uniform(shape, low, high, seed=self.seed_generator)

    def _crop_and_flip(self, images: tf.Tensor) -> tf.Tensor:
        height, width = images.shape[1], images.shape[2]
        batch = tf.shape(images)[:1]
        area = self._uniform(batch, self.crop_scale, 1.0)
        log_ratio = self._uniform(batch, math.log(3 / 4), math.log(4 / 3))
        ratio = tf.exp(log_ratio)  # width / height of the box
        box_width = tf.minimum(tf.sqrt(area * ratio), 1.0)
        box_height = tf.minimum(tf.sqrt(area / ratio), 1.0)
        top = self._uniform(batch) * (1.0 - box_height)
        left = self._uniform(batch) * (1.0 - box_width)
        rows = _interpolation(top, box_height, height)  # [B, H, H]
        columns = _interpolation(left, box_width, width)  # [B, W, W]
        if self.horizontal_flip:
            flip = self._uniform(batch) < 0.5
            columns = tf.where(flip[:, None, None], tf.reverse(columns, axis=[1]), columns)
        return tf.einsum("boh,bhwc,bpw->bopc", rows, images, columns)

    def _jitter(self, colours: tf.Tensor) -> tf.Tensor:
        batch = tf.shape(colours)[:1]
        spread = 0.8 * self.color_jitter

        def factor() -> tf.Tensor:
            return self._uniform(batch, max(1.0 - spread, 0.0), 1.0 + spread)[:, None, None, None]

        jittered = colours * factor()  # brightness
        mean = tf.reduce_mean(_gray(jittered), axis=[1, 2, 3], keepdims=True)
        jittered = (jittered - mean) * factor() + mean  # contrast
        gray = _gray(jittered)
        jittered = tf.clip_by_value(gray + (jittered - gray) * factor(), 0.0, 1.0)  # saturation
        angle = self._uniform(batch, -0.2, 0.2) * self.color_jitter * 2.0 * math.pi
        jittered = _rotate_hue(jittered, angle)
        applied = self._uniform(batch) < JITTER_PROBABILITY
        return tf.where(applied[:, None, None, None], tf.clip_by_value(jittered, 0.0, 1.0),
                        colours)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "crop_scale": self.crop_scale,
                "color_jitter": self.color_jitter, "grayscale": self.grayscale,
                "horizontal_flip": self.horizontal_flip, "seed": self.seed}


def _interpolation(start: tf.Tensor, extent: tf.Tensor, size: int) -> tf.Tensor:
    """Bilinear interpolation matrices `[B, size, size]` resampling `[start, start + extent]`.

    Row `o` of image `b` holds the weights of the input pixels for output pixel `o`:
    the triangle kernel `max(0, 1 - |source - i|)` around its source coordinate, pixel
    centres mapped as `tf.image.resize(..., half_pixel_centers)` does.
    """
    outputs = (tf.range(size, dtype=tf.float32) + 0.5) / size  # [size], in (0, 1)
    source = (start[:, None] + outputs[None, :] * extent[:, None]) * size - 0.5  # [B, size]
    source = tf.clip_by_value(source, 0.0, size - 1.0)
    pixels = tf.range(size, dtype=tf.float32)
    return tf.nn.relu(1.0 - tf.abs(source[:, :, None] - pixels[None, None, :]))


def _gray(colours: tf.Tensor) -> tf.Tensor:
    """Luma of `[B, H, W, 3]`, repeated over the three channels."""
    luma = tf.tensordot(colours, tf.constant(_LUMA), axes=[[3], [0]])[..., None]
    return tf.tile(luma, [1, 1, 1, 3])


def _rotate_hue(colours: tf.Tensor, angle: tf.Tensor) -> tf.Tensor:
    """Rotates the hue of each image of `[B, H, W, 3]` by `angle[b]` radians (YIQ space)."""
    to_yiq = tf.constant(_RGB_TO_YIQ)
    from_yiq = tf.linalg.inv(to_yiq)
    cos, sin = tf.cos(angle), tf.sin(angle)
    ones, zeros = tf.ones_like(angle), tf.zeros_like(angle)
    rotation = tf.stack([tf.stack([ones, zeros, zeros], -1),
                         tf.stack([zeros, cos, -sin], -1),
                         tf.stack([zeros, sin, cos], -1)], -2)  # [B, 3, 3]
    transform = tf.einsum("ij,bjk,kl->bil", from_yiq, rotation, to_yiq)  # RGB -> RGB
    return tf.einsum("bhwk,bck->bhwc", colours, transform)
