"""Image folders: `root/<class>/<image>`, the most common way users bring their own data.

Class names are the sub-folder names, sorted. JPEG, PNG, BMP and GIF (first frame)
files are used; other files are ignored. Every candidate is checked once up front so
that every file that will not reach the model is skipped, counted and named
(`FolderFiles.skipped`) before any split is made, instead of failing a run hours later
or silently shrinking it:

1. a name that is not valid UTF-8 (TensorFlow file names are UTF-8 strings);
2. Pillow's header and structure check (`verify()`), which also refuses decompression
   bombs (images claiming more than `PIL.Image.MAX_IMAGE_PIXELS * 2` pixels) before
   anything allocates them;
3. a full decode with TensorFlow's own decoder, the one the pipeline uses
   (`decode_files`), which catches truncated files that pass Pillow's check.

Step 3 reads every image once (a first scan of 10,000 32x32 PNGs took 3 s on two busy
CPU cores, a second one 0.9 s): the files that decoded are recorded in the user cache
with their sizes and modification times (`decode_check_cache`), so later scans decode
only new or changed files. A file that still fails to decode later in the pipeline
(changed after the scan) is left out and added to the same list, never dropped
silently (`decode_files`).

Example:

>>> files = scan_folder("../shared/data/hymenoptera/train")  # doctest: +SKIP
>>> files.class_names
['ants', 'bees']
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import unicodedata
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from kcls.config import ConfigError
from kcls.files import write_json
from kcls.layout import FOLDER_CHECKS_DIR, cache_root

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


@dataclass
class FolderFiles:
    """The readable images of a folder and the ones skipped.

    Attributes:
        paths: list[str] of readable image files.
        labels: int64 array `(len(paths),)`, indices into `class_names`.
        class_names: list[str], sorted sub-folder names.
        skipped: list[str] of files with an image extension that will not reach the
            model (unreadable, undecodable, or a name that is not UTF-8, shown with
            its undecodable bytes escaped as `\\xNN`); `decode_files` appends files
            that fail to decode later.
    """

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    skipped: list[str] = field(default_factory=list)


def scan_folder(root: str | Path) -> FolderFiles:
    """Lists and checks the images under `root/<class>/`.

    Hidden sub-folders (names starting with `.`) are not classes; a warning names them.

    Raises:
        ConfigError: `root` missing or not a folder, fewer than two class sub-folders,
            a class folder name that `labels.txt` cannot hold (control characters, bytes
            that are not UTF-8, outer spaces), or a class with no readable image.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(
            f"Image folder {str(root)!r} does not exist. Pass data.source=folder:PATH with "
            "one sub-folder of images per class.")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    hidden = [p.name for p in folders if p.name.startswith(".")]
    if hidden:
        warnings.warn(
            f"Image folder {str(root)!r}: ignored {len(hidden)} hidden folder(s): "
            f"{', '.join(printable_path(name) for name in hidden)} (names starting with '.' "
            "are not classes; rename a folder to use it as one).", UserWarning, stacklevel=2)
    class_dirs = [p for p in folders if not p.name.startswith(".")]
    for class_dir in class_dirs:
        _check_class_name(class_dir)
    if not class_dirs:
        raise ConfigError(
            f"Image folder {str(root)!r} has no class sub-folders; expected "
            f"{root}/<class_name>/<image>.jpg.")
    if len(class_dirs) < 2:
        raise ConfigError(
            f"Image folder {str(root)!r} has 1 class folder ({class_dirs[0].name}); a "
            "classifier needs at least two classes, one sub-folder of images each "
            f"({root}/<class_name>/<image>.jpg). Point data.source at the folder that "
            "holds the class folders.")
    candidates = [(path, label) for label, class_dir in enumerate(class_dirs)
                  for path in sorted(class_dir.rglob("*"))
                  if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()]
    usable = check_images(root, [path for path, _ in candidates])
    kept = [c for c, ok in zip(candidates, usable) if ok]
    skipped = [printable_path(path) for (path, _), ok in zip(candidates, usable) if not ok]
    counts = np.bincount([label for _, label in kept], minlength=len(class_dirs))
    empty = [class_dirs[i].name for i in np.flatnonzero(counts == 0)]
    if empty:
        raise ConfigError(
            f"Image folder {str(root)!r}: class folder(s) {', '.join(empty)} contain no readable "
            f"image ({', '.join(IMAGE_EXTENSIONS)}). Add images or remove the folder(s).")
    return FolderFiles([str(path) for path, _ in kept],
                       np.asarray([label for _, label in kept], dtype=np.int64),
                       [d.name for d in class_dirs], skipped)


