"""`optimize`: a trained classifier to TFLite, measured against float32 TFLite.

`optimize(path, method)` (what `kcls optimize` does):

1. rebuilds the float32 Keras classifier with `kcls.load.load_classifier` (a run
   directory or an export);
2. converts it to float32 TFLite, the baseline (`kcls.optimize.convert`);
3. converts it with `method`: `ptq-dynamic` (int8 weights, float activations),
   `ptq-float16` (float16 weights) or `ptq-int8` (full integer, calibrated on images of
   the training split, input/output type `io_type`, per-channel weight scales unless
   `per_channel=False`); `prune` and `qat` instead fine-tune in a TF-MOT child process
   (`kcls.optimize.mot`, `kcls.optimize.mot_worker`), whose progress reaches `log`;
4. evaluates both with the TFLite interpreter on the recipe's held-out test split (the
   same examples `kcls evaluate` uses), one image at a time, and measures warm latency
   (batch 1, median of `latency_runs` invocations; `kcls.optimize.interpreter`): top-1
   accuracy, or for a multi-label model (`model.task=multilabel`, sigmoid outputs) mAP
   and micro F1 at the per-label thresholds stored with the model;
5. writes `model.tflite`, `float32.tflite`, `optimize.json` and `optimize.md` to `out_dir`.

`out_dir` defaults to `<run_dir>/optimized/<method>/` for a run directory and to
`saved_models/NAME/optimized/<version>/<method>/` for an export (TF Serving ignores
folders whose names are not numbers).

Example:

>>> report = optimize("saved_models/quickstart", "ptq-int8")  # doctest: +SKIP
>>> report["optimized"]["size_bytes"] < report["float32"]["size_bytes"] / 3  # doctest: +SKIP
True
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from kcls.config import Recipe
from kcls.data.folder import skipped_files_line
from kcls.data.pipeline import prepare_image
from kcls.data.sources import HeldOut, load_splits, recorded_test_examples
from kcls.files import check_output_dir, write_bytes, write_json, write_text
from kcls.layout import (
    FLOAT32_TFLITE_FILE,
    OPTIMIZE_REPORT_FILE,
    OPTIMIZE_TABLE_FILE,
    TFLITE_FILE,
    optimized_dir,
)
from kcls.load import LoadedClassifier, load_classifier
from kcls.optimize.convert import (
    IO_TYPES,
    PTQ_METHODS,
    OptimizeError,
    convert,
    representative_images,
    write_probability_saved_model,
)
from kcls.optimize.interpreter import interpreter_name, measure
from kcls.optimize.mot import TRAINING_METHODS, fine_tune_with_mot
from kcls.tasks import Task

METHODS = PTQ_METHODS + TRAINING_METHODS


def held_out_examples(recipe: Recipe, skipped: list[str] | None = None,
                      class_names: list[str] | None = None,
                      test_files: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The held-out test split as arrays: float32 `[N, S, S, 3]`, int64 `[N]` (multi-label:
    multi-hot int64 `[N, C]`): the `test_files` a run recorded (labelled by
    `class_names`, `kcls.data.sources.recorded_test_examples`), else the recipe's split.

    `skipped` receives the source's files that do not reach the model.
    """
    if test_files is not None and class_names is not None:
        held_out = recorded_test_examples(recipe.data, class_names, test_files,
                                          recipe.label_format)
    else:
        splits = load_splits(recipe.data, recipe.label_format)
        held_out = HeldOut(splits.test, splits.skipped, splits.test_files)
    prepared = held_out.examples.map(
        lambda image, label: (prepare_image(image, recipe.data.image_size, recipe.data.resize),
                              label), num_parallel_calls=tf.data.AUTOTUNE)
    images, labels = [], []
    for image, label in prepared.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
        images.append(image)
        labels.append(label)
    if skipped is not None:
        skipped.extend(name for name in held_out.skipped if name not in skipped)
    return np.stack(images).astype(np.float32), np.asarray(labels, np.int64)


