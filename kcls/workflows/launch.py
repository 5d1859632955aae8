"""`kcls recipe run NAME --workers N`: multi-worker training tried on one machine.

`launch_local_workers` starts N processes of `kcls recipe run NAME --set
train.strategy=multiworker --out RUN_DIR`, each with a `TF_CONFIG` naming all of them on
free 127.0.0.1 ports (worker 0 is the chief), streams the chief's output, shows the other
workers' error lines prefixed with `worker <i>: `, and waits for all of them. When one
fails, the others are stopped: SIGTERM, then SIGKILL after `GRACE_SECONDS`, because
TensorFlow catches SIGTERM (its preemption handler) and a worker waiting for a peer that
never arrives never returns. The run directory is one folder for all workers (default a
new `runs/<recipe>/<timestamp>`), as a cluster's shared storage would be.

Nothing here imports TensorFlow: the launcher only starts, watches and stops processes.
On a real cluster the scheduler does this (Kubeflow's TFJob, Vertex AI: see deploy/ and
docs/distributed.md).

Example:

>>> recipe = load_recipe("quickstart")
>>> exit_code = launch_local_workers(recipe, "quickstart", [], None, 2)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from kcls.config import ConfigError, Recipe, check_global_batch
from kcls.workflows.run_directory import new_run_dir

HOST = "127.0.0.1"
# After SIGTERM, how long a worker may take to stop before it is killed.
GRACE_SECONDS = 10.0
# After the chief has finished, how long the other workers may take to exit.
AFTER_CHIEF_SECONDS = 60.0
POLL_SECONDS = 0.2


def free_ports(count: int) -> list[int]:
    """`count` TCP ports free on 127.0.0.1 (another process may take one before use)."""
    sockets = []
    try:
        for _ in range(count):
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind((HOST, 0))
            sockets.append(listener)
        return [listener.getsockname()[1] for listener in sockets]
    finally:
        for listener in sockets:
            listener.close()


def tf_config(ports: Sequence[int], index: int) -> str:
    """The `TF_CONFIG` of worker `index` of a cluster of workers on `ports` of 127.0.0.1
    (worker 0 is the chief: the cluster has no `chief` task)."""
    return json.dumps({"cluster": {"worker": [f"{HOST}:{port}" for port in ports]},
                       "task": {"type": "worker", "index": index}})


def worker_environment(ports: Sequence[int], index: int) -> dict[str, str]:
    """This process's environment with worker `index`'s `TF_CONFIG`, unbuffered output,
    and the kcls checkout this process runs first on `PYTHONPATH`, so the workers run
    the same code."""
    # Unbuffered: the chief's lines are streamed as they come, not in blocks.
    environment = {**os.environ, "TF_CONFIG": tf_config(ports, index), "PYTHONUNBUFFERED": "1"}
    source_root = Path(__file__).resolve().parents[2]
    if (source_root / "pyproject.toml").is_file():
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(source_root), os.environ.get("PYTHONPATH")]))
    return environment


def start_workers(command: Sequence[str], count: int, ports: Sequence[int] | None = None,
                  outputs: Sequence[tuple[IO, IO]] | None = None) -> list[subprocess.Popen]:
    """Starts `count` processes of `command`, worker i with `worker_environment(ports, i)`.

    Args:
        command: the program and its arguments, the same for every worker.
        count: int, the number of workers.
        ports: one 127.0.0.1 port per worker; default free ones.
        outputs: per worker, the `(stdout, stderr)` files to write to; default pipes.

    Returns:
        The processes, worker 0 (the chief) first.
    """
    ports = list(ports or free_ports(count))
    processes = []
    for index in range(count):
        stdout, stderr = outputs[index] if outputs else (subprocess.PIPE, subprocess.PIPE)
        processes.append(subprocess.Popen(list(command), env=worker_environment(ports, index),
                                          stdout=stdout, stderr=stderr, text=True,
                                          bufsize=1))
    return processes


def stream_output(processes: Sequence[subprocess.Popen], log: Callable[[str], None],
                  error_log: Callable[[str], None]) -> list[threading.Thread]:
    """Forwards the chief's output lines (stdout to `log`, stderr to `error_log`) and the
    other workers' error lines, prefixed `worker <i>: `; their other output is dropped."""
    def forward(stream: IO, write: Callable[[str], None] | None, prefix: str) -> None:
        for line in stream:
            if write is not None:
                write(prefix + line.rstrip("\n"))

    threads = []
    for index, process in enumerate(processes):
        prefix = "" if index == 0 else f"worker {index}: "
        for stream, write in ((process.stdout, log if index == 0 else None),
                              (process.stderr, error_log)):
            thread = threading.Thread(target=forward, args=(stream, write, prefix), daemon=True)
            thread.start()
            threads.append(thread)
    return threads


