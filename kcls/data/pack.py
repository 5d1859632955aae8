"""`kcls data pack SOURCE OUT_DIR`: a folder or a manifest as sharded TFRecords.

The pack (format: `kcls.data.tfrecord`) holds each image file's bytes as they are, its
label and its file name, in shards of about `shard_bytes` (128 MiB by default) per
split. The splits are the ones the source's `DataConfig` makes (`data.seed`,
`data.test_fraction`, `data.validation_fraction`, or a manifest's `split` column),
made once here and frozen: `data.source=tfrecord:OUT_DIR` trains, validates and tests
on exactly these examples, in this order, whatever its own seed and fractions say.

What packing guarantees:

- every image is decoded once, with the decoder training uses, before it is written:
  files that fail (and those the scan refused) are named in `pack.json`'s `skipped`, and
  a pack holds only images that decode;
- packing an unchanged source again (same files, sizes, modification times, settings)
  does nothing and says so;
- nothing half-written looks like a pack: shards and `pack.json` are written into a
  hidden temporary folder beside OUT_DIR (`kcls.files.temporary_name`) and published
  with one rename; an interrupted pack leaves OUT_DIR as it was (absent, empty or the
  previous pack), and the next pack into it removes the temporaries of dead packers;
- OUT_DIR is never overwritten: a folder holding anything but a kcls pack is refused,
  and a pack of other files or settings is replaced only with `replace=True`
  (`--replace`).

Example:

>>> config = DataConfig(source="folder:../shared/data/hymenoptera/train")  # doctest: +SKIP
>>> result = pack_source(config, "packs/hymenoptera")  # doctest: +SKIP
>>> result.examples
{'train': 176, 'validation': 20, 'test': 49}
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from kcls.config import ConfigError, DataConfig, LabelFormat
from kcls.data.folder import DECODE_CHUNK, decode_batches, graph_only
from kcls.data.sources import FileSplits, file_splits, fingerprint
from kcls.data.tfrecord import (
    PACK_FORMAT,
    PACK_VERSION,
    SPLIT_NAMES,
    read_pack,
    serialize_example,
    shard_name,
)
from kcls.environment import software_versions
from kcls.files import TEMPORARY_NAME, owner_tag, process_exists, temporary_name, write_json
from kcls.layout import PACK_MANIFEST_FILE

DEFAULT_SHARD_BYTES = 128 * 2**20
SIZE_UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}


@dataclass
class PackResult:
    """What `pack_source` did.

    Attributes:
        out_dir: Path of the pack.
        written: False when OUT_DIR already held this pack (nothing was done).
        examples: examples per split in the pack.
        shards: shard files per split.
        skipped: files of the source that are not in the pack (see the module docstring).
        fingerprint: the pack's fingerprint (`Splits.fingerprint` of `tfrecord:OUT_DIR`).
    """

    out_dir: Path
    written: bool
    examples: dict[str, int]
    shards: dict[str, int]
    skipped: list[str] = field(default_factory=list)
    fingerprint: str = ""


def parse_size(text: str) -> int:
    """Bytes in a size such as `128MB`, `1.5GB`, `64KB` or `1000` (binary units).

    >>> parse_size("128MB")
    134217728

    Raises:
        ConfigError: not a positive size with one of the units B, KB, MB, GB.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    size = int(float(match[1]) * SIZE_UNITS[match[2]]) if match else 0
    if size < 1:
        raise ConfigError(f"Shard size {text!r} is not a size; use e.g. 128MB, 1GB or 512KB.")
    return size


