"""`kcls data check SOURCE`: what a data set holds, and its duplicates and leaks.

For a `folder:`, `manifest:` or `tfrecord:` source this lists the images with their
splits as a run would make them (`kcls.data.sources.file_splits`: the folder scan by
names and headers, its skipped files included; a pack's frozen splits), reads and
decodes each image once (`kcls.data.image_hashes`), and reports

- the images per class and split;
- their sizes, Pillow modes and formats;
- the unreadable files: those the scan skipped and those that do not decode;
- groups of exact and near duplicates (`kcls.data.duplicates`): within a class, across
  classes (conflicting labels) and across the splits (leaks).

`kcls.data.check_report` writes it as `data_check.json`, `data_check.md` and a PNG of
the duplicate groups.

Example:

>>> check = check_source(DataConfig(source="folder:../shared/data/hymenoptera"))  # doctest: +SKIP
>>> check.counts()["train"]  # doctest: +SKIP
{'ants': 123, 'bees': 121}
"""

from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from kcls.config import ConfigError, DataConfig, LabelFormat
from kcls.data.duplicates import (
    NEAR_DUPLICATE_DISTANCE,
    DuplicateGroup,
    duplicate_groups,
    label_keys,
    split_names,
)
from kcls.data.folder import SPLIT_NAMES
from kcls.data.image_hashes import ImageHashes, concatenate_hashes, hash_encoded, hash_files
from kcls.data.sources import FileSplits, file_splits

PACK_READ_BATCH = 256  # records hashed at a time from a pack


@dataclass
class SourceImages:
    """The images of a source with their labels and splits (before any decoding).

    Attributes:
        files: N file names (paths for folders and manifests, recorded names for packs).
        labels: int64 `(N,)` class indices or float32 `(N, C)` multi-hot labels.
        splits: N split names.
        class_names: list[str].
        skipped: files the listing skipped; hashing appends those that do not decode.
    """

    files: list[str]
    labels: np.ndarray
    splits: list[str]
    class_names: list[str]
    skipped: list[str]

    def describe(self, index: int) -> dict[str, str]:
        """Image `index` as reports name it: `{"file", "split", "label"}`."""
        return {"file": self.files[index], "split": self.splits[index],
                "label": label_text(self.labels[index], self.class_names)}


@dataclass
class DataCheck:
    """What `check_source` found (see the module docstring).

    Attributes:
        source: the `data.source` checked.
        images: the listed images (`SourceImages`).
        hashes: their `ImageHashes` (what decoded, sizes, modes, formats).
        groups: duplicate groups, in the order of their first members.
        threshold: the Hamming distance used for near duplicates.
        seconds: wall-clock time of the check.
    """

    source: str
    images: SourceImages
    hashes: ImageHashes
    groups: list[DuplicateGroup]
    threshold: int
    seconds: float

    def counts(self) -> dict[str, dict[str, int]]:
        """Readable images per split and class: `{split: {class: count}}`."""
        images, readable = self.images, self.hashes.readable
        splits = np.asarray(images.splits)
        result = {}
        for split in SPLIT_NAMES:
            chosen = (splits == split) & readable
            if not chosen.any():
                continue
            result[split] = dict(zip(images.class_names, class_counts(
                images.labels[chosen], len(images.class_names)).tolist()))
        return result

    def image_summary(self) -> dict[str, Any]:
        """Sizes (`width`/`height` min, median, max; the most common sizes), modes and
        formats of the readable images."""
        hashes = self.hashes
        readable = hashes.readable
        sizes = collections.Counter(
            f"{width}x{height}" for width, height, ok in
            zip(hashes.widths, hashes.heights, readable) if ok)

        def spread(values: np.ndarray) -> dict[str, int]:
            values = values[readable]
            return ({"min": int(values.min()), "median": int(np.median(values)),
                     "max": int(values.max())} if len(values) else {})

        def tally(values: list[str]) -> dict[str, int]:
            return dict(collections.Counter(
                value for value, ok in zip(values, readable) if ok).most_common())

        return {"width": spread(hashes.widths), "height": spread(hashes.heights),
                "common_sizes": dict(sizes.most_common(5)), "distinct_sizes": len(sizes),
                "modes": tally(hashes.modes), "formats": tally(hashes.formats)}

    def group_counts(self) -> dict[str, int]:
        """Groups by kind: exact and near, within a class, across classes, across splits."""
        groups = self.groups
        return {"groups": len(groups),
                "exact": sum(group.exact for group in groups),
                "near": sum(not group.exact for group in groups),
                "within_class": sum(not group.across_classes for group in groups),
                "across_classes": sum(group.across_classes for group in groups),
                "across_splits": sum(group.across_splits for group in groups),
                "images_in_groups": sum(len(group.members) for group in groups)}

    def member(self, index: int) -> dict[str, str]:
        """One image of a group as the report names it: file, split and label(s)."""
        return self.images.describe(index)

    def to_dict(self) -> dict[str, Any]:
        """`data_check.json`: everything above, every group with its members."""
        return {
            "source": self.source, "class_names": self.images.class_names,
            "images": len(self.images.files), "readable": int(self.hashes.readable.sum()),
            "counts": self.counts(), "image_summary": self.image_summary(),
            "unreadable": self.images.skipped,
            "near_duplicate_distance": self.threshold,
            "duplicates": self.group_counts(),
            "groups": [{"kinds": group.kinds, "exact": group.exact,
                        "distance": group.distance,
                        "members": [self.member(index) for index in group.members]}
                       for group in self.groups],
            "seconds": round(self.seconds, 2)}


