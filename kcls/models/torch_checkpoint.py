"""Reads PyTorch's legacy (non-zip) checkpoint format with `pickle` and numpy, no torch.

`torch.save(..., _use_new_zipfile_serialization=False)` writes, one after the other:
a pickled magic number, a pickled protocol version, a pickled dict of system info,
the pickled object itself (tensors are `torch._utils._rebuild_tensor_v2` calls whose
storages are pickle *persistent ids*), a pickled list of storage keys, and then, for
each key in that order, an 8-byte little-endian element count followed by the
storage's raw bytes. A tensor is a strided view into its storage: it has its own
offset, shape and strides (in elements), which may not be C-contiguous (a checkpoint
converted from TensorFlow can store kernels in TF's HWIO order behind OIHW strides).

Only plain tensors in (ordered) dicts are supported: the pickle may name no class but
the tensor rebuild function, the storage types and `collections.OrderedDict`, so
reading a checkpoint never runs code from it.

Example:

>>> tensors = read_legacy_checkpoint("efficientnet-lite0-57934424.pth")  # doctest: +SKIP
>>> tensors["_conv_stem.weight"].shape  # doctest: +SKIP
(32, 3, 3, 3)
"""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class CheckpointError(ValueError):
    """A file that is not a readable legacy PyTorch checkpoint of plain tensors."""


def read_legacy_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a legacy-format PyTorch state dict, as numpy arrays.

    Args:
        path: a `.pth`/`.pt` file written by `torch.save` in the legacy format (the
            default before PyTorch 1.6) holding a dict of tensors.

    Returns:
        dict: tensor name -> C-contiguous numpy array with the tensor's shape and dtype
        (float32 for `FloatStorage` ...), in the checkpoint's order.

    Raises:
        CheckpointError: a zip-format checkpoint, a truncated file, or a pickle that holds
            anything but tensors in dicts.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is a zip-format PyTorch checkpoint; only the legacy format is supported.")
    with path.open("rb") as file:
        try:
            if pickle.load(file) != LEGACY_MAGIC_NUMBER:
                raise CheckpointError(f"{path} is not a legacy PyTorch checkpoint (magic number).")
            if pickle.load(file) != LEGACY_PROTOCOL_VERSION:
                raise CheckpointError(f"{path}: unsupported legacy protocol version.")
            system_info = pickle.load(file)
            if not system_info.get("little_endian", True):
                raise CheckpointError(f"{path} was written on a big-endian machine.")
            unpickler = _StateDictUnpickler(file)
            state = unpickler.load()
            storage_keys = pickle.load(file)
            data = {key: _read_storage(file, unpickler.storages[key]) for key in storage_keys}
        except (pickle.UnpicklingError, EOFError, struct.error, KeyError) as error:
            raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint: "
                                  f"{type(error).__name__}: {error}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of tensors.")
    return {name: _materialise(name, tensor, data) for name, tensor in state.items()}


class _Storage:
    def __init__(self, dtype: type, key: str, size: int) -> None:
        self.dtype, self.key, self.size = np.dtype(dtype), key, size


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, shape: tuple, strides: tuple) -> None:
        self.storage, self.offset = storage, offset
        self.shape, self.strides = tuple(shape), tuple(strides)


def _rebuild_tensor(storage: _Storage, offset: int, shape: tuple, strides: tuple,
                    *unused: Any) -> _Tensor:
    """Stands in for `torch._utils._rebuild_tensor_v2` (requires_grad and hooks dropped)."""
    return _Tensor(storage, offset, shape, strides)


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"),
                              ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return name
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"unsupported object {module}.{name} in the checkpoint")

    def persistent_load(self, persistent_id: Any) -> _Storage:
        kind, storage_type, key, _location, size = persistent_id[:5]
        if kind != "storage" or storage_type not in STORAGE_DTYPES:
            raise pickle.UnpicklingError(f"unsupported persistent id {persistent_id[:2]}")
        storage = self.storages.setdefault(
            key, _Storage(STORAGE_DTYPES[storage_type], key, size))
        return storage


def _read_storage(file: BinaryIO, storage: _Storage) -> np.ndarray:
    (count,) = struct.unpack("<q", file.read(8))
    raw = file.read(count * storage.dtype.itemsize)
    if count != storage.size or len(raw) != count * storage.dtype.itemsize:
        raise EOFError(f"storage {storage.key}: expected {storage.size} elements")
    return np.frombuffer(raw, storage.dtype)


def _materialise(name: str, tensor: Any, data: dict[str, np.ndarray]) -> np.ndarray:
    if not isinstance(tensor, _Tensor):
        raise CheckpointError(f"checkpoint entry {name!r} is a {type(tensor).__name__}, "
                              "not a tensor")
    storage = data[tensor.storage.key]
    itemsize = storage.dtype.itemsize
    extent = tensor.offset + sum((size - 1) * stride for size, stride
                                 in zip(tensor.shape, tensor.strides) if size > 0)
    if any(size == 0 for size in tensor.shape):
        return np.zeros(tensor.shape, storage.dtype)
    if not tensor.shape:  # as_strided cannot make 0-d views
        return np.array(storage[tensor.offset])
    if tensor.offset < 0 or extent >= len(storage):
        raise CheckpointError(f"tensor {name!r} reaches outside its storage")
    view = np.lib.stride_tricks.as_strided(
        storage[tensor.offset:], shape=tensor.shape,
        strides=tuple(stride * itemsize for stride in tensor.strides), writeable=False)
    return np.ascontiguousarray(view)
