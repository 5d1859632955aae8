"""Image headers: the format and size of an image file from its first bytes, without decoding.

The folder scan (`kcls.data.folder.check_images`) reads these instead of decoding every
image: a header costs one open, one read of `HEADER_BYTES` (a JPEG whose frame header
lies after large EXIF data: one more) and an `fstat` (the size and modification time
the source's fingerprint records), 10-20 microseconds a file on a busy 2-core CPU
against about 100 for Pillow's `Image.open` and 500 for a full decode. It tells

- whether TensorFlow's `tf.io.decode_image` will take the file at all: it picks its
  decoder by the same signatures (JPEG `FF D8 FF`, PNG, GIF, BMP `BM`), whatever the
  file's extension says;
- whether the image is a decompression bomb: a header claiming more than
  `MAX_IMAGE_PIXELS` pixels, Pillow's `DecompressionBombError` limit, which a decode
  would try to allocate (a 20000x20000 PNG of a few hundred bytes asks for 1.2 GB).

What a header cannot tell (a truncated or corrupt body) the pipeline finds when it
decodes the file, and counts and names it (`kcls.data.folder.decode_batches`).

Example:

>>> read_image_header("../shared/data/hymenoptera/train/ants/0013035.jpg")  # doctest: +SKIP
ImageHeader(format='jpeg', width=500, height=375)
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

# Pillow refuses images over twice its `Image.MAX_IMAGE_PIXELS` (89,478,485) with a
# DecompressionBombError; the scan keeps the limit it had when it used Pillow.
MAX_IMAGE_PIXELS = 2 * 89_478_485
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG markers that start a frame (SOF0-SOF15 without DHT C4, JPG C8 and DAC CC): the
# frame header holds the size. Markers without a length field: TEM, RST0-7, SOI.
JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD9)})
JPEG_START_OF_SCAN, JPEG_END_OF_IMAGE = 0xDA, 0xD9
JPEG_MAX_EXTRANEOUS_BYTES = 4096
# Bytes read at once: PNG, GIF, BMP and most JPEGs without EXIF data have their size in them.
HEADER_BYTES = 1024


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says.

    Attributes:
        format: `jpeg`, `png`, `gif` or `bmp`: the decoder `tf.io.decode_image` picks.
        width: int, pixels.
        height: int, pixels.
    """

    format: str
    width: int
    height: int


def read_image_header(path: str | Path) -> ImageHeader | None:
    """The header of the image file `path`, or None when it has none TensorFlow decodes.

    None for a missing or unreadable file, a signature that is not JPEG, PNG, GIF or
    BMP, or a header cut short or claiming no pixels.
    """
    return _inspect(path)[0]


def image_stamp(path: str | Path) -> tuple[int, int] | None:
    """`(size in bytes, modification time in ns)` of `path` when it passes the scan, else
    None: a UTF-8 name (TensorFlow's file names are UTF-8 strings) and a header TensorFlow
    decodes, with at most `MAX_IMAGE_PIXELS` pixels.

    >>> image_stamp("notes.txt") is None
    True
    """
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return None
    header, stat = _inspect(path)
    if header is None or header.width * header.height > MAX_IMAGE_PIXELS:
        return None
    return stat.st_size, stat.st_mtime_ns


def _inspect(path: str | Path) -> tuple[ImageHeader | None, os.stat_result | None]:
    """The header and the `fstat` of `path`: one `open` and usually one read of
    `HEADER_BYTES` (a JPEG's frame header may lie further, after its EXIF data: the walk
    then reads on where it is)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return None, None
    try:
        start = os.pread(descriptor, HEADER_BYTES, 0)
        if start.startswith(b"\xff\xd8\xff"):
            size = _jpeg_size(descriptor, start)
            header = None if size is None else _header("jpeg", *size)
        else:
            header = _fixed_offset_header(start)
        return header, os.fstat(descriptor)
    except OSError:
        return None, None
    finally:
        os.close(descriptor)


def _header(format: str, width: int, height: int) -> ImageHeader | None:
    return ImageHeader(format, width, height) if width > 0 and height > 0 else None


def _fixed_offset_header(start: bytes) -> ImageHeader | None:
    """PNG, GIF and BMP keep their size at a fixed offset of the first 26 bytes."""
    if start.startswith(PNG_SIGNATURE) and start[12:16] == b"IHDR" and len(start) >= 24:
        return _header("png", *struct.unpack(">II", start[16:24]))
    if start[:6] in (b"GIF87a", b"GIF89a") and len(start) >= 10:
        return _header("gif", *struct.unpack("<HH", start[6:10]))
    if start.startswith(b"BM") and len(start) >= 26:
        (info_size,) = struct.unpack("<I", start[14:18])
        if info_size == 12:  # BITMAPCOREHEADER: unsigned 16-bit sides
            return _header("bmp", *struct.unpack("<HH", start[18:22]))
        width, height = struct.unpack("<ii", start[18:26])
        return _header("bmp", width, abs(height))  # negative height: rows top-down
    return None


def _jpeg_size(descriptor: int, data: bytes) -> tuple[int, int] | None:
    """`(width, height)` from the frame header, walking the segments after SOI; None when
    the scan or the end comes first or the file ends. `data` is the file's first bytes;
    a walk past them reads the window of `HEADER_BYTES` where it is."""
    position, base, extraneous = 2, 0, 0  # `data` holds the file from offset `base`
    while True:
        if position + 9 > base + len(data):  # a marker, a length, a frame's precision and size
            base, data = position, os.pread(descriptor, HEADER_BYTES, position)
            if len(data) < 9:
                return None
        at = position - base
        if data[at] != 0xFF:
            # libjpeg skips stray bytes before a marker (with a warning), so TensorFlow
            # decodes such files: so does this walk, up to a bound.
            position, extraneous = position + 1, extraneous + 1
            if extraneous > JPEG_MAX_EXTRANEOUS_BYTES:
                return None
            continue
        marker = data[at + 1]
        if marker == 0xFF:  # a fill byte
            position += 1
        elif marker in JPEG_STANDALONE_MARKERS:
            position += 2
        elif marker in (JPEG_START_OF_SCAN, JPEG_END_OF_IMAGE, 0x00):
            return None
        elif marker in JPEG_FRAME_MARKERS:
            height, width = struct.unpack_from(">HH", data, at + 5)
            return width, height
        else:
            (length,) = struct.unpack_from(">H", data, at + 2)
            if length < 2:
                return None
            position += 2 + length
