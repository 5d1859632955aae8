"""Classification metrics: arrays in, numbers out.

Accuracy, top-5 accuracy, negative log-likelihood (from the log-softmax of the logits,
never from clipped probabilities), 15-bin expected calibration error
(`kcls.metrics.calibration`), per-class precision/recall/F1/support, their averages and
the confusion matrix (scikit-learn's). Nothing here runs a model or touches a file; the
functions are tested on hand-made predictions whose right answers are known.

Example:

>>> logits = np.log([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
>>> metrics = classification_metrics(logits, np.array([0, 1, 1]), ["cat", "dog"])
>>> round(metrics["accuracy"], 3), metrics["per_class"]["dog"]["recall"]
(0.667, 0.5)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import log_softmax, logsumexp, softmax
from sklearn import metrics as sklearn_metrics

from kcls.metrics.calibration import expected_calibration_error
from kcls.metrics.evaluation import Evaluation


def evaluate_predictions(logits: np.ndarray, labels: np.ndarray,
                         class_names: list[str] | None = None,
                         view_logits: list[np.ndarray] | None = None,
                         temperature: float | None = None) -> Evaluation:
    """Every metric of one set of predictions, and the predictions reports need.

    Args:
        logits: float `[N, C]` logits.
        labels: int `[N]` true classes.
        class_names: list[str] of length C; defaults to "0".."C-1".
        view_logits: float `[N, C]` logits of each test-time augmentation view of the
            images (`kcls.data.tta`: the mirror, and with shift TTA the shifted ones);
            the TTA metrics (mean probabilities over the image and its views) go under
            `metrics["tta"]`, never in place of the plain ones, and the number of views
            averaged (the image included) under `metrics["tta_views"]`.
        temperature: T > 0 of temperature scaling: every metric is then computed from
            `softmax(logits / T)` (accuracy is unchanged) and `metrics["calibration"]`
            holds T with the NLL and ECE `before` and `after` it. None: no scaling.
    """
    logits = np.asarray(logits, np.float64)
    uncalibrated = None
    if temperature is not None:
        uncalibrated = softmax(logits, axis=1).astype(np.float32)
        before = summary_metrics(logits, labels)
        logits = logits / temperature
        view_logits = None if view_logits is None else [
            np.asarray(view, np.float64) / temperature for view in view_logits]
    metrics = classification_metrics(logits, labels, class_names)
    if view_logits:
        metrics["tta"] = summary_metrics(mean_probability_logits(logits, *view_logits), labels)
        metrics["tta_views"] = 1 + len(view_logits)
    if temperature is not None:
        metrics["calibration"] = {
            "method": "temperature", "temperature": float(temperature),
            "before": {key: before[key] for key in ("nll", "ece")},
            "after": {key: metrics[key] for key in ("nll", "ece")}}
    return Evaluation(metrics, softmax(logits, axis=1).astype(np.float32),
                      np.asarray(labels, np.int64),
                      uncalibrated_probabilities=uncalibrated)


def mean_probability_logits(*logits: np.ndarray) -> np.ndarray:
    """Logits (log-probabilities) of the mean of the probabilities of several predictions.

    Computed in log space, `log(mean(softmax(l)))`, so no probability underflows to 0.
    """
    stacked = np.stack([log_softmax(np.asarray(each, np.float64), axis=1) for each in logits])
    return logsumexp(stacked, axis=0) - np.log(len(logits))


def summary_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 (and top-5 with more than 5 classes) accuracy, NLL and 15-bin ECE.

    Args:
        logits: float `[N, C]` logits (unnormalised log-probabilities; log-probabilities
            work too).
        labels: int `[N]`, true class indices.
    """
    labels = np.asarray(labels, dtype=np.int64)
    log_probabilities = log_softmax(np.asarray(logits, np.float64), axis=1)
    probabilities = np.exp(log_probabilities)
    metrics = {
        "examples": int(len(labels)),
        "accuracy": float(sklearn_metrics.accuracy_score(labels,
                                                         log_probabilities.argmax(axis=1))),
        "nll": float(-np.mean(log_probabilities[np.arange(len(labels)), labels])),
        "ece": expected_calibration_error(probabilities, labels),
    }
    if probabilities.shape[1] > 5:
        metrics["top5_accuracy"] = float(sklearn_metrics.top_k_accuracy_score(
            labels, probabilities, k=5, labels=np.arange(probabilities.shape[1])))
    return metrics


def classification_metrics(logits: np.ndarray, labels: np.ndarray,
                           class_names: list[str] | None = None) -> dict[str, Any]:
    """Summary metrics, per-class precision/recall/F1/support, averages, confusion matrix.

    Args:
        logits: float `[N, C]` logits (or log-probabilities).
        labels: int `[N]`, true class indices.
        class_names: list[str] of length C; defaults to "0".."C-1".

    Returns:
        dict with the `summary_metrics` keys plus `per_class` (name -> precision, recall,
        f1, support), `macro_avg` and `weighted_avg` (precision, recall, f1) and
        `confusion_matrix` (list of C rows: true class; columns: predicted class).
        A class never predicted has precision 0 (scikit-learn's `zero_division=0`).
    """
    num_classes = np.shape(logits)[1]
    class_names = class_names or [str(i) for i in range(num_classes)]
    classes = np.arange(num_classes)
    predictions = np.argmax(logits, axis=1)

    def scores(average: str | None) -> tuple[Any, ...]:
        return sklearn_metrics.precision_recall_fscore_support(
            labels, predictions, labels=classes, average=average, zero_division=0)

    precision, recall, f1, support = scores(None)
    averages = {name: dict(zip(("precision", "recall", "f1"), map(float, scores(name)[:3])))
                for name in ("macro", "weighted")}
    return {
        **summary_metrics(logits, labels),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i])}
                      for i, name in enumerate(class_names)},
        "macro_avg": averages["macro"],
        "weighted_avg": averages["weighted"],
        "confusion_matrix": sklearn_metrics.confusion_matrix(
            labels, predictions, labels=classes).tolist(),
    }


def class_balance_warning(support: dict[str, int], threshold: float = 0.1) -> str | None:
    """A warning when the smallest class has under `threshold` of the largest's examples."""
    smallest = min(support, key=support.get)
    largest = max(support, key=support.get)
    if support[largest] and support[smallest] < threshold * support[largest]:
        return (f"class imbalance: '{smallest}' has {support[smallest]} examples, "
                f"under {threshold:.0%} of '{largest}' ({support[largest]}); consider "
                "--set train.class_weights=balanced")
    return None