def pack_source(config: DataConfig, out_dir: str | Path,
                shard_bytes: int = DEFAULT_SHARD_BYTES, replace: bool = False,
                log: Callable[[str], None] = print,
                label_format: LabelFormat = "class_index") -> PackResult:
    """Packs the `folder:` or `manifest:` source of `config` into `out_dir`.

    Args:
        config: DataConfig; its source and split settings (`seed`, fractions).
        out_dir: the pack's folder: absent, empty, or a pack to leave (same source and
            settings) or replace (with `replace`).
        shard_bytes: int, about how many bytes a shard holds.
        replace: replace a pack of other files or settings in `out_dir`.
        log: receives a line per shard's worth of images written and a summary per split.
        label_format: how a manifest's labels are read (`kcls.config.Recipe.label_format`:
            its `label` column for `model.task=multiclass`, `labels` for `multilabel`).

    Returns:
        PackResult.

    Raises:
        ConfigError: another kind of source, data that cannot be split, or an `out_dir`
            that holds something else (the message names the fix).
    """
    if config.source.partition(":")[0] not in ("folder", "manifest"):
        raise ConfigError(
            f"kcls data pack packs folder:PATH or manifest:PATH.csv sources, not "
            f"{config.source!r} (TFDS datasets are sharded TFRecords already).")
    out_dir = Path(out_dir)
    existing = _existing_pack(out_dir)  # refuses a folder of other files before the scan
    files = file_splits(config, label_format)
    key = fingerprint(PACK_FORMAT, PACK_VERSION, files.fingerprint, shard_bytes, DECODE_CHUNK)
    if existing is not None and existing.get("fingerprint") == key:
        log(f"{out_dir} already holds this pack of {config.source} (the same files and "
            "settings): nothing to do")
        return _result(out_dir, existing, written=False)
    if existing is not None and not replace:
        raise ConfigError(
            f"{str(out_dir)!r} holds a pack of {existing.get('source', 'another source')} made "
            "from other files or settings (or a damaged one); pass --replace to replace it, "
            "or choose another OUT_DIR.")
    _remove_dead_temporaries(out_dir)
    temporary = out_dir.parent / temporary_name(out_dir.name)
    try:
        temporary.mkdir(parents=True)
        manifest = _write_pack(files, config, temporary, shard_bytes, key, log)
        _publish(temporary, out_dir, replace_pack=existing is not None)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return _result(out_dir, manifest, written=True)


def _result(out_dir: Path, manifest: dict[str, Any], written: bool) -> PackResult:
    splits = manifest["splits"]
    return PackResult(out_dir, written, {name: splits[name]["examples"] for name in SPLIT_NAMES},
                      {name: len(splits[name]["shards"]) for name in SPLIT_NAMES},
                      list(manifest["skipped"]), manifest["fingerprint"])


def _existing_pack(out_dir: Path) -> dict[str, Any] | None:
    """The manifest of the pack in `out_dir` (`{}` for a damaged one), or None when
    `out_dir` is absent or empty.

    Raises:
        ConfigError: `out_dir` is a file or holds anything but a kcls pack.
    """
    if not out_dir.exists():
        return None
    if not out_dir.is_dir() or (any(out_dir.iterdir())
                                and not (out_dir / PACK_MANIFEST_FILE).is_file()):
        raise ConfigError(
            f"OUT_DIR {str(out_dir)!r} holds something other than a kcls pack (no "
            f"{PACK_MANIFEST_FILE}); kcls data pack never overwrites it: choose a new or empty "
            "folder.")
    if not any(out_dir.iterdir()):
        return None
    try:
        return read_pack(out_dir).manifest
    except ConfigError:  # damaged or incomplete: never "unchanged", replaceable
        return {}


