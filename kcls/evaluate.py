"""Honest evaluation on a held-out split: predictions once, every metric from them.

`classification_metrics` works on plain arrays, so it is tested on hand-made
predictions whose right answers are known; `evaluate_classifier` runs a model over an
evaluation pipeline (optionally with horizontal-flip test-time augmentation) and
returns the same dictionary plus the raw predictions for reports.

Example:

>>> probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
>>> metrics = classification_metrics(probabilities, np.array([0, 1, 1]), ["cat", "dog"])
>>> round(metrics["accuracy"], 3), metrics["per_class"]["dog"]["recall"]
(0.667, 0.5)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

CALIBRATION_BINS = 15


@dataclass
class Evaluation:
    """Metrics and the predictions they were computed from.

    Attributes:
        metrics: dict from `classification_metrics` (plus `tta` when flip-TTA was run).
        probabilities: float32 `[N, C]` predicted class probabilities (without TTA).
        labels: int64 `[N]` true classes.
    """

    metrics: dict[str, Any]
    probabilities: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)


def predict_probabilities(classifier: keras.Model, batches: tf.data.Dataset,
                          flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Runs `classifier` in inference mode over `batches`.

    Args:
        classifier: keras.Model, images -> float32 logits `[B, C]`.
        batches: finite dataset of `(float32 images, float32 one-hot labels [B, C])`.
        flip: bool, predict on horizontally mirrored images instead.

    Returns:
        `(probabilities float32 [N, C], labels int64 [N])`.
    """
    # One pass, batch by batch: `predict()` would read the data twice (images, then
    # labels) and warn that a dataset of unknown length "ran out of data".
    logits, labels = [], []
    for images, one_hot in batches:
        logits.append(classifier.predict_on_batch(images[:, :, ::-1] if flip else images))
        labels.append(np.argmax(one_hot, axis=-1))
    logits = np.concatenate(logits).astype(np.float32)
    return tf.nn.softmax(logits).numpy(), np.concatenate(labels).astype(np.int64)


def evaluate_classifier(classifier: keras.Model, batches: tf.data.Dataset,
                        class_names: list[str] | None = None,
                        flip_tta: bool = False) -> Evaluation:
    """All metrics of `classifier` on `batches`; with `flip_tta`, also under flip averaging.

    Flip test-time augmentation averages the probabilities of each image and its mirror;
    its metrics are reported separately under `metrics["tta"]`, never in place of the
    plain ones.
    """
    probabilities, labels = predict_probabilities(classifier, batches)
    metrics = classification_metrics(probabilities, labels, class_names)
    if flip_tta:
        flipped, _ = predict_probabilities(classifier, batches, flip=True)
        metrics["tta"] = summary_metrics((probabilities + flipped) / 2, labels)
    return Evaluation(metrics, probabilities, labels)


