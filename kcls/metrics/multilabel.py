"""Multi-label metrics: arrays in, numbers out (`model.task=multilabel`).

A multi-label model gives each of C labels its own probability `sigmoid(logit)`; an
image gets every label whose probability reaches that label's threshold. Metrics
(scikit-learn computes them all):

- `mAP`: the mean over labels of the average precision (area under the label's
  precision-recall curve, threshold-free), over labels with at least one positive;
- `micro_f1` (all label decisions pooled) and `macro_f1` (the mean of the per-label
  F1) at the chosen thresholds; per-label precision, recall, F1, AP and support;
- label cardinality: the mean number of labels per image, true and predicted.

`tune_thresholds` picks each label's threshold on held-out (validation) data to
maximise that label's F1; the export stores them and the serving graph applies them.

Example:

>>> probabilities = np.array([[0.9, 0.2], [0.4, 0.7], [0.8, 0.6]])
>>> targets = np.array([[1, 0], [0, 1], [1, 1]])
>>> multilabel_metrics(probabilities, targets, [0.5, 0.5], ["a", "b"])["micro_f1"]
1.0
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_recall_curve,
    precision_recall_fscore_support,
)

DEFAULT_THRESHOLD = 0.5


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """float64 probabilities `1 / (1 + exp(-logits))`, computed without overflow."""
    logits = np.asarray(logits, np.float64)
    return np.exp(-np.logaddexp(0.0, -logits))


def tune_thresholds(probabilities: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-label thresholds that maximise each label's F1 on these examples.

    Args:
        probabilities: float `[N, C]` in [0, 1].
        targets: `[N, C]` of 0/1.

    Returns:
        float64 `[C]`: for each label the probability of the best-F1 point of its
        precision-recall curve (scikit-learn's `precision_recall_curve`); 0.5
        (`DEFAULT_THRESHOLD`) for a label without positives.
    """
    probabilities, targets = np.asarray(probabilities), np.asarray(targets) > 0.5
    thresholds = np.full(probabilities.shape[1], DEFAULT_THRESHOLD)
    for label in range(probabilities.shape[1]):
        if not targets[:, label].any():
            continue
        precision, recall, candidates = precision_recall_curve(targets[:, label],
                                                               probabilities[:, label])
        # The last point (precision 1, recall 0) has no threshold.
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1],
                                                           1e-12)
        thresholds[label] = float(candidates[int(np.argmax(f1))])
    return thresholds


def multilabel_metrics(probabilities: np.ndarray, targets: np.ndarray,
                       thresholds: np.ndarray | list[float], class_names: list[str]
                       ) -> dict[str, Any]:
    """Every multi-label metric of the module docstring.

    Args:
        probabilities: float `[N, C]` in [0, 1].
        targets: `[N, C]` of 0/1 (float or int).
        thresholds: float `[C]`, a label is predicted when its probability >= its threshold.
        class_names: list[str] of C names.

    Returns:
        dict with `task` ("multilabel"), `examples`, `mAP`, `micro_f1`, `macro_f1`,
        `micro_precision`, `micro_recall`, `label_cardinality`,
        `predicted_cardinality`, `exact_match` (share of images whose predicted set is
        exactly right), `thresholds` (name -> threshold) and `per_label` (name ->
        precision, recall, f1, average_precision (None without positives), support).
    """
    probabilities = np.asarray(probabilities, np.float64)
    truth = (np.asarray(targets) > 0.5).astype(np.int64)
    predicted = (probabilities >= np.asarray(thresholds)[np.newaxis, :]).astype(np.int64)
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, average=None, zero_division=0)
    micro = precision_recall_fscore_support(truth, predicted, average="micro", zero_division=0)
    with_positives = truth.sum(axis=0) > 0
    average_precision = [
        float(average_precision_score(truth[:, label], probabilities[:, label]))
        if with_positives[label] else None for label in range(truth.shape[1])]
    return {
        "task": "multilabel",
        "examples": int(len(truth)),
        "mAP": float(np.mean([value for value in average_precision if value is not None]))
        if with_positives.any() else None,
        "micro_f1": float(micro[2]),
        "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
        "micro_precision": float(micro[0]),
        "micro_recall": float(micro[1]),
        "label_cardinality": float(truth.sum(axis=1).mean()),
        "predicted_cardinality": float(predicted.sum(axis=1).mean()),
        "exact_match": float(np.mean(np.all(truth == predicted, axis=1))),
        "thresholds": {name: float(value) for name, value in zip(class_names, thresholds)},
        "per_label": {
            name: {"precision": float(precision[label]), "recall": float(recall[label]),
                   "f1": float(f1[label]), "average_precision": average_precision[label],
                   "support": int(support[label])}
            for label, name in enumerate(class_names)},
    }


def precision_recall_curves(probabilities: np.ndarray, targets: np.ndarray
                            ) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per label, `(precision, recall)` arrays of its curve, or None without positives."""
    truth = np.asarray(targets) > 0.5
    return [precision_recall_curve(truth[:, label], probabilities[:, label])[:2]
            if truth[:, label].any() else None for label in range(truth.shape[1])]
