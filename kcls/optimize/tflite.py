"""TFLite conversion, post-training quantization, interpreter evaluation and latency.

`optimize(path, method)` (what `kcls optimize` does):

1. rebuilds the float32 Keras classifier with `kcls.export.load_classifier` (a run
   directory or an export);
2. writes a temporary SavedModel with one signature, float32 images `[1, S, S, 3]` in
   [0, 255] -> `probabilities` float32 `[1, C]`, and converts it with
   `tf.lite.TFLiteConverter.from_saved_model` (`from_keras_model` does not take Keras 3
   models, and the export's own signatures take encoded bytes or resize inside);
3. converts it twice: plain float32 (the baseline) and with `method`:
   `ptq-dynamic` (int8 weights, float activations), `ptq-float16` (float16 weights) or
   `ptq-int8` (full integer, calibrated on images of the training split, input/output
   type `io_type`, per-channel weight scales unless `per_channel=False`); `prune` and
   `qat` instead fine-tune in a TF-MOT child process (`fine_tune_with_mot`,
   `kcls.optimize.mot_worker`);
4. evaluates both with the TFLite interpreter on the recipe's held-out test split (the
   same examples `kcls evaluate` uses), one image at a time, and measures warm latency
   (batch 1, median of `latency_runs` invocations);
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

import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kcls.config import Recipe, to_dict
from kcls.data.pipeline import prepare_image
from kcls.data.sources import load_splits
from kcls.export import is_run_dir, load_classifier, resolve_export_dir
from kcls.optimize.weight_keys import weight_keys

PTQ_METHODS = ("ptq-dynamic", "ptq-float16", "ptq-int8")
TRAINING_METHODS = ("prune", "qat")
METHODS = PTQ_METHODS + TRAINING_METHODS
IO_TYPES = ("int8", "uint8", "float32")
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
REPORT_FILE = "optimize.json"
TABLE_FILE = "optimize.md"


class OptimizeError(ValueError):
    """A request `optimize` cannot carry out, with what to do instead in its message."""


@dataclasses.dataclass
class TFLiteClassifier:
    """A TFLite classifier run one image at a time by the interpreter.

    Attributes:
        interpreter: the allocated interpreter (input `[1, S, S, 3]`, output `[1, C]`).
        input_dtype: numpy dtype the model takes (float32, int8 or uint8).
        output_dtype: numpy dtype it returns.
    """

    interpreter: Any
    input_dtype: np.dtype
    output_dtype: np.dtype

    @classmethod
    def from_bytes(cls, model: bytes, num_threads: int = 1) -> TFLiteClassifier:
        """Loads a flatbuffer; `num_threads` interpreter threads (1: edge-like, stable timing)."""
        interpreter = _interpreter_class()(model_content=model, num_threads=num_threads)
        interpreter.allocate_tensors()
        return cls(interpreter, np.dtype(interpreter.get_input_details()[0]["dtype"]),
                   np.dtype(interpreter.get_output_details()[0]["dtype"]))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The input shape, `(1, S, S, 3)`."""
        return tuple(int(n) for n in self.interpreter.get_input_details()[0]["shape"])

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The output shape, `(1, C)`."""
        return tuple(int(n) for n in self.interpreter.get_output_details()[0]["shape"])

    def quantize_input(self, image: np.ndarray) -> np.ndarray:
        """float32 `[1, S, S, 3]` in [0, 255] -> the model's input dtype (quantized if integer)."""
        if self.input_dtype == np.float32:
            return image.astype(np.float32)
        scale, zero_point = self.interpreter.get_input_details()[0]["quantization"]
        limits = np.iinfo(self.input_dtype)
        quantized = np.round(image / scale + zero_point)
        return np.clip(quantized, limits.min, limits.max).astype(self.input_dtype)

    def invoke(self, model_input: np.ndarray) -> np.ndarray:
        """Runs one already-typed input; returns the raw output `[1, C]`."""
        self.interpreter.set_tensor(self.interpreter.get_input_details()[0]["index"], model_input)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.interpreter.get_output_details()[0]["index"])

    def predict(self, images: np.ndarray) -> np.ndarray:
        """float32 `[N, S, S, 3]` in [0, 255] -> float32 probabilities `[N, C]` (dequantized)."""
        scale, zero_point = self.interpreter.get_output_details()[0]["quantization"]
        rows = []
        for image in images:
            output = self.invoke(self.quantize_input(image[np.newaxis]))
            if self.output_dtype != np.float32:
                output = (output.astype(np.float32) - zero_point) * scale
            rows.append(output[0])
        return np.stack(rows).astype(np.float32)

    def latency_ms(self, image: np.ndarray, runs: int = 100, warmup: int = 10) -> float:
        """Median milliseconds of one warm `invoke` on `image`, float32 `[1, S, S, 3]`."""
        model_input = self.quantize_input(image)
        for _ in range(warmup):
            self.invoke(model_input)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            self.invoke(model_input)
            times.append(time.perf_counter() - started)
        return 1000.0 * statistics.median(times)


