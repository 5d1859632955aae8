"""Manifest sources: a CSV file listing images and their labels.

`data.source=manifest:PATH.csv` reads a CSV with a header and the columns

- `path`: the image file, relative to the manifest's folder (or absolute);
- `label`: the image's class (`cat`), for single-label data (`model.task=multiclass`,
  the default); or `labels`: the image's labels separated by `;` (`cat;dog`), one or
  more, for multi-label data (`model.task=multilabel`). The recipe's task decides
  which column is read (`kcls.config.Recipe.label_format`), nothing is guessed from
  the file: a manifest with the other column is refused, naming the column expected;
- `split` (optional): `train`, `validation` or `test`. With it the manifest fixes the
  splits (the mosaic set needs this: no source image in two splits); without it
  kcls carves seeded splits of `data.test_fraction` and `data.validation_fraction`
  (stratified by class for single-label manifests, as for folders).

Class names are the labels of `labels.txt` beside the manifest (one per line), when
present, else the sorted set of labels the manifest uses.

Rows that cannot train are skipped, counted and named, never dropped silently
(`ManifestFiles.skipped`, which `Splits.skipped` reports in run.json and the report):
a missing or unreadable image or one without a header TensorFlow decodes (the scan of
folder sources, `kcls.data.folder.check_images`; an image whose body fails to decode is
named by its path when the pipeline reads it), an empty label (set), a label not in
`labels.txt`, and a repeated path (the first row counts). A manifest that cannot be
read at all (no such file, not UTF-8 text, no `path` column or no label column of the
task (`label` or `labels`), an unknown split
name, a label that cannot be a class name (control or line-separator characters, as for
folder class names), or no usable row) is a `ConfigError` naming the fix. A UTF-8
byte-order mark (Excel's "CSV UTF-8") is read as text, not as part of the first
column's name.

Example:

>>> files = read_manifest("/tmp/mosaics/manifest.csv", "multi_hot")  # doctest: +SKIP
>>> files.targets.shape  # float32 multi-hot (N, C)
(2500, 10)
>>> read_manifest("/tmp/photos.csv", "class_index").targets.dtype  # doctest: +SKIP
dtype('int64')
"""

from __future__ import annotations

import collections
import csv
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kcls.config import TASK_CAPABILITIES, ConfigError, LabelFormat
from kcls.data.folder import SPLIT_NAMES, check_images, class_name_problem, printable_path
from kcls.layout import MANIFEST_LABELS_FILE

LABEL_SEPARATOR = ";"
# The column each label format reads, what its cell holds, and what an empty one is.
LABEL_COLUMNS: dict[str, tuple[str, str, str]] = {
    "class_index": ("label", "one class per image", "empty label"),
    "multi_hot": ("labels", "labels separated by ';'", "empty label set"),
}


@dataclass
class ManifestFiles:
    """The usable rows of a manifest.

    Attributes:
        paths: list[str] of image files.
        targets: int64 `(len(paths),)` class indices (`class_index`) or float32
            `(len(paths), C)` multi-hot labels (`multi_hot`).
        class_names: list[str], label `c` is `class_names[c]`.
        splits: list[str] per path (`train`, `validation`, `test`), or None when the
            manifest has no `split` column.
        skipped: list[str], one `row N (path): reason` entry per skipped row.
        stamps: list of `(size, mtime_ns)` per path, as the scan found them.
    """

    paths: list[str]
    targets: np.ndarray
    class_names: list[str]
    splits: list[str] | None
    skipped: list[str] = field(default_factory=list)
    stamps: list[tuple[int, int]] = field(default_factory=list)


def read_manifest(manifest: str | Path, label_format: LabelFormat) -> ManifestFiles:
    """Reads and checks a manifest CSV (see the module docstring).

    Args:
        manifest: the CSV file.
        label_format: `class_index` reads the `label` column (one class per row),
            `multi_hot` the `labels` column (label sets); `kcls.config.Recipe.label_format`.

    Raises:
        ConfigError: the manifest is missing or malformed (the label column of the other
            format included), or has no usable row.
    """
    manifest = Path(manifest)
    column, meaning, empty = LABEL_COLUMNS[label_format]
    if not manifest.is_file():
        raise ConfigError(
            f"Manifest {str(manifest)!r} does not exist. Pass data.source=manifest:PATH.csv, "
            f"a CSV with columns path,{column} ({meaning}).")
    reader = csv.DictReader(io.StringIO(read_text(manifest), newline=""))
    if reader.fieldnames:  # "path, labels" (a space after the comma) is fine too
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
    rows = list(reader)
    columns = list(rows[0].keys()) if rows else []
    _check_columns(manifest, columns, label_format)
    known = _known_labels(manifest)
    skipped: list[str] = []
    reasons: collections.Counter[str] = collections.Counter()
    first_row: dict[str, int] = {}
    kept: list[tuple[int, Path, list[str], str | None]] = []

    def skip(number: int, path: str, reason: str, kind: str) -> None:
        skipped.append(f"row {number} ({path}): {reason}")
        reasons[kind] += 1

    for number, row in enumerate(rows, start=2):  # row 1 is the header
        path = (row.get("path") or "").strip()
        labels = _row_labels(row.get(column) or "", label_format)
        _check_labels(labels, f"Manifest {str(manifest)!r} row {number}")
        split = (row.get("split") or "").strip() if "split" in columns else None
        if split is not None and split not in SPLIT_NAMES:
            raise ConfigError(
                f"Manifest {str(manifest)!r} row {number}: unknown split {split!r}; use "
                f"{', '.join(SPLIT_NAMES)}, or drop the split column for random splits.")
        if path in first_row:
            skip(number, path, f"duplicate of row {first_row[path]}", "duplicate rows")
            continue
        first_row[path] = number
        unknown = [label for label in labels if known is not None and label not in known]
        if not labels:
            skip(number, path, empty, f"{empty}s")
        elif unknown:
            skip(number, path, f"unknown label(s) {', '.join(unknown)} (not in "
                 f"{MANIFEST_LABELS_FILE})", "unknown labels")
        else:
            resolved = Path(path) if Path(path).is_absolute() else manifest.parent / path
            kept.append((number, resolved, labels, split))
    stamps = check_images([path for _, path, _, _ in kept])
    for (number, _, _, _), stamp in zip(kept, stamps):
        if not stamp:
            # Named as the manifest writes it (row 1 is the header).
            skip(number, printable_path(rows[number - 2]["path"].strip()),
                 "missing, unreadable or undecodable image",
                 "missing or undecodable images")
    kept, stamps = ([entry for entry, stamp in zip(kept, stamps) if stamp],
                    [stamp for stamp in stamps if stamp])
    if reasons:
        warnings.warn(
            f"Manifest {str(manifest)!r}: skipped {sum(reasons.values())} row(s): "
            + ", ".join(f"{count} {kind}" for kind, count in reasons.items())
            + " (each named in run.json's skipped_files and the report).",
            UserWarning, stacklevel=2)
    if not kept:
        raise ConfigError(f"Manifest {str(manifest)!r} has no usable row (skipped: "
                          f"{'; '.join(skipped[:3]) or 'no rows'}).")
    class_names = known or sorted({label for _, _, labels, _ in kept for label in labels})
    splits = None if "split" not in columns else [split for _, _, _, split in kept]
    return ManifestFiles([str(path) for _, path, _, _ in kept],
                         _targets([labels for _, _, labels, _ in kept], class_names,
                                  label_format),
                         class_names, splits, skipped, stamps)


