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


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes `data` to `path` atomically and returns `path`."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


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