def interpreter_name() -> str:
    """Which interpreter `TFLiteClassifier` uses: `ai_edge_litert` or `tf.lite`."""
    return "tf.lite" if _interpreter_class() is tf.lite.Interpreter else "ai_edge_litert"


def _interpreter_class() -> type:
    """LiteRT's interpreter (`pip install "kcls[edge]"`), else TensorFlow's own.

    `tf.lite.Interpreter` is deprecated in favour of `ai_edge_litert` but still ships with
    TF 2.21 and runs the same flatbuffers, so kcls does not require the extra wheel.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return tf.lite.Interpreter
    return Interpreter


def write_probability_saved_model(classifier: keras.Model, image_size: int,
                                  directory: str | Path) -> Path:
    """Writes a SavedModel the TFLite converter takes: one fixed-shape float signature.

    Args:
        classifier: float32 keras.Model, images `[B, S, S, 3]` in [0, 255] -> logits `[B, C]`.
        image_size: int, S.
        directory: where to write it.

    Returns:
        `directory`, whose `serving_default` maps `images` float32 `[1, S, S, 3]` to
        `probabilities` float32 `[1, C]`.
    """
    def probabilities(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return {OUTPUT_NAME: tf.nn.softmax(classifier(images, training=False))}

    archive = keras.export.ExportArchive()
    archive.track(classifier)
    # Batch 1, static: edge runtimes allocate once, and a dynamic batch keeps the
    # converter from folding shapes.
    archive.add_endpoint("serving_default", probabilities, input_signature=[
        tf.TensorSpec([1, image_size, image_size, 3], tf.float32, name=INPUT_NAME)])
    archive.write_out(str(directory), verbose=False)
    return Path(directory)


def convert(saved_model_dir: str | Path, method: str | None = None,
            representative_images: Callable[[], Iterator[np.ndarray]] | None = None,
            io_type: str = "int8", per_channel: bool = True) -> bytes:
    """Converts a SavedModel from `write_probability_saved_model` to a TFLite flatbuffer.

    Args:
        saved_model_dir: the SavedModel.
        method: `None` (float32), `ptq-dynamic`, `ptq-float16` or `ptq-int8`.
        representative_images: for `ptq-int8`, a callable yielding float32 `[1, S, S, 3]`
            calibration images in [0, 255].
        io_type: for `ptq-int8`, the model's input and output type: `int8`, `uint8` or
            `float32` (float32 keeps quantize/dequantize ops inside the model).
        per_channel: for `ptq-int8`, one weight scale per output channel (the converter's
            default). `False`: one scale per tensor, which drops a float32 scale and an
            int64 zero point per channel from the file (about 45 KB, 15%, on quickstart's
            resnet_v2_tiny) but can cost accuracy, notably with depthwise convolutions.

    Returns:
        The `.tflite` flatbuffer.
    """
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))
    if method in PTQ_METHODS:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if method == "ptq-float16":
        converter.target_spec.supported_types = [tf.float16]
    elif method == "ptq-int8":
        if representative_images is None:
            raise OptimizeError("ptq-int8 needs representative images for calibration.")
        converter.representative_dataset = lambda: ([image] for image in representative_images())
        # Full integer: fail at conversion rather than silently keep float ops.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # Private but long-standing converter switch; there is no public one.
        converter._experimental_disable_per_channel = not per_channel
        if io_type != "float32":
            converter.inference_input_type = getattr(tf, io_type)
            converter.inference_output_type = getattr(tf, io_type)
    elif method is not None and method not in PTQ_METHODS:
        raise OptimizeError(f"Unknown post-training method {method!r}; use one of "
                            f"{', '.join(PTQ_METHODS)}.")
    return converter.convert()


def representative_images(recipe: Recipe, count: int = 200) -> Callable[[], Iterator[np.ndarray]]:
    """Calibration images from the recipe's TRAINING split, never the test split.

    Returns:
        A callable yielding `count` (or fewer) float32 `[1, S, S, 3]` images in [0, 255],
        shuffled with the recipe's seed, prepared exactly as in evaluation.
    """
    def images() -> Iterator[np.ndarray]:
        train = load_splits(recipe.data).train.shuffle(10_000, seed=recipe.data.seed)
        prepared = train.take(count).map(
            lambda image, _: prepare_image(image, recipe.data.image_size, recipe.data.resize),
            num_parallel_calls=tf.data.AUTOTUNE)
        for image in prepared.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
            yield image[np.newaxis].astype(np.float32)

    return images


def held_out_examples(recipe: Recipe) -> tuple[np.ndarray, np.ndarray]:
    """The recipe's held-out test split as arrays: float32 `[N, S, S, 3]`, int64 `[N]`."""
    prepared = load_splits(recipe.data).test.map(
        lambda image, label: (prepare_image(image, recipe.data.image_size, recipe.data.resize),
                              label), num_parallel_calls=tf.data.AUTOTUNE)
    images, labels = [], []
    for image, label in prepared.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
        images.append(image)
        labels.append(label)
    return np.stack(images).astype(np.float32), np.asarray(labels, np.int64)