def summary_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 (and top-5 with more than 5 classes) accuracy, NLL and 15-bin ECE.

    Args:
        probabilities: float `[N, C]`, rows summing to 1.
        labels: int `[N]`, true class indices.
    """
    labels = np.asarray(labels, dtype=np.int64)
    metrics = {
        "examples": int(len(labels)),
        "accuracy": float(np.mean(np.argmax(probabilities, axis=1) == labels)),
        "nll": float(-np.mean(np.log(np.clip(probabilities[np.arange(len(labels)), labels],
                                             1e-12, 1.0)))),
        "ece": expected_calibration_error(probabilities, labels),
    }
    if probabilities.shape[1] > 5:
        top5 = np.argsort(-probabilities, axis=1)[:, :5]
        metrics["top5_accuracy"] = float(np.mean(np.any(top5 == labels[:, None], axis=1)))
    return metrics


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray,
                           class_names: list[str] | None = None) -> dict[str, Any]:
    """Summary metrics, per-class precision/recall/F1/support, averages, confusion matrix.

    Args:
        probabilities: float `[N, C]`, rows summing to 1.
        labels: int `[N]`, true class indices.
        class_names: list[str] of length C; defaults to "0".."C-1".

    Returns:
        dict with the `summary_metrics` keys plus `per_class` (name -> precision, recall,
        f1, support), `macro_avg` and `weighted_avg` (precision, recall, f1) and
        `confusion_matrix` (list of C rows: true class; columns: predicted class).
        A class never predicted has precision 0 (scikit-learn's convention).
    """
    num_classes = probabilities.shape[1]
    class_names = class_names or [str(i) for i in range(num_classes)]
    predictions = np.argmax(probabilities, axis=1)
    matrix = confusion_matrix(labels, predictions, num_classes)
    true_positives = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = np.divide(true_positives, predicted, out=np.zeros(num_classes),
                          where=predicted > 0)
    recall = np.divide(true_positives, support, out=np.zeros(num_classes), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros(num_classes),
                   where=denominator > 0)
    weights = support / max(support.sum(), 1)
    return {
        **summary_metrics(probabilities, labels),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i])}
                      for i, name in enumerate(class_names)},
        "macro_avg": {"precision": float(precision.mean()), "recall": float(recall.mean()),
                      "f1": float(f1.mean())},
        "weighted_avg": {"precision": float(weights @ precision),
                         "recall": float(weights @ recall), "f1": float(weights @ f1)},
        "confusion_matrix": matrix.tolist(),
    }


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray,
                     num_classes: int) -> np.ndarray:
    """int64 `[C, C]` counts: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
    return matrix


def calibration_bins(probabilities: np.ndarray, labels: np.ndarray,
                     bins: int = CALIBRATION_BINS) -> dict[str, np.ndarray]:
    """Equal-width confidence bins of the top-1 prediction (for ECE and reliability plots).

    Returns:
        dict of float arrays `[bins]`: `confidence` (mean top-1 probability, NaN if empty),
        `accuracy` (NaN if empty), `count`, and `edges` `[bins + 1]`.
    """
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bins are (lower, upper]; confidence 0 cannot happen for a top-1 probability.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, minlength=bins) / count
        accuracy = np.bincount(index, correct, minlength=bins) / count
    return {"confidence": mean_confidence, "accuracy": accuracy, "count": count, "edges": edges}


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray,
                               bins: int = CALIBRATION_BINS) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width bins."""
    binned = calibration_bins(probabilities, labels, bins)
    filled = binned["count"] > 0
    gaps = np.abs(binned["accuracy"][filled] - binned["confidence"][filled])
    return float(np.sum(gaps * binned["count"][filled]) / len(labels))


def class_balance_warning(support: dict[str, int], threshold: float = 0.1) -> str | None:
    """A warning when the smallest class has under `threshold` of the largest's examples."""
    smallest = min(support, key=support.get)
    largest = max(support, key=support.get)
    if support[largest] and support[smallest] < threshold * support[largest]:
        return (f"class imbalance: '{smallest}' has {support[smallest]} examples, "
                f"under {threshold:.0%} of '{largest}' ({support[largest]}); consider "
                "--set train.class_weights=balanced")
    return None


def evaluate_model(model_path: str, data_source: str | None = None,
                   out_dir: str | None = None, flip_tta: bool = False) -> Evaluation:
    """Evaluates an export or a run directory and writes the report (what `kcls evaluate` does).

    Args:
        model_path: an export (version or model folder) or a run directory.
        data_source: `folder:PATH` evaluates every image of that folder (its class
            folders must be the model's classes); `tfds:NAME` or `sklearn:digits` the
            test split of that source. `None`: the test split the model's recipe held
            out (same seed, so never an image it trained on).
        out_dir: where `metrics.json`, `report.md` and the plots go (None: no files).
        flip_tta: also report flip test-time augmentation metrics.

    Raises:
        ConfigError: unusable data, or class names that differ from the model's.
        FileNotFoundError: `model_path` is neither an export nor a run directory.
    """
    import dataclasses

    from kcls.config import ConfigError
    from kcls.data.pipeline import eval_pipeline
    from kcls.data.sources import load_splits
    from kcls.export import load_classifier
    from kcls.report import write_report

    loaded = load_classifier(model_path)
    data = loaded.recipe.data
    if data_source and data_source.startswith("folder:"):
        from kcls.data.folder import decode_image_file, scan_folder

        files = scan_folder(data_source.partition(":")[2])
        class_names = files.class_names
        examples = tf.data.Dataset.from_tensor_slices((files.paths, files.labels)).map(
            decode_image_file, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    else:
        splits = load_splits(dataclasses.replace(data, source=data_source or data.source))
        class_names, examples = splits.class_names, splits.test
    if class_names != loaded.class_names:
        raise ConfigError(
            f"The evaluation data's classes {class_names} are not the model's classes "
            f"{loaded.class_names}; evaluate on data with the same class folders/labels.")
    batches = eval_pipeline(examples, len(class_names), dataclasses.replace(data, cache="none"))
    evaluation = evaluate_classifier(loaded.classifier, batches, class_names, flip_tta)
    if out_dir:
        write_report(out_dir, evaluation, class_names)
    return evaluation
