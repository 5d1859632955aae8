"""Training losses and metrics per task (`kcls.config.ModelConfig.task`).

`multiclass`: softmax categorical cross-entropy and accuracy. `multilabel`: one sigmoid
per label, binary cross-entropy averaged over labels, optionally weighing each label's
positives by a per-label factor (`train.class_weights=balanced`: rare labels count more),
and the area under the precision-recall curve averaged over labels (a close estimate
of mean average precision, computed on 200 thresholds).

Example:

>>> loss, metrics = task_loss_and_metrics("multilabel", label_smoothing=0.1)
>>> float(loss(np.ones([2, 3], np.float32), np.zeros([2, 3], np.float32)))  # doctest: +SKIP
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from kcls.config import Task, require_choice


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


def task_loss_and_metrics(task: str, label_smoothing: float = 0.0,
                          positive_weights: np.ndarray | None = None
                          ) -> tuple[keras.losses.Loss, list[keras.metrics.Metric]]:
    """The loss (on logits) and the training metrics of `task`.

    Args:
        task: `multiclass` or `multilabel`.
        label_smoothing: float in [0, 1).
        positive_weights: float `[C]` per-label positive weights (multilabel only), or None.
    """
    require_choice(task, Task, "model.task")
    if task == "multiclass":
        return (keras.losses.CategoricalCrossentropy(from_logits=True,
                                                     label_smoothing=label_smoothing),
                [keras.metrics.CategoricalAccuracy(name="accuracy")])
    metrics = [keras.metrics.AUC(curve="PR", multi_label=True, from_logits=True,
                                 name="pr_auc")]
    if positive_weights is not None:
        return WeightedBinaryCrossentropy(positive_weights, label_smoothing), metrics
    return (keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=label_smoothing),
            metrics)
