"""Evaluating a classifier: predictions over a dataset, and `kcls evaluate` for saved models.

`evaluate_classifier` runs a Keras classifier over an evaluation pipeline (optionally
with horizontal-flip test-time augmentation) and computes every metric of
`kcls.metrics.classification` from the one set of predictions; `evaluate_model` does it for an export or
a run directory on held-out data and writes the report (`kcls.evaluation.report`).

Example:

>>> evaluation = evaluate_model("saved_models/quickstart", out_dir="report")  # doctest: +SKIP
>>> evaluation.metrics["accuracy"]  # doctest: +SKIP
0.99
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from kcls.config import ConfigError
from kcls.data.folder import decode_files, scan_folder, skipped_files_line
from kcls.data.pipeline import eval_pipeline
from kcls.data.sources import load_splits
from kcls.evaluation.report import write_multilabel_report, write_report
from kcls.load import LoadedClassifier, load_classifier
from kcls.metrics.classification import Evaluation, evaluate_predictions
from kcls.metrics.multilabel import DEFAULT_THRESHOLD, multilabel_metrics, sigmoid


def predict_logits(classifier: keras.Model, batches: tf.data.Dataset,
                   flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Runs `classifier` in inference mode over `batches`.

    Args:
        classifier: keras.Model, images -> float32 logits `[B, C]`.
        batches: finite dataset of `(float32 images, float32 one-hot labels [B, C])`.
        flip: bool, predict on horizontally mirrored images instead.

    Returns:
        `(logits float32 [N, C], labels int64 [N])`.
    """
    logits, one_hot = _predict_batches(classifier, batches, flip)
    return logits, np.argmax(one_hot, axis=-1).astype(np.int64)


