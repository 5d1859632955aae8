"""Test-time augmentation: the views of an image whose predictions are averaged with its own.

`flip` TTA (`evaluate.flip_tta`, `export.flip_tta`) adds the horizontal mirror; `shift`
TTA (`evaluate.shift_tta`, `export.shift_tta`) adds the image and its mirror shifted by
one pixel up-left and one pixel down-right (reflect-padded), six views in all: airbench's
multi-crop TTA (arXiv:2404.00498), which pays for models trained on shifted crops. The
views are TensorFlow ops, so evaluation, the SavedModel's signatures and the ONNX model
compute the same ones.

Example:

>>> images = tf.zeros([2, 32, 32, 3])
>>> [view.shape for view in tta_views(images, shifts=True)][:1]
[TensorShape([2, 32, 32, 3])]
>>> len(tta_views(images, shifts=True)), tta_name(shifts=True)
(5, 'flip+shift')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf

SHIFT_PIXELS = 1
View = Callable[[tf.Tensor], tf.Tensor]


def tta_views(images: Any, shifts: bool = False) -> list[tf.Tensor]:
    """The views averaged with `images` themselves.

    Args:
        images: float `[B, H, W, 3]` (tf.Tensor or np.ndarray).
        shifts: add the shifted views to the mirror.

    Returns:
        `[mirror]`, or with `shifts` `[mirror, up-left, its mirror, down-right, its mirror]`,
        each float `[B, H, W, 3]`.
    """
    images = tf.convert_to_tensor(images)
    return [view(images) for view in tta_transforms(shifts)]


def tta_transforms(shifts: bool = False) -> list[View]:
    """The functions making `tta_views`' views, one per view, in its order."""
    views: list[View] = [mirror]
    if shifts:
        for offset in (SHIFT_PIXELS, -SHIFT_PIXELS):  # content moved up-left, then down-right
            views += [_shift(offset), _mirrored(_shift(offset))]
    return views


def mirror(images: tf.Tensor) -> tf.Tensor:
    """Horizontally mirrored float `[B, H, W, 3]` images."""
    return tf.reverse(images, axis=[2])


def view_count(flip_tta: bool, shift_tta: bool) -> int:
    """Forward passes per image: 1 without TTA, 2 with the mirror, 6 with the shifts too."""
    return 1 + len(tta_transforms(shift_tta)) if flip_tta else 1


def tta_name(shifts: bool) -> str:
    """`flip` or `flip+shift`, as logs and reports name the TTA."""
    return "flip+shift" if shifts else "flip"


def measured_tta_name(metrics: Mapping[str, Any]) -> str:
    """The TTA behind an evaluation's `metrics["tta"]` (`kcls.metrics.classification`):
    `flip` for 2 views (and runs from before `tta_views` was recorded), else `flip+shift`."""
    return tta_name(shifts=metrics.get("tta_views", 2) > 2)


def _shift(offset: int) -> View:
    """Images moved by `offset` pixels up and left (down and right when negative), the
    uncovered border filled by reflection."""
    def shifted(images: tf.Tensor) -> tf.Tensor:
        side = abs(offset)
        padded = tf.pad(images, [[0, 0], [side, side], [side, side], [0, 0]], mode="REFLECT")
        start = side + offset
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        return padded[:, start:start + height, start:start + width]
    return shifted


def _mirrored(view: View) -> View:
    return lambda images: mirror(view(images))
