"""One way to write a file: atomically, so that nothing is ever seen half-written.

Every file kcls writes (run.json, reports, plots (`kcls.figures`), weights, exports' metadata,
`models.config`) goes through `atomic_path`: the content goes to a temporary name in the
same folder, `.tmp-<host>-<pid>-<random>-<name>`, is flushed to the disk, and is renamed
over the target with `os.replace`. A reader, a TF Serving poll or a run killed half-way
sees the old file or the new one, never part of one. The temporary's name records the
process writing it (`owner_tag`), so a folder's leftovers of killed processes can be told
from live ones (`kcls.serving.publish.clean_stale_temporaries`). This module imports only
the standard library: every layer uses it, the TF-MOT child process included.

Example:

>>> path = write_json(Path(tmp) / "run.json", {"accuracy": 0.99})  # doctest: +SKIP
>>> with atomic_path(Path(tmp) / "model.weights.h5") as temporary:  # doctest: +SKIP
...     classifier.save_weights(temporary)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# `.tmp-<host>-<pid>-<32 hex>` (an export's version folder) or with `-<name>` after it (a
# file); the owner part is missing from names older kcls versions wrote.
TEMPORARY_NAME = re.compile(
    r"\.tmp-(?:(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-)?[0-9a-f]{32}(?:-(?P<name>.+))?")


def owner_tag(pid: int | None = None) -> str:
    """`<host>-<pid>`, naming the process that writes a temporary file or folder.

    `host` is a short digest of this machine's host name (a folder may be on a disk
    several machines share); `pid` defaults to this process.
    """
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return f"{host}-{os.getpid() if pid is None else pid}"


def temporary_name(name: str = "") -> str:
    """A fresh temporary name for `name` (a file) or, without one, for a folder."""
    return f".tmp-{owner_tag()}-{uuid.uuid4().hex}" + (f"-{name}" if name else "")


def process_exists(pid: int) -> bool:
    """Whether a process with id `pid` runs on this machine (whoever owns it)."""
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write `path`'s new content to, then publishes it.

    The temporary ends with `path`'s own name, so writers that check suffixes (Keras's
    `.weights.h5`, matplotlib's `.png`) accept it. On leaving the block the file is
    fsynced and renamed over `path`; on an error it is removed and `path` is untouched.
    The folder is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(temporary_name(path.name))
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


SAFE_NAME_CHARACTERS = frozenset(" -_.+,=@()")
SAFE_NAME_LENGTH = 100


def safe_file_name(text: str, limit: int = SAFE_NAME_LENGTH) -> str:
    """`text` (a class name, a label) made safe as one file name on every file system.

    Letters, digits and ` -_.+,=@()` stay; every other character (`/`, `\\`, `:`,
    control characters, `%` itself) becomes `%XX` escapes of its UTF-8 bytes, as in
    URLs, so two texts never share a name; a leading `.` (hidden) and trailing spaces and
    dots (dropped by Windows) are escaped too. A longer result than `limit` characters is
    cut and ends with a digest of `text`.

    >>> safe_file_name("in/out"), safe_file_name("100%"), safe_file_name(".hidden")
    ('in%2Fout', '100%25', '%2Ehidden')
    """
    escaped = "".join(character if character.isalnum() or character in SAFE_NAME_CHARACTERS
                      else _percent(character) for character in text)
    if escaped.startswith("."):
        escaped = "%2E" + escaped[1:]
    stripped = escaped.rstrip(" .")
    escaped = stripped + "".join(_percent(c) for c in escaped[len(stripped):]) or "%00"
    if len(escaped) > limit:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        escaped = f"{escaped[:limit - 17]}~{digest}"
    return escaped


def _percent(character: str) -> str:
    return "".join(f"%{byte:02X}" for byte in character.encode("utf-8", "surrogatepass"))


class OutputFolderError(ValueError):
    """An output folder that cannot be made or written; the message names the fix."""


def check_output_dir(path: str | Path, option: str = "--out") -> Path:
    """Checks, before any work, that files can be written into the folder `path`.

    Nothing is created: the folder (or, when it does not exist yet, the nearest folder
    it would be made in) must be a writable folder, not a file.

    Args:
        path: the output folder.
        option: how the user named it, for the message (`--out`, `export.base_dir`).

    Returns:
        `path` as a Path.

    Raises:
        OutputFolderError: naming the folder, what is in the way and the fix.
    """
    path = Path(path)
    existing = next((folder for folder in (path, *path.parents)
                     if folder.exists() or folder.is_symlink()), Path("."))
    if not existing.is_dir():
        blocking = "it is a file" if existing == path else f"{existing} is a file"
        raise OutputFolderError(f"{option} {str(path)!r} cannot be a folder: {blocking}. "
                                f"Pass another {option} folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputFolderError(f"{option} {str(path)!r} cannot be written: {existing} is not "
                                f"writable by this user. Pass another {option} folder.")
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes `data` to `path` atomically and returns `path`."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_new_bytes(path: str | Path, data: bytes) -> Path:
    """Writes `data` to `path` atomically unless a file is there already.

    The content is written to a temporary name and hard-linked to `path` in one step,
    so two writers never share the name and no reader sees part of the file.

    Raises:
        FileExistsError: `path` exists (it is left untouched).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(temporary_name(path.name))
    try:
        temporary.write_bytes(data)
        _fsync(temporary)
        os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Writes UTF-8 `text` to `path` atomically and returns `path`."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """Writes `data` as JSON to `path` atomically and returns `path`."""
    return write_text(path, json.dumps(data, indent=indent) + "\n")


def save_weights(model: Any, path: str | Path) -> Path:
    """Saves a Keras `model`'s weights to `path` (a `.weights.h5` name) atomically."""
    with atomic_path(path) as temporary:
        model.save_weights(temporary)
    return Path(path)


def _fsync(path: Path) -> None:
    """Flushes `path`'s content to the disk, so the rename never publishes an empty file."""
    with open(path, "rb") as file:
        os.fsync(file.fileno())