def predict_multilabel(classifier: keras.Model, batches: tf.data.Dataset
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Runs a multi-label `classifier` in inference mode over `batches`.

    Args:
        classifier: keras.Model, images -> float32 logits `[B, C]`, one per label.
        batches: finite dataset of `(float32 images, float32 multi-hot labels [B, C])`.

    Returns:
        `(probabilities float64 [N, C] = sigmoid(logits), targets float32 [N, C])`.
    """
    logits, targets = _predict_batches(classifier, batches)
    return sigmoid(logits), targets


def _predict_batches(classifier: keras.Model, batches: tf.data.Dataset,
                     flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`(logits float32 [N, C], labels float32 [N, C])` of `classifier` over `batches`."""
    # One pass, batch by batch: `predict()` would read the data twice (images, then
    # labels) and warn that a dataset of unknown length "ran out of data".
    logits, labels = [], []
    for images, batch_labels in batches:
        logits.append(classifier.predict_on_batch(images[:, :, ::-1] if flip else images))
        labels.append(batch_labels.numpy())
    return (np.concatenate(logits).astype(np.float32),
            np.concatenate(labels).astype(np.float32))


def evaluate_classifier(classifier: keras.Model, batches: tf.data.Dataset,
                        class_names: list[str] | None = None,
                        flip_tta: bool = False,
                        temperature: float | None = None) -> Evaluation:
    """All metrics of `classifier` on `batches`; with `flip_tta`, also under flip averaging.

    Flip test-time augmentation averages the probabilities of each image and its mirror;
    its metrics are reported separately under `metrics["tta"]`, never in place of the
    plain ones. With a `temperature` T, the metrics are those of `softmax(logits / T)`,
    what a calibrated export serves, and `metrics["calibration"]` compares them with T=1.
    """
    logits, labels = predict_logits(classifier, batches)
    flipped = predict_logits(classifier, batches, flip=True)[0] if flip_tta else None
    return evaluate_predictions(logits, labels, class_names, flipped, temperature)


def evaluate_model(model_path: str, data_source: str | None = None,
                   out_dir: str | None = None, flip_tta: bool = False,
                   log: Callable[[str], None] = print) -> Evaluation:
    """Evaluates an export or a run directory and writes the report (what `kcls evaluate` does).

    Args:
        model_path: an export (version or model folder) or a run directory.
        data_source: `folder:PATH` evaluates every image of that folder (its class
            folders must be the model's classes); `tfds:NAME` or `sklearn:digits` the
            test split of that source. `None`: the test split the model's recipe held
            out (same seed, so never an image it trained on).
        out_dir: where `metrics.json`, `report.md` and the plots go (None: no files).
        flip_tta: also report flip test-time augmentation metrics (single-label only).
        A multi-label model (`model.task=multilabel`) is scored with
        `kcls.metrics.multilabel` at its tuned thresholds, on the test split of its
        manifest or of `data_source` (`manifest:PATH.csv`: the test split it makes).
        The model's calibration temperature (`kcls.json`, `run.json`), when it has one,
        scales the logits as the export does.
        log: receives a line naming the files of the data that did not reach the model
            (unreadable or undecodable images of a folder), when there are any.

    Returns:
        The Evaluation; its `skipped` lists those files (also in `report.md`).

    Raises:
        ConfigError: unusable data, or class names that differ from the model's.
        FileNotFoundError: `model_path` is neither an export nor a run directory.
    """
    loaded = load_classifier(model_path)
    data = loaded.recipe.data
    if loaded.recipe.model.task == "multilabel":
        return _evaluate_multilabel_model(loaded, data_source, out_dir, log)
    if data_source and data_source.startswith("folder:"):
        files = scan_folder(data_source.partition(":")[2])
        class_names, skipped = files.class_names, files.skipped
        examples = decode_files(files.paths, files.labels, skipped)
    else:
        splits = load_splits(dataclasses.replace(data, source=data_source or data.source))
        class_names, examples, skipped = splits.class_names, splits.test, splits.skipped
    if class_names != loaded.class_names:
        raise ConfigError(
            f"The evaluation data's classes {class_names} are not the model's classes "
            f"{loaded.class_names}; evaluate on data with the same class folders/labels.")
    batches = eval_pipeline(examples, len(class_names), dataclasses.replace(data, cache="none"))
    evaluation = evaluate_classifier(loaded.classifier, batches, class_names, flip_tta,
                                     loaded.temperature)
    # Read after the pass: files failing to decode during it were appended to `skipped`.
    evaluation.skipped = list(skipped)
    if skipped:
        log(skipped_files_line(skipped))
    if out_dir:
        write_report(out_dir, evaluation, class_names)
    return evaluation


def _evaluate_multilabel_model(loaded: LoadedClassifier, data_source: str | None,
                               out_dir: str | None, log: Callable[[str], None]) -> Evaluation:
    """`evaluate_model` for a multi-label model: the test split of its manifest (or of
    `data_source`), scored at the model's tuned thresholds; `Evaluation.labels` holds the
    float32 multi-hot targets `[N, C]`."""
    data = loaded.recipe.data
    splits = load_splits(dataclasses.replace(data, source=data_source or data.source))
    if splits.class_names != loaded.class_names:
        raise ConfigError(
            f"The evaluation data's labels {splits.class_names} are not the model's labels "
            f"{loaded.class_names}; put the model's labels.txt beside the manifest.")
    batches = eval_pipeline(splits.test, len(splits.class_names),
                            dataclasses.replace(data, cache="none"))
    probabilities, targets = predict_multilabel(loaded.classifier, batches)
    thresholds = loaded.thresholds or [DEFAULT_THRESHOLD] * len(splits.class_names)
    metrics = multilabel_metrics(probabilities, targets, thresholds, splits.class_names)
    metrics["thresholds_tuned_on"] = "the model's validation split (stored in the model)"
    if splits.skipped:
        log(skipped_files_line(splits.skipped))
    if out_dir:
        write_multilabel_report(out_dir, metrics, probabilities, targets, splits.class_names,
                                skipped=list(splits.skipped))
    return Evaluation(metrics, probabilities.astype(np.float32), targets, list(splits.skipped))
