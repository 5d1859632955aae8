"""TF-MOT pruning and quantization-aware training, orchestrated from the Keras 3 process.

TF-MOT only wraps tf-keras models and importing it switches the whole process to legacy
Keras, so the work happens in a child process, `python -m kcls.optimize.mot_worker`,
with `TF_USE_LEGACY_KERAS=1` (see that module). This module writes the job (the recipe
and the weights keyed by name, `kcls.optimize.weight_keys`), runs the child and reads
back its TFLite model.

Example:

>>> model, result = fine_tune_with_mot(classifier, recipe, 10, "prune",
...                                    Path("out"))  # doctest: +SKIP
>>> result["sparsity"]["overall"]  # doctest: +SKIP
0.5
"""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import keras
import numpy as np

from kcls.config import Recipe, to_dict
from kcls.data.sources import load_splits
from kcls.layout import MOT_RESULT_FILE, TFLITE_FILE
from kcls.models.backbones import has_legacy_build
from kcls.optimize.convert import PTQ_METHODS, OptimizeError
from kcls.optimize.weight_keys import weight_keys
from kcls.tasks import get_task

TRAINING_METHODS = ("prune", "qat")
# A child silent this long is stopped: the worker prints a line at least every 30 s while
# training, and its longest silent stage (TFLite conversion) takes minutes, not 15.
IDLE_TIMEOUT_SECONDS = 900.0
ERROR_LINES = 5  # last lines of the child's stderr in an error message
# TensorFlow's native start-up lines, which are not errors.
_NATIVE_LOG_PREFIXES = ("WARNING: All log", "I0000", "W0000")


def save_weights_by_key(classifier: keras.Model, path: str | Path) -> Path:
    """Saves every weight of `classifier` to `.npz`, keyed by `kcls.optimize.weight_keys`.

    The keys name the same variables in the tf-keras rebuild of `kcls.optimize.mot_worker`,
    whatever order either Keras lists them in.
    """
    arrays = {key: variable.numpy() for key, variable in weight_keys(classifier.weights).items()}
    np.savez(path, **arrays)
    return Path(path)


