"""Multi-label classification (`model.task=multilabel`): any set of labels per image.

One sigmoid per label and binary cross-entropy averaged over labels, optionally
weighing each label's positives (`train.class_weights=balanced`: rare labels count
more); the training metric is the area under the precision-recall curve averaged over
labels (a close estimate of mean average precision, on 200 thresholds). After training,
each label's threshold is tuned on the validation split to maximise its F1
(`kcls.metrics.multilabel.tune_thresholds`; 0.5 without one); an image gets every label
whose probability reaches its threshold. Test metrics are `kcls.metrics.multilabel`'s;
exports serve every label, best first, with those below their thresholds blanked.

Example:

>>> task = MultiLabelTask().fit(logits, targets, "validation split")  # doctest: +SKIP
>>> task.thresholds  # doctest: +SKIP
(0.41, 0.62, 0.35)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import keras
import numpy as np
import tensorflow as tf

from kcls.metrics.multilabel import (
    DEFAULT_THRESHOLD,
    multilabel_metrics,
    sigmoid,
    tune_thresholds,
)
from kcls.tasks.base import CalibrationPlan, Evaluation, LossWeights, Objective, Task, format_value

SUMMARY_METRICS = ("examples", "mAP", "micro_f1", "macro_f1", "micro_precision", "micro_recall",
                   "exact_match", "label_cardinality", "predicted_cardinality")


class WeightedBinaryCrossentropy(keras.losses.Loss):
    """Binary cross-entropy on logits with a weight on each label's positive term.

    `loss = mean_c(-(w_c * y_c * log sigmoid(x_c) + (1 - y_c) * log(1 - sigmoid(x_c))))`,
    the smoothed targets `y = y * (1 - s) + s / 2` as in `keras.losses.BinaryCrossentropy`.

    Args:
        positive_weights: float `[C]` weight of each label's positives (`w_c`).
        label_smoothing: float in [0, 1), `s`.
    """

    def __init__(self, positive_weights: np.ndarray, label_smoothing: float = 0.0,
                 name: str = "weighted_binary_crossentropy") -> None:
        super().__init__(name=name)
        self.positive_weights = np.asarray(positive_weights, np.float32)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        y_pred = tf.cast(y_pred, tf.float32)
        y_true = tf.cast(y_true, tf.float32) * (1.0 - self.label_smoothing) \
            + 0.5 * self.label_smoothing
        losses = tf.nn.weighted_cross_entropy_with_logits(
            y_true, y_pred, tf.constant(self.positive_weights))
        return tf.reduce_mean(losses, axis=-1)

    def get_config(self) -> dict:
        return {"positive_weights": self.positive_weights.tolist(),
                "label_smoothing": self.label_smoothing, "name": self.name}


def balanced_positive_weights(targets: np.ndarray) -> np.ndarray:
    """Per-label weights of the positives, `negatives / positives` of the training labels
    (float `[N, C]` multi-hot), so that each label's positives and negatives weigh the
    same in the loss; 1 for a label without positives."""
    positives = np.asarray(targets, np.float64).sum(axis=0)
    negatives = len(targets) - positives
    return np.where(positives > 0, negatives / np.maximum(positives, 1), 1.0)


@dataclass(frozen=True)
class MultiLabelTask(Task):
    """Any set of labels per image, a sigmoid and a tuned threshold per label.

    Attributes:
        thresholds: float `[C]` probability thresholds, or None for 0.5 each.
        tuned_on: where the thresholds come from, for reports.
    """

    thresholds: tuple[float, ...] | None = None
    tuned_on: str = "default 0.5"

    name: ClassVar[str] = "multilabel"
    description: ClassVar[str] = "multi-label"
    label_rank: ClassVar[int] = 1
    wrong_labels: ClassVar[str] = (
        "gives each image one class; model.task=multilabel needs sets of labels: use a "
        "manifest (data.source=manifest:PATH.csv, see docs/multilabel.md) or "
        "model.task=multiclass.")
    training_score: ClassVar[str] = "pr_auc"
    headline_metrics: ClassVar[tuple[str, ...]] = ("mAP", "micro_f1")
    supports_monitoring: ClassVar[bool] = False
    supports_slices: ClassVar[bool] = False  # per-slice mAP: not yet
    explains_each_label: ClassVar[bool] = True
    agreement_kind: ClassVar[str] = "label-set"
    report_title: ClassVar[str] = "Multi-label evaluation on the held-out split"
    plots: ClassVar[tuple[str, ...]] = ("pr_curves",)

    def balanced_weights(self, class_counts: Callable[[], np.ndarray],
                         targets: Callable[[], np.ndarray]) -> LossWeights:
        return LossWeights(positives=balanced_positive_weights(targets()))

    def objective(self, label_smoothing: float, weights: LossWeights) -> Objective:
        def make() -> tuple[keras.losses.Loss, list[keras.metrics.Metric]]:
            metrics = [keras.metrics.AUC(curve="PR", multi_label=True, from_logits=True,
                                         name="pr_auc")]
            if weights.positives is not None:
                return WeightedBinaryCrossentropy(weights.positives, label_smoothing), metrics
            return (keras.losses.BinaryCrossentropy(from_logits=True,
                                                    label_smoothing=label_smoothing), metrics)

        return make

    def legacy_objective(self) -> dict[str, Any]:
        return {"loss": "BinaryCrossentropy", "metric": "BinaryAccuracy",
                "metric_arguments": {"threshold": 0.0}, "activation": "sigmoid"}

    def calibration_plan(self, calibrate: str, has_validation: bool,
                         reject_coverage: float | str | None = None) -> CalibrationPlan:
        """Thresholds with a validation split; no rejection rule (`TASK_CAPABILITIES`)."""
        super().calibration_plan(calibrate, has_validation)  # checks the setting
        return CalibrationPlan("thresholds" if has_validation else "none")

    def fit(self, logits: np.ndarray, labels: np.ndarray, fitted_on: str) -> MultiLabelTask:
        """Tunes each label's threshold on held-out `logits` and multi-hot `labels` `[N, C]`."""
        thresholds = tune_thresholds(sigmoid(logits), labels)
        return MultiLabelTask(tuple(float(value) for value in thresholds),
                              f"{fitted_on} ({len(labels)} images)")

    def threshold_vector(self, num_classes: int) -> np.ndarray:
        """float64 `[C]`: the tuned thresholds, or 0.5 each."""
        if self.thresholds is None:
            return np.full(num_classes, DEFAULT_THRESHOLD)
        return np.asarray(self.thresholds, np.float64)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return sigmoid(logits)

    def probabilities_graph(self, logits: tf.Tensor) -> tf.Tensor:
        return tf.math.sigmoid(logits)

    def predicted(self, probabilities: np.ndarray) -> np.ndarray:
        return (probabilities >= self.threshold_vector(probabilities.shape[-1])).astype(np.int64)

    def explained_labels(self, probabilities: np.ndarray) -> list[int]:
        """Every label at or above its threshold (the most probable one when none is)."""
        labels = np.flatnonzero(probabilities >= self.threshold_vector(len(probabilities)))
        if not len(labels):
            labels = [int(np.argmax(probabilities))]
        return [int(label) for label in sorted(labels, key=lambda label: -probabilities[label])]

    def ranked_labels(self, probabilities: np.ndarray, top_k: int) -> list[int]:
        """The labels at or above their thresholds, best first, at most `top_k`."""
        above = np.flatnonzero(probabilities >= self.threshold_vector(len(probabilities)))
        return [int(label) for label in sorted(above, key=lambda label: -probabilities[label])
                ][:top_k]

    def evaluate(self, logits: np.ndarray, labels: np.ndarray, class_names: list[str],
                 view_logits: list[np.ndarray] | None = None,
                 embeddings: np.ndarray | None = None) -> Evaluation:
        """Multi-label metrics at the thresholds; `labels` multi-hot `[N, C]`."""
        probabilities = self.probabilities(logits)
        metrics = multilabel_metrics(probabilities, labels, self.threshold_vector(len(class_names)),
                                     class_names)
        metrics["thresholds_tuned_on"] = self.tuned_on
        return Evaluation(metrics, probabilities.astype(np.float32),
                          np.asarray(labels, np.float32))

    def edge_metrics(self, probabilities: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        scores = multilabel_metrics(probabilities, labels,
                                    self.threshold_vector(labels.shape[1]),
                                    [str(label) for label in range(labels.shape[1])])
        return {"mAP": scores["mAP"], "micro_f1": scores["micro_f1"]}

    def summary_line(self, metrics: dict[str, Any], chance: float) -> str:
        return (f"test mAP {metrics['mAP']:.4f}, micro F1 {metrics['micro_f1']:.4f}, macro F1 "
                f"{metrics['macro_f1']:.4f} on {metrics['examples']} held-out images "
                f"(thresholds tuned on the {self.tuned_on}; label cardinality "
                f"{metrics['label_cardinality']:.2f}, predicted "
                f"{metrics['predicted_cardinality']:.2f})")

    def report_sections(self, metrics: dict[str, Any]) -> list[str]:
        lines = ["| metric | value |", "| --- | --- |"]
        lines += [f"| {key} | {format_value(metrics[key])} |" for key in SUMMARY_METRICS]
        lines += ["", "F1, precision and recall at the per-label thresholds tuned on the "
                  f"{metrics.get('thresholds_tuned_on', 'validation split')}.", "",
                  "## Per label", "",
                  "| label | threshold | AP | precision | recall | F1 | support |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, row in metrics["per_label"].items():
            average_precision = row["average_precision"]
            lines.append(f"| {name} | {metrics['thresholds'][name]:.3f} | "
                         + (f"{average_precision:.3f}" if average_precision is not None else "-")
                         + f" | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | "
                         f"{row['support']} |")
        return lines

    def serving_outputs(self, probabilities: tf.Tensor, label_table: tf.Tensor,
                        top_k: int) -> dict[str, tf.Tensor]:
        num_classes = int(label_table.shape[0])
        scores, classes = tf.math.top_k(probabilities, k=num_classes)
        above = probabilities >= tf.constant(self.threshold_vector(num_classes), tf.float32)
        labels = tf.gather(label_table, classes)
        # Every label, best first; one below its threshold is blanked.
        return {"probabilities": probabilities, "classes": classes, "scores": scores,
                "labels": tf.where(tf.gather(above, classes, batch_dims=1), labels, ""),
                "predicted": tf.cast(above, tf.int32)}

    def metadata(self) -> dict[str, Any]:
        return {"task": self.name, "temperature": None, "rejection": None,
                "thresholds": None if self.thresholds is None else list(self.thresholds)}