def _check_columns(manifest: Path, columns: list[str], label_format: LabelFormat) -> None:
    """Refuses a manifest without `path` and the label column of `label_format`, naming
    the column expected and, for the other format's column, the task that reads it."""
    column, meaning, _ = LABEL_COLUMNS[label_format]
    if "path" in columns and column in columns:
        return
    task = next(name for name, capabilities in TASK_CAPABILITIES.items()
                if capabilities.label_format == label_format)
    other = next(((name, other_column) for name, (other_column, _, _) in LABEL_COLUMNS.items()
                  if other_column in columns and other_column != column), None)
    if "path" in columns and other is not None:
        other_task = next(name for name, capabilities in TASK_CAPABILITIES.items()
                          if capabilities.label_format == other[0])
        raise ConfigError(
            f"Manifest {str(manifest)!r} has a {other[1]!r} column, but model.task={task} "
            f"reads the column {column!r} ({meaning}): train it with --set "
            f"model.task={other_task}, or write a {column!r} column.")
    raise ConfigError(
        f"Manifest {str(manifest)!r} needs a header row with the columns path,{column} "
        f"({meaning}, for model.task={task}; and optionally split); it has "
        f"{', '.join(repr(name) for name in columns) or 'no rows'}.")


def _row_labels(cell: str, label_format: LabelFormat) -> list[str]:
    """The labels of one row's label cell: the class (`class_index`; the whole cell, a
    `;` included), or the sorted set of `;`-separated labels (`multi_hot`)."""
    if label_format == "class_index":
        return [cell.strip()] if cell.strip() else []
    return sorted({label.strip() for label in cell.split(LABEL_SEPARATOR) if label.strip()})


def _targets(labels: list[list[str]], class_names: list[str], label_format: LabelFormat
             ) -> np.ndarray:
    """int64 `(N,)` class indices (`class_index`) or float32 `(N, C)` multi-hot labels."""
    index = {name: position for position, name in enumerate(class_names)}
    if label_format == "class_index":
        return np.asarray([index[row[0]] for row in labels], np.int64)
    targets = np.zeros((len(labels), len(class_names)), np.float32)
    for row, row_labels in enumerate(labels):
        targets[row, [index[label] for label in row_labels]] = 1.0
    return targets


def read_text(path: Path) -> str:
    """The UTF-8 text of a manifest or `labels.txt`, a byte-order mark dropped (Excel's
    "CSV UTF-8" writes one).

    Raises:
        ConfigError: the file is not UTF-8 (e.g. latin-1): the message names the line.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ConfigError(
            f"{str(path)!r} is not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}, "
            "e.g. a latin-1 file): save it as UTF-8 (Excel: 'CSV UTF-8').") from None


def _check_labels(labels: list[str], where: str) -> None:
    """Refuses labels that cannot be class names (`kcls.data.folder.class_name_problem`)."""
    for label in labels:
        problem = class_name_problem(label)
        if problem:
            raise ConfigError(
                f"{where}: the label {label!r} cannot be a class name: {problem}, which would "
                "misalign the class names in the export's labels.txt. Rename the label.")


def _known_labels(manifest: Path) -> list[str] | None:
    """The class names of `labels.txt` beside the manifest, or None without one.

    Lines are split on newlines only: `str.splitlines` would also split on the line
    separators (U+2028, ...) a label cannot hold anyway.
    """
    labels_file = manifest.parent / MANIFEST_LABELS_FILE
    if not labels_file.is_file():
        return None
    names = [line.strip() for line in read_text(labels_file).split("\n") if line.strip()]
    _check_labels(names, str(labels_file))
    return names
