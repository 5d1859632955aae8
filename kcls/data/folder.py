"""Image folders: `root/<class>/<image>`, the most common way users bring their own data.

Class names are the sub-folder names, sorted. JPEG, PNG, BMP and GIF (first frame)
files are used; other files are ignored. Every file that will not reach the model is
skipped, counted and named (`FolderFiles.skipped`), never dropped silently, in two
places:

1. the scan, before any split is made, reads each candidate's name and header only
   (`kcls.data.headers`, 10-20 microseconds a file): a name that is not valid UTF-8
   (TensorFlow file names are UTF-8 strings), a file TensorFlow's decoder does not take
   (no JPEG, PNG, GIF or BMP signature, a header cut short) and a decompression bomb (a
   header claiming more than `kcls.data.headers.MAX_IMAGE_PIXELS` pixels, refused before
   anything allocates them) are skipped;
2. the pipeline decodes each file with TensorFlow's own decoder (`decode_batches`): a file
   that fails there (a truncated download, a corrupt body, a file changed since the scan)
   is left out and appended to the same list, once, when the pass that read it gets to
   it. Read the list after the data has been read (`kcls recipe run`, `kcls evaluate` and
   `kcls optimize` do).

So the first training step waits for a listing and the headers, not for a decode of
every image (10,000 CIFAR-10 JPEGs: 5.5 s before, with a full decode at scan time;
see docs/data.md for the measured table).

A root already split (the Roboflow, Ultralytics and Hugging Face `imagefolder` layouts)
holds split folders instead of class folders: `root/train/<class>/<image>` and any of
`val/`, `valid/` or `validation/` and `test/` (names matched case-insensitively), each
with the same class folders. The scan then records each file's split
(`FolderFiles.splits`), and `kcls.data.sources` uses these splits as they are, carving a
missing one from `train/` only. A root mixing split folders and other folders, or split
folders with different classes, is refused (`split_folders`, `scan_folder`).

Example:

>>> files = scan_folder("../shared/data/hymenoptera")  # doctest: +SKIP
>>> files.class_names, sorted(set(files.splits))
(['ants', 'bees'], ['train', 'validation'])
"""

from __future__ import annotations

import operator
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
from kcls.data.headers import image_stamp

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# Files decoded per attempt in `decode_batches`: failures are looked for per chunk, so a
# chunk's cost is paid once for this many images; a record block of a pack
# (`kcls.data.tfrecord`) is one chunk.
DECODE_CHUNK = 32
# Functions tf.data runs as graphs: without AutoGraph's source conversion, which took 4.6 of
# the 5.4 s of building the pipelines on a busy 2-core CPU. They hold no Python control
# flow on tensors (`tf.cond` is explicit), so the conversion had nothing to do.
graph_only = tf.autograph.experimental.do_not_convert
# Header reads run in this many threads: on a local disk the scan is bound by Python (1, 2
# and 8 threads measured within noise of each other), on a network disk by the round
# trips, which threads overlap.
SCAN_THREADS = 4
SPLIT_NAMES = ("train", "validation", "test")
# The sub-folder names (lower-cased) that make a root a root of split folders, by split.
SPLIT_FOLDER_NAMES = {"train": "train", "val": "validation", "valid": "validation",
                      "validation": "validation", "test": "test"}


@dataclass
class FolderFiles:
    """The usable images of a folder and the ones skipped.

    Attributes:
        paths: list[str] of image files that passed the scan (name and header).
        labels: int64 array `(len(paths),)`, indices into `class_names`.
        class_names: list[str], sorted sub-folder names.
        skipped: list[str] of files with an image extension that will not reach the
            model (unreadable, no decodable header, a decompression bomb, or a name that
            is not UTF-8, shown with its undecodable bytes escaped as `\\xNN`);
            `decode_files` appends the files that fail to decode when they are read.
        stamps: list of `(size, mtime_ns)` per path, as the scan found them.
        splits: list[str] per path (`train`, `validation`, `test`) for a root of split
            folders, None for a root of class folders.
    """

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    skipped: list[str] = field(default_factory=list)
    stamps: list[tuple[int, int]] = field(default_factory=list)
    splits: list[str] | None = None