def zipped_size(model: bytes) -> int:
    """Bytes of `model` in a deflate-compressed zip: what pruned zeros save on the wire."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model.tflite", model)
    return len(buffer.getvalue())


def default_out_dir(model_path: str | Path, method: str) -> Path:
    """Where `optimize` writes by default (see the module docstring)."""
    path = Path(model_path)
    if is_run_dir(path):
        return path / "optimized" / method
    export_dir = resolve_export_dir(path)
    return export_dir.parent / "optimized" / export_dir.name / method


def measure(model: bytes, images: np.ndarray, labels: np.ndarray, latency_runs: int = 100,
            num_threads: int = 1) -> tuple[dict[str, Any], np.ndarray]:
    """Size, test accuracy and batch-1 latency of a TFLite classifier.

    Args:
        model: the flatbuffer.
        images: float32 `[N, S, S, 3]` in [0, 255].
        labels: int64 `[N]`.
        latency_runs: timed invocations (after 10 warm-up ones).
        num_threads: interpreter threads.

    Returns:
        `(row, predictions)`: the row has `size_bytes`, `zipped_bytes`, `accuracy`,
        `latency_ms`, `input_dtype`; predictions are int64 top-1 classes `[N]`.
    """
    runner = TFLiteClassifier.from_bytes(model, num_threads)
    predictions = np.argmax(runner.predict(images), axis=-1)
    row = {"size_bytes": len(model), "zipped_bytes": zipped_size(model),
           "accuracy": float(np.mean(predictions == labels)),
           "latency_ms": runner.latency_ms(images[:1], latency_runs),
           "input_dtype": runner.input_dtype.name}
    return row, predictions


def optimize(model_path: str | Path, method: str, out_dir: str | Path | None = None,
             io_type: str = "int8", calibration_images: int = 200, latency_runs: int = 100,
             num_threads: int = 1, mot_epochs: int = 2, target_sparsity: float = 0.5,
             mot_steps_per_epoch: int | None = None, per_channel: bool = True) -> dict[str, Any]:
    """Quantizes a trained classifier for the edge and compares it with float32 TFLite.

    Args:
        model_path: a run directory or an export (version or model folder).
        method: one of `METHODS`; `prune` and `qat` fine-tune in a TF-MOT child process
            (see `fine_tune_with_mot`).
        out_dir: output folder; default from `default_out_dir`.
        io_type: `ptq-int8` input/output type (`int8`, `uint8` or `float32`).
        calibration_images: training images used to calibrate `ptq-int8`.
        latency_runs: timed batch-1 invocations per model.
        num_threads: interpreter threads for evaluation and latency.
        mot_epochs: `prune`/`qat` fine-tuning epochs over the training split.
        target_sparsity: `prune`'s final share of zero weights in Conv/Dense kernels.
        mot_steps_per_epoch: caps `prune`/`qat` steps per epoch (default: the whole split).
        per_channel: `ptq-int8` weight scales per output channel (default) or per tensor
            (smaller file; see `convert`).

    Returns:
        The report written to `<out_dir>/optimize.json`: `method`, `io_type`,
        `per_channel`, `interpreter` (see `interpreter_name`), `out_dir`,
        `test_examples`, `float32` and `optimized` rows (see `measure`), `agreement` (share
        of test images with the same top-1 class as float32 TFLite), `ratios` and, for
        `prune`, `sparsity` (share of zeros per kernel and `overall`).

    Raises:
        OptimizeError: unknown or unavailable method, or a bad `io_type`.
        FileNotFoundError, ConfigError: from `load_classifier`.
    """
    if method not in METHODS:
        raise OptimizeError(f"Unknown method {method!r}; use one of {', '.join(METHODS)}.")
    if io_type not in IO_TYPES:
        raise OptimizeError(f"Unknown io type {io_type!r}; use one of {', '.join(IO_TYPES)}.")
    loaded = load_classifier(model_path)
    recipe = loaded.recipe
    out_dir = Path(out_dir) if out_dir else default_out_dir(model_path, method)
    with tempfile.TemporaryDirectory(prefix="kcls-tflite-") as temporary:
        saved_model = write_probability_saved_model(loaded.classifier, recipe.data.image_size,
                                                    Path(temporary) / "saved_model")
        float_model = convert(saved_model)
        if method in TRAINING_METHODS:
            optimized_model, mot_result = fine_tune_with_mot(
                loaded.classifier, recipe, len(loaded.class_names), method, out_dir,
                mot_epochs, target_sparsity, steps_per_epoch=mot_steps_per_epoch)
        else:
            optimized_model, mot_result = convert(
                saved_model, method, representative_images(recipe, calibration_images),
                io_type, per_channel), {}
    images, labels = held_out_examples(recipe)
    float_row, float_predictions = measure(float_model, images, labels, latency_runs, num_threads)
    row, predictions = measure(optimized_model, images, labels, latency_runs, num_threads)
    report = {
        "method": method, "io_type": io_type if method == "ptq-int8" else "float32",
        "per_channel": per_channel if method == "ptq-int8" else None,
        "interpreter": interpreter_name(),
        "source": str(model_path), "out_dir": str(out_dir), "test_examples": int(len(labels)),
        "num_threads": num_threads, "latency_runs": latency_runs,
        "float32": float_row, "optimized": row,
        "agreement": float(np.mean(predictions == float_predictions)),
        **({"sparsity": mot_result["sparsity"]} if mot_result.get("sparsity") else {}),
        "ratios": {"size": float_row["size_bytes"] / row["size_bytes"],
                   "zipped_size": float_row["zipped_bytes"] / row["zipped_bytes"],
                   "speedup": float_row["latency_ms"] / row["latency_ms"],
                   "accuracy_delta": row["accuracy"] - float_row["accuracy"]},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model.tflite").write_bytes(optimized_model)
    (out_dir / "float32.tflite").write_bytes(float_model)
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    (out_dir / TABLE_FILE).write_text(markdown_table(report))
    return report


def markdown_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table: float32 TFLite vs the optimized model."""
    lines = [f"# {report['method']} vs float32 TFLite",
             "",
             f"{report['test_examples']} held-out test images; latency: batch 1, warm, median "
             f"of {report['latency_runs']} runs, {report['num_threads']} interpreter thread(s) "
             f"({report.get('interpreter', 'tf.lite')}).",
             "",
             "| model | input | size (bytes) | zipped (bytes) | accuracy | latency (ms) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, row in (("float32", report["float32"]), (report["method"], report["optimized"])):
        lines.append(f"| {name} | {row['input_dtype']} | {row['size_bytes']:,} | "
                     f"{row['zipped_bytes']:,} | {row['accuracy']:.4f} | "
                     f"{row['latency_ms']:.3f} |")
    ratios = report["ratios"]
    lines += ["",
              f"{ratios['size']:.2f}x smaller ({ratios['zipped_size']:.2f}x zipped), "
              f"{ratios['speedup']:.2f}x faster, accuracy {ratios['accuracy_delta']:+.4f}, "
              f"top-1 agreement with float32 {report['agreement']:.4f}.", ""]
    return "\n".join(lines)


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