def stop_workers(processes: Sequence[subprocess.Popen], grace: float = GRACE_SECONDS) -> None:
    """SIGTERM to every running process, then SIGKILL to those still running after `grace`."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in running:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_workers(processes: Sequence[subprocess.Popen], log: Callable[[str], None],
                     grace: float = GRACE_SECONDS,
                     after_chief: float = AFTER_CHIEF_SECONDS) -> int:
    """Waits for every worker; stops all of them as soon as one fails.

    Args:
        processes: the workers, the chief first.
        log: receives a line naming a worker that failed or had to be stopped.
        grace: seconds between SIGTERM and SIGKILL when stopping.
        after_chief: seconds the other workers may run on after the chief finished.

    Returns:
        0 when every worker exited with 0, else the failed worker's exit status (1 for
        one killed by a signal, or stopped after the chief finished).
    """
    chief_done = None
    while True:
        codes = [process.poll() for process in processes]
        failed = next((index for index, code in enumerate(codes) if code not in (None, 0)), None)
        if failed is not None:
            log(f"worker {failed} exited with status {codes[failed]}: stopping the others")
            stop_workers(processes, grace)
            return codes[failed] if codes[failed] > 0 else 1
        if all(code == 0 for code in codes):
            return 0
        if codes[0] == 0:
            chief_done = chief_done or time.monotonic()
            if time.monotonic() - chief_done > after_chief:
                log(f"workers still running {after_chief:.0f} s after the chief finished: "
                    "stopping them")
                stop_workers(processes, grace)
                return 1
        time.sleep(POLL_SECONDS)


def worker_command(name: str, overrides: Sequence[str], run_dir: Path,
                   debug: bool = False) -> list[str]:
    """The `kcls recipe run` command line every local worker runs."""
    sets = [argument for override in overrides for argument in ("--set", override)]
    return [sys.executable, "-m", "kcls.cli", *(["--debug"] if debug else []), "recipe", "run",
            name, *sets, "--set", "train.strategy=multiworker", "--out", str(run_dir)]


def launch_local_workers(recipe: Recipe, name: str, overrides: Sequence[str],
                         run_dir: Path | None, workers: int, debug: bool = False,
                         log: Callable[[str], None] = print,
                         error_log: Callable[[str], None] = print) -> int:
    """Runs `recipe` on `workers` local processes (`kcls recipe run NAME --workers N`).

    Args:
        recipe: the resolved recipe (checked here before anything starts).
        name: the recipe name or file the workers load, and `overrides`, its `--set`s.
        run_dir: the run directory of all workers; None for a new `runs/<recipe>/<timestamp>`.
        workers: int >= 1.
        debug: pass `--debug` to the workers (tracebacks instead of one-line errors).
        log, error_log: receive the chief's output and error lines.

    Returns:
        The exit status for the command (see `wait_for_workers`).

    Raises:
        ConfigError: an explicit `train.strategy` other than multiworker, or a global
            batch the workers cannot share equally.
    """
    chosen = [override for override in overrides if override.startswith("train.strategy=")]
    if chosen and chosen[-1] != "train.strategy=multiworker":
        raise ConfigError(f"--workers trains with train.strategy=multiworker: drop --set "
                          f"{chosen[-1]}.")
    check_global_batch(recipe.data.batch_size, workers)  # before any worker starts
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(recipe.name)
    ports = free_ports(workers)
    log(f"{workers} workers on {HOST} ports {', '.join(map(str, ports))}, run dir {run_dir}: "
        "the chief's output follows, the other workers' errors prefixed")
    processes = start_workers(worker_command(name, overrides, run_dir, debug), workers, ports)
    threads = stream_output(processes, log, error_log)
    try:
        status = wait_for_workers(processes, log)
    except KeyboardInterrupt:
        stop_workers(processes)
        raise
    for thread in threads:
        thread.join(timeout=5)
    return status


__all__ = ["launch_local_workers", "start_workers", "stop_workers", "wait_for_workers"]
