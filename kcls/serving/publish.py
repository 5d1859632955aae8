"""Publishing export versions in TF Serving's layout: `<base_dir>/<model>/<N>/`.

A version is written into a hidden temporary sibling folder (`kcls.files.temporary_name`,
which records the writing process) and renamed to the next free integer, so a server
polling the base path never loads a half-written version, and two exports never take the
same number. After each export, `<base_dir>/models.config` lists every model for
`tensorflow_model_server --model_config_file`, with base paths under `/models`, where the
README's `docker run -v "$PWD/saved_models:/models"` mounts `base_dir`.

An export killed before the rename leaves its temporary behind; the next export into
the same folders removes it once that process is gone (or, for a process on another
machine or a name without an owner, once it is an hour old).

Example:

>>> temporary = new_version_folder(Path("saved_models/quickstart"))  # doctest: +SKIP
>>> version_dir = publish_version(temporary, Path("saved_models/quickstart"))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from kcls.config import ConfigError
from kcls.files import TEMPORARY_NAME, owner_tag, process_exists, temporary_name, write_text
from kcls.layout import MODELS_CONFIG_FILE, exported_versions, versions
from kcls.load import read_export_labels

SERVING_MOUNT = "/models"  # where the docker command in the README mounts the base dir
STALE_TEMPORARY_SECONDS = 3600.0
_LIVE_OWNER_STALE_SECONDS = 86400.0


def new_version_folder(model_dir: Path) -> Path:
    """A fresh temporary folder beside `model_dir`'s versions, after removing stale ones."""
    model_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(model_dir)
    clean_stale_temporaries(model_dir.parent)
    return model_dir / temporary_name()


def publish_version(temporary: Path, model_dir: Path) -> Path:
    """Renames `temporary` to the next free integer version of `model_dir`, atomically."""
    while True:
        target = model_dir / str((versions(model_dir) or [0])[-1] + 1)
        try:
            os.rename(temporary, target)  # fails if another export took `target` meanwhile
            return target
        except OSError:
            if not target.exists():
                raise


def check_model_labels(model_dir: str | Path, class_names: list[str]) -> None:
    """Refuses a new version of `model_dir` whose classes differ from its latest version's.

    TF Serving serves the latest version under the model's name: a classifier of other
    classes there would answer every client with labels it never asked about.

    Raises:
        ConfigError: naming both class lists and the fix (`export.model_name`).
    """
    model_dir = Path(model_dir)
    published = exported_versions(model_dir)
    if not published:
        return
    latest = model_dir / str(published[-1])
    served = read_export_labels(latest)
    if served is None or served == list(class_names):
        return
    raise ConfigError(
        f"{latest} serves the classes {_listed(served)}; this model has {_listed(class_names)}. "
        f"As version {published[-1] + 1} of {model_dir.name!r} it would replace them for every "
        "client. Export it under its own name: --set export.model_name=NAME (`kcls export "
        "RUN_DIR --model-name NAME`), or into another export.base_dir.")


def _listed(names: list[str], shown: int = 6) -> str:
    return ", ".join(names[:shown]) + (f" ... ({len(names)} classes)" if len(names) > shown
                                       else "")


def write_models_config(base_dir: str | Path, mount: str = SERVING_MOUNT) -> Path:
    """Rewrites `<base_dir>/models.config` to list every exported model, atomically.

    The file is TF Serving's `ModelServerConfig` in text format, one `config` per model
    folder that holds at least one numbered SavedModel version:

        model_config_list {
          config {
            name: "quickstart"
            base_path: "/models/quickstart"
            model_platform: "tensorflow"
          }
        }

    Args:
        base_dir: the export base directory (e.g. `saved_models`).
        mount: where the server sees `base_dir`; `/models` matches
            `docker run -v "$PWD/saved_models:/models" tensorflow/serving`.

    Returns:
        Path of the `models.config` file.
    """
    base_dir = Path(base_dir)
    names = sorted(folder.name for folder in base_dir.iterdir()
                   if folder.is_dir() and not folder.name.startswith(".")
                   and exported_versions(folder))
    entries = "".join(
        f"  config {{\n    name: {_quoted(name)}\n"
        f"    base_path: {_quoted(mount.rstrip('/') + '/' + name)}\n"
        f'    model_platform: "tensorflow"\n  }}\n' for name in names)
    # Atomic: a server re-reading the file never sees half of it.
    return write_text(base_dir / MODELS_CONFIG_FILE, f"model_config_list {{\n{entries}}}\n")


def clean_stale_temporaries(folder: str | Path) -> list[Path]:
    """Removes the temporary files and folders that killed writers left in `folder`.

    A temporary (`kcls.files.TEMPORARY_NAME`) is stale when the process named in it
    (`owner_tag`) ran on this machine and is gone, or when it is older than
    `STALE_TEMPORARY_SECONDS` and its owner cannot be checked (another machine, or a
    name written by an older kcls). A live owner's temporaries stay until they are a day
    old (its pid may have been reused).

    Returns:
        The paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host = owner_tag().split("-")[0]
    removed = []
    for path in folder.iterdir():
        match = TEMPORARY_NAME.fullmatch(path.name)
        if not match:
            continue
        try:
            age = time.time() - path.lstat().st_mtime
        except FileNotFoundError:  # its owner just renamed or removed it
            continue
        if match["host"] == host:
            stale = (not process_exists(int(match["pid"]))
                     or age > _LIVE_OWNER_STALE_SECONDS)
        else:
            stale = age > STALE_TEMPORARY_SECONDS
        if stale:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _quoted(text: str) -> str:
    """`text` as a protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