def scan_folder(root: str | Path) -> FolderFiles:
    """Lists and checks the images under `root/<class>/`, or under
    `root/<split>/<class>/` for a root of split folders (names and headers, no decoding).

    Hidden sub-folders (names starting with `.`) are not classes; a warning names them.

    Raises:
        ConfigError: `root` missing or not a folder, fewer than two class sub-folders,
            a class folder name that `labels.txt` cannot hold (control characters, bytes
            that are not UTF-8, outer spaces), a class with no usable image, or split
            folders that cannot be used (`split_folders`; split folders whose class
            folders differ).
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(
            f"Image folder {str(root)!r} does not exist. Pass data.source=folder:PATH with "
            "one sub-folder of images per class.")
    given = split_folders(root)
    if given is None:
        return _scan_classes(root)
    _check_same_classes(root, given)  # before the scan: the folders' names say it
    scans = {split: _scan_classes(folder) for split, folder in given.items()}
    return FolderFiles(
        [path for files in scans.values() for path in files.paths],
        np.concatenate([files.labels for files in scans.values()]),
        scans["train"].class_names,
        [path for files in scans.values() for path in files.skipped],
        [stamp for files in scans.values() for stamp in files.stamps],
        [split for split, files in scans.items() for _ in files.paths])


def split_folders(root: Path) -> dict[str, Path] | None:
    """The split folders of `root` by split (`train`, then `validation` and `test` when
    given), or None when `root` holds no sub-folder named like a split.

    Raises:
        ConfigError: `root` mixes split folders and other folders, has two folders for
            one split (`val/` and `valid/`), or has split folders but no `train/`.
    """
    # Hidden folders are left out; `_class_folders` names them for a root of classes.
    folders = _unhidden_folders(root)
    named = [folder for folder in folders if folder.name.lower() in SPLIT_FOLDER_NAMES]
    if not named:
        return None
    others = [printable_path(folder.name) for folder in folders if folder not in named]
    if others:
        raise ConfigError(
            f"Image folder {str(root)!r} mixes split folders "
            f"({', '.join(folder.name for folder in named)}) and other folders "
            f"({', '.join(others)}): a folder holds either class folders "
            "(ROOT/<class>/<image>) or split folders (ROOT/train/<class>/<image>, val/, "
            f"test/); move {', '.join(others)} into the split folders as class folders, "
            "or rename the split folders to use them as classes.")
    given: dict[str, Path] = {}
    for folder in named:
        split = SPLIT_FOLDER_NAMES[folder.name.lower()]
        if split in given:
            raise ConfigError(
                f"Image folder {str(root)!r} has two {split} folders, {given[split].name} "
                f"and {folder.name}: merge them into one.")
        given[split] = folder
    if "train" not in given:
        raise ConfigError(
            f"Image folder {str(root)!r} has split folders ({', '.join(sorted(given))}) but "
            f"no train folder: add {root}/train/<class>/ with the training images.")
    return {split: given[split] for split in SPLIT_NAMES if split in given}


def _check_same_classes(root: Path, given: dict[str, Path]) -> None:
    """Refuses split folders whose class folders differ from `train/`'s."""
    classes = [folder.name for folder in _unhidden_folders(given["train"])]
    problems = []
    for split_folder in given.values():
        names = [folder.name for folder in _unhidden_folders(split_folder)]
        missing = [name for name in classes if name not in names]
        extra = [printable_path(name) for name in names if name not in classes]
        if missing or extra:
            problems.append(f"{split_folder.name}/ " + " and ".join(
                part for part in (f"lacks {', '.join(missing)}" if missing else "",
                                  f"has {', '.join(extra)}" if extra else "") if part))
    if problems:
        raise ConfigError(
            f"Image folder {str(root)!r}: the split folders hold different classes "
            f"({'; '.join(problems)}; {given['train'].name}/ has "
            f"{', '.join(printable_path(name) for name in classes)}); every split folder "
            "needs the same class folders: add the missing ones or remove the extra ones.")