def _write_pack(files: FileSplits, config: DataConfig, folder: Path, shard_bytes: int,
                key: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Writes the shards of every split and `pack.json` into `folder`; returns the manifest."""
    skipped = files.skipped  # the scan's; decoding appends the files that fail
    splits, train_labels = {}, []
    for name in SPLIT_NAMES:
        splits[name], labels = _write_split(files, name, folder, shard_bytes, skipped, log)
        train_labels = labels if name == "train" else train_labels
    kind, _, argument = config.source.partition(":")
    manifest = {
        "format": PACK_FORMAT, "version": PACK_VERSION,
        "source": f"{kind}:{Path(argument).resolve()}", "fingerprint": key,
        "source_fingerprint": files.fingerprint,
        "settings": {"seed": config.seed, "test_fraction": config.test_fraction,
                     "validation_fraction": config.validation_fraction,
                     "shard_bytes": shard_bytes, "block_records": DECODE_CHUNK},
        "class_names": files.class_names,
        "label_format": "multi_hot" if files.labels.ndim == 2 else "class_index",
        "splits": splits, "train_labels": train_labels, "skipped": skipped,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **software_versions(),
    }
    write_json(folder / PACK_MANIFEST_FILE, manifest, indent=None)
    return manifest


def _write_split(files: FileSplits, split: str, folder: Path, shard_bytes: int,
                 skipped: list[str], log: Callable[[str], None]
                 ) -> tuple[dict[str, Any], list[Any]]:
    """Writes split `split`'s shards: blocks of `DECODE_CHUNK` records in the split's
    order, dealt round robin (see `kcls.data.tfrecord`).

    Returns:
        `(the manifest's record of the split, its labels: class indices, or lists of
        class indices for multi-hot labels)`.
    """
    indices = files.indices[split]
    blocks = -(-len(indices) // DECODE_CHUNK)
    count = int(np.clip(np.ceil(files.sizes[indices].sum() / shard_bytes), 1, max(blocks, 1)))
    paths = [folder / shard_name(split, index, count) for index in range(count)]
    records, sizes, labels = [0] * count, [0] * count, []
    started, reported = time.monotonic(), 0
    writers = [tf.io.TFRecordWriter(str(path)) for path in paths]
    try:
        for position, (encoded, label, name) in enumerate(
                _checked_examples(files, indices, skipped)):
            record = serialize_example(encoded, label, name.decode("utf-8"))
            shard = (position // DECODE_CHUNK) % count
            writers[shard].write(record)
            records[shard], sizes[shard] = records[shard] + 1, sizes[shard] + len(record)
            labels.append(np.flatnonzero(label).tolist() if np.ndim(label) else int(label))
            if sum(sizes) >= (reported + 1) * shard_bytes and reported + 1 < count:
                reported += 1
                log(_progress_line(split, reported, count, len(labels), len(indices),
                                   sum(sizes), started))
    finally:
        for writer in writers:
            writer.close()
    for path in paths:
        _fsync(path)
    log(_progress_line(split, count, count, len(labels), len(indices), sum(sizes), started))
    classes = [label for entry in labels for label in np.atleast_1d(entry)]
    return ({"examples": len(labels),
             "class_counts": np.bincount(np.asarray(classes, np.int64),
                                         minlength=len(files.class_names)).tolist(),
             "shards": [{"file": path.name, "records": record_count, "bytes": size}
                        for path, record_count, size in zip(paths, records, sizes)]}, labels)


def _progress_line(split: str, done: int, count: int, images: int, total: int, size: int,
                   started: float) -> str:
    """`train: shard 2 of 8 written (5,000 of 20,000 images, 256 MB, 3,100 images/s)`."""
    rate = images / max(time.monotonic() - started, 1e-9)
    return (f"{split}: shard {done} of {count} written ({images:,} of {total:,} images, "
            f"{size / 2**20:,.0f} MB, {rate:,.0f} images/s)")


def _checked_examples(files: FileSplits, indices: np.ndarray, skipped: list[str]):
    """`(encoded bytes, label, file name bytes)` of the files at `indices` that decode, in
    their order; the others are appended to `skipped`."""
    paths, labels = files.paths[indices], files.labels[indices]
    if not len(paths):
        return iter(())
    names = tf.constant(paths.tolist(), tf.string)
    chunks = tf.data.Dataset.from_tensor_slices((names, labels, names)).batch(DECODE_CHUNK)
    examples = decode_batches(chunks, skipped, read_files=True, keep_encoded=True).map(
        graph_only(lambda image, label, encoded, name: (encoded, label, name)),
        num_parallel_calls=tf.data.AUTOTUNE)
    return examples.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def _fsync(path: Path) -> None:
    """Flushes a shard to the disk, so the rename never publishes a pack of empty files."""
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def _publish(temporary: Path, out_dir: Path, replace_pack: bool) -> None:
    """Renames the finished `temporary` to `out_dir` (absent or empty); a pack there is
    moved aside first and removed after."""
    previous = out_dir.parent / temporary_name(out_dir.name) if replace_pack else None
    if previous is not None:
        os.rename(out_dir, previous)
    try:
        os.rename(temporary, out_dir)  # onto nothing or an empty folder
    except OSError:
        if previous is not None:
            os.rename(previous, out_dir)
        raise ConfigError(f"OUT_DIR {str(out_dir)!r} was filled while packing (another kcls "
                          "data pack?); it is left as it is: pack again.") from None
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def _remove_dead_temporaries(out_dir: Path) -> None:
    """Removes the temporary folders of `out_dir` that killed packs on this machine left."""
    if not out_dir.parent.is_dir():
        return
    host = owner_tag().split("-")[0]
    for path in out_dir.parent.iterdir():
        match = TEMPORARY_NAME.fullmatch(path.name)
        if (match and match["name"] == out_dir.name and match["host"] == host
                and not process_exists(int(match["pid"])) and path.is_dir()):
            shutil.rmtree(path, ignore_errors=True)
