"""Likely label errors: out-of-fold predicted probabilities through cleanlab.

`kcls data label-issues` (`kcls.workflows.label_issues`) embeds the training images with
a pretrained backbone; this module turns the embeddings into out-of-sample predicted
probabilities with k-fold cross-validation (a logistic regression on standardized
embeddings per fold: every image is scored by a model that never saw its label) and
hands them to cleanlab's `find_label_issues` (confident learning, Northcutt et al.
2021), which is not re-derived here. The score of each image is cleanlab's label
quality (`get_label_quality_scores`, self-confidence: the out-of-fold probability of the
given label; lower is more suspect), the suggested label the most probable class.

cleanlab is an optional dependency: `pip install "kcls[quality]"`.

Example:

>>> probabilities = out_of_fold_probabilities(embeddings, labels, folds=5)  # doctest: +SKIP
>>> issues = rank_label_issues(labels, probabilities)  # doctest: +SKIP
>>> issues.indices[:3], issues.suggested[issues.indices[:3]]  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_FOLDS = 5
# Inverse L2 strength of the per-fold logistic regression on standardized 1280-d Lite0
# embeddings, measured on 7,200 CIFAR-10 training images at 160 px with 5% of the labels
# flipped (docs/data_quality.md): out-of-fold accuracy 0.657 at 1 (scikit-learn's
# default), 0.673 at 0.1, 0.714 at 0.01, 0.743 at 0.001, and cleanlab's precision 0.16,
# 0.18, 0.25, 0.32 with it (recall 0.93 to 0.79).
REGULARIZATION = 0.001
MAX_ITERATIONS = 300


class MissingCleanlabError(ImportError):
    """cleanlab is not installed; the message names the extra that installs it."""


@dataclass
class LabelIssues:
    """cleanlab's verdict on N labelled images.

    Attributes:
        indices: int64 `(K,)` the images flagged as label issues, most suspect first.
        scores: float32 `(N,)` label quality in [0, 1] (lower: more likely mislabelled).
        suggested: int64 `(N,)` the most probable class out of fold.
        probabilities: float32 `(N, C)` the out-of-fold predicted probabilities.
    """

    indices: np.ndarray
    scores: np.ndarray
    suggested: np.ndarray
    probabilities: np.ndarray

    def out_of_fold_accuracy(self, labels: np.ndarray) -> float:
        """How often the suggested class is the given one (the probe's accuracy)."""
        return float(np.mean(self.suggested == labels))


def out_of_fold_probabilities(embeddings: np.ndarray, labels: np.ndarray, num_classes: int,
                              folds: int = DEFAULT_FOLDS, seed: int = 0) -> np.ndarray:
    """Predicted probabilities of each image from a model fitted on the other folds.

    Args:
        embeddings: float `(N, D)` image embeddings.
        labels: int `(N,)` given classes in `[0, num_classes)`.
        num_classes: C.
        folds: K of the stratified K-fold split (each class needs K images).
        seed: seed of the split.

    Returns:
        float32 `(N, C)`, rows summing to 1.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels, np.int64)
    probabilities = np.zeros((len(labels), num_classes), np.float32)
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fitted, held_out in split.split(embeddings, labels):
        model = make_pipeline(StandardScaler(), LogisticRegression(
            C=REGULARIZATION, max_iter=MAX_ITERATIONS))
        model.fit(embeddings[fitted], labels[fitted])
        # A class absent from a fold's training part gets probability 0 there.
        probabilities[np.ix_(held_out, model[-1].classes_)] = model.predict_proba(
            embeddings[held_out])
    return probabilities


def rank_label_issues(labels: np.ndarray, probabilities: np.ndarray) -> LabelIssues:
    """cleanlab's `find_label_issues` on out-of-fold `probabilities` `(N, C)`, ranked by
    self-confidence, with the label quality score of every image.

    Raises:
        MissingCleanlabError: cleanlab is not installed.
    """
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        raise MissingCleanlabError(
            "kcls data label-issues needs cleanlab: pip install \"kcls[quality]\"") from None
    labels = np.asarray(labels, np.int64)
    indices = find_label_issues(labels, probabilities,
                                return_indices_ranked_by="self_confidence")
    scores = get_label_quality_scores(labels, probabilities, method="self_confidence")
    return LabelIssues(np.asarray(indices, np.int64), np.asarray(scores, np.float32),
                       probabilities.argmax(axis=1).astype(np.int64), probabilities)


def check_foldable(labels: np.ndarray, class_names: list[str], folds: int) -> str | None:
    """Why `labels` cannot be split into `folds` stratified folds, or None when they can."""
    counts = np.bincount(labels, minlength=len(class_names))
    small = [f"{name} {count}" for name, count in zip(class_names, counts) if count < folds]
    if small:
        return (f"every class needs at least {folds} training images for {folds}-fold "
                f"cross-validation; these have fewer: {', '.join(small)}")
    return None
