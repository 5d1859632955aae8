"""ONNX Runtime against the SavedModel on this CPU, and `kcls predict` batched vs per file.

    python benchmarks/serving_latency.py VERSION_DIR [--runs 50] [--images FOLDER]

VERSION_DIR is an export version holding `model.onnx` (`kcls export RUN_DIR --format
onnx`, or a run with `export.onnx=true`). Part 1 times the same decoded images through
the SavedModel's `predict_images` signature (TensorFlow, eager call of the concrete
function) and through `model.onnx` (ONNX Runtime, CPU provider, default threads) at
batch 1 and batch 32: the median of `--runs` warm calls, ms per call and images/s.
The inputs are the same images at the model's size (uint8 for the SavedModel, float32 for
ONNX), so the graph's resize is the identity in both. Part 2
(with `--images FOLDER`) classifies every image of the folder with
`kcls.workflows.predict.predict_images` at batch 32 and at batch 1 (one model call per
file, as `kcls predict` did before batching), for the SavedModel and the ONNX model,
after one warm-up pass, and prints images/s (reading and decoding included).
The CPU model and its vector flags come from /proc/cpuinfo. docs/serving.md quotes the
figures this printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kcls.layout import ONNX_FILE  # noqa: E402
from kcls.serving.onnx import OnnxSession  # noqa: E402
from kcls.workflows.predict import predict_images  # noqa: E402

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


def cpu_description() -> str:
    """`MODEL, N cores, flags: ...` from /proc/cpuinfo (empty parts elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return (f"{model}, {os.cpu_count()} cores, flags: "
            + " ".join(flag for flag in FLAGS if flag in flags))


def median_ms(call, runs: int) -> float:
    """Median wall time of `runs` calls after 3 warm-up calls, in milliseconds."""
    for _ in range(3):
        call()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def latency_rows(version_dir: Path, runs: int) -> list[tuple[str, int, float]]:
    """`(runtime, batch, median ms per call)` for the SavedModel and ONNX Runtime."""
    session = OnnxSession(version_dir / ONNX_FILE)
    signature = tf.saved_model.load(str(version_dir)).signatures["predict_images"]
    size = session.image_size
    rng = np.random.default_rng(0)
    rows = []
    for batch in (1, 32):
        images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        as_tensor, as_float = tf.constant(images), images.astype(np.float32)
        rows.append(("SavedModel (TensorFlow)", batch,
                     median_ms(lambda tensor=as_tensor: signature(images=tensor), runs)))
        rows.append(("ONNX Runtime", batch,
                     median_ms(lambda floats=as_float: session.run(floats), runs)))
    return rows


def predict_rows(version_dir: Path, images: str) -> list[tuple[str, int, int, float]]:
    """`(model, batch, images, images/s)` of `predict_images` over the folder."""
    rows = []
    for name, model in (("SavedModel", version_dir), ("ONNX", version_dir / ONNX_FILE)):
        for batch in (32, 1):
            predict_images(model, [images], batch_size=batch)  # warm: load, trace, cache
            run = predict_images(model, [images], batch_size=batch)
            rows.append((name, batch, len(run.predictions), run.images_per_second))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version_dir", type=Path)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--images", help="a folder of images for the `kcls predict` part")
    args = parser.parse_args()
    print(cpu_description())
    print(f"tensorflow {tf.__version__}; "
          f"onnxruntime {__import__('onnxruntime').__version__}")
    print("| runtime | batch | ms per call | images/s |\n| --- | --- | --- | --- |")
    for runtime, batch, milliseconds in latency_rows(args.version_dir, args.runs):
        print(f"| {runtime} | {batch} | {milliseconds:.2f} | {1000 * batch / milliseconds:.0f} |")
    if args.images:
        print("\n| kcls predict model | batch | images | images/s |\n| --- | --- | --- | --- |")
        for name, batch, count, rate in predict_rows(args.version_dir, args.images):
            print(f"| {name} | {batch} | {count} | {rate:.0f} |")


if __name__ == "__main__":
    main()