def check_source(config: DataConfig, label_format: LabelFormat = "class_index",
                 threshold: int = NEAR_DUPLICATE_DISTANCE) -> DataCheck:
    """Checks the source `config.source` (see the module docstring).

    Args:
        config: DataConfig: the source, and the seed and fractions its splits are carved
            with (as a run would carve them).
        label_format: how a manifest's labels are read (`kcls.config.Recipe.label_format`).
        threshold: Hamming distance (bits of 64) of near duplicates.

    Raises:
        ConfigError: a source that is not made of image files (`sklearn:`, `tfds:`), or
            one that cannot be read (the folder scan's and the manifest's errors).
    """
    started = time.perf_counter()
    kind, _, argument = config.source.partition(":")
    if kind == "tfrecord":
        images, hashes = _pack_images(argument)
    elif kind in ("folder", "manifest"):
        # The leaks are what is checked: none dropped.
        images = file_images(file_splits(dataclasses.replace(config, drop_leaks=False),
                                         label_format))
        hashes = hash_files(images.files, images.skipped)
    else:
        raise ConfigError(f"kcls data check reads image files: folder:PATH, manifest:PATH.csv "
                          f"or tfrecord:DIR, not {config.source!r}.")
    groups = duplicate_groups(hashes.digests, hashes.perceptual, hashes.flipped,
                              label_keys(images.labels), images.splits, hashes.readable,
                              threshold)
    return DataCheck(config.source, images, hashes, groups, threshold,
                     time.perf_counter() - started)


def file_images(files: FileSplits) -> SourceImages:
    """The images of a folder's or a manifest's `FileSplits`, each with its split."""
    return SourceImages(files.paths.tolist(), files.labels,
                        split_names(files.indices, len(files.paths)), files.class_names,
                        files.skipped)


def _pack_images(folder: str) -> tuple[SourceImages, ImageHashes]:
    """The records of the pack in `folder`, read a batch at a time, and their hashes."""
    import tensorflow as tf

    from kcls.data.tfrecord import block_parser, read_pack

    pack = read_pack(folder)
    skipped = list(pack.manifest["skipped"])
    parse = block_parser(pack)
    files, labels, splits, parts = [], [], [], []
    for split in SPLIT_NAMES:
        paths = [str(path) for path in pack.shard_paths(split)]
        if not paths:
            continue
        records = tf.data.TFRecordDataset(paths).batch(PACK_READ_BATCH).map(parse)
        for encoded, label, names in records.as_numpy_iterator():
            names = [name.decode("utf-8", "backslashreplace") for name in names]
            parts.append(hash_encoded(lambda index, block=encoded: bytes(block[index]),
                                      len(encoded), skipped, names))
            files += names
            labels.append(label)
            splits += [split] * len(names)
    empty = np.zeros((0, len(pack.class_names)) if pack.multi_label else 0)
    return (SourceImages(files, np.concatenate(labels) if labels else empty, splits,
                         pack.class_names, skipped), concatenate_hashes(parts))


def label_text(label: np.ndarray, class_names: list[str]) -> str:
    """A label as text: the class name, or the classes of a multi-hot row joined by `;`."""
    if np.ndim(label) == 0:
        return class_names[int(label)]
    return ";".join(class_names[index] for index in np.flatnonzero(label))


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Images per class: int64 `[num_classes]` (a multi-hot image counts for each label)."""
    if labels.ndim == 1:
        return np.bincount(labels.astype(np.int64), minlength=num_classes)
    return labels.sum(axis=0).astype(np.int64)


def encoded_images(check: DataCheck, wanted: set[int]) -> dict[int, bytes]:
    """The encoded bytes of the images at positions `wanted` (for the groups' PNG):
    read from their files, or, for a pack, from a second pass over its records."""
    kind, _, argument = check.source.partition(":")
    found: dict[int, bytes] = {}
    if kind != "tfrecord":
        for index in wanted:
            try:
                with open(check.images.files[index], "rb") as file:
                    found[index] = file.read()
            except OSError:
                pass
        return found
    import tensorflow as tf

    from kcls.data.tfrecord import block_parser, read_pack

    pack = read_pack(argument)
    parse, position = block_parser(pack), 0
    paths = [str(path) for split in SPLIT_NAMES for path in pack.shard_paths(split)]
    for encoded, _, _ in tf.data.TFRecordDataset(paths).batch(PACK_READ_BATCH).map(
            parse).as_numpy_iterator():
        found.update({position + offset: bytes(data) for offset, data in enumerate(encoded)
                      if position + offset in wanted})
        position += len(encoded)
    return found