def _unhidden_folders(root: Path) -> list[Path]:
    """The sub-folders of `root` whose names do not start with `.`, sorted (no warning)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_classes(root: Path) -> FolderFiles:
    """`scan_folder` of a folder of class folders."""
    class_dirs = _class_folders(root)
    candidates = [(path, label) for label, class_dir in enumerate(class_dirs)
                  for path in _image_files(class_dir, skip_hidden=False)]
    stamps = check_images([path for path, _ in candidates])
    kept = [(*candidate, stamp) for candidate, stamp in zip(candidates, stamps) if stamp]
    skipped = [printable_path(path) for (path, _), stamp in zip(candidates, stamps)
               if not stamp]
    counts = np.bincount([label for _, label, _ in kept], minlength=len(class_dirs))
    empty = [class_dirs[i].name for i in np.flatnonzero(counts == 0)]
    if empty:
        raise ConfigError(
            f"Image folder {str(root)!r}: class folder(s) {', '.join(empty)} contain no readable "
            f"image ({', '.join(IMAGE_EXTENSIONS)}). Add images or remove the folder(s).")
    return FolderFiles([path for path, _, _ in kept],
                       np.asarray([label for _, label, _ in kept], dtype=np.int64),
                       [d.name for d in class_dirs], skipped, [stamp for _, _, stamp in kept])


def _visible_folders(root: Path) -> list[Path]:
    """The sub-folders of `root` not starting with `.`, sorted; warns about the others."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    hidden = [p.name for p in folders if p.name.startswith(".")]
    if hidden:
        warnings.warn(
            f"Image folder {str(root)!r}: ignored {len(hidden)} hidden folder(s): "
            f"{', '.join(printable_path(name) for name in hidden)} (names starting with '.' "
            "are not classes; rename a folder to use it as one).", UserWarning, stacklevel=5)
    return [p for p in folders if not p.name.startswith(".")]


def _class_folders(root: Path) -> list[Path]:
    """The class folders of `root`, sorted; warns about hidden ones, refuses fewer than two."""
    class_dirs = _visible_folders(root)
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
    return class_dirs


