"""What slice each test image belongs to: a manifest column, or a folder of its path.

`kcls evaluate MODEL --slice-by BY` groups the evaluated images by

- `COLUMN`: the value of that column of the manifest (`manifest:PATH.csv`) in the
  image's row, e.g. `site`, `device`, `group`; any column but `path`;
- `path:N`: the N-th folder of the image's path below the source's root (the
  manifest's folder, or the `folder:` root): `path:1` the first folder below the root,
  `path:2` the second; `path:-1` the folder holding the file, `path:-2` its parent.
  For an image outside the root (an absolute manifest path elsewhere), its whole path.

An image without a value (an empty cell, a row shorter than the header, a path with too
few folders) is put in the slice `(missing)` (`MISSING_SLICE`), counted and ranked
like the others, never dropped: it was scored in the overall metrics, so the slices
add up to them, and images without the attribute often come from another pipeline
that behaves differently, which is worth seeing. A slicing that cannot apply (no
images from files, an unknown column, `path:0`) is a `ConfigError` naming the fix.

Example:

>>> slice_values("site", ["/data/a.png"], "manifest:/data/photos.csv")  # doctest: +SKIP
['north']
>>> slice_values("path:-1", ["/data/cats/a.png"], "folder:/data")
['cats']
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from kcls.config import ConfigError
from kcls.data.manifest import read_text

MISSING_SLICE = "(missing)"
PATH_SLICE_PREFIX = "path:"
SLICE_SYNTAX = ("a manifest column (--slice-by site) or a folder of the path (--slice-by "
                "path:1 the first folder below the root, path:-1 the folder holding the file)")


def slice_values(slice_by: str, files: list[str] | None, source: str) -> list[str]:
    """The slice of each evaluated image.

    Args:
        slice_by: `COLUMN` or `path:N` (module docstring).
        files: list[str] of the N evaluated images' files, in order (`Evaluation.files`),
            or None for data without files.
        source: the `data.source` the files come from (`manifest:PATH.csv`, `folder:PATH`).

    Returns:
        list[str] of N slice names, `MISSING_SLICE` for an image without a value.

    Raises:
        ConfigError: a slicing that cannot apply to this data (the message names the fix).
    """
    kind, _, argument = source.partition(":")
    if files is None or kind not in ("manifest", "folder"):
        raise ConfigError(
            f"--slice-by needs images read from files (data.source=manifest:PATH.csv or "
            f"folder:PATH); {source!r} has none: evaluate with --data manifest:PATH.csv.")
    root = Path(argument).parent if kind == "manifest" else Path(argument)
    if slice_by.startswith(PATH_SLICE_PREFIX):
        return path_values(files, root, _path_position(slice_by))
    if kind != "manifest":
        raise ConfigError(
            f"--slice-by {slice_by}: a column needs a manifest source, and {source!r} is a "
            f"folder; use {PATH_SLICE_PREFIX}N for a folder of the path, or --data "
            "manifest:PATH.csv.")
    return column_values(files, Path(argument), slice_by)


def _path_position(slice_by: str) -> int:
    """N of `path:N`, a non-zero integer, or a ConfigError naming the syntax."""
    position = slice_by[len(PATH_SLICE_PREFIX):]
    try:
        number = int(position)
    except ValueError:
        number = 0
    if number == 0:
        raise ConfigError(f"--slice-by {slice_by}: N of path:N must be a non-zero integer; "
                          f"slice by {SLICE_SYNTAX}.")
    return number


def path_values(files: list[str], root: Path, position: int) -> list[str]:
    """The folder at `position` of each file's path below `root` (1: the first folder
    below it, -1: the file's own folder), `MISSING_SLICE` where the path has too few."""
    absolute_root = os.path.abspath(root)
    values = []
    for file in files:
        relative = os.path.relpath(os.path.abspath(file), absolute_root)
        parts = Path(relative).parts
        if parts and parts[0] == os.pardir:  # outside the root: its whole path
            parts = Path(os.path.abspath(file)).parts[1:]
        folders = parts[:-1]
        index = position - 1 if position > 0 else len(folders) + position
        values.append(folders[index] if 0 <= index < len(folders) else MISSING_SLICE)
    return values


def column_values(files: list[str], manifest: Path, column: str) -> list[str]:
    """The `column` cell of each file's manifest row (rows matched by their resolved
    `path`, as `kcls.data.manifest.read_manifest` resolves it), `MISSING_SLICE` where the
    cell is empty or absent.

    Raises:
        ConfigError: the manifest has no such column (the message lists its columns).
    """
    reader = csv.DictReader(io.StringIO(read_text(manifest), newline=""))
    columns = [name.strip() for name in reader.fieldnames or []]
    reader.fieldnames = columns
    if column == "path":
        raise ConfigError(f"--slice-by path: slice by a folder of the path with "
                          f"{PATH_SLICE_PREFIX}N ({SLICE_SYNTAX}).")
    if column not in columns:
        available = [name for name in columns if name != "path"]
        raise ConfigError(
            f"--slice-by {column}: {str(manifest)!r} has no column {column!r}; its columns "
            f"are {', '.join(available) or 'none'} (or slice by {PATH_SLICE_PREFIX}N, a "
            "folder of the path).")
    by_file: dict[str, str] = {}
    for row in reader:
        path = (row.get("path") or "").strip()
        resolved = Path(path) if Path(path).is_absolute() else manifest.parent / path
        by_file.setdefault(os.path.abspath(resolved), (row.get(column) or "").strip())
    return [by_file.get(os.path.abspath(file)) or MISSING_SLICE for file in files]
