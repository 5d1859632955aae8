"""Telling unknown images from known ones: scores, the coverage threshold, and how well a
score separates in-distribution (ID) from out-of-distribution (OOD) images.

Every score is larger for an image more like the training images:

- `max_probability`: the largest calibrated softmax probability (Hendrycks & Gimpel 2017);
- `energy`: `T * logsumexp(logits / T)`, the negative free energy (Liu et al. 2020);
- `max_logit`: the largest logit (Hendrycks et al. 2022);
- `mahalanobis`: minus the smallest Mahalanobis distance of the embedding to a class
  mean, with one shared covariance (Lee et al. 2018), fitted on training embeddings;
- `nearest_mean_cosine`: the largest cosine similarity of the embedding to a class mean;
- `knn_cosine`: the cosine similarity to the k-th nearest training embedding (Sun et al.
  2022).

A rejection rule keeps an image as known when its score reaches a threshold chosen on
held-out ID images for a target coverage (`coverage_threshold`, split conformal). `auroc` and
`false_positive_rate` measure a score on ID and OOD images. Arrays in, numbers out.

Example:

>>> threshold = coverage_threshold(max_probability(validation_logits, 1.3), 0.95)  # doctest: +SKIP
>>> auroc(max_probability(test_logits), max_probability(ood_logits))  # doctest: +SKIP
0.91
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp, softmax
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score, roc_curve


def max_probability(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """float64 `[N]`: the largest of `softmax(logits / temperature)`, logits `[N, C]`."""
    return softmax(np.asarray(logits, np.float64) / temperature, axis=-1).max(axis=-1)


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """float64 `[N]`: `temperature * logsumexp(logits / temperature)`, logits `[N, C]`."""
    return temperature * logsumexp(np.asarray(logits, np.float64) / temperature, axis=-1)


def max_logit(logits: np.ndarray) -> np.ndarray:
    """float64 `[N]`: the largest logit of each row of `[N, C]`."""
    return np.asarray(logits, np.float64).max(axis=-1)


def class_means(embeddings: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """float64 `[C, D]`: the mean embedding `[N, D]` of each class (int labels `[N]`); the
    mean of all embeddings for a class without examples."""
    embeddings = np.asarray(embeddings, np.float64)
    overall = embeddings.mean(axis=0)
    return np.stack([embeddings[labels == label].mean(axis=0) if np.any(labels == label)
                     else overall for label in range(num_classes)])


def shared_precision(embeddings: np.ndarray, labels: np.ndarray, means: np.ndarray
                     ) -> np.ndarray:
    """float64 `[D, D]`: the inverse of the within-class covariance of `embeddings` `[N, D]`
    about their class `means` `[C, D]`, shrunk (Ledoit-Wolf) so it exists for N < D."""
    centred = np.asarray(embeddings, np.float64) - means[np.asarray(labels)]
    return LedoitWolf(assume_centered=True).fit(centred).precision_


def mahalanobis(embeddings: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """float64 `[N]`: minus the smallest squared Mahalanobis distance to a class mean."""
    differences = np.asarray(embeddings, np.float64)[:, None, :] - means[None]  # [N, C, D]
    distances = np.einsum("ncd,de,nce->nc", differences, precision, differences)
    return -distances.min(axis=1)


def normalized(embeddings: np.ndarray) -> np.ndarray:
    """float64 rows of `[N, D]` scaled to unit length (zero rows stay zero)."""
    embeddings = np.asarray(embeddings, np.float64)
    norms = np.linalg.norm(embeddings, axis=-1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)


def nearest_mean_cosine(embeddings: np.ndarray, means: np.ndarray) -> np.ndarray:
    """float64 `[N]`: the largest cosine similarity of each embedding to a class mean."""
    return (normalized(embeddings) @ normalized(means).T).max(axis=1)


def knn_cosine(embeddings: np.ndarray, bank: np.ndarray, neighbours: int) -> np.ndarray:
    """float64 `[N]`: the cosine similarity of each embedding `[N, D]` to its
    `neighbours`-th most similar row of the training `bank` `[M, D]`."""
    similarities = normalized(embeddings) @ normalized(bank).T
    k = min(neighbours, similarities.shape[1])
    return -np.partition(-similarities, k - 1, axis=1)[:, k - 1]


def coverage_threshold(scores: np.ndarray, coverage: float) -> float:
    """The threshold that keeps at least `coverage` of new in-distribution images, in
    expectation, from held-out ID `scores` `[N]` (`score >= threshold` is known).

    Split conformal prediction's rank (Vovk et al. 2005; Angelopoulos & Bates 2021): the
    k-th smallest score with `k = floor((N + 1) * (1 - coverage))`, so that a new
    image exchangeable with the held-out ones scores under it with probability at most
    `k / (N + 1) <= 1 - coverage`. `-inf` (every image known) when N is too small for
    any k (N < 1 / (1 - coverage) - 1, e.g. under 19 images for 95%).
    """
    ordered = np.sort(np.asarray(scores, np.float64))
    rank = int(np.floor((len(ordered) + 1) * (1.0 - coverage) + 1e-9))
    return float(ordered[rank - 1]) if rank >= 1 else float("-inf")


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """The area under the ROC curve of telling ID (positive) from OOD images by score."""
    targets = np.r_[np.ones(len(in_scores)), np.zeros(len(out_scores))]
    return float(roc_auc_score(targets, np.r_[in_scores, out_scores]))


def false_positive_rate(in_scores: np.ndarray, out_scores: np.ndarray,
                        true_positive_rate: float = 0.95) -> float:
    """The share of OOD images kept as known at the threshold that keeps
    `true_positive_rate` of the ID images (FPR@95TPR by default)."""
    targets = np.r_[np.ones(len(in_scores)), np.zeros(len(out_scores))]
    false_positives, true_positives, _ = roc_curve(targets, np.r_[in_scores, out_scores])
    return float(false_positives[np.searchsorted(true_positives, true_positive_rate)])