def fine_tune_with_mot(classifier: keras.Model, recipe: Recipe, num_classes: int, method: str,
                       out_dir: Path, epochs: int = 2, target_sparsity: float = 0.5,
                       learning_rate: float = 1e-4, steps_per_epoch: int | None = None,
                       log: Callable[[str], None] = print,
                       idle_timeout: float = IDLE_TIMEOUT_SECONDS,
                       objective: dict[str, Any] | None = None
                       ) -> tuple[bytes, dict[str, Any]]:
    """Prunes or quantization-aware-trains `classifier` in a TF-MOT child process.

    TF-MOT only wraps tf-keras models and importing it switches this whole process to
    legacy Keras, so `python -m kcls.optimize.mot_worker` does the work with
    `TF_USE_LEGACY_KERAS=1` (see that module). Its progress lines (stages, epochs, and
    within long epochs a line at least every 30 s) reach `log` as they are printed. Its
    SavedModel goes to `<out_dir>/saved_model/`.

    Args:
        epochs: fine-tuning epochs; 0 only rebuilds, loads the weights and converts.
        log: receives the child's progress lines.
        idle_timeout: seconds without a line from the child after which it is stopped.
        objective: the task's loss, metric and activation by tf-keras name
            (`kcls.tasks.Task.legacy_objective`); default the recipe's task's.

    Returns:
        `(tflite flatbuffer, result)`: float32 weights for `prune` (zeros compress when
        zipped), int8 for `qat`; `result` has `sparsity` for `prune`.

    Raises:
        OptimizeError: a backbone with no tf-keras build (KerasHub and preset backbones),
            or the child failed (e.g. on a layer TF-MOT cannot wrap), was killed or fell
            silent; the message holds its last error lines.
    """
    if not has_legacy_build(recipe.model.backbone):
        raise OptimizeError(
            f"TF-MOT {method} rebuilds the backbone with tf-keras, which backbone "
            f"{recipe.model.backbone!r} (a KerasHub or KerasCV preset, Keras 3 only) has no "
            f"build for; use a post-training method instead ({', '.join(PTQ_METHODS)}).")
    out_dir.mkdir(parents=True, exist_ok=True)
    steps_per_epoch = steps_per_epoch or max(
        load_splits(recipe.data, recipe.label_format).sizes["train"] // recipe.data.batch_size, 1)
    with tempfile.TemporaryDirectory(prefix="kcls-mot-") as temporary:
        job = {"method": method, "recipe": to_dict(recipe), "num_classes": num_classes,
               "objective": objective or get_task(recipe.model.task).legacy_objective(),
               "weights": str(save_weights_by_key(classifier, Path(temporary) / "weights.npz")),
               "out_dir": str(out_dir), "epochs": epochs, "steps_per_epoch": steps_per_epoch,
               "learning_rate": learning_rate, "target_sparsity": target_sparsity}
        job_file = Path(temporary) / "job.json"
        job_file.write_text(json.dumps(job))
        environment = {**os.environ, "TF_USE_LEGACY_KERAS": "1"}
        environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        run_child([sys.executable, "-m", "kcls.optimize.mot_worker", str(job_file)], log,
                  f"The TF-MOT {method} child process for backbone "
                  f"{recipe.model.backbone!r}", environment=environment,
                  idle_timeout=idle_timeout,
                  advice=f"Use a post-training method instead ({', '.join(PTQ_METHODS)}).")
    result = json.loads((out_dir / MOT_RESULT_FILE).read_text())
    return (out_dir / TFLITE_FILE).read_bytes(), result


def run_child(command: list[str], log: Callable[[str], None], description: str, *,
              environment: dict[str, str] | None = None,
              idle_timeout: float = IDLE_TIMEOUT_SECONDS, advice: str = "") -> None:
    """Runs `command`, passing each line it prints on stdout to `log` as it comes.

    stdout carries progress, stderr diagnostics: the last lines of stderr go into the
    error message when the child fails.

    Args:
        command: the child's argv.
        log: receives stdout lines, without their newline.
        description: names the child in error messages ("The TF-MOT prune child process").
        environment: the child's environment; `None` inherits this one.
        idle_timeout: seconds without a line on either stream after which the child is
            killed (a hung child would otherwise block forever).
        advice: appended to error messages.

    Raises:
        OptimizeError: non-zero exit status, death by a signal, or silence for
            `idle_timeout` seconds.
    """
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, bufsize=1, env=environment)
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()

    def pump(stream: IO[str], kind: str) -> None:
        for line in stream:
            lines.put((kind, line.rstrip("\n")))
        lines.put((kind, None))

    for stream, kind in ((process.stdout, "stdout"), (process.stderr, "stderr")):
        threading.Thread(target=pump, args=(stream, kind), daemon=True).start()
    errors: collections.deque[str] = collections.deque(maxlen=ERROR_LINES)
    open_streams = 2
    try:
        while open_streams:
            try:
                kind, line = lines.get(timeout=idle_timeout)
            except queue.Empty:
                raise OptimizeError(
                    f"{description} (process {process.pid}) printed nothing for "
                    f"{idle_timeout:g} s and was stopped.\n{advice}".rstrip()) from None
            if line is None:
                open_streams -= 1
            elif kind == "stdout":
                log(line)
            elif line.strip() and not line.startswith(_NATIVE_LOG_PREFIXES):
                errors.append(line)
        status = process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if status == 0:
        return
    detail = "\n".join(errors)
    if status < 0:
        name = signal.Signals(-status).name
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        raise OptimizeError(f"{description} was killed by signal {name}{hint}:\n{detail}\n"
                            f"{advice}".rstrip())
    raise OptimizeError(f"{description} failed (exit status {status}):\n{detail}\n"
                        f"{advice}".rstrip())