def scan_images(root: str | Path) -> FolderFiles:
    """Lists and checks every image under `root`, at any depth, ignoring sub-folder names.

    For unlabelled data (self-supervised pretraining): the same checks as `scan_folder`,
    so unreadable files are skipped and named, but no classes. Hidden files and folders
    (names starting with `.`) are left out.

    Returns:
        FolderFiles with all labels 0 and no class names.

    Raises:
        ConfigError: `root` missing or not a folder, or no readable image in it.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"Image folder {str(root)!r} does not exist. Pass a folder of "
                          "images (sub-folders are searched too).")
    candidates = list_image_files(root)
    usable = check_images(root, candidates)
    paths = [str(path) for path, ok in zip(candidates, usable) if ok]
    if not paths:
        raise ConfigError(
            f"Image folder {str(root)!r} holds no readable image ({', '.join(IMAGE_EXTENSIONS)}"
            f"{f'; {len(candidates)} unreadable' if candidates else ''}). Point it at a "
            "folder of images.")
    return FolderFiles(paths, np.zeros(len(paths), np.int64), [],
                       [printable_path(path) for path, ok in zip(candidates, usable) if not ok])


def list_image_files(root: Path) -> list[Path]:
    """The image files (by extension) under the folder `root`, at any depth, sorted;
    hidden files and folders (names starting with `.`) left out. Nothing is opened.

    Symbolic links to folders are followed, as training follows a symlinked class
    folder; each real folder is listed once, so a link loop ends.
    """
    found, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found += [Path(folder) / name for name in names if not name.startswith(".")
                  and Path(name).suffix.lower() in IMAGE_EXTENSIONS
                  and (Path(folder) / name).is_file()]
    return sorted(found)


def check_images(root: str | Path, paths: Sequence[Path]) -> list[bool]:
    """Whether each image file will reach the model: steps 1-3 of the module docstring.

    Args:
        root: the folder whose decode-check record (`decode_check_cache`) to use.
        paths: image files (under `root` or anywhere).

    Returns:
        one bool per path, False for a file that is missing, unreadable, undecodable or
        has a name that is not UTF-8.
    """
    root, paths = Path(root), [Path(path) for path in paths]
    with ThreadPoolExecutor(max_workers=8) as pool:
        readable = list(pool.map(_is_readable, paths))
    stamps = {str(path): _stamp(path) for path, ok in zip(paths, readable) if ok}
    cache = decode_check_cache(root)
    decoded_before = _read_decode_checks(cache)
    failed = set(_undecodable([path for path, stamp in stamps.items()
                               if decoded_before.get(path) != stamp]))
    usable = [ok and str(path) not in failed for path, ok in zip(paths, readable)]
    _write_decode_checks(cache, root, {str(path): stamps[str(path)]
                                       for path, ok in zip(paths, usable) if ok})
    return usable


def _check_class_name(class_dir: Path) -> None:
    """Refuses a class folder name that `labels.txt` (one name per line) cannot hold."""
    problem = class_name_problem(class_dir.name)
    if problem:
        raise ConfigError(
            f"Class folder {printable_path(class_dir)!r} has a name kcls cannot use as a "
            f"class name: {problem}, which would misalign the class names in the export's "
            "labels.txt. Please rename the folder (letters, digits, spaces, '-' and '_' are "
            "safe).")


def class_name_problem(name: str) -> str | None:
    """Why `name` cannot be a class name (a line of `labels.txt`), or None when it can.

    Control characters (newline, tab, ...), line and paragraph separators split or hide
    lines; surrogates stand for bytes that are not UTF-8; outer spaces vanish when a
    reader strips lines. Folder class names and manifest labels meet the same check.

    >>> class_name_problem("ants"), class_name_problem("in/out")
    (None, None)
    >>> class_name_problem("a\u2028b")
    'it contains control or line-separator characters, or bytes that are not UTF-8'
    """
    if any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in name):
        return "it contains control or line-separator characters, or bytes that are not UTF-8"
    if name != name.strip():
        return "it starts or ends with a space"
    return None


def decode_image_file(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Reads and decodes one file to `(uint8 [H, W, 3], label)`; gray and RGBA become RGB."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image, label


def decode_files(paths: Sequence[str], labels: np.ndarray,
                 failed: list[str] | None = None) -> tf.data.Dataset:
    """The decoded `(uint8 [H, W, 3], label)` examples of `paths`, in their order.

    A file that fails to read or decode is left out and its path appended to `failed`
    (once, however many passes are made), so that whoever reports `failed` afterwards
    counts it; `tf.data`'s `ignore_errors` alone would drop it with a muted C++ log.

    Args:
        paths: sequence of str, image files (UTF-8 names, see `scan_folder`).
        labels: int array `(len(paths),)` of classes (int64 labels), or float array
            `(len(paths), C)` of multi-hot labels (float32 labels).
        failed: list[str] to append the paths of files that fail to; `None` for a new
            list nobody reads.
    """
    failed = [] if failed is None else failed
    lock = threading.Lock()  # tf.data may call `record` from several threads
    labels = np.asarray(labels)
    labels = labels.astype(np.float32 if labels.dtype.kind == "f" else np.int64)
    examples = tf.data.Dataset.from_tensor_slices(
        (tf.constant(list(paths), tf.string), labels))

    def attempt(path: tf.Tensor, label: tf.Tensor) -> tf.data.Dataset:
        # One file in its own dataset: `ignore_errors` empties it on failure and the
        # fallback element, flagged, takes its place, so a failure is seen, not lost.
        decoded = tf.data.Dataset.from_tensors((path, label)).map(
            lambda path, label: (*decode_image_file(path, label), path, True)).ignore_errors()
        fallback = tf.data.Dataset.from_tensors(
            (tf.zeros([0, 0, 3], tf.uint8), label, path, False))
        return decoded.concatenate(fallback).take(1)

    def record(path: tf.Tensor) -> bool:
        name = path.numpy().decode("utf-8", "backslashreplace")
        with lock:
            if name not in failed:
                failed.append(name)
        return False

    def keep(image: tf.Tensor, label: tf.Tensor, path: tf.Tensor, decoded: tf.Tensor
             ) -> tf.Tensor:
        return tf.cond(decoded, lambda: tf.constant(True),
                       lambda: tf.py_function(record, [path], tf.bool))

    examples = examples.interleave(attempt, cycle_length=tf.data.AUTOTUNE, block_length=1,
                                   num_parallel_calls=tf.data.AUTOTUNE)
    return examples.filter(keep).map(lambda image, label, path, decoded: (image, label),
                                     num_parallel_calls=tf.data.AUTOTUNE)


def skipped_files_line(skipped: list[str], shown: int = 5) -> str:
    """One line counting and naming (the first `shown` of) the files that did not reach
    the model.

    >>> skipped_files_line(["a/1.jpg", "b/2.png"])
    'skipped 2 file(s) that could not be read or decoded: a/1.jpg, b/2.png'
    """
    return (f"skipped {len(skipped)} file(s) that could not be read or decoded: "
            + ", ".join(skipped[:shown]) + (f" ... (all {len(skipped)} in the report)"
                                             if len(skipped) > shown else ""))


def printable_path(path: str | Path) -> str:
    """`path` as valid UTF-8 text: bytes that are not UTF-8 become `\\xNN` escapes.

    >>> printable_path(os.fsdecode(b"caf\\xe9.png"))
    'caf\\\\xe9.png'
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_readable(path: Path) -> bool:
    """Pillow's cheap check: a UTF-8 name, a known header, sane structure, not a bomb."""
    from PIL import Image

    try:
        os.fsencode(path).decode("utf-8")
        with Image.open(path) as image:
            image.verify()  # structure only; `_undecodable` does the full decode
        return True
    # DecompressionBombError is not an OSError: a 20000x20000 PNG header would otherwise
    # stop the scan, and decoding it would allocate 1.2 GB.
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def _undecodable(paths: list[str]) -> list[str]:
    """The files among `paths` that TensorFlow's decoder fails on, as the pipeline's would."""
    failed: list[str] = []
    examples = decode_files(paths, np.zeros(len(paths), np.int64), failed)
    for _ in examples.map(lambda image, label: label).prefetch(tf.data.AUTOTUNE):
        pass
    return failed


