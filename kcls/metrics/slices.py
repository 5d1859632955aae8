"""Metrics per slice of the test images, with bootstrap confidence intervals.

A slice is the images sharing one value of an attribute (a manifest column such as
`site`, a folder of their path). Per slice: the number of images, accuracy, macro F1
(scikit-learn's, over the classes present in the slice's truth or predictions) and the
15-bin ECE (`kcls.metrics.calibration`), each with a percentile bootstrap interval:
`BOOTSTRAP_RESAMPLES` resamples of the slice's images with replacement, drawn from a
seeded generator, the metric computed for all resamples at once (vectorised numpy, in
chunks of at most `_CHUNK_ELEMENTS` drawn indices).

The worst and best slices are ranked by accuracy among the slices of at least
`MIN_RANKED_IMAGES` images (all slices when fewer than two are that large): a slice of
6 images all right has the interval [1, 1], since resampling cannot invent the mistakes
it never saw, and would otherwise be "best" with false certainty. The gap is best minus
worst, its interval from the difference of the two slices' independent resamples (both
slices chosen after looking, so read it as optimistic: it excludes 0 a little more often
than a comparison chosen in advance would). ECE is biased upwards on small slices (few
images per bin), and so are its resamples. Arrays in, numbers out.

Example:

>>> probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]])
>>> result = slice_metrics(probabilities, np.array([0, 1, 1, 1]), ["a", "a", "b", "b"])
>>> result.worst.name, result.worst.accuracy.value
('b', 0.0)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from kcls.metrics.calibration import CALIBRATION_BINS, confidence_bin, expected_calibration_error

BOOTSTRAP_RESAMPLES = 1000
CONFIDENCE_LEVEL = 0.95
BOOTSTRAP_SEED = 0
MIN_RANKED_IMAGES = 20
# At most this many drawn indices (int64, 8 bytes each) are held at once: 32 MB.
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class Interval:
    """A metric's value on the slice and its bootstrap interval `[low, high]`."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class SliceScores:
    """One slice: its `name`, its number of `images` and three metrics with intervals."""

    name: str
    images: int
    accuracy: Interval
    macro_f1: Interval
    ece: Interval


