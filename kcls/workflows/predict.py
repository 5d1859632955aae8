"""`kcls predict MODEL IMAGE...`: many images through an export, in batches.

MODEL is an export (a version or model folder: its SavedModel's `serving_default`), a
`.onnx` file from `kcls export --format onnx` (ONNX Runtime, `kcls.serving.onnx`) or a
`.tflite` file from `kcls optimize` (the TFLite interpreter; the `optimize.json` beside
it names the classes, the input and the task). Each IMAGE is a file, a folder (every
image under it by extension, at any depth; other files are counted as not images) or a
glob (`photos/**/*.jpg`, `**` recursive).

Files are read on a thread one batch ahead and classified `batch_size` at a time; a batch
holding a file that does not decode is retried one image at a time, so an unreadable
file is listed in `PredictionRun.unreadable` with its reason, never fatal. ONNX and
TFLite models get the images decoded and resized on the host exactly as the SavedModel
does inside (`kcls.serving.graph.image_decoder`). Each image's labels come from the
task (`Task.ranked_labels`), `known` from the model's rejection rule (None without one).
`write_predictions` writes `FILE.csv` or `FILE.jsonl` atomically.

Example:

>>> run = predict_images("saved_models/quickstart", ["photos/"], top_k=3)  # doctest: +SKIP
>>> run.predictions[0].labels, run.predictions[0].known  # doctest: +SKIP
(['7', '1', '9'], True)
"""

from __future__ import annotations

import csv
import glob
import io
import json
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tensorflow as tf

from kcls.data.folder import IMAGE_EXTENSIONS, list_image_files, printable_path
from kcls.files import write_text
from kcls.layout import OPTIMIZE_REPORT_FILE
from kcls.load import read_json
from kcls.optimize.interpreter import TFLiteClassifier
from kcls.serving.graph import image_decoder
from kcls.serving.onnx import OnnxSession
from kcls.serving.predict import PredictionError, load_predictor
from kcls.tasks import Task, task_from_metadata

BATCH_SIZE = 32
OUTPUT_FORMATS = (".csv", ".jsonl")
GLOB_CHARACTERS = "*?["
UNDECODABLE = "not a decodable JPEG, PNG, GIF or BMP image"


class PredictInputError(ValueError):
    """Images or a model `kcls predict` cannot start on; the message says what to pass."""


class BatchModel(Protocol):
    """What `predict_images` runs: the class names, the fitted task, and a batch call
    returning `probabilities` `[N, C]` and, with a rejection rule, `known` `[N]` or
    `known_score` `[N]` (raising `PredictionError` when an image does not decode)."""

    class_names: list[str]
    task: Task

    def run(self, images: list[bytes]) -> dict[str, np.ndarray]: ...


@dataclass
class ImagePrediction:
    """One image's answer: the top labels and probabilities, best first, and whether the
    model knows it (`known` None: the model has no rejection rule)."""

    path: str
    labels: list[str]
    scores: list[float]
    known: bool | None = None
    known_score: float | None = None

    def record(self) -> dict[str, Any]:
        """The JSON-lines object: `path`, `labels`, `scores`, `known`, `known_score`."""
        return {"path": self.path, "labels": self.labels,
                "scores": [round(score, 6) for score in self.scores], "known": self.known,
                "known_score": None if self.known_score is None else round(self.known_score, 6)}

    def line(self) -> str:
        """The printed line: `path: label (0.981)  label (0.012)`, `unknown` first when
        rejected (the labels after it are the closest classes)."""
        ranked = "  ".join(f"{label} ({score:.3f})" for label, score
                           in zip(self.labels, self.scores)) or "(no label above its threshold)"
        return f"{self.path}: " + ("unknown; closest: " if self.known is False else "") + ranked


@dataclass
class PredictionRun:
    """What `predict_images` did.

    Attributes:
        predictions: one per classified image, in input order.
        unreadable: `path: reason` of every file that could not be read or decoded.
        not_images: files in the folders given whose names are not images'.
        seconds: wall time from the first read to the last answer.
    """

    predictions: list[ImagePrediction] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    not_images: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return len(self.predictions) / self.seconds if self.seconds > 0 else 0.0


