"""Calibration: how far confidence is from accuracy, and temperature scaling.

The 15-bin expected calibration error and its reliability bins, and the temperature of
temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks": one
scalar T, `softmax(logits / T)`, fitted by minimising the NLL). Arrays in, numbers out.

Example:

>>> probabilities = np.array([[0.9, 0.1], [0.3, 0.7]])
>>> round(expected_calibration_error(probabilities, np.array([0, 0])), 2)
0.4
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

CALIBRATION_BINS = 15
# Temperatures `fit_temperature` searches, as bounds on log(T): T in [0.05, 20].
_LOG_TEMPERATURE_BOUNDS = (float(np.log(0.05)), float(np.log(20.0)))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the NLL of `softmax(logits / T)` (Guo et al. 2017).

    One scalar divides every logit, so the argmax, hence accuracy, never changes; T > 1
    softens an over-confident model, T < 1 sharpens an under-confident one. The NLL is
    convex in 1/T, and the search is a bounded scalar minimisation over log T in
    [log 0.05, log 20] (scipy's `minimize_scalar`), in float64.

    Args:
        logits: float `[N, C]` logits of held-out examples (never the training ones).
        labels: int `[N]` true classes.

    Returns:
        float T > 0.

    Raises:
        ValueError: no examples, or `labels` not matching `logits`.

    >>> fit_temperature(np.array([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]]),
    ...                 np.array([0, 1, 1, 0])) > 10  # right half the time: soften
    True
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    if logits.ndim != 2 or len(logits) == 0 or labels.shape != (len(logits),):
        raise ValueError(f"fit_temperature needs logits [N, C] with N >= 1 and labels [N]; "
                         f"got logits {logits.shape} and labels {labels.shape}.")
    rows = np.arange(len(labels))

    def nll(log_temperature: float) -> float:
        scaled = log_softmax(logits / np.exp(log_temperature), axis=1)
        return float(-np.mean(scaled[rows, labels]))

    result = minimize_scalar(nll, bounds=_LOG_TEMPERATURE_BOUNDS, method="bounded",
                             options={"xatol": 1e-5})
    return float(np.exp(result.x))


def confidence_bin(confidence: np.ndarray, bins: int = CALIBRATION_BINS) -> np.ndarray:
    """int64 `[N]`: the equal-width bin in `[0, bins)` of each top-1 probability `[N]`."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bins are (lower, upper]; confidence 0 cannot happen for a top-1 probability.
    return np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)


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
    index = confidence_bin(confidence, bins)
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