def decode_check_cache(root: str | Path) -> Path:
    """The file recording which images under `root` decoded at its last scan.

    `<cache_root>/folder_checks/<digest of the absolute root>.json` (see
    `kcls.layout.cache_root`): `{"root", "tensorflow", "decoded": {path: [size,
    mtime_ns]}}`. A scan decodes only the files not in it with the same size and
    modification time, so scanning a large folder again costs about as much as listing
    it; the record is dropped when TensorFlow's version changes.
    """
    digest = hashlib.sha256(os.fsencode(Path(root).resolve())).hexdigest()[:32]
    return cache_root() / FOLDER_CHECKS_DIR / f"{digest}.json"


def _stamp(path: Path) -> list[int] | None:
    try:
        stat = path.stat()
    except OSError:  # gone since the listing: decoding it fails and names it
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _read_decode_checks(cache: Path) -> dict[str, list[int]]:
    try:
        record = json.loads(cache.read_text())
        if record.get("tensorflow") == tf.__version__:
            return dict(record["decoded"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # missing or damaged: decode everything again
    return {}


def _write_decode_checks(cache: Path, root: Path, decoded: dict[str, list[int]]) -> None:
    try:  # atomic: a concurrent scan reads the old or the new record
        write_json(cache, {"root": printable_path(root.resolve()), "tensorflow": tf.__version__,
                           "decoded": decoded}, indent=None)
    except OSError:  # a read-only cache only costs the next scan its decoding time
        pass
