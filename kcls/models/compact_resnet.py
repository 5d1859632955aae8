"""A compact residual network for small images trained from scratch on little compute.

The layout of the fast CIFAR-10 ResNets (David Page's DAWNBench "ResNet-9", whose
descendants hold the CIFAR-10 speed records): few stages, each downsampling by max
pooling after a convolution, two of them with a residual pair of convolutions. It
keeps full resolution only for the cheap stem, so most compute runs at 16x16 and below;
with widths (16, 32, 64, 128) a training step costs about a tenth of the hand-written
VGG-style CIFAR baseline on a CPU, at 0.41M parameters.

    stem      conv3x3(w0)-BN-ReLU, or patch whitening-ReLU (24 channels)    S x S
    stage1    conv3x3(w1)-BN-ReLU, maxpool, + residual(2 x conv-BN-ReLU)   S/2
    stage2    conv3x3(w2)-BN-ReLU, maxpool                                 S/4
    stage3    conv3x3(w3)-BN-ReLU, maxpool, + residual(2 x conv-BN-ReLU)   S/8

`compact_resnet_whitened` (kcls.models.backbones) replaces the stem with airbench's frozen
patch-whitening layer (`kcls.models.whitening`), fitted to the training images before
the first step: it trains faster per epoch but ended no more accurate on 8,000 CIFAR-10
images in 8 minutes, and is 1.46x faster in mixed_bfloat16 on AMX (docs/performance.md).

Built with the Keras that KerasCV uses (Keras 3, or tf-keras in
the TF-MOT worker process), so the same builder serves training and pruning/QAT.

Example:

>>> backbone = CompactResNet(input_shape=(32, 32, 3))
>>> backbone.output.shape
(None, 4, 4, 128)
"""

from __future__ import annotations

from typing import Any

# KerasCV's own switch (private in keras-cv 0.9, which is pinned): Keras 3, or tf-keras when
# TF_USE_LEGACY_KERAS=1, exactly as the KerasCV backbones are built.
from keras_cv.src.backend import keras

from kcls.models.whitening import PatchWhitening


class CompactResNet(keras.Model):
    """The backbone: float images `[B, S, S, 3]` in [0, 255] -> features `[B, S/8, S/8, w3]`.

    Args:
        widths: channels of the stem and the three stages.
        include_rescaling: divide the inputs by 255 first (as the KerasCV backbones do).
        stem: `conv`, or `whitening`: a frozen 2x2 patch-whitening convolution fitted to
            the training images (`kcls.models.whitening`; airbench's first layer), then a
            ReLU, in place of the stem's convolution (`widths[0]` is then unused).
        input_shape: `(S, S, 3)`, S divisible by 8.
    """

    def __init__(self, widths: tuple[int, int, int, int] | list[int] = (16, 32, 64, 128),
                 include_rescaling: bool = True, stem: str = "conv",
                 input_shape: tuple[int, int, int] = (32, 32, 3), **kwargs: Any) -> None:
        layers = keras.layers
        images = keras.Input(input_shape)
        x = layers.Rescaling(1.0 / 255.0, name="rescaling")(images) if include_rescaling \
            else images
        if stem == "whitening":
            x = layers.ReLU(name="stem_relu")(PatchWhitening(name="stem_whitening")(x))
        else:
            x = _conv_bn_relu(x, widths[0], "stem")
        for stage, (width, residual) in enumerate(zip(widths[1:], (True, False, True)), 1):
            prefix = f"stage{stage}"
            x = _conv_bn_relu(x, width, f"{prefix}_in")
            x = layers.MaxPooling2D(name=f"{prefix}_pool")(x)
            if residual:
                branch = _conv_bn_relu(x, width, f"{prefix}_res1")
                branch = _conv_bn_relu(branch, width, f"{prefix}_res2")
                x = layers.Add(name=f"{prefix}_add")([x, branch])
        super().__init__(inputs=images, outputs=x, **kwargs)
        self.widths = list(widths)
        self.include_rescaling = include_rescaling
        self.stem = stem
        self.image_shape = tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        return {"widths": self.widths, "include_rescaling": self.include_rescaling,
                "stem": self.stem,
                "input_shape": self.image_shape, "name": self.name, "trainable": self.trainable}


def _conv_bn_relu(x: Any, filters: int, name: str) -> Any:
    layers = keras.layers
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)
