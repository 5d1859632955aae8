"""Data sources: anything that yields `(image uint8 [H, W, 3], label int64)` plus class names.

A source is named by `DataConfig.source`:

- `sklearn:digits` — scikit-learn's bundled 8x8 handwritten digits (1,797 real images,
  10 classes), offline everywhere scikit-learn is installed.
- `tfds:NAME` — a TensorFlow Datasets dataset, read from `DataConfig.data_dir` (and
  downloaded and prepared there by TFDS on first use with `data.download=auto`); a
  `labels` feature that is a sequence of class labels makes it multi-label (float32
  multi-hot `[C]` labels).
- `folder:PATH` — an image folder `PATH/<class>/<image>`, or a folder already split
  into `PATH/train/<class>/`, `val/` (`valid/`, `validation/`) and `test/`, whose splits
  are used as they are (see `kcls.data.folder` and `given_split_indices`).
- `manifest:PATH.csv` — a CSV of `path,label[,split]` rows (one class per image), or of
  `path,labels[,split]` rows for multi-label data, whose examples then carry float32
  multi-hot `[C]` labels; which one is read is the `label_format` argument, the recipe's
  `model.task` (`kcls.config.Recipe.label_format`; see `kcls.data.manifest`).
- `tfrecord:DIR` — a pack of sharded TFRecords that `kcls data pack` wrote from a folder
  or a manifest, with its splits frozen in it (see `kcls.data.tfrecord`).

Sources without a test split get one carved off, stratified and seeded; every source
without a validation split gets one carved off its training data the same way. Folders and
manifests are split by `file_splits` before any image is read, which `kcls data pack`
uses too: a pack holds the splits the source makes.

Example:

>>> splits = load_splits(DataConfig(source="sklearn:digits"))
>>> splits.class_names[:3], splits.sizes["test"]
(['0', '1', '2'], 360)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from sklearn.model_selection import train_test_split

from kcls.config import ConfigError, DataConfig, DownloadPolicy, LabelFormat, require_choice
from kcls.data.duplicates import (
    DuplicateGroup,
    leak_groups,
    leaked_training_copies,
    split_names,
)


@dataclass
class Splits:
    """Train, validation and test datasets of `(image uint8 [H, W, 3], label int64)` examples.

    Attributes:
        train: tf.data.Dataset of training examples, not batched; in a seeded random
            order for sources split here (arrays, folders, manifests) and for packs
            (the order `kcls data pack` froze), in TFDS's order otherwise.
        validation: tf.data.Dataset or `None` when `validation_fraction` is 0.
        test: tf.data.Dataset held out for the final evaluation.
        class_names: list[str], label `i` is `class_names[i]`.
        sizes: number of examples per split (`train`, `validation`, `test`).
        skipped: files of the source that do not reach the model: refused by the
            folder scan (names and headers) or by `kcls data pack`, or failing to decode
            (or, in a pack, to read) in the pipeline (appended when it happens, so read
            it after iterating).
        train_labels: int64 `(train,)` labels (float32 `(train, C)` multi-hot ones) of the
            training split when the source knows them without reading images (arrays,
            folders, manifests, packs), else `None` (see `train_class_counts`).
        fingerprint: hex digest of what the source read (the files with their sizes and
            modification times, the array bytes, the pack, or the TFDS dataset and
            version), which keys on-disk caches (see `kcls.data.pipeline`).
        test_files: list[str], the image files of the test split in its order, for
            sources made of files (folders, manifests); None for the others, whose test
            split does not change (arrays, TFDS, packs). A run records it, so `kcls
            evaluate` scores the same images however the folder grows
            (`recorded_test_examples`).
    """

    train: tf.data.Dataset
    validation: tf.data.Dataset | None
    test: tf.data.Dataset
    class_names: list[str]
    sizes: dict[str, int]
    skipped: list[str] = field(default_factory=list)
    train_labels: np.ndarray | None = None
    fingerprint: str = ""
    test_files: list[str] | None = None

    def evaluated_test_files(self) -> list[str] | None:
        """The file of each test example that reached the model, in order (read it
        after the pass), or None for sources without files."""
        return evaluated_files(self.test_files, self.skipped)


@dataclass
class HeldOut:
    """Held-out examples to score a trained model on (`test_examples`).

    Attributes:
        examples: unbatched `(uint8 image, label)` examples.
        skipped: the files that did not reach them (appended to while they are read).
        files: the image file of each example in order (before any is skipped), or None
            for sources without files.
    """

    examples: tf.data.Dataset
    skipped: list[str]
    files: list[str] | None = None

    def evaluated_files(self) -> list[str] | None:
        """The file of each example that reached the model (read it after the pass)."""
        return evaluated_files(self.files, self.skipped)


def evaluated_files(files: list[str] | None, skipped: list[str]) -> list[str] | None:
    """`files` without the `skipped` ones, or None without files."""
    failed = set(skipped)
    return None if files is None else [path for path in files if path not in failed]


def load_splits(config: DataConfig, label_format: LabelFormat = "class_index") -> Splits:
    """Loads the source named by `config.source` and splits it.

    Args:
        config: DataConfig.
        label_format: how a manifest's labels are read (`kcls.config.Recipe.label_format`,
            from `model.task`): its `label` column as class indices, or its `labels`
            column as multi-hot sets. Other sources' labels are what they are (the task
            checks them, `Task.check_labels`).

    Raises:
        ConfigError: unknown source, or data that cannot be found (the message says
            where kcls looked and how to fix it).
    """
    kind, _, argument = config.source.partition(":")
    if kind == "sklearn":
        images, labels, class_names = _sklearn_arrays(argument)
        return splits_from_arrays(images, labels, class_names, config)
    if kind == "tfds":
        return _tfds_splits(argument, config)
    if kind in ("folder", "manifest"):
        return decoded_splits(file_splits(config, label_format))
    if kind == "tfrecord":
        return _pack_splits(argument)
    raise ConfigError(f"Unknown data source {config.source!r}.")


def test_examples(config: DataConfig, class_names: list[str], source: str | None = None,
                  test_files: list[str] | None = None,
                  label_format: LabelFormat = "class_index") -> HeldOut:
    """The held-out examples to score a trained model on, their files and skipped files.

    Args:
        config: the model's DataConfig: its source, seed and fractions name the test
            split it held out (never an image it trained on).
        class_names: the model's classes, which the data must have, in that order.
        source: another `data.source` to score on instead: `folder:PATH` takes every
            image of that folder (its class folders must be the model's classes), any
            other source its test split (a folder of split folders, `train/`, `val/`,
            `test/`: its test split, `test/` or carved from `train/` with `config`'s
            seed and `test_fraction`).
        test_files: the test split's files the model's run recorded
            (`Splits.test_files`), scored instead of a split made again from data that
            may have grown since (`recorded_test_examples`); not used with `source`.
        label_format: how a manifest's labels are read (see `load_splits`).

    Raises:
        ConfigError: unusable data, or classes that differ from `class_names`.
    """
    if source is None and test_files is not None:
        return recorded_test_examples(config, class_names, test_files, label_format)
    if source and source.startswith("folder:"):
        from kcls.data.folder import decode_files, scan_folder

        files = scan_folder(source.partition(":")[2])
        found = files.class_names
        # A root of split folders: its test split (`test/`, or carved from `train/` as
        # the model's training would carve it), never the images it trains on.
        selected = (np.arange(len(files.paths)) if files.splits is None
                    else folder_split_indices(files, config)[2])
        paths = [files.paths[index] for index in selected]
        held_out = HeldOut(decode_files(paths, files.labels[selected], files.skipped),
                           files.skipped, paths)
    else:
        # Another source is scored on its own test split, never the model's test_source.
        other = (dataclasses.replace(config, source=source, test_source=None) if source
                 else config)
        splits = load_splits(other, label_format)
        found = splits.class_names
        held_out = HeldOut(splits.test, splits.skipped, splits.test_files)
    if found != class_names:
        raise ConfigError(
            f"The evaluation data's classes {found} are not the model's classes "
            f"{class_names}; evaluate on data with the same class folders or labels (for a "
            "manifest, the model's labels.txt beside it).")
    return held_out


def split_folders_note(source: str) -> str | None:
    """What `test_examples` scores of `source` when it is a folder of split folders (a
    line for `kcls evaluate`'s log), else None."""
    from kcls.data.folder import split_folders

    kind, _, argument = source.partition(":")
    if kind != "folder" or not Path(argument).is_dir():
        return None
    given = split_folders(Path(argument))
    if given is None:
        return None
    if "test" in given:
        return f"{source} holds split folders: scoring its test split, {given['test']}"
    return (f"{source} holds split folders without a test folder: scoring the test split "
            f"carved from {given['train']} (the model's data.seed and data.test_fraction, "
            "as its training run carved it)")


def recorded_test_examples(config: DataConfig, class_names: list[str], test_files: list[str],
                           label_format: LabelFormat = "class_index") -> HeldOut:
    """The test files a run recorded, read from its folder or manifest as it is now.

    The files keep the labels the source gives them now (by class name, so a class
    folder added since changes nothing); a recorded file that is gone, no longer of one
    of the model's classes, or unreadable is skipped and named, never replaced by
    another image.

    Raises:
        ConfigError: the source is not made of files, or none of the files is left.
    """
    from kcls.data.folder import decode_files

    paths, labels, names, unreadable = _source_files(config, label_format)
    labels, known = _relabel(np.asarray(labels), names, class_names)
    position = {path: index for index, path in enumerate(paths)}
    kept = [position[path] for path in test_files if path in position and known[position[path]]]
    unreadable = set(unreadable)
    skipped = [path if path in unreadable else f"{path} (no longer in {config.source} under "
               "one of the model's classes)" for path in test_files
               if path not in position or not known[position[path]]]
    if not kept:
        raise ConfigError(
            f"None of the {len(test_files)} test images the run recorded is in "
            f"{config.source} any more (first: {test_files[0] if test_files else 'none'}); "
            "evaluate on other data with --data SOURCE.")
    files = [paths[index] for index in kept]
    return HeldOut(decode_files(files, labels[kept], skipped), skipped, files)


FILE_SOURCES = ("folder", "manifest")


def has_files(config: DataConfig) -> bool:
    """Whether `config.source` is made of image files (`Splits.test_files` is known)."""
    return config.source.partition(":")[0] in FILE_SOURCES


def _source_files(config: DataConfig, label_format: LabelFormat
                  ) -> tuple[list[str], np.ndarray, list[str], list[str]]:
    """`(paths, labels, class_names, unreadable files)` of a folder or manifest source,
    and of its `data.test_source` (whose files are its test split)."""
    if config.test_source:
        files = file_splits(config, label_format)
        return list(files.paths), files.labels, files.class_names, files.skipped
    kind, _, argument = config.source.partition(":")
    if kind == "folder":
        from kcls.data.folder import scan_folder

        files = scan_folder(argument)
        return files.paths, files.labels, files.class_names, files.skipped
    if kind == "manifest":
        from kcls.data.manifest import read_manifest

        files = read_manifest(argument, label_format)
        return files.paths, files.targets, files.class_names, []  # rows named in warnings
    raise ConfigError(f"{config.source!r} is not a source of files: its test split cannot "
                      "be read back from a list of files.")


def _relabel(labels: np.ndarray, names: list[str], class_names: list[str]
             ) -> tuple[np.ndarray, np.ndarray]:
    """Labels over classes `names` as labels over `class_names` (matched by name), and
    whether each example still has one of them: `(labels, known bool [N])`."""
    if names == class_names:
        return labels, np.ones(len(labels), bool)
    if labels.ndim == 1:  # class indices
        mapping = np.asarray([class_names.index(name) if name in class_names else -1
                              for name in names], np.int64)
        relabelled = mapping[labels]
        return np.maximum(relabelled, 0), relabelled >= 0
    columns = [labels[:, names.index(name)] if name in names else np.zeros(len(labels))
               for name in class_names]  # multi-hot
    relabelled = np.stack(columns, axis=1).astype(labels.dtype)
    return relabelled, relabelled.sum(axis=1) > 0


def splits_from_arrays(images: np.ndarray, labels: np.ndarray, class_names: list[str],
                       config: DataConfig) -> Splits:
    """Splits in-memory examples into stratified, seeded train/validation/test datasets.

    Args:
        images: uint8 array `(N, H, W, 3)`.
        labels: int array `(N,)` with values in `[0, len(class_names))`.
        class_names: list[str], one name per class.
        config: DataConfig, for `test_fraction`, `validation_fraction` and `seed`.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(
            f"Array images must be uint8 of shape (N, H, W, 3); got {images.dtype} "
            f"{images.shape}.")
    labels = np.asarray(labels, np.int64)
    indices = checked_split_indices(labels, class_names, config)
    return _indexed_splits(
        indices, lambda selected: tf.data.Dataset.from_tensor_slices(
            (images[selected], labels[selected])),
        class_names, labels, skipped=[],
        source=fingerprint(images.shape, images.tobytes(), labels.tobytes(), class_names))


@dataclass
class FileSplits:
    """The files of a folder or a manifest and their splits, before any image is read.

    Attributes:
        paths: str array `(N,)` of the image files that passed the scan.
        labels: int64 `(N,)` class indices (folders) or float32 `(N, C)` multi-hot labels
            (manifests).
        class_names: list[str], label `i` is `class_names[i]`.
        indices: `train`, `validation`, `test` -> int array of indices into `paths`; the
            training indices in a seeded random order, the others sorted.
        skipped: list[str], the files (or manifest rows) the scan skipped; decoding
            appends to it.
        fingerprint: hex digest of the files (names, labels, sizes, modification times)
            and of the splits.
        sizes: int64 `(N,)` file sizes in bytes.
    """

    paths: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    indices: dict[str, np.ndarray]
    skipped: list[str]
    fingerprint: str
    sizes: np.ndarray


def file_splits(config: DataConfig, label_format: LabelFormat = "class_index") -> FileSplits:
    """Scans a `folder:` or `manifest:` source (names and headers only, see
    `kcls.data.folder`) and splits it: for folders, the split folders they give with the
    missing splits carved stratified by class (`folder_split_indices`), for manifests
    (read with `label_format`, see `load_splits`), the `split` column or seeded splits
    (stratified for class labels, random for label sets). With `data.test_source`, every
    file of that source is the test split and none is carved from `data.source`
    (`_with_test_source`). With `data.drop_leaks` the training copies of held-out images
    leave the training split (`kcls.data.leaks`), so every command that reads the
    training split (runs, `kcls optimize`, packs) reads the same one.

    Raises:
        ConfigError: another kind of source, or data that cannot be split.
    """
    if config.test_source:
        files = _with_test_source(config, label_format)
    else:
        files = _split_source(config, label_format)
    return drop_leaked(files)[0] if config.drop_leaks else files


def drop_leaked(files: FileSplits, groups: list[DuplicateGroup] | None = None
                ) -> tuple[FileSplits, list[str]]:
    """`files` without the training copies of held-out images (`data.drop_leaks`), and
    those files.

    Args:
        files: FileSplits.
        groups: the groups of copies across its splits (`kcls.data.duplicates.leak_groups`,
            found here when None).

    The training order of the rest is kept; the fingerprint covers the change, so an
    on-disk cache or a run of the full training split is never taken for this one.
    Without a training copy to drop, `files` is returned as it is.
    """
    splits = split_names(files.indices, len(files.paths))
    if groups is None:
        groups = leak_groups(files.paths.tolist(), files.labels, splits)
    dropped = leaked_training_copies(groups, splits)
    if not dropped:
        return files, []
    train = files.indices["train"]
    names = sorted(files.paths[index] for index in dropped)
    return dataclasses.replace(
        files, indices={**files.indices, "train": train[~np.isin(train, dropped)]},
        fingerprint=fingerprint(files.fingerprint, "drop_leaks", names)), names


def _split_source(config: DataConfig, label_format: LabelFormat,
                  test_fraction: float | None = None) -> FileSplits:
    """`file_splits` of `config.source` alone, carving `test_fraction` (default
    `config.test_fraction`; 0 carves no test split) where the source gives none."""
    kind, _, argument = config.source.partition(":")
    if kind == "folder":
        from kcls.data.folder import scan_folder

        files = scan_folder(argument)
        paths, labels, class_names = files.paths, files.labels, files.class_names
        indices = folder_split_indices(files, config, test_fraction)
        split_names = files.splits
    elif kind == "manifest":
        from kcls.data.manifest import read_manifest

        files = read_manifest(argument, label_format)
        paths, labels, class_names = files.paths, files.targets, files.class_names
        indices = _manifest_split_indices(argument, files, config, test_fraction)
        split_names = files.splits
    else:
        raise ConfigError(f"data.source={config.source!r} is not a folder:PATH or "
                          "manifest:PATH.csv source.")
    stamps = files.stamps
    return FileSplits(
        np.asarray(paths, dtype=str), labels, class_names,
        dict(zip(("train", "validation", "test"), indices)), files.skipped,
        fingerprint(paths, labels.tobytes(), split_names, class_names, stamps,
                    [index.tolist() for index in indices]),
        np.asarray([size for size, _ in stamps], np.int64))


def _with_test_source(config: DataConfig, label_format: LabelFormat) -> FileSplits:
    """The training and validation splits of `data.source` (no test split carved) and
    every file of `data.test_source` as the test split.

    Raises:
        ConfigError: `data.source` gives its own test split, or the two sources' classes
            differ (one line naming both).
    """
    main = _split_source(config, label_format, test_fraction=0.0)
    if len(main.indices["test"]):
        raise ConfigError(
            f"data.source={config.source} has its own test split ({len(main.indices['test'])} "
            f"images: a test/ folder or split column) and data.test_source={config.test_source} "
            "gives another: keep one of them.")
    paths, labels, class_names, skipped, stamps = _all_files(config.test_source, label_format)
    if class_names != main.class_names:
        raise ConfigError(
            f"data.test_source={config.test_source} has classes {class_names} and data.source="
            f"{config.source} has {main.class_names}: a test set must have the training "
            "classes (the same class folders or labels).")
    offset = len(main.paths)
    indices = {**main.indices, "test": np.arange(offset, offset + len(paths))}
    return FileSplits(
        np.concatenate([main.paths, np.asarray(paths, dtype=str)]),
        np.concatenate([main.labels, np.asarray(labels, main.labels.dtype)]), class_names,
        indices, main.skipped + skipped,
        fingerprint(main.fingerprint, config.test_source, paths, np.asarray(labels).tobytes(),
                    stamps),
        np.concatenate([main.sizes, np.asarray([size for size, _ in stamps], np.int64)]))


def _all_files(source: str, label_format: LabelFormat
               ) -> tuple[list[str], np.ndarray, list[str], list[str], list[Any]]:
    """Every file of a folder or manifest source, unsplit: `(paths, labels, class_names,
    skipped, stamps)`; a folder of split folders is refused (which split would it be?)."""
    kind, _, argument = source.partition(":")
    if kind == "folder":
        from kcls.data.folder import scan_folder

        files = scan_folder(argument)
        if files.splits is not None:
            raise ConfigError(
                f"data.test_source={source} is a folder of split folders (train/, val/, "
                "test/): point it at the folder of class folders to test on, e.g. "
                f"folder:{Path(argument) / 'test'}.")
        return list(files.paths), files.labels, files.class_names, files.skipped, files.stamps
    from kcls.data.manifest import read_manifest

    files = read_manifest(argument, label_format)
    return list(files.paths), files.targets, files.class_names, files.skipped, files.stamps


def decoded_splits(files: FileSplits) -> Splits:
    """The splits of `files` as datasets that decode the images when read."""
    from kcls.data.folder import decode_files

    def dataset(selected: np.ndarray) -> tf.data.Dataset:
        # A file that fails to decode is added to `files.skipped`, the list
        # `Splits.skipped` reports, instead of vanishing.
        return decode_files(files.paths[selected], files.labels[selected], files.skipped)

    indices = files.indices
    return _indexed_splits((indices["train"], indices["validation"], indices["test"]),
                           dataset, files.class_names, files.labels, files.skipped,
                           files.fingerprint, files.paths)


def _pack_splits(folder: str) -> Splits:
    """The splits of the pack in `folder` (`kcls data pack`), frozen when it was packed:
    `DataConfig`'s seed and fractions do not split it again. `skipped` starts with the
    files the pack skipped; `fingerprint` is the pack's."""
    from kcls.data.tfrecord import SPLIT_NAMES, read_pack, split_examples

    pack = read_pack(folder)
    skipped = list(pack.manifest["skipped"])
    datasets = {name: split_examples(pack, name, skipped)
                for name in SPLIT_NAMES if pack.split(name)["examples"]}
    if "train" not in datasets or "test" not in datasets:
        raise ConfigError(f"data.source=tfrecord:{folder}: the pack has no training or no "
                          "test examples; pack a source with more images.")
    return Splits(datasets["train"], datasets.get("validation"), datasets["test"],
                  pack.class_names,
                  {name: int(pack.split(name)["examples"]) for name in SPLIT_NAMES},
                  skipped=skipped, train_labels=pack.train_labels(),
                  fingerprint=pack.manifest["fingerprint"])


def _indexed_splits(indices: tuple[np.ndarray, np.ndarray, np.ndarray],
                    dataset: Callable[[np.ndarray], tf.data.Dataset], class_names: list[str],
                    labels: np.ndarray, skipped: list[str], source: str,
                    files: np.ndarray | None = None) -> Splits:
    """Splits of the examples at `(train, validation, test)` indices (`dataset` makes the
    examples of given indices, in their order; `labels` are all examples' labels, `files`
    their image files, for `Splits.test_files`)."""
    train, validation, test = indices
    return Splits(dataset(train), dataset(validation) if len(validation) else None,
                  dataset(test), list(class_names),
                  {"train": len(train), "validation": len(validation), "test": len(test)},
                  skipped=skipped, train_labels=labels[train], fingerprint=source,
                  test_files=None if files is None else files[test].tolist())


def _manifest_split_indices(manifest: str, files: Any, config: DataConfig,
                            test_fraction: float | None = None
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The manifest's own splits (its `split` column, `ManifestFiles.splits`), else
    stratified seeded splits of class labels (as for folders) or seeded random ones of
    label sets (multi-label sets cannot be stratified by one class)."""
    if files.splits is not None:
        named = np.asarray(files.splits)
        train, validation, test = (np.flatnonzero(named == name)
                                   for name in ("train", "validation", "test"))
        train = np.random.default_rng(config.seed).permutation(train)
    elif files.targets.ndim == 1:  # class indices
        return checked_split_indices(files.targets, files.class_names, config, test_fraction)
    else:
        order = np.random.default_rng(config.seed).permutation(len(files.paths))
        fraction = config.test_fraction if test_fraction is None else test_fraction
        test_count = int(np.ceil(fraction * len(order)))
        validation_count = int(np.ceil(config.validation_fraction * (len(order) - test_count)))
        test, validation, train = (np.sort(order[:test_count]),
                                   np.sort(order[test_count:test_count + validation_count]),
                                   order[test_count + validation_count:])
    if not len(train) or (not len(test) and test_fraction != 0.0):
        raise ConfigError(
            f"Manifest {manifest!r} leaves {len(train)} training and {len(test)} test "
            "images; both need at least one (check its split column or data.test_fraction).")
    return train, validation, test


def folder_split_indices(files: Any, config: DataConfig, test_fraction: float | None = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The `(train, validation, test)` indices of a folder's files (`FolderFiles`): its
    split folders (`given_split_indices`), else stratified seeded splits
    (`checked_split_indices`); `test_fraction` instead of `config`'s (0: none carved)."""
    if files.splits is None:
        return checked_split_indices(files.labels, files.class_names, config, test_fraction)
    return given_split_indices(files.labels, files.class_names, files.splits, config,
                               test_fraction)


def given_split_indices(labels: np.ndarray, class_names: list[str], named: list[str],
                        config: DataConfig, test_fraction: float | None = None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The splits a folder of split folders gives, the missing ones carved from its
    training split the way `checked_split_indices` carves a folder.

    Without a test folder the test split is `data.test_fraction` of `train/` (never of
    `val/`: the validation images stay the ones given); without a validation folder the
    validation split is `data.validation_fraction` of what `train/` keeps. The fractions
    size carved splits only. Given validation and test images are never carved or moved,
    so a given test split never trains.

    Args:
        labels: int array `(N,)`.
        class_names: list[str], one per class.
        named: the split of each example, `train`, `validation` or `test`.
        config: DataConfig, for the fractions and `seed`.
        test_fraction: instead of `config.test_fraction` (0: no test split carved).

    Returns:
        `(train, validation, test)` int arrays: the training indices in a seeded random
        order, the others sorted.
    """
    test_fraction = config.test_fraction if test_fraction is None else test_fraction
    named = np.asarray(named)
    given = {split: np.flatnonzero(named == split) for split in ("train", "validation", "test")}
    train = given["train"]
    carved = checked_split_indices(
        labels[train], class_names, config,
        test_fraction=0.0 if len(given["test"]) else test_fraction,
        validation_fraction=0.0 if len(given["validation"]) else config.validation_fraction)
    train_kept, validation, test = (train[part] for part in carved)
    return (train_kept, given["validation"] if len(given["validation"]) else validation,
            given["test"] if len(given["test"]) else test)


def fingerprint(*parts: object) -> str:
    """A hex digest of `parts` (bytes, or anything JSON can write)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else json.dumps(part).encode())
    return digest.hexdigest()


def checked_split_indices(labels: np.ndarray, class_names: list[str], config: DataConfig,
                          test_fraction: float | None = None,
                          validation_fraction: float | None = None
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`split_indices` of examples `0..N-1`, with errors and warnings users can act on.

    Args:
        labels: int array `(N,)`.
        class_names: list[str], one per class.
        config: DataConfig, for `test_fraction`, `validation_fraction` and `seed`.
        test_fraction, validation_fraction: float, instead of `config`'s (0 carves no
            such split: a folder that gives it, `given_split_indices`).

    Raises:
        ConfigError: fewer than two classes, or a class too small for the split (the
            message gives the examples per class and the fixes).
    """
    labels = np.asarray(labels, dtype=np.int64)
    test_fraction = config.test_fraction if test_fraction is None else test_fraction
    validation_fraction = (config.validation_fraction if validation_fraction is None
                           else validation_fraction)
    counts = np.bincount(labels, minlength=len(class_names))
    per_class = ", ".join(f"{name} {count}" for name, count in zip(class_names, counts))
    if np.count_nonzero(counts) < 2:
        raise ConfigError(
            f"The data has examples of {np.count_nonzero(counts)} class(es) ({per_class}); "
            "a classifier needs at least two classes. Add the missing classes' images.")
    try:
        train_indices, validation_indices, test_indices = split_indices(
            labels, config, test_fraction, validation_fraction)
    except ValueError:  # scikit-learn: a class or a split too small to stratify
        smallest = class_names[int(np.argmin(np.where(counts > 0, counts, counts.max() + 1)))]
        test = int(np.ceil(test_fraction * len(labels)))  # scikit-learn's rounding
        validation = int(np.ceil(validation_fraction * (len(labels) - test)))
        raise ConfigError(
            f"Cannot make a stratified split with data.test_fraction={test_fraction} "
            f"and data.validation_fraction={validation_fraction} of these examples "
            f"per class: {per_class} (smallest: {smallest}; the splits would hold test "
            f"{test}, validation {validation} examples for {np.count_nonzero(counts)} "
            "classes). Every class needs at least two examples for "
            "each split carved off, and each split at least one example per class: add "
            "images to the smallest classes, or change the fractions "
            "(data.validation_fraction=0 turns validation off).") from None
    _warn_about_missing_classes(labels, class_names, counts, {
        "train": train_indices, "validation": validation_indices, "test": test_indices})
    return train_indices, validation_indices, test_indices


def _warn_about_missing_classes(labels: np.ndarray, class_names: list[str],
                                counts: np.ndarray, splits: dict[str, np.ndarray]) -> None:
    """Warns about each class without an example in a non-empty split (`counts`: the
    examples per class in all splits)."""
    for split, indices in splits.items():
        if not len(indices):
            continue
        in_split = np.bincount(labels[indices], minlength=len(class_names))
        for index in np.flatnonzero(in_split == 0):
            name = class_names[index]
            warnings.warn(
                f"Class {name!r} has 0 {split} examples (of {counts[index]} in all): "
                + ("the model cannot learn it. " if split == "train" else
                   f"its {split} metrics are missing. ")
                + "Add images of it, or change data.test_fraction / "
                "data.validation_fraction.", UserWarning, stacklevel=3)


def split_indices(labels: np.ndarray, config: DataConfig, test_fraction: float | None = None,
                  validation_fraction: float | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The train, validation and test indices of examples with `labels`.

    Stratified and seeded: `config.test_fraction` of the examples is held out for
    testing, then `config.validation_fraction` of the rest for validation (or the
    fractions given instead; 0 holds nothing out). This is the split `load_splits`
    makes of sources without their own splits (arrays, folders of class folders).

    Returns:
        `(train, validation, test)` int arrays: the training indices in a seeded random
        order, the validation and test indices sorted.
    """
    labels = np.asarray(labels, dtype=np.int64)
    indices = np.arange(len(labels))
    test_fraction = config.test_fraction if test_fraction is None else test_fraction
    validation_fraction = (config.validation_fraction if validation_fraction is None
                           else validation_fraction)
    train, test = _stratified_split(indices, labels, test_fraction, config.seed)
    train, validation = _stratified_split(train, labels[train], validation_fraction,
                                          config.seed)
    # Folders are listed class by class, and a shuffle buffer smaller than the split
    # would fill batches from one or two classes: shuffle the order once, as
    # keras.utils.image_dataset_from_directory does.
    return np.random.default_rng(config.seed).permutation(train), validation, test


CALIBRATION_FRACTION = 0.1


def carve_calibration_split(splits: Splits, fraction: float = CALIBRATION_FRACTION
                            ) -> tuple[Splits, tf.data.Dataset]:
    """Holds `fraction` of the training split out, for fitting a calibration temperature.

    For recipes without a validation split (`kcls.config.EvaluateConfig.calibrate`): the
    first `ceil(fraction * train)` training examples (the training split is in a seeded
    random order for arrays and folders, TFDS's order otherwise) no longer train.

    Returns:
        `(splits without them, the held-out examples)`; the new splits' `fingerprint`
        differs, so an on-disk cache of the full training split is never replayed.
    """
    count = int(np.ceil(fraction * splits.sizes["train"]))
    if not 0 < count < splits.sizes["train"]:
        raise ConfigError(
            f"Cannot hold {fraction:.0%} of {splits.sizes['train']} training examples out "
            "for evaluate.calibrate=temperature; use more data, a validation split "
            "(data.validation_fraction > 0) or evaluate.calibrate=none.")
    carved = dataclasses.replace(
        splits, train=splits.train.skip(count),
        sizes={**splits.sizes, "train": splits.sizes["train"] - count},
        train_labels=None if splits.train_labels is None else splits.train_labels[count:],
        fingerprint=fingerprint(splits.fingerprint, "calibration", count))
    return carved, splits.train.take(count)


def train_class_counts(splits: Splits) -> np.ndarray:
    """Training examples per class: int64 `[len(class_names)]`.

    Reads the labels the source kept, or makes one pass over the training split
    (decoding its images) when it kept none, as for TFDS.
    """
    labels = splits.train_labels
    if labels is None:
        labels = np.fromiter((label for _, label in splits.train.as_numpy_iterator()),
                             dtype=np.int64)
    return np.bincount(labels, minlength=len(splits.class_names)).astype(np.int64)


def _stratified_split(indices: np.ndarray, labels: np.ndarray, fraction: float,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits `indices` into (kept, held_out) with `fraction` held out, class-stratified."""
    if fraction == 0:
        return indices, indices[:0]
    kept, held_out = train_test_split(indices, test_size=fraction, random_state=seed,
                                      stratify=labels)
    return np.sort(kept), np.sort(held_out)


def _sklearn_arrays(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if name != "digits":
        raise ConfigError(
            f"Unknown scikit-learn dataset {name!r}: only 'sklearn:digits' is bundled.")
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are ink counts 0..16; scale to 0..255 and replicate to 3 channels.
    gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(gray[..., np.newaxis], 3, axis=-1)
    return images, digits.target.astype(np.int64), [str(c) for c in digits.target_names]


def _tfds_splits(name: str, config: DataConfig) -> Splits:
    import tensorflow_datasets as tfds

    builder = tfds_builder(name, config)
    features = builder.info.features
    label_key = next((key for key in ("label", "labels") if key in features), None)
    if "image" not in features or label_key is None:
        raise ConfigError(f"TFDS dataset {name!r} has no 'image' and 'label' (or 'labels') "
                          "features.")
    # A sequence of class labels (e.g. `labels: Sequence(ClassLabel)`) is multi-label:
    # examples then carry float32 multi-hot [C] labels.
    label_sets = isinstance(features[label_key], tfds.features.Sequence)
    class_feature = features[label_key].feature if label_sets else features[label_key]
    class_names = list(class_feature.names)

    def load(split: str) -> tf.data.Dataset:
        if not label_sets:
            dataset = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
            return dataset.map(_as_rgb_example, num_parallel_calls=tf.data.AUTOTUNE)
        dataset = builder.as_dataset(split=split, shuffle_files=False)
        return dataset.map(lambda example: _as_rgb_example(
            example["image"], multi_hot(example[label_key], len(class_names))),
            num_parallel_calls=tf.data.AUTOTUNE)

    def count(split: str) -> int:
        try:
            return int(builder.info.splits[split].num_examples)
        except (KeyError, ValueError):
            raise ConfigError(
                f"TFDS dataset {name!r} has no split {split!r}; it has "
                f"{', '.join(builder.info.splits)}. Slices like 'train[:90%]' work too.") from None

    train_count, test_count = count(config.train_split), count(config.test_split)
    test = load(config.test_split)
    source = fingerprint(name, str(builder.version), str(builder.data_dir))
    if "validation" in builder.info.splits and config.validation_fraction > 0:
        return Splits(load(config.train_split), load("validation"), test, class_names,
                      {"train": train_count, "validation": count("validation"),
                       "test": test_count}, fingerprint=source)
    # No validation split: carve one off the training split. TFDS stores examples in a
    # fixed shuffled order, so its first examples are a reproducible random subset.
    validation_count = int(round(train_count * config.validation_fraction))
    train = load(config.train_split)
    validation = train.take(validation_count) if validation_count else None
    return Splits(train.skip(validation_count), validation, test, class_names,
                  {"train": train_count - validation_count, "validation": validation_count,
                   "test": test_count}, fingerprint=source)


def tfds_builder(name: str, config: DataConfig) -> Any:
    """The TFDS builder of dataset `name`, prepared in `config.data_dir` (TFDS's default
    folder when None).

    With `data.download=auto` a dataset that is not prepared yet is downloaded and
    prepared by TFDS itself (`download_and_prepare`: its URLs, checksums and progress
    bars; files it has to be given by hand are read from `<data_dir>/downloads/manual`);
    with `never` kcls refuses instead.

    Returns:
        A `tfds.core.DatasetBuilder` whose `as_dataset` reads the prepared files.

    Raises:
        ConfigError: an unknown name, a dataset that is not prepared with
            `data.download=never`, or one that cannot be downloaded (no network, files
            missing from the manual folder); the message names the dataset and the way
            around.
    """
    import tensorflow_datasets as tfds

    require_choice(config.download, DownloadPolicy, "data.download")
    try:
        builder = tfds.builder(name, data_dir=config.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ConfigError(
            f"TFDS has no dataset named {name!r} (data.source=tfds:{name}). "
            "See https://www.tensorflow.org/datasets/catalog for the names.") from None
    if builder.is_prepared():
        return builder
    elsewhere = (f"prepare it where there is internet (`tfds build {name} --data_dir DIR`) "
                 "and point kcls at it with --set data.data_dir=DIR, or train on local images "
                 "with --set data.source=folder:PATH (one sub-folder per class)")
    if config.download == "never":
        raise ConfigError(
            f"TFDS dataset {name!r} is not prepared in {str(builder.data_dir)!r} and "
            f"data.download=never: {elsewhere}, or let TFDS download it with "
            "--set data.download=auto.")
    try:
        builder.download_and_prepare()
    except (OSError, tfds.download.DownloadError) as error:  # requests' errors are OSErrors
        raise ConfigError(
            f"Could not download TFDS dataset {name!r} into {str(builder.data_dir)!r} "
            f"({type(error).__name__}: {str(error)[:160]}; no internet?): {elsewhere}."
        ) from None
    except AssertionError:  # TFDS's way of saying the manual download folder is empty
        if not getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
            raise
        # TFDS's default download folder: `downloads/` beside the dataset folders.
        manual = Path(builder.data_dir).parents[1] / "downloads" / "manual"
        raise ConfigError(
            f"TFDS dataset {name!r} needs files downloaded by hand: put them into "
            f"{str(manual)!r} as its MANUAL_DOWNLOAD_INSTRUCTIONS say (`tfds build {name}` "
            "prints them), then run again.") from None
    return builder


def _as_rgb_example(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Grayscale and RGBA become RGB; class labels become int64 (multi-hot ones stay)."""
    image = tf.image.grayscale_to_rgb(image) if image.shape[-1] == 1 else image[..., :3]
    return image, tf.cast(label, tf.int64) if label.dtype.is_integer else label


def multi_hot(classes: tf.Tensor, num_classes: int) -> tf.Tensor:
    """float32 `[num_classes]` with 1 at each of the int `classes` `[K]` (K may be 0).

    >>> multi_hot(tf.constant([2, 0, 2]), 4).numpy().tolist()
    [1.0, 0.0, 1.0, 0.0]
    """
    counts = tf.reduce_sum(tf.one_hot(classes, num_classes), axis=0)
    return tf.minimum(counts, 1.0)