def scan_images(root: str | Path) -> FolderFiles:
    """Lists and checks every image under `root`, at any depth, ignoring sub-folder names.

    For unlabelled data (self-supervised pretraining): the same checks as `scan_folder`,
    so unusable files are skipped and named, but no classes. Hidden files and folders
    (names starting with `.`) are left out.

    Returns:
        FolderFiles with all labels 0 and no class names.

    Raises:
        ConfigError: `root` missing or not a folder, or no usable image in it.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"Image folder {str(root)!r} does not exist. Pass a folder of "
                          "images (sub-folders are searched too).")
    candidates = _image_files(root, skip_hidden=True)
    stamps = check_images(candidates)
    paths = [path for path, stamp in zip(candidates, stamps) if stamp]
    if not paths:
        raise ConfigError(
            f"Image folder {str(root)!r} holds no readable image ({', '.join(IMAGE_EXTENSIONS)}"
            f"{f'; {len(candidates)} unreadable' if candidates else ''}). Point it at a "
            "folder of images.")
    return FolderFiles(paths, np.zeros(len(paths), np.int64), [],
                       [printable_path(path) for path, stamp in zip(candidates, stamps)
                        if not stamp], [stamp for stamp in stamps if stamp])


def list_image_files(root: Path) -> list[Path]:
    """The image files (by extension) under the folder `root`, at any depth, sorted;
    hidden files and folders (names starting with `.`) left out. Nothing is opened.

    Symbolic links to folders are followed, as training follows a symlinked class
    folder; each real folder is listed once, so a link loop ends.
    """
    return [Path(path) for path in _image_files(Path(root), skip_hidden=True)]


def _image_files(folder: Path, skip_hidden: bool, seen: set[str] | None = None
                 ) -> list[str]:
    """The files with an image extension under `folder`, in `sorted(folder.rglob("*"))`'s
    order (by path parts: each folder's entries by name, a sub-folder's files where its
    name sorts), following links to folders but listing each real folder once (`seen`):
    one `scandir` per folder and the paths it makes (a `Path` per file cost more than its
    header read)."""
    found: list[str] = []
    seen = set() if seen is None else seen
    real = os.path.realpath(folder)
    if real in seen:  # a link loop, or a folder linked twice
        return found
    seen.add(real)
    try:
        entries = sorted(os.scandir(folder), key=operator.attrgetter("name"))
    except OSError:  # unreadable sub-folder: as rglob, nothing under it is listed
        return found
    for entry in entries:
        name = entry.name
        if skip_hidden and name.startswith("."):
            continue
        if entry.is_dir():
            found += _image_files(entry.path, skip_hidden, seen)
            continue
        dot = name.rfind(".")
        if dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS and entry.is_file():
            found.append(entry.path)
    return found


def check_images(paths: Sequence[Path | str]) -> list[tuple[int, int] | None]:
    """Which image files pass the scan: a UTF-8 name and a header TensorFlow decodes, not
    claiming a decompression bomb's size (`kcls.data.headers.image_stamp`).

    Args:
        paths: image files.

    Returns:
        one entry per path: `(size, mtime_ns)` of a file that passes, None for one that
        is missing, unreadable, has no decodable header, is a decompression bomb or has
        a name that is not UTF-8. A file whose body does not decode passes: the pipeline
        names it when it reads it (`decode_batches`).
    """
    paths = list(paths)
    slices = [paths[start::SCAN_THREADS] for start in range(SCAN_THREADS)]
    with ThreadPoolExecutor(max_workers=SCAN_THREADS) as pool:
        results = list(pool.map(lambda part: [image_stamp(path) for path in part], slices))
    stamps: list[tuple[int, int] | None] = [None] * len(paths)
    for start, result in enumerate(results):
        stamps[start::SCAN_THREADS] = result
    return stamps


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


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """The one decoder of training, evaluation and packs: encoded JPEG/PNG/GIF/BMP bytes
    (string `[]`) to uint8 `[H, W, 3]`; gray and RGBA become RGB, a GIF its first frame."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def decode_image_file(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Reads and decodes one file to `(uint8 [H, W, 3], label)` (see `decode_image`)."""
    return decode_image(tf.io.read_file(path)), label


def decode_files(paths: Sequence[str], labels: np.ndarray,
                 failed: list[str] | None = None) -> tf.data.Dataset:
    """The decoded `(uint8 [H, W, 3], label)` examples of `paths`, in their order.

    A file that fails to read or decode is left out and its path appended to `failed`
    (see `decode_batches`).

    Args:
        paths: sequence of str, image files (UTF-8 names, see `scan_folder`).
        labels: int array `(len(paths),)` of classes (int64 labels), or float array
            `(len(paths), C)` of multi-hot labels (float32 labels).
        failed: list[str] to append the paths of files that fail to; `None` for a new
            list nobody reads.
    """
    labels = np.asarray(labels)
    labels = labels.astype(np.float32 if labels.dtype.kind == "f" else np.int64)
    # Python strings: a list of numpy strings converts 10x slower (0.15 s for 100,000).
    names = tf.constant(np.asarray(paths, dtype=str).tolist(), tf.string)
    chunks = tf.data.Dataset.from_tensor_slices((names, labels, names)).batch(DECODE_CHUNK)
    return decode_batches(chunks, failed, read_files=True)


