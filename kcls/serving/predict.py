"""Local predictions from an exported SavedModel, through its `serving_default` signature.

Example:

>>> predictor = load_predictor("saved_models/quickstart")  # doctest: +SKIP
>>> predictor.predict_file("digit.png")[:1]  # doctest: +SKIP
[('7', 0.98)]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorflow as tf

from kcls.layout import resolve_export_dir
from kcls.load import load_saved_model


class PredictionError(ValueError):
    """An input the model cannot classify, e.g. a file that is not an image."""


@dataclass
class Predictor:
    """Calls the `serving_default` signature of a loaded export."""

    export_dir: Path
    signature: Any
    loaded: Any  # keeps the signature's variables alive

    def predict_bytes(self, image_bytes: bytes) -> list[tuple[str, float]]:
        """Top-k `(label, probability)` pairs, best first, for one encoded image; for a
        multi-label model, the labels above their thresholds (the served blanks dropped)."""
        try:
            outputs = self.signature(image_bytes=tf.constant([image_bytes]))
        except tf.errors.InvalidArgumentError:
            raise PredictionError("not a decodable JPEG, PNG, GIF or BMP image") from None
        labels = [label.decode() for label in outputs["labels"].numpy()[0]]
        return [(label, score) for label, score
                in zip(labels, outputs["scores"].numpy()[0].tolist()) if label]

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
    return Predictor(export_dir, signature, loaded)
