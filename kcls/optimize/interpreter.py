"""The TFLite interpreter: predictions one image at a time, latency, size and accuracy.

Example:

>>> row, predictions = measure(model_bytes, images, labels, latency_runs=20)  # doctest: +SKIP
>>> row["accuracy"], row["latency_ms"]  # doctest: +SKIP
(0.97, 0.21)
"""

from __future__ import annotations

import dataclasses
import io
import statistics
import time
import warnings
import zipfile
from typing import Any

import numpy as np
import tensorflow as tf

from kcls.environment import native_logs_wanted, native_stderr_muted
from kcls.tasks import SingleLabelTask, Task


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
        with native_stderr_muted(not native_logs_wanted()):  # "Created ... XNNPACK delegate"
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
    return "tf.lite" if _interpreter_class() is _TensorFlowInterpreter else "ai_edge_litert"


class _TensorFlowInterpreter:
    """`tf.lite.Interpreter` without its deprecation warning, which would name TF 2.20
    and a package without saying how kcls gets it: `interpreter_class` says that once."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
            return tf.lite.Interpreter(*args, **kwargs)


_warned_about_tf_lite = False


def _interpreter_class() -> type:
    """LiteRT's interpreter (`pip install "kcls[edge]"`), else TensorFlow's own.

    `tf.lite.Interpreter` is deprecated in favour of `ai_edge_litert` but still ships with
    TF 2.21 and runs the same flatbuffers, so kcls does not require the extra wheel; it
    warns once per process that the extra replaces it.
    """
    global _warned_about_tf_lite
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        if not _warned_about_tf_lite:
            _warned_about_tf_lite = True
            warnings.warn("TFLite models run on tf.lite.Interpreter, which TensorFlow "
                          "deprecates; pip install \"kcls[edge]\" for the LiteRT interpreter "
                          "that replaces it (same models, same results).", UserWarning,
                          stacklevel=3)
        return _TensorFlowInterpreter
    return Interpreter


def zipped_size(model: bytes) -> int:
    """Bytes of `model` in a deflate-compressed zip: what pruned zeros save on the wire."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model.tflite", model)
    return len(buffer.getvalue())


def measure(model: bytes, images: np.ndarray, labels: np.ndarray, latency_runs: int = 100,
            num_threads: int = 1, task: Task | None = None
            ) -> tuple[dict[str, Any], np.ndarray]:
    """Size, test metrics and batch-1 latency of a TFLite classifier.

    Args:
        model: the flatbuffer.
        images: float32 `[N, S, S, 3]` in [0, 255].
        labels: int64 `[N]`, or for a multi-label model multi-hot int64 `[N, C]`.
        latency_runs: timed invocations (after 10 warm-up ones).
        num_threads: interpreter threads.
        task: the model's fitted Task, which scores its probabilities (`edge_metrics`:
            accuracy, or mAP and micro F1 at the thresholds) and reads its decisions;
            default single-label.

    Returns:
        `(row, predictions)`: the row has `size_bytes`, `zipped_bytes`, `latency_ms`,
        `input_dtype` and the task's metrics; predictions are the task's decisions
        (`Task.predicted`: int64 top-1 classes `[N]`, or multi-hot int64 `[N, C]`).
    """
    task = task or SingleLabelTask()
    runner = TFLiteClassifier.from_bytes(model, num_threads)
    probabilities = runner.predict(images)
    row: dict[str, Any] = {"size_bytes": len(model), "zipped_bytes": zipped_size(model),
                           **task.edge_metrics(probabilities, labels)}
    row.update({"latency_ms": runner.latency_ms(images[:1], latency_runs),
                "input_dtype": runner.input_dtype.name})
    return row, task.predicted(probabilities)
