"""Claiming a run directory: unique default names, a lock, and no training over finished runs.

A run owns its directory from the moment it writes `config.json` to its end:

- Default run directories (`runs/<recipe>/<YYYYmmdd-HHMMSS>`) are created exclusively;
  when another run started in the same second, this one gets `-2`, `-3`, ... appended.
- The run holds `<run_dir>/run.lock` (`kcls.layout.RUN_LOCK_FILE`), created with
  `O_CREAT | O_EXCL` and holding the process id and host, and removes it when it ends,
  also on errors. A second run with the same `--out` is refused while the first is
  alive; a lock left by a process that died (killed, out of memory) is taken over
  with a warning, and the run resumes from the directory's backup.
- Once locked, the temporary files of writers that were killed mid-write (their
  process is gone) are removed.
- A directory that holds a finished run (`run.json`) or a trained model
  (`model.weights.h5`) is refused: kcls never trains over a result. A trained model
  whose run was killed after training (its `state.json` holds the training) is not a
  result yet: that run resumes at evaluation (`kcls.workflows.run_state`).
- Under several workers (`train.strategy=multiworker`) the run directory is one folder on
  storage every worker shares, named by `--out` on all of them (a default name would
  differ between machines); the chief claims and locks it, the other workers only check
  it (`lock=False`): the lock is the chief's.

Example:

>>> with claim_run_dir(None, "quickstart") as run_dir:  # doctest: +SKIP
...     (run_dir / "config.json").write_text("{}")
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from kcls.config import ConfigError
from kcls.files import process_exists
from kcls.layout import (
    RUN_CONFIG_FILE,
    RUN_INFO_FILE,
    RUN_LOCK_FILE,
    RUN_STATE_FILE,
    RUNS_DIR,
    WEIGHTS_FILE,
)
from kcls.serving.publish import clean_stale_temporaries

MAX_SUFFIX = 1000  # runs of one recipe started in the same second


def check_run_dir(run_dir: str | Path, lock: bool = True) -> None:
    """Raises unless a run may start (or resume) in `run_dir`.

    Cheap and side-effect free, so `run_recipe` calls it before loading any data;
    `claim_run_dir` checks again once it holds the lock.

    Args:
        run_dir: the run directory.
        lock: whether this process will lock it (False for workers other than the
            chief, which run in the chief's directory under the chief's lock).

    Raises:
        ConfigError: `run_dir` holds a finished run or a trained model, or a live
            process holds its lock; the message says what to do instead.
    """
    run_dir = Path(run_dir)
    # A trained model with the state of its training is a run killed after training,
    # which resumes at evaluation (`kcls.workflows.run_state`); without, a result.
    trained = _has_training_state(run_dir / RUN_STATE_FILE)
    for name, what in ((RUN_INFO_FILE, "a finished run"),
                       (WEIGHTS_FILE, "a trained model")):
        if (run_dir / name).is_file() and not (name == WEIGHTS_FILE and trained):
            raise ConfigError(
                f"{run_dir} holds {what} ({name}); kcls never trains over a result. Use a "
                "new --out (or leave --out out for a new runs/NAME/TIMESTAMP folder), or "
                "delete the folder to run there again.")
    owner = _lock_owner(run_dir / RUN_LOCK_FILE) if lock else None
    if owner is not None and not _mine(owner) and _alive(owner):
        raise ConfigError(_locked_message(run_dir, owner))


def _has_training_state(state_file: Path) -> bool:
    """Whether the run state file records a finished training (unreadable: no)."""
    try:
        return "training" in json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


@contextlib.contextmanager
def claim_run_dir(run_dir: str | Path | None, recipe_name: str,
                  log: Callable[[str], None] = print,
                  parent: str | Path = RUNS_DIR, lock: bool = True) -> Iterator[Path]:
    """Creates or reuses a run directory and holds its lock while the block runs.

    Args:
        run_dir: the directory to run in (created if needed; an interrupted run there
            resumes), or None for a new `<parent>/<recipe_name>/<timestamp>[-N]`.
        recipe_name: the recipe's name, a single folder name (`kcls.config.check_name`).
        log: receives the warning when a stale lock is taken over.
        parent: where default run directories go.
        lock: False for a worker other than the chief: `run_dir` (required) is only
            checked, neither created nor locked.

    Yields:
        Path of the run directory, locked by this process (by the chief with `lock=False`).

    Raises:
        ConfigError: see `check_run_dir`.
    """
    if not lock:
        check_run_dir(run_dir, lock=False)
        yield Path(run_dir)
        return
    path = Path(run_dir) if run_dir is not None else new_run_dir(recipe_name, parent)
    path.mkdir(parents=True, exist_ok=True)
    lock = path / RUN_LOCK_FILE
    _acquire(lock, log)
    try:
        check_run_dir(path)  # a run that finished while this one loaded its data
        # Temporaries of a writer killed mid-write (`kcls.files.atomic_path`), e.g. a
        # `.tmp-<host>-<pid>-...-backbone.weights.h5` of a killed pretraining.
        clean_stale_temporaries(path)
        yield path
    finally:
        lock.unlink(missing_ok=True)


def unfinished_runs(recipe_name: str, parent: str | Path = RUNS_DIR) -> list[Path]:
    """The default run directories of `recipe_name` under `parent` that a run may resume,
    newest first: begun (`config.json`), unfinished (no `run.json`) and not held by a
    live process. Whether one is the *same* run is `kcls.workflows.run_state.check_same_run`'s
    question."""
    recipe_dir = Path(parent) / recipe_name
    if not recipe_dir.is_dir():
        return []
    found = []
    for path in recipe_dir.iterdir():
        if not (path / RUN_CONFIG_FILE).is_file() or (path / RUN_INFO_FILE).exists():
            continue
        try:
            check_run_dir(path)
        except ConfigError:  # running, or a result of an older kcls
            continue
        found.append(path)
    return sorted(found, key=_started_order, reverse=True)


def _started_order(path: Path) -> tuple[str, int]:
    """`<timestamp>[-N]` in the order the runs started (`-10` after `-9`)."""
    stamp, _, suffix = path.name.partition("-")[2].partition("-")
    return path.name.partition("-")[0] + stamp, int(suffix) if suffix.isdigit() else 1


def new_run_dir(recipe_name: str, parent: str | Path = RUNS_DIR) -> Path:
    """Creates `<parent>/<recipe_name>/<timestamp>`, or the first free `<timestamp>-N`,
    exclusively, and returns it."""
    recipe_dir = Path(parent) / recipe_name
    recipe_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for suffix in range(1, MAX_SUFFIX + 1):
        path = recipe_dir / (stamp if suffix == 1 else f"{stamp}-{suffix}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"More than {MAX_SUFFIX} runs of {recipe_dir.name!r} started in the "
                      f"second {stamp}; pass --out to choose run directories.")


def _acquire(lock: Path, log: Callable[[str], None]) -> None:
    """Creates `lock` exclusively, taking over a lock whose process is gone."""
    content = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                          "started": datetime.now().isoformat(timespec="seconds")})
    for _ in range(3):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is None:  # vanished, or being written this instant: look again
                continue
            if _alive(owner):
                raise ConfigError(_locked_message(lock.parent, owner)) from None
            if _take_over(lock, owner):
                log(f"warning: {lock.parent} was locked by process {owner.get('pid')}, which "
                    "is no longer running (killed?); taking the run directory over.")
            continue
        with os.fdopen(descriptor, "w") as stream:
            stream.write(content)
        return
    raise ConfigError(f"Could not lock {lock.parent}: other processes keep claiming it. Use a "
                      "new --out.")


def _take_over(lock: Path, stale_owner: dict[str, Any]) -> bool:
    """Removes a stale `lock`, unless another process replaced it meanwhile."""
    # Renaming is atomic: of two processes taking over the same stale lock, one gets it.
    aside = lock.with_name(f"{lock.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return False
    if _lock_owner(aside) != stale_owner:  # a fresh lock moved aside by mistake: restore it
        with contextlib.suppress(FileExistsError):
            os.link(aside, lock)
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def _lock_owner(lock: Path) -> dict[str, Any] | None:
    """The `{"pid", "host", "started"}` a lock holds, or None when there is none."""
    try:
        owner = json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half-written: treated as held, see `_alive`
    return owner if isinstance(owner, dict) else {}


def _mine(owner: dict[str, Any]) -> bool:
    return owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()


def _alive(owner: dict[str, Any]) -> bool:
    """Whether the process that wrote a lock may still be running."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or owner.get("host") != socket.gethostname():
        return True  # another machine (shared disk) or an unreadable lock: assume it runs
    return process_exists(pid)


def _locked_message(run_dir: Path, owner: dict[str, Any]) -> str:
    who = (f"process {owner['pid']} on {owner.get('host')} (started {owner.get('started')})"
           if owner.get("pid") else "another process")
    return (f"{run_dir} is in use by {who}: two runs cannot share a run directory. Use a new "
            f"--out, or wait for that run to end. If no run is active there, delete "
            f"{run_dir / RUN_LOCK_FILE}.")


__all__ = ["check_run_dir", "claim_run_dir", "new_run_dir", "unfinished_runs"]