@dataclass(frozen=True)
class SliceResults:
    """Every slice, worst accuracy first, and how far apart the extremes are.

    Attributes:
        slices: list[SliceScores], by accuracy ascending (ties by name).
        worst, best: the ranked slices of lowest and highest accuracy.
        gap: best minus worst accuracy, with its bootstrap interval.
        gap_excludes_zero: whether that interval lies above 0 (False with one slice).
        ranked: list[str], the slices worst and best were chosen among.
        min_images: the size a slice needs to be ranked (unless under two are).
        resamples, confidence_level, seed: how the intervals were drawn.
    """

    slices: list[SliceScores]
    worst: SliceScores
    best: SliceScores
    gap: Interval
    gap_excludes_zero: bool
    ranked: list[str]
    min_images: int
    resamples: int
    confidence_level: float
    seed: int

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of every field (intervals as `{value, low, high}`)."""
        return asdict(self)


def bootstrap_indices(count: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """int64 `[resamples, count]`: indices into `count` items drawn with replacement."""
    return rng.integers(0, count, size=(resamples, count))


def resampled_accuracy(correct: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """float64 `[B]`: accuracy of each resample, `correct` bool `[N]`, indices `[B, N]`."""
    return correct[indices].mean(axis=1)


def resampled_macro_f1(labels: np.ndarray, predictions: np.ndarray, indices: np.ndarray,
                       num_classes: int) -> np.ndarray:
    """float64 `[B]`: macro F1 of each resample (indices `[B, N]` into int labels and
    predictions `[N]`), as scikit-learn's `f1_score(average="macro", zero_division=0)`:
    the mean of `2 TP / (true + predicted)` over the classes present in the resample."""
    resamples = len(indices)
    offsets = (np.arange(resamples) * num_classes)[:, None]

    def counts(classes: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        flat = (offsets + classes[indices]).ravel()
        return np.bincount(flat, weights, minlength=resamples * num_classes).reshape(
            resamples, num_classes)

    hits = (labels == predictions).astype(np.float64)[indices].ravel()
    true_positives = counts(labels, hits)
    either = counts(labels) + counts(predictions)
    present = either > 0
    f1 = np.divide(2 * true_positives, either, out=np.zeros(either.shape), where=present)
    return f1.sum(axis=1) / present.sum(axis=1)


def resampled_ece(correct: np.ndarray, confidence: np.ndarray, indices: np.ndarray,
                  bins: int = CALIBRATION_BINS) -> np.ndarray:
    """float64 `[B]`: the ECE of each resample (indices `[B, N]`), correct bool `[N]`,
    top-1 probabilities `[N]`: `sum over bins |sum(correct - confidence)| / N`."""
    resamples, count = indices.shape
    flat = ((np.arange(resamples) * bins)[:, None] + confidence_bin(confidence, bins)[indices])
    excess = (correct.astype(np.float64) - confidence)[indices]
    per_bin = np.bincount(flat.ravel(), excess.ravel(), minlength=resamples * bins)
    return np.abs(per_bin.reshape(resamples, bins)).sum(axis=1) / count


def _bootstrap(labels: np.ndarray, probabilities: np.ndarray, resamples: int,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    """float64 `[resamples]` of each metric over resamples of one slice, in chunks."""
    predictions = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1).astype(np.float64)
    correct = predictions == labels
    chunk = max(1, _CHUNK_ELEMENTS // len(labels))
    parts: dict[str, list[np.ndarray]] = {"accuracy": [], "macro_f1": [], "ece": []}
    for start in range(0, resamples, chunk):
        indices = bootstrap_indices(len(labels), min(chunk, resamples - start), rng)
        parts["accuracy"].append(resampled_accuracy(correct, indices))
        parts["macro_f1"].append(resampled_macro_f1(labels, predictions, indices,
                                                    probabilities.shape[1]))
        parts["ece"].append(resampled_ece(correct, confidence, indices))
    return {name: np.concatenate(values) for name, values in parts.items()}


def _interval(value: float, resampled: np.ndarray, level: float) -> Interval:
    low, high = np.quantile(resampled, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(value), float(low), float(high))


def _score_slice(name: str, labels: np.ndarray, probabilities: np.ndarray,
                 resampled: dict[str, np.ndarray], level: float) -> SliceScores:
    predictions = probabilities.argmax(axis=1)
    values = {"accuracy": accuracy_score(labels, predictions),
              "macro_f1": f1_score(labels, predictions, average="macro", zero_division=0),
              "ece": expected_calibration_error(probabilities, labels)}
    return SliceScores(name, int(len(labels)), **{
        metric: _interval(values[metric], resampled[metric], level) for metric in values})


def slice_metrics(probabilities: np.ndarray, labels: np.ndarray, groups: list[str],
                  resamples: int = BOOTSTRAP_RESAMPLES, level: float = CONFIDENCE_LEVEL,
                  seed: int = BOOTSTRAP_SEED, min_images: int = MIN_RANKED_IMAGES
                  ) -> SliceResults:
    """Accuracy, macro F1 and ECE per slice with bootstrap intervals (module docstring).

    Args:
        probabilities: float `[N, C]` served probabilities of the N test images.
        labels: int `[N]` true classes.
        groups: list[str] of N slice names, one per image.
        resamples: bootstrap resamples per slice.
        level: the intervals' confidence level (0.95: the 2.5th and 97.5th percentiles).
        seed: the generator's seed; the same seed gives the same intervals.
        min_images: the images a slice needs to be ranked worst or best.

    Raises:
        ValueError: no images, or `groups` or `labels` not of length N.
    """
    probabilities = np.asarray(probabilities, np.float64)
    labels, groups = np.asarray(labels, np.int64), np.asarray(groups, dtype=object)
    if not len(labels) or labels.shape != (len(probabilities),) or len(groups) != len(labels):
        raise ValueError(f"slice_metrics needs N >= 1 probabilities [N, C], labels [N] and "
                         f"groups [N]; got {probabilities.shape}, {labels.shape}, "
                         f"{groups.shape}.")
    rng = np.random.default_rng(seed)
    scored, resampled_accuracies = [], {}
    for name in sorted(set(groups)):
        members = groups == name
        resampled = _bootstrap(labels[members], probabilities[members], resamples, rng)
        scored.append(_score_slice(name, labels[members], probabilities[members],
                                   resampled, level))
        resampled_accuracies[name] = resampled["accuracy"]
    scored.sort(key=lambda scores: (scores.accuracy.value, scores.name))
    large = [scores for scores in scored if scores.images >= min_images]
    ranked = large if len(large) >= 2 else scored
    worst, best = ranked[0], ranked[-1]
    gap = _interval(best.accuracy.value - worst.accuracy.value,
                    resampled_accuracies[best.name] - resampled_accuracies[worst.name], level)
    return SliceResults(scored, worst, best, gap, len(ranked) > 1 and gap.low > 0,
                        [scores.name for scores in ranked], min_images, resamples, level,
                        seed)