def optimize(model_path: str | Path, method: str, out_dir: str | Path | None = None,
             io_type: str = "int8", calibration_images: int = 200, latency_runs: int = 100,
             num_threads: int = 1, mot_epochs: int = 2, target_sparsity: float = 0.5,
             mot_steps_per_epoch: int | None = None, per_channel: bool = True,
             overwrite: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Quantizes a trained classifier for the edge and compares it with float32 TFLite.

    Args:
        model_path: a run directory or an export (version or model folder).
        method: one of `METHODS`; `prune` and `qat` fine-tune in a TF-MOT child process
            (see `fine_tune_with_mot`).
        out_dir: output folder; default `kcls.layout.optimized_dir`.
        io_type: `ptq-int8` input/output type (`int8`, `uint8` or `float32`).
        calibration_images: training images used to calibrate `ptq-int8`.
        latency_runs: timed batch-1 invocations per model.
        num_threads: interpreter threads for evaluation and latency.
        mot_epochs: `prune`/`qat` fine-tuning epochs over the training split.
        target_sparsity: `prune`'s final share of zero weights in Conv/Dense kernels.
        mot_steps_per_epoch: caps `prune`/`qat` steps per epoch (default: the whole split).
        per_channel: `ptq-int8` weight scales per output channel (default) or per tensor
            (smaller file; see `convert`).
        overwrite: replace the models and report of an earlier call in `out_dir`.
        log: receives the progress lines of `prune` and `qat`, as they come, and a line
            naming the skipped files, if any.

    Returns:
        The report written to `<out_dir>/optimize.json`: `method`, `io_type`,
        `per_channel`, `interpreter` (see `interpreter_name`), `out_dir`, `_model_record`'s,
        `test_examples`, `skipped_files` (files of the data that reached neither
        calibration or fine-tuning nor the test: unreadable or undecodable), `task`,
        `metrics` (the rows' quality keys: `accuracy`, or `mAP` and `micro_f1` for a
        multi-label model), `float32` and `optimized` rows (see `measure`), `agreement`
        (share of test images with the same top-1 class, or the same predicted label
        set, as float32 TFLite), `ratios` (with `<metric>_delta` per metric) and, for
        `prune`, `sparsity` (share of zeros per kernel and `overall`).

    Raises:
        OptimizeError: unknown or unavailable method, a bad `io_type`, or an earlier
            report in `out_dir` (without `overwrite`).
        OutputFolderError: `out_dir` cannot be written (checked before any work).
        FileNotFoundError, ConfigError: from `load_classifier`.
    """
    out_dir = check_request(method, io_type, out_dir, overwrite)
    loaded = load_classifier(model_path)  # its errors name what `model_path` lacks
    out_dir = out_dir or check_optimize_dir(optimized_dir(model_path, method), overwrite)
    skipped: list[str] = []  # files of the data that reach neither calibration nor test
    with tempfile.TemporaryDirectory(prefix="kcls-tflite-") as temporary:
        saved_model = write_probability_saved_model(
            loaded.classifier, loaded.recipe.data.image_size, Path(temporary) / "saved_model",
            loaded.task)
        float_model = convert(saved_model)
        if method in TRAINING_METHODS:
            optimized_model, mot_result = fine_tune_with_mot(
                loaded.classifier, loaded.recipe, len(loaded.class_names), method, out_dir,
                mot_epochs, target_sparsity, steps_per_epoch=mot_steps_per_epoch, log=log,
                objective=loaded.task.legacy_objective())
        else:
            optimized_model, mot_result = convert(
                saved_model, method,
                representative_images(loaded.recipe, calibration_images, skipped),
                io_type, per_channel), {}
    images, labels = held_out_examples(loaded.recipe, skipped, loaded.class_names,
                                       loaded.metadata.get("test_files"))
    skipped.extend(name for name in mot_result.get("skipped_files", []) if name not in skipped)
    if skipped:
        log(skipped_files_line(skipped))
    report = {
        "method": method, "io_type": io_type if method == "ptq-int8" else "float32",
        "per_channel": per_channel if method == "ptq-int8" else None,
        "interpreter": interpreter_name(), "source": str(model_path), "out_dir": str(out_dir),
        "test_examples": int(len(labels)), "skipped_files": skipped,
        "num_threads": num_threads, "latency_runs": latency_runs, **_model_record(loaded),
        **({"sparsity": mot_result["sparsity"]} if mot_result.get("sparsity") else {}),
        **compare(loaded.task, float_model, optimized_model, images, labels, latency_runs,
                  num_threads)}
    write_bytes(out_dir / TFLITE_FILE, optimized_model)
    write_bytes(out_dir / FLOAT32_TFLITE_FILE, float_model)
    write_json(out_dir / OPTIMIZE_REPORT_FILE, report)
    write_text(out_dir / OPTIMIZE_TABLE_FILE, markdown_table(report))
    return report


def _model_record(loaded: LoadedClassifier) -> dict[str, Any]:
    """What `kcls predict model.tflite` reads from the report: classes, input, task."""
    return {"class_names": loaded.class_names, "image_size": loaded.recipe.data.image_size,
            "resize": loaded.recipe.data.resize, "task_metadata": loaded.task.metadata()}
def check_request(method: str, io_type: str, out_dir: str | Path | None,
                  overwrite: bool) -> Path | None:
    """Checks an `optimize` request before any work: the method, the io type and, when
    given, the output folder (`check_optimize_dir`). Returns that folder or None.

    Raises:
        OptimizeError: unknown method or io type, or an earlier report (no `overwrite`).
        OutputFolderError: the folder cannot be written.
    """
    if method not in METHODS:
        raise OptimizeError(f"Unknown method {method!r}; use one of {', '.join(METHODS)}.")
    if io_type not in IO_TYPES:
        raise OptimizeError(f"Unknown io type {io_type!r}; use one of {', '.join(IO_TYPES)}.")
    return None if out_dir is None else check_optimize_dir(out_dir, overwrite)


def check_optimize_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """`out_dir`, once checked writable and without an earlier report (or `overwrite`)."""
    out_dir = check_output_dir(out_dir)
    if (out_dir / OPTIMIZE_REPORT_FILE).exists() and not overwrite:
        raise OptimizeError(f"{out_dir / OPTIMIZE_REPORT_FILE} exists: pass --overwrite to "
                            "replace that optimized model and its report, or another --out.")
    return out_dir


def compare(task: Task, float_model: bytes, optimized_model: bytes, images: np.ndarray,
            labels: np.ndarray, latency_runs: int, num_threads: int) -> dict[str, Any]:
    """The float32 and optimized TFLite models measured side by side (`measure`).

    Returns:
        `{"task", "metrics", "agreement_kind", "float32", "optimized", "agreement",
        "ratios"}` of the report `optimize` writes.
    """
    float_row, float_predictions = measure(float_model, images, labels, latency_runs,
                                           num_threads, task)
    row, predictions = measure(optimized_model, images, labels, latency_runs, num_threads,
                               task)
    same = (predictions == float_predictions).reshape(len(predictions), -1).all(axis=1)
    metrics = list(task.headline_metrics)
    return {
        "task": task.name, "metrics": metrics, "agreement_kind": task.agreement_kind,
        "float32": float_row, "optimized": row, "agreement": float(np.mean(same)),
        "ratios": {"size": float_row["size_bytes"] / row["size_bytes"],
                   "zipped_size": float_row["zipped_bytes"] / row["zipped_bytes"],
                   "speedup": float_row["latency_ms"] / row["latency_ms"],
                   **{f"{metric}_delta": _delta(row[metric], float_row[metric])
                      for metric in metrics}}}


def _delta(value: float | None, baseline: float | None) -> float | None:
    """`value - baseline`, None when either is (mAP without any positive label)."""
    return None if value is None or baseline is None else value - baseline


def metrics_line(report: dict[str, Any], row: dict[str, Any]) -> str:
    """A row's quality metrics, e.g. `accuracy 0.9100` or `mAP 0.8100  micro_f1 0.7000`."""
    return "  ".join(f"{metric} {_number(row[metric])}"
                     for metric in report.get("metrics", ["accuracy"]))


def deltas_line(report: dict[str, Any]) -> str:
    """The quality changes vs float32 and the agreement, e.g. `accuracy +0.0010, top-1 ...`."""
    metrics = report.get("metrics", ["accuracy"])
    deltas = ", ".join(f"{metric} {_number(report['ratios'][f'{metric}_delta'], '+')}"
                       for metric in metrics)
    kind = report.get("agreement_kind", "top-1")
    return f"{deltas}, {kind} agreement with float32 {report['agreement']:.4f}"


def _number(value: float | None, sign: str = "") -> str:
    return "n/a" if value is None else f"{value:{sign}.4f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table: float32 TFLite vs the optimized model."""
    metrics = report.get("metrics", ["accuracy"])
    lines = [f"# {report['method']} vs float32 TFLite",
             "",
             f"{report['test_examples']} held-out test images; latency: batch 1, warm, median "
             f"of {report['latency_runs']} runs, {report['num_threads']} interpreter thread(s) "
             f"({report.get('interpreter', 'tf.lite')}).",
             "",
             f"| model | input | size (bytes) | zipped (bytes) | {' | '.join(metrics)} "
             "| latency (ms) |",
             "| --- | --- | ---: | ---: | " + "---: | " * len(metrics) + "---: |"]
    for name, row in (("float32", report["float32"]), (report["method"], report["optimized"])):
        scores = " | ".join(_number(row[metric]) for metric in metrics)
        lines.append(f"| {name} | {row['input_dtype']} | {row['size_bytes']:,} | "
                     f"{row['zipped_bytes']:,} | {scores} | {row['latency_ms']:.3f} |")
    ratios = report["ratios"]
    lines += ["",
              f"{ratios['size']:.2f}x smaller ({ratios['zipped_size']:.2f}x zipped), "
              f"{ratios['speedup']:.2f}x faster, {deltas_line(report)}.", ""]
    return "\n".join(lines)


