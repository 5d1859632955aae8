"""The rejection rule: when a single-label model answers "unknown" instead of a class.

An image is known when the cosine similarity of its embedding (the penultimate layer)
to the nearest class mean reaches a threshold. The class means are those of the
training images' embeddings (evaluation mode, no augmentation); the threshold is the
one that keeps `coverage` of the held-out validation images (`export.reject_coverage`).
`benchmarks/rejection.py` chose this score over the maximum calibrated probability,
energy, the largest logit, the Mahalanobis distance and k-nearest-neighbour similarity
(docs/serving.md, "Rejecting unknown images"): among the scores a graph serves cheaply
it had the highest AUROC on all three models measured (digits, CIFAR-10, ants and bees)
and each of their OOD sets; on the quickstart model it separated
out-of-distribution photos almost as well as the best score (AUROC 0.997-0.998) while
keeping its coverage on held-out images (Mahalanobis fell to 91% for a 95% target), and
it needs only the C x D unit-length means, which the graph holds as a constant (k-NN
would need the training embeddings in the graph).

Example:

>>> rule = RejectionRule.fit(train_embeddings, train_labels, validation_embeddings, 0.95,
...                          "validation split", num_classes=10)  # doctest: +SKIP
>>> rule.known(test_embeddings).mean()  # doctest: +SKIP
0.948
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import tensorflow as tf

from kcls.metrics.rejection import class_means, coverage_threshold, nearest_mean_cosine, normalized


@dataclass(frozen=True)
class RejectionRule:
    """Known when `known_score >= threshold`; `known_score` is the embedding's cosine
    similarity to the nearest class mean.

    Attributes:
        class_means: float32 `[C, D]`, the unit-length mean training embedding per class.
        threshold: the smallest known score.
        coverage: the target share of in-distribution images kept.
        fitted_on: where the threshold was chosen, e.g. `validation split (800 images)`.
        fitted_coverage: the share of those images it keeps.
    """

    class_means: np.ndarray = field(repr=False, compare=False)
    threshold: float
    coverage: float
    fitted_on: str
    fitted_coverage: float

    score: ClassVar[str] = "nearest_mean_cosine"

    @classmethod
    def fit(cls, train_embeddings: np.ndarray, train_labels: np.ndarray,
            held_out_embeddings: np.ndarray, coverage: float, fitted_on: str,
            num_classes: int) -> RejectionRule:
        """The rule from training embeddings `[M, D]` with int labels `[M]` (the means)
        and held-out in-distribution embeddings `[N, D]` (the threshold)."""
        means = normalized(class_means(train_embeddings, train_labels, num_classes))
        means = means.astype(np.float32)
        scores = nearest_mean_cosine(held_out_embeddings, means)
        threshold = coverage_threshold(scores, coverage)
        return cls(means, threshold, float(coverage),
                   f"{fitted_on} ({len(scores)} images)", float(np.mean(scores >= threshold)))

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """float64 `[N]` known scores of embeddings `[N, D]`."""
        return nearest_mean_cosine(embeddings, self.class_means)

    def known(self, embeddings: np.ndarray) -> np.ndarray:
        """bool `[N]`: whether each embedding `[N, D]` is known."""
        return self.scores(embeddings) >= self.threshold

    def outputs_graph(self, embedding: tf.Tensor) -> dict[str, tf.Tensor]:
        """`known` (bool `[N]`) and `known_score` (float32 `[N]`) of embeddings `[N, D]`, in
        a TensorFlow graph (the means and threshold are constants of it)."""
        unit = tf.math.l2_normalize(tf.cast(embedding, tf.float32), axis=-1, epsilon=1e-24)
        score = tf.reduce_max(tf.matmul(unit, tf.constant(self.class_means),
                                        transpose_b=True), axis=-1)
        return {"known": score >= self.threshold, "known_score": score}

    def evaluate(self, embeddings: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
        """The rule on held-out test images: `coverage` (share known), `accuracy_known`
        (accuracy on those), beside the rule's settings; `correct` bool `[N]`."""
        known = self.known(embeddings)
        return {"score": self.score, "threshold": self.threshold,
                "target_coverage": self.coverage, "fitted_on": self.fitted_on,
                "fitted_coverage": self.fitted_coverage, "coverage": float(np.mean(known)),
                "accuracy_known": float(np.mean(correct[known])) if known.any() else None}

    def metadata(self) -> dict[str, Any]:
        """What exports and run.json record (`from_metadata` reads it back)."""
        return {"score": self.score, "threshold": self.threshold, "coverage": self.coverage,
                "fitted_on": self.fitted_on, "fitted_coverage": self.fitted_coverage,
                "class_means": self.class_means.tolist()}

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any] | None) -> RejectionRule | None:
        """The rule `metadata()` recorded, or None for none."""
        if not metadata:
            return None
        return cls(np.asarray(metadata["class_means"], np.float32), float(metadata["threshold"]),
                   float(metadata["coverage"]), str(metadata["fitted_on"]),
                   float(metadata["fitted_coverage"]))

    def describe(self) -> str:
        """One line: the threshold and the coverage it was fitted to."""
        return (f"rejection rule: known when the embedding's cosine similarity to the nearest "
                f"class mean >= {self.threshold:.4f}, keeping {self.fitted_coverage:.1%} of "
                f"the {self.fitted_on} (target {self.coverage:.0%})")