def decode_batches(chunks: tf.data.Dataset, failed: list[str] | None = None, *,
                   read_files: bool, keep_encoded: bool = False,
                   chunk_size: int = DECODE_CHUNK) -> tf.data.Dataset:
    """Decodes chunks of images in parallel, leaving out and naming the ones that fail.

    Each chunk is decoded in a dataset of its own whose failures `ignore_errors` skips,
    followed by one empty-image element (no decoded image is empty) that counts what
    arrived: when images are missing, the chunk is decoded again one by one in Python
    and the files that fail are appended to `failed` (once, however many passes are
    made). A failure is thereby seen and named, where `ignore_errors` alone would drop
    it with a muted C++ log, at the cost of two small ops per image (measured in
    docs/data.md). The order is the chunks' order (`deterministic=True`): a split read
    twice (a calibration carve-out's `take`/`skip`, the report's mistake images) gives
    the same examples in the same places.

    Args:
        chunks: tf.data.Dataset of `(sources string [K], labels [K] or [K, C], names
            string [K])` with 1 <= K <= `chunk_size`: file paths (`read_files=True`)
            or encoded images, and the names to report failures by.
        failed: list[str] to append the names of failures to; `None` for a new list.
        read_files: whether `sources` are paths to read (else the encoded bytes).
        keep_encoded: also return each example's encoded bytes and name.
        chunk_size: int, the largest K (a whole chunk comes out before the next one).

    Returns:
        Unbatched `(uint8 image [H, W, 3], label)`, or with `keep_encoded`
        `(image, label, encoded string [], name string [])`.
    """
    failed = [] if failed is None else failed
    recheck = _failure_recorder(failed, read_files)

    @graph_only
    def attempt(sources: tf.Tensor, labels: tf.Tensor, names: tf.Tensor) -> tf.data.Dataset:
        @graph_only
        def decode(source: tf.Tensor, label: tf.Tensor, name: tf.Tensor) -> tuple:
            encoded = tf.io.read_file(source) if read_files else source
            return (decode_image(encoded), label, encoded, name)[:4 if keep_encoded else 2]

        # Sequential within a chunk: the interleave below runs chunks in parallel, and a
        # parallel map here too measured slower on two cores (7,700 vs 8,600 images/s).
        decoded = tf.data.Dataset.from_tensor_slices((sources, labels, names)).map(
            decode).ignore_errors()
        count = tf.shape(sources)[0]
        counter = (tf.zeros([0, 0, 3], tf.uint8), labels[0], sources[0], names[0])

        @graph_only
        def tally(arrived: tf.Tensor, example: tuple) -> tuple[tf.Tensor, tuple]:
            is_counter = tf.equal(tf.size(example[0]), 0)
            checked = tf.cond(is_counter & (arrived < count),
                              lambda: tf.py_function(recheck, [sources, names], tf.bool),
                              lambda: tf.constant(False))
            with tf.control_dependencies([checked]):
                return arrived + 1, example

        examples = decoded.concatenate(tf.data.Dataset.from_tensors(
            counter[:4 if keep_encoded else 2])).scan(tf.constant(0), tally)
        return examples.filter(graph_only(lambda image, *rest: tf.size(image) > 0))

    return chunks.interleave(attempt, cycle_length=tf.data.AUTOTUNE, block_length=chunk_size,
                             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _failure_recorder(failed: list[str], read_files: bool):
    """The Python side of `decode_batches`: decodes a chunk whose count fell short one
    image at a time and appends the names of those that fail to `failed`."""
    lock = threading.Lock()  # tf.data may call it from several threads

    def recheck(sources: tf.Tensor, names: tf.Tensor) -> bool:
        failing = []
        for source, name in zip(sources, names.numpy()):
            try:
                decode_image(tf.io.read_file(source) if read_files else source)
            except tf.errors.OpError:
                failing.append(name.decode("utf-8", "backslashreplace"))
        if not failing:  # failed in the pipeline, decodes now (changed meanwhile)
            failing = [f"one of {len(names)} files from "
                       f"{names[0].numpy().decode('utf-8', 'backslashreplace')} "
                       "(failed once, decoded on a second try)"]
        with lock:
            failed.extend(name for name in failing if name not in failed)
        return False

    return recheck


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