def find_images(arguments: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """The image files the arguments name, in order, each once, and the other files of the
    folders named (not images by extension).

    Raises:
        PredictInputError: a path that does not exist or a glob that matches nothing.
    """
    images: list[Path] = []
    not_images: list[str] = []
    for argument in map(str, arguments):
        if any(character in argument for character in GLOB_CHARACTERS):
            matches = [Path(match) for match in sorted(glob.glob(argument, recursive=True))]
            if not matches:
                raise PredictInputError(f"No file matches {argument!r}; quote the pattern so "
                                        "the shell does not expand it, e.g. 'photos/**/*.jpg'.")
        elif Path(argument).exists():
            matches = [Path(argument)]
        else:
            raise PredictInputError(f"IMAGE {argument!r} does not exist; pass image files, "
                                    "folders or globs.")
        for match in matches:
            if match.is_dir():
                images += list_image_files(match)
                not_images += [printable_path(path) for path in sorted(match.rglob("*"))
                               if path.is_file() and path.suffix.lower() not in IMAGE_EXTENSIONS]
            elif match.is_file():
                images.append(match)
    return list(dict.fromkeys(images)), not_images


@dataclass
class TFLiteModel:
    """A `kcls optimize` `.tflite` model with the classes, input and task of the
    `optimize.json` beside it."""

    classifier: TFLiteClassifier
    class_names: list[str]
    task: Task
    decode: Callable[[list[bytes]], Any]

    @classmethod
    def load(cls, path: Path, threads: int | None = None) -> TFLiteModel:
        report_file = path.parent / OPTIMIZE_REPORT_FILE
        report = (read_json(report_file, "run `kcls optimize` again") if report_file.is_file()
                  else {})
        if "class_names" not in report:
            raise PredictInputError(
                f"{str(path)!r} has no {OPTIMIZE_REPORT_FILE} beside it naming its classes and "
                "input (kcls optimize writes one); run `kcls optimize` again, or predict with "
                "the export it came from.")
        metadata = report["task_metadata"]
        return cls(TFLiteClassifier.from_bytes(path.read_bytes(), threads or 1),
                   report["class_names"], task_from_metadata(metadata["task"], metadata),
                   image_decoder(report["image_size"], report["resize"]))

    def run(self, images: list[bytes]) -> dict[str, np.ndarray]:
        try:
            prepared = self.decode(images).numpy()
        except tf.errors.InvalidArgumentError:
            raise PredictionError(UNDECODABLE) from None
        outputs = self.classifier.predict_outputs(prepared)
        if "known_score" in outputs and self.task.rejection is not None:
            outputs["known"] = outputs["known_score"] >= self.task.rejection.threshold
        return outputs


class OnnxModel:
    """A kcls `.onnx` model run by ONNX Runtime on host-decoded images."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.session = OnnxSession(path, threads)
        self.class_names, self.task = self.session.class_names, self.session.task

    def run(self, images: list[bytes]) -> dict[str, np.ndarray]:
        return self.session.run_encoded(images)


def load_model(model: str | Path, threads: int | None = None) -> BatchModel:
    """The model at `model`: a `.onnx` or `.tflite` file, else an export folder."""
    path = Path(model)
    if path.suffix.lower() == ".onnx" and path.is_file():
        return OnnxModel(path, threads)
    if path.suffix.lower() == ".tflite" and path.is_file():
        return TFLiteModel.load(path, threads)
    if path.is_file():
        raise PredictInputError(f"MODEL {str(path)!r} is a file but neither .onnx nor .tflite; "
                                "pass an export folder (saved_models/NAME), a .onnx or a "
                                ".tflite file.")
    return load_predictor(path)


def predict_images(model: str | Path | BatchModel, images: Sequence[str | Path],
                   top_k: int = 3, batch_size: int = BATCH_SIZE,
                   progress: Callable[[int, int], None] | None = None) -> PredictionRun:
    """Classifies every image the arguments name (`find_images`) with `model`.

    Args:
        model: an export folder, a `.onnx` or `.tflite` file (`load_model`), or a loaded one.
        images: files, folders and globs.
        top_k: labels per image.
        batch_size: images per model call.
        progress: called after each batch with (images done, images in all).

    Raises:
        PredictInputError: missing inputs, no image among them, or an unusable model file.
    """
    paths, not_images = find_images(images)
    if not paths:
        raise PredictInputError("No image file (" + ", ".join(IMAGE_EXTENSIONS) + ") in "
                                + ", ".join(map(str, images)) + ".")
    runner = load_model(model) if isinstance(model, (str, Path)) else model
    run = PredictionRun(not_images=not_images)
    started, done = time.perf_counter(), 0
    for chunk in _read_ahead(paths, batch_size):
        readable = [(path, data) for path, data in chunk if isinstance(data, bytes)]
        run.unreadable += [f"{printable_path(path)}: {data}" for path, data in chunk
                           if not isinstance(data, bytes)]
        for path, outputs in _classify(runner, readable, run.unreadable):
            run.predictions.append(_prediction(runner, path, outputs, top_k))
        done += len(chunk)
        if progress is not None:
            progress(done, len(paths))
    run.seconds = time.perf_counter() - started
    return run


def _read_ahead(paths: list[Path], batch_size: int
                ) -> Iterator[list[tuple[Path, bytes | str]]]:
    """Batches of `(path, bytes or the reason it cannot be read)`, the next one read on a
    thread while the current one is classified."""
    def read(batch: list[Path]) -> list[tuple[Path, bytes | str]]:
        contents: list[tuple[Path, bytes | str]] = []
        for path in batch:
            try:
                contents.append((path, path.read_bytes()))
            except OSError as error:
                contents.append((path, f"cannot be read ({error.strerror or error})"))
        return contents

    batches = [paths[start:start + batch_size] for start in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read, batches[0])
        for following in [*batches[1:], None]:
            current = pending.result()
            if following is not None:
                pending = reader.submit(read, following)
            yield current


def _classify(runner: BatchModel, chunk: list[tuple[Path, bytes]], unreadable: list[str]
              ) -> Iterator[tuple[Path, dict[str, np.ndarray]]]:
    """`(path, that image's outputs)` of a batch; when an image in it does not decode, the
    batch again one image at a time, the failures added to `unreadable`."""
    if not chunk:
        return
    try:
        outputs = runner.run([data for _, data in chunk])
        attempts = [(chunk, outputs)]
    except PredictionError:
        attempts = []
        for path, data in chunk:
            try:
                attempts.append(([(path, data)], runner.run([data])))
            except PredictionError as error:
                unreadable.append(f"{printable_path(path)}: {error}")
    for images, outputs in attempts:
        for row, (path, _) in enumerate(images):
            yield path, {name: value[row] for name, value in outputs.items()}


def _prediction(runner: BatchModel, path: Path, outputs: dict[str, np.ndarray],
                top_k: int) -> ImagePrediction:
    probabilities = np.asarray(outputs["probabilities"], np.float64)
    ranked = runner.task.ranked_labels(probabilities, top_k)
    known = outputs.get("known")
    score = outputs.get("known_score")
    return ImagePrediction(printable_path(path), [runner.class_names[index] for index in ranked],
                           [float(probabilities[index]) for index in ranked],
                           None if known is None else bool(known),
                           None if score is None else float(score))


def write_predictions(path: str | Path, run: PredictionRun, top_k: int) -> Path:
    """Writes the predictions to `FILE.csv` (columns `path`, `label_1`, `score_1`, ...,
    `known`, `known_score`) or `FILE.jsonl` (`ImagePrediction.record` per line), atomically.

    Raises:
        PredictInputError: another file extension.
    """
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise PredictInputError(f"--output {str(path)!r}: use a .csv or .jsonl file name.")
    if path.suffix.lower() == ".jsonl":
        return write_text(path, "".join(json.dumps(prediction.record()) + "\n"
                                        for prediction in run.predictions))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", *[f"{kind}_{rank}" for rank in range(1, top_k + 1)
                               for kind in ("label", "score")], "known", "known_score"])
    for prediction in run.predictions:
        ranked = [value for pair in zip(prediction.labels, prediction.scores) for value in pair]
        ranked += [""] * (2 * top_k - len(ranked))
        record = prediction.record()
        writer.writerow([prediction.path, *[f"{value:.6f}" if isinstance(value, float)
                                            else value for value in ranked],
                         "" if record["known"] is None else record["known"],
                         "" if record["known_score"] is None else record["known_score"]])
    return write_text(path, buffer.getvalue())
