"""Local predictions from an exported SavedModel, through its `serving_default` signature.

`Predictor.run` classifies a batch of encoded images in one call (what `kcls predict`
batches through, `kcls.workflows.predict`); `predict_file` and `predict_bytes` one image.

Example:

>>> predictor = load_predictor("saved_models/quickstart")  # doctest: +SKIP
>>> predictor.predict_file("digit.png")[:1]  # doctest: +SKIP
[('7', 0.98)]
>>> predictor.run([png_bytes, jpeg_bytes])["known"]  # doctest: +SKIP
array([ True, False])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from kcls.layout import METADATA_FILE, resolve_export_dir
from kcls.load import load_saved_model, read_export_labels, read_export_metadata
from kcls.tasks import Task, get_task, task_from_metadata


class PredictionError(ValueError):
    """An input the model cannot classify, e.g. a file that is not an image."""


@dataclass
class Predictor:
    """Calls the `serving_default` signature of a loaded export.

    Attributes:
        export_dir: the version directory.
        signature: its `serving_default` concrete function.
        loaded: the loaded SavedModel (keeps the signature's variables alive).
        class_names: list[str], from `kcls.json` (or `assets/labels.txt`).
        task: the fitted Task `kcls.json` records (temperature, thresholds, rejection).
    """

    export_dir: Path
    signature: Any
    loaded: Any
    class_names: list[str] = field(default_factory=list)
    task: Task | None = None

    def run(self, images: list[bytes]) -> dict[str, np.ndarray]:
        """Every served output for encoded images (`probabilities` `[N, C]`, `labels`,
        `scores`, and with a rejection rule `known` `[N]` and `known_score` `[N]`).

        Raises:
            PredictionError: one of the images does not decode (the batch fails whole).
        """
        try:
            outputs = self.signature(image_bytes=tf.constant(images, tf.string))
        except tf.errors.InvalidArgumentError:
            raise PredictionError("not a decodable JPEG, PNG, GIF or BMP image") from None
        return {name: value.numpy() for name, value in outputs.items()}

    def predict_bytes(self, image_bytes: bytes) -> list[tuple[str, float]]:
        """Top-k `(label, probability)` pairs, best first, for one encoded image; for a
        multi-label model, the labels above their thresholds (the served blanks dropped)."""
        outputs = self.run([image_bytes])
        labels = [label.decode() for label in outputs["labels"][0]]
        return [(label, score) for label, score
                in zip(labels, outputs["scores"][0].tolist()) if label]

    def predict_file(self, path: str | Path) -> list[tuple[str, float]]:
        """Top-k `(label, probability)` pairs for the image file at `path`."""
        try:
            return self.predict_bytes(Path(path).read_bytes())
        except PredictionError as error:
            raise PredictionError(f"{path}: {error}.") from None


def load_predictor(model_dir: str | Path) -> Predictor:
    """Loads the export at `model_dir` (a version directory, or a model folder: latest version).

    Raises:
        FileNotFoundError: no export there, or the version has no SavedModel
            (`kcls.layout.resolve_export_dir`).
        DamagedFileError: the SavedModel is damaged; the message names the folder.
    """
    export_dir = resolve_export_dir(model_dir)
    loaded, signature = load_saved_model(export_dir, "serving_default")
    class_names, task = _export_task(export_dir)
    return Predictor(export_dir, signature, loaded, class_names, task)


def _export_task(export_dir: Path) -> tuple[list[str], Task]:
    """The class names and fitted task of an export (`kcls.json`; an export without it
    has its `labels.txt` and the unfitted single-label task)."""
    if not (export_dir / METADATA_FILE).is_file():
        return read_export_labels(export_dir) or [], get_task("multiclass")
    metadata = read_export_metadata(export_dir)
    name = metadata.get("task") or metadata["recipe"]["model"]["task"]
    return metadata["class_names"], task_from_metadata(name, metadata)
