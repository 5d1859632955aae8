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

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import keras
import numpy as np

from kcls.config import Recipe, to_dict
from kcls.data.sources import load_splits
from kcls.optimize.convert import PTQ_METHODS, OptimizeError
from kcls.optimize.weight_keys import weight_keys

TRAINING_METHODS = ("prune", "qat")


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
                       learning_rate: float = 1e-4,
                       steps_per_epoch: int | None = None) -> tuple[bytes, dict[str, Any]]:
    """Prunes or quantization-aware-trains `classifier` in a TF-MOT child process.

    TF-MOT only wraps tf-keras models and importing it switches this whole process to
    legacy Keras, so `python -m kcls.optimize.mot_worker` does the work with
    `TF_USE_LEGACY_KERAS=1` (see that module). Its SavedModel goes to
    `<out_dir>/saved_model/`.

    Returns:
        `(tflite flatbuffer, result)`: float32 weights for `prune` (zeros compress when
        zipped), int8 for `qat`; `result` has `sparsity` for `prune`.

    Raises:
        OptimizeError: the child failed, e.g. on a layer TF-MOT cannot wrap (its message
            is included).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    steps_per_epoch = steps_per_epoch or max(
        load_splits(recipe.data).sizes["train"] // recipe.data.batch_size, 1)
    with tempfile.TemporaryDirectory(prefix="kcls-mot-") as temporary:
        job = {"method": method, "recipe": to_dict(recipe), "num_classes": num_classes,
               "weights": str(save_weights_by_key(classifier, Path(temporary) / "weights.npz")),
               "out_dir": str(out_dir), "epochs": epochs, "steps_per_epoch": steps_per_epoch,
               "learning_rate": learning_rate, "target_sparsity": target_sparsity}
        job_file = Path(temporary) / "job.json"
        job_file.write_text(json.dumps(job))
        environment = {**os.environ, "TF_USE_LEGACY_KERAS": "1"}
        environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        completed = subprocess.run(
            [sys.executable, "-m", "kcls.optimize.mot_worker", str(job_file)],
            env=environment, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        lines = [line for line in completed.stderr.splitlines()
                 if line.strip() and not line.startswith(("WARNING: All log", "I0000", "W0000"))]
        detail = "\n".join(lines[-5:])
        raise OptimizeError(
            f"TF-MOT {method} failed for backbone {recipe.model.backbone!r} (tf-keras child "
            f"process, exit status {completed.returncode}):\n{detail}\nUse a post-training "
            f"method instead ({', '.join(PTQ_METHODS)}).")
    result = json.loads((out_dir / "result.json").read_text())
    return (out_dir / "model.tflite").read_bytes(), result
