"""Manifest sources: a CSV file listing images and their labels, for multi-label data.

`data.source=manifest:PATH.csv` reads a CSV with a header and the columns

- `path`: the image file, relative to the manifest's folder (or absolute);
- `labels`: the image's labels separated by `;` (e.g. `cat;dog`), one or more;
- `split` (optional): `train`, `validation` or `test`. With it the manifest fixes the
  splits (the mosaic set needs this: no source image in two splits); without it
  kcls carves seeded random splits of `data.test_fraction` and
  `data.validation_fraction`.

Class names are the labels of `labels.txt` beside the manifest (one per line), when
present, else the sorted set of labels the manifest uses.

Rows that cannot train are skipped, counted and named, never dropped silently
(`ManifestFiles.skipped`, which `Splits.skipped` reports in run.json and the report):
a missing, unreadable or undecodable image (the checks of folder sources,
`kcls.data.folder.check_images`), an empty label set, a label not in `labels.txt`, and
a repeated path (the first row counts). A manifest that cannot be read at all (no such
file, not UTF-8 text, no `path`/`labels` columns, an unknown split name, a label that
cannot be a class name (control or line-separator characters, as for folder class
names), or no usable row) is a `ConfigError` naming the fix. A UTF-8 byte-order mark
(Excel's "CSV UTF-8") is read as text, not as part of the first column's name.

Example:

>>> files = read_manifest("/tmp/mosaics/manifest.csv")  # doctest: +SKIP
>>> files.targets.shape  # float32 multi-hot (N, C)
(2500, 10)
"""

from __future__ import annotations

import collections
import csv
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kcls.config import ConfigError
from kcls.data.folder import check_images, class_name_problem, printable_path
from kcls.layout import MANIFEST_LABELS_FILE

LABEL_SEPARATOR = ";"
SPLIT_NAMES = ("train", "validation", "test")


@dataclass
class ManifestFiles:
    """The usable rows of a manifest.

    Attributes:
        paths: list[str] of image files.
        targets: float32 `(len(paths), C)` multi-hot labels.
        class_names: list[str], label `c` is `class_names[c]`.
        splits: list[str] per path (`train`, `validation`, `test`), or None when the
            manifest has no `split` column.
        skipped: list[str], one `row N (path): reason` entry per skipped row.
    """

    paths: list[str]
    targets: np.ndarray
    class_names: list[str]
    splits: list[str] | None
    skipped: list[str] = field(default_factory=list)


def read_manifest(manifest: str | Path) -> ManifestFiles:
    """Reads and checks a manifest CSV (see the module docstring).

    Raises:
        ConfigError: the manifest is missing or malformed, or has no usable row.
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise ConfigError(
            f"Manifest {str(manifest)!r} does not exist. Pass data.source=manifest:PATH.csv, "
            "a CSV with columns path,labels (labels separated by ';').")
    reader = csv.DictReader(io.StringIO(read_text(manifest), newline=""))
    if reader.fieldnames:  # "path, labels" (a space after the comma) is fine too
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
    rows = list(reader)
    columns = list(rows[0].keys()) if rows else []
    if "path" not in columns or "labels" not in columns:
        raise ConfigError(
            f"Manifest {str(manifest)!r} needs a header row with the columns path,labels "
            "(and optionally split); it has "
            f"{', '.join(repr(column) for column in columns) or 'no rows'}.")
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
        labels = [label.strip() for label in (row.get("labels") or "").split(LABEL_SEPARATOR)]
        labels = sorted({label for label in labels if label})
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
            skip(number, path, "empty label set", "empty label sets")
        elif unknown:
            skip(number, path, f"unknown label(s) {', '.join(unknown)} (not in "
                 f"{MANIFEST_LABELS_FILE})", "unknown labels")
        else:
            resolved = Path(path) if Path(path).is_absolute() else manifest.parent / path
            kept.append((number, resolved, labels, split))
    usable = check_images(manifest.parent, [path for _, path, _, _ in kept])
    for (number, _, _, _), ok in zip(kept, usable):
        if not ok:
            # Named as the manifest writes it (row 1 is the header).
            skip(number, printable_path(rows[number - 2]["path"].strip()),
                 "missing, unreadable or undecodable image",
                 "missing or undecodable images")
    kept = [entry for entry, ok in zip(kept, usable) if ok]
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
    index = {name: position for position, name in enumerate(class_names)}
    targets = np.zeros((len(kept), len(class_names)), np.float32)
    for row, (_, _, labels, _) in enumerate(kept):
        targets[row, [index[label] for label in labels]] = 1.0
    splits = None if "split" not in columns else [split for _, _, _, split in kept]
    return ManifestFiles([str(path) for _, path, _, _ in kept], targets, class_names, splits,
                         skipped)


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
