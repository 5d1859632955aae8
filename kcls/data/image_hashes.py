"""Image hashes for finding duplicates: a content digest and a perceptual hash per image.

One read and one decode per image (Pillow, in threads; a JPEG is decoded at a reduced
scale with `Image.draft`, so a photo costs a fraction of a full decode):

- the *content digest* (BLAKE2b of the file's bytes) is equal for exact copies only;
- the *perceptual hash* (a DCT pHash: the 8x8 lowest frequencies of the DCT of a 32x32
  grayscale thumbnail, each bit "above the median of the 64") is equal or close in
  Hamming distance for the same picture re-encoded, resized or slightly recoloured;
- the *flipped hash* is the pHash of the mirrored thumbnail, from the same DCT (a
  horizontal flip multiplies the coefficient of horizontal frequency `v` by `(-1)^v`),
  so a mirrored copy is caught too (`kcls.data.duplicates`).

The same decode gives what `kcls data check` reports of each image: its size, Pillow
mode (`RGB`, `L`, `P`, `RGBA`, `CMYK`, ...) and format. A file Pillow cannot decode is
unreadable: its name is appended to the caller's list of skipped files, the list the
folder scan (`kcls.data.folder`) started.

Example:

>>> hashes = hash_files(["a.jpg", "b.png"], failed=[])  # doctest: +SKIP
>>> hamming(hashes.perceptual[0], hashes.perceptual[1])  # doctest: +SKIP
3
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from kcls.data.headers import MAX_IMAGE_PIXELS

THUMBNAIL_SIDE = 32  # pixels: the pHash's DCT input
HASH_SIDE = 8  # the lowest HASH_SIDE x HASH_SIDE frequencies: 64 bits
HASH_THREADS = 4  # Pillow releases the GIL while decoding
DIGEST_BYTES = 16
FLAT_COEFFICIENT = 1e-2  # DCT coefficients (gray levels) below this are zero


@dataclass
class ImageHashes:
    """Hashes and properties of N images (entries of unreadable ones are zero / empty).

    Attributes:
        readable: bool `(N,)`, whether the image decoded.
        digests: list[str] of N hex BLAKE2b digests of the encoded bytes ("" unreadable).
        perceptual: uint64 `(N,)` pHashes.
        flipped: uint64 `(N,)` pHashes of the horizontally mirrored images.
        widths, heights: int64 `(N,)` pixels.
        modes: list[str], Pillow modes before any conversion ("" unreadable).
        formats: list[str], Pillow formats (`JPEG`, `PNG`, `GIF`, `BMP`; "" unreadable).
    """

    readable: np.ndarray
    digests: list[str]
    perceptual: np.ndarray
    flipped: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    modes: list[str]
    formats: list[str]


@dataclass
class _Decoded:
    digest: str
    thumbnail: np.ndarray  # float32 [THUMBNAIL_SIDE, THUMBNAIL_SIDE], gray 0..255
    width: int
    height: int
    mode: str
    format: str


def hash_files(paths: Sequence[str], failed: list[str] | None = None,
               names: Sequence[str] | None = None) -> ImageHashes:
    """Hashes image files (see the module docstring), reading each once.

    Args:
        paths: N image files.
        failed: list to append the name of each file that does not decode to.
        names: how to name the files in `failed` (default: the paths).
    """
    def read(path: str) -> bytes | None:
        try:
            with open(path, "rb") as file:
                return file.read()
        except OSError:
            return None

    return hash_encoded(lambda index: read(paths[index]), len(paths), failed,
                        list(names) if names is not None else list(paths))


def hash_encoded(encoded: Callable[[int], bytes | None], count: int,
                 failed: list[str] | None, names: list[str]) -> ImageHashes:
    """`hash_files` of `count` encoded images, the i-th given by `encoded(i)` (None:
    unreadable); `names[i]` names it in `failed`."""
    lock = threading.Lock()

    def one(index: int) -> _Decoded | None:
        decoded = _decode(encoded(index))
        if decoded is None and failed is not None:
            with lock:
                failed.append(f"{names[index]} (does not decode)")
        return decoded

    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        decoded = list(pool.map(one, range(count), chunksize=64))
    return _collect(decoded)


def _collect(decoded: list[_Decoded | None]) -> ImageHashes:
    readable = np.asarray([entry is not None for entry in decoded], bool)
    blank = np.zeros((THUMBNAIL_SIDE, THUMBNAIL_SIDE), np.float32)
    thumbnails = np.stack([entry.thumbnail if entry else blank for entry in decoded]
                          ) if decoded else np.zeros((0, THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    perceptual, flipped = perceptual_hashes(thumbnails)

    def field(name: str, empty: object) -> list:
        return [getattr(entry, name) if entry else empty for entry in decoded]

    return ImageHashes(readable, field("digest", ""), perceptual, flipped,
                       np.asarray(field("width", 0), np.int64),
                       np.asarray(field("height", 0), np.int64),
                       field("mode", ""), field("format", ""))


def _decode(data: bytes | None) -> _Decoded | None:
    """One image's digest, gray thumbnail and properties, or None when it does not decode."""
    if data is None:
        return None
    # No `warnings.catch_warnings` around Pillow's notes (palette transparency): it
    # changes process-wide state, and this runs in threads.
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        mode, image_format = image.mode, image.format or ""
        if width * height > MAX_IMAGE_PIXELS:  # the folder scan's bomb limit
            return None
        # JPEG: decode at 1/2, 1/4 or 1/8 scale (no smaller than the thumbnail).
        image.draft("L", (THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        thumbnail = image.convert("L").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE),
                                              Image.Resampling.BILINEAR)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None
    digest = hashlib.blake2b(data, digest_size=DIGEST_BYTES).hexdigest()
    return _Decoded(digest, np.asarray(thumbnail, np.float32), width, height, mode,
                    image_format)


def _dct_matrix(size: int) -> np.ndarray:
    """The orthonormal DCT-II matrix `[size, size]`: `D @ x` transforms a column `x`."""
    frequency, position = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    matrix = np.cos(np.pi * (2 * position + 1) * frequency / (2 * size)) * np.sqrt(2 / size)
    matrix[0] /= np.sqrt(2)
    return matrix.astype(np.float32)


_DCT = _dct_matrix(THUMBNAIL_SIDE)[:HASH_SIDE]
# A horizontal flip reverses each row: the DCT coefficient of horizontal frequency v
# changes sign when v is odd.
_FLIP_SIGNS = np.where(np.arange(HASH_SIDE) % 2, -1.0, 1.0).astype(np.float32)


def perceptual_hashes(thumbnails: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pHashes of gray thumbnails and of their mirror images.

    Args:
        thumbnails: float `(N, THUMBNAIL_SIDE, THUMBNAIL_SIDE)`, gray levels.

    Returns:
        `(hashes, flipped)`, uint64 `(N,)` each: bit `8u + v` (from the most significant)
        is whether the DCT coefficient of vertical frequency `u`, horizontal `v` is
        above the median of the 64.

    >>> flat = np.zeros((1, THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    >>> [int(h[0]) for h in perceptual_hashes(flat)]
    [0, 0]
    """
    low = np.einsum("uh,nhw,vw->nuv", _DCT, np.asarray(thumbnails, np.float32), _DCT)
    # Rounding noise of a flat image's (zero) frequencies would otherwise set random bits.
    low[np.abs(low) < FLAT_COEFFICIENT] = 0.0
    return _bits(low), _bits(low * _FLIP_SIGNS)


def _bits(coefficients: np.ndarray) -> np.ndarray:
    """uint64 `(N,)`: one bit per coefficient of `(N, 8, 8)`, set when above the median."""
    flat = coefficients.reshape(len(coefficients), -1)
    above = flat > np.median(flat, axis=1, keepdims=True)
    return np.packbits(above, axis=1).view(">u8")[:, 0].astype(np.uint64)


def hamming(first: np.ndarray | int, second: np.ndarray | int) -> np.ndarray:
    """Bits that differ between uint64 hashes (broadcast): uint8 of the broadcast shape.

    >>> int(hamming(np.uint64(0b1011), np.uint64(0b0001)))
    2
    """
    return np.bitwise_count(np.bitwise_xor(np.asarray(first, np.uint64),
                                           np.asarray(second, np.uint64)))


def concatenate_hashes(parts: Sequence[ImageHashes]) -> ImageHashes:
    """The `ImageHashes` of consecutive batches of images as one."""
    if not parts:
        return _collect([])
    return ImageHashes(
        np.concatenate([part.readable for part in parts]),
        [digest for part in parts for digest in part.digests],
        np.concatenate([part.perceptual for part in parts]),
        np.concatenate([part.flipped for part in parts]),
        np.concatenate([part.widths for part in parts]),
        np.concatenate([part.heights for part in parts]),
        [mode for part in parts for mode in part.modes],
        [image_format for part in parts for image_format in part.formats])
