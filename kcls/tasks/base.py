"""What every problem type answers: the `Task` interface and the results it passes on.

A task turns the classifier's logits into what the user gets: the head's activation
(softmax or sigmoids), the training loss and metrics, the labels it expects, what it
fits on held-out data after training (a calibration temperature, per-label thresholds),
the test metrics and their report, the serving outputs and how predictions are read.
Everything outside `kcls.tasks` asks the task instead of testing `model.task`, as TF
Model Garden's `ImageClassificationTask` and keras-hub's task classes own their models'
heads, losses and metrics. A task object is immutable; `fit` returns a fitted copy,
and `metadata` / `kcls.tasks.task_from_metadata` carry that state into exports.

Example:

>>> task = get_task("multiclass").fit(validation_logits, validation_labels,
...                                   "validation split")  # doctest: +SKIP
>>> evaluation = task.evaluate(test_logits, test_labels, class_names)  # doctest: +SKIP
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import keras
import numpy as np
import tensorflow as tf

from kcls.config import TASK_CAPABILITIES, Calibrate, ConfigError, require_choice
from kcls.metrics.evaluation import Evaluation
from kcls.tasks.rejection import RejectionRule

# A fresh training loss and fresh training metrics, for one `compile()`.
Objective = Callable[[], tuple[keras.losses.Loss, list[keras.metrics.Metric]]]


@dataclass(frozen=True)
class LossWeights:
    """How the training loss weighs examples (`train.class_weights`).

    Attributes:
        per_class: float `[C]`, the weight of each training example by its class
            (single-label, `balanced`), or None.
        positives: float `[C]`, the weight of each label's positives in the loss
            (multi-label, `balanced`), or None.
    """

    per_class: np.ndarray | None = None
    positives: np.ndarray | None = None

    def record(self, class_names: list[str]) -> dict[str, dict[str, float] | None]:
        """`{"class_weights", "positive_weights"}`: name -> weight (4 decimals), or None."""
        def named(weights: np.ndarray | None) -> dict[str, float] | None:
            return None if weights is None else dict(
                zip(class_names, np.round(weights, 4).tolist()))

        return {"class_weights": named(self.per_class), "positive_weights": named(self.positives)}

    def describe(self, class_names: list[str]) -> str | None:
        """One log line naming the weights, or None without any."""
        for weights, what in ((self.positives, "positive weights per label"),
                              (self.per_class, "class weights")):
            if weights is not None:
                return f"{what} (balanced): " + ", ".join(
                    f"{name} {weight:.2f}" for name, weight in zip(class_names, weights))
        return None


@dataclass(frozen=True)
class CalibrationPlan:
    """What a run fits on held-out data after training (`evaluate.calibrate`).

    Attributes:
        method: `temperature`, `thresholds` or `none`.
        carve_out: whether to hold training images out to fit on (no validation split).
        reject_coverage: the coverage of the rejection rule to fit (`RejectionRule`), or
            None for none (`export.reject_coverage`, `auto` resolved).
        skipped: why a calibration `auto` would have fitted was not fitted (too few
            held-out images, `kcls.workflows.prepare.plan_calibration`), or None.
    """

    method: str
    carve_out: bool = False
    reject_coverage: float | None = None
    skipped: str | None = None

    @property
    def fits_anything(self) -> bool:
        """Whether anything is fitted on held-out examples after training."""
        return self.method != "none" or self.reject_coverage is not None


class Task(abc.ABC):
    """A problem type. Subclasses set the class attributes and implement the methods.

    Attributes:
        name: the `model.task` value.
        description: a few words for messages (`single-label`).
        label_rank: the dimensions of one example's label: 0 (a class index) or 1 (a
            multi-hot vector); wrong_labels: what to say of a source with the other kind.
        training_score: the training metric the curves plot beside the loss.
        headline_metrics: the test metrics a model is judged by, first the main one.
        supports_monitoring: whether `kcls monitor` can compare its predictions.
        supports_slices: whether `kcls evaluate --slice-by` scores its slices
            (`kcls.metrics.slices`: accuracy, macro F1 and ECE of top-1 predictions).
        explains_each_label: whether `kcls explain` writes one overlay per label.
        agreement_kind: what "same prediction" means between two models (`top-1`).
        report_title: the report's heading; plots: the report's plots
            (`kcls.evaluation.plots.PLOTS` names).
        rejection: the fitted rule for unknown images (`kcls.tasks.rejection`), or None;
            only tasks whose `TASK_CAPABILITIES` have `rejection` get one.
    """

    rejection: RejectionRule | None = None

    name: ClassVar[str]
    description: ClassVar[str]
    label_rank: ClassVar[int]
    wrong_labels: ClassVar[str]
    training_score: ClassVar[str]
    headline_metrics: ClassVar[tuple[str, ...]]
    supports_monitoring: ClassVar[bool]
    supports_slices: ClassVar[bool]
    explains_each_label: ClassVar[bool]
    agreement_kind: ClassVar[str]
    report_title: ClassVar[str]
    plots: ClassVar[tuple[str, ...]]

    @property
    def supports_flip_tta(self) -> bool:
        return TASK_CAPABILITIES[self.name].flip_tta

    # Data.
    def check_labels(self, label_rank: int, source: str) -> None:
        """Raises `ConfigError` unless examples whose labels have `label_rank` dimensions
        (0: a class index, 1: a multi-hot vector) suit the task, naming the fix."""
        if label_rank != self.label_rank:
            raise ConfigError(f"data.source={source!r} {self.wrong_labels}")

    @abc.abstractmethod
    def balanced_weights(self, class_counts: Callable[[], np.ndarray],
                         targets: Callable[[], np.ndarray]) -> LossWeights:
        """The `balanced` loss weights, from the training split's class counts (int
        `[C]`) or its multi-hot targets (`[N, C]`), each read only when needed."""

    def label_names(self, label: np.ndarray, class_names: list[str]) -> list[str]:
        """The class names of one example's label (a class index or a multi-hot vector)."""
        if np.ndim(label) == 0:
            return [class_names[int(label)]]
        return [class_names[index] for index in np.flatnonzero(np.asarray(label) > 0.5)]

    # Training.
    @abc.abstractmethod
    def objective(self, label_smoothing: float, weights: LossWeights) -> Objective:
        """The training loss on logits and the training metrics, as a factory."""

    @abc.abstractmethod
    def legacy_objective(self) -> dict[str, Any]:
        """The loss, metric and activation by tf-keras name, for the TF-MOT child process
        (which cannot use Keras 3 objects): `{"loss", "metric", "metric_arguments",
        "activation"}`."""

    # After training.
    def calibration_plan(self, calibrate: str, has_validation: bool,
                         reject_coverage: float | str | None = None) -> CalibrationPlan:
        """What `evaluate.calibrate` and `export.reject_coverage` (`auto` included) mean
        for this task and data."""
        require_choice(calibrate, Calibrate, "evaluate.calibrate")
        return CalibrationPlan("none")

    def fit_rejection(self, train_embeddings: np.ndarray, train_labels: np.ndarray,
                      held_out_embeddings: np.ndarray, coverage: float, fitted_on: str,
                      num_classes: int) -> Task:
        """The task with a rejection rule (`RejectionRule.fit`): the class means of the
        training embeddings `[M, D]` (int labels `[M]`, or one-hot `[M, C]`), a threshold
        keeping `coverage` of the held-out embeddings `[N, D]`.

        Raises:
            ConfigError: a task without rejection (`TASK_CAPABILITIES`).
        """
        if not TASK_CAPABILITIES[self.name].rejection:
            raise ConfigError(f"{self.description} models learn no rejection rule; set "
                              "export.reject_coverage=none.")
        labels = np.asarray(train_labels)
        labels = np.argmax(labels, axis=-1) if labels.ndim == 2 else labels.astype(np.int64)
        rule = RejectionRule.fit(train_embeddings, labels, held_out_embeddings, coverage,
                                 fitted_on, num_classes)
        return dataclasses.replace(self, rejection=rule)

    def rejection_outputs(self, logits: tf.Tensor, embedding: tf.Tensor
                          ) -> dict[str, tf.Tensor]:
        """The rule's outputs in a graph, `known` (bool `[N]`) and `known_score` (float32
        `[N]`), from logits `[N, C]` and embeddings `[N, D]`; none without a rule."""
        return {} if self.rejection is None else self.rejection.outputs_graph(embedding)

    def fit(self, logits: np.ndarray, labels: np.ndarray, fitted_on: str) -> Task:
        """The task fitted on held-out `logits` `[N, C]` and `labels`; `self` by default."""
        return self

    # Predictions.
    @abc.abstractmethod
    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """float64 `[N, C]` served probabilities of float logits `[N, C]`."""

    @abc.abstractmethod
    def probabilities_graph(self, logits: tf.Tensor) -> tf.Tensor:
        """The same in a TensorFlow graph (exports, TFLite): float32 `[N, C]`."""

    @abc.abstractmethod
    def predicted(self, probabilities: np.ndarray) -> np.ndarray:
        """The decisions: int64 `[N]` top-1 classes, or int64 `[N, C]` label sets."""

    @abc.abstractmethod
    def explained_labels(self, probabilities: np.ndarray) -> list[int]:
        """The classes `kcls explain` draws for one image's probabilities `[C]`, most
        probable first."""

    @abc.abstractmethod
    def ranked_labels(self, probabilities: np.ndarray, top_k: int) -> list[int]:
        """The classes a prediction names for one image's probabilities `[C]`, best first,
        at most `top_k`: what `serving_outputs` serves as `labels` (without blanks)."""

    # Metrics and reports.
    @abc.abstractmethod
    def evaluate(self, logits: np.ndarray, labels: np.ndarray, class_names: list[str],
                 view_logits: list[np.ndarray] | None = None,
                 embeddings: np.ndarray | None = None) -> Evaluation:
        """Every test metric of `logits` `[N, C]` against `labels`; with `view_logits`
        (of each test-time augmentation view, `kcls.data.tta`) the TTA metrics too; with
        `embeddings` `[N, D]` and a rejection rule, the rule's coverage and accuracy on
        the known images."""

    @abc.abstractmethod
    def edge_metrics(self, probabilities: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        """The headline metrics of served probabilities `[N, C]` (TFLite models)."""

    def headline(self, metrics: dict[str, Any]) -> str:
        """The test metric(s) a run is judged by, for one line (`accuracy 0.9900`)."""
        return ", ".join(f"{_spoken(name)} {metrics[name]:.4f}"
                         for name in self.headline_metrics if metrics.get(name) is not None)

    def notes(self, metrics: dict[str, Any]) -> list[str]:
        """Log lines a run prints about its test metrics before the summary line."""
        return []

    @abc.abstractmethod
    def summary_line(self, metrics: dict[str, Any], chance: float) -> str:
        """The log line of a run's test metrics (without the report's path)."""

    @abc.abstractmethod
    def report_sections(self, metrics: dict[str, Any]) -> list[str]:
        """The report's Markdown lines for `metrics`, between the title and the files."""

    # Serving and exports.
    @abc.abstractmethod
    def serving_outputs(self, probabilities: tf.Tensor, label_table: tf.Tensor,
                        top_k: int) -> dict[str, tf.Tensor]:
        """The signatures' outputs from probabilities `[N, C]` (besides the embedding)."""

    def metadata(self) -> dict[str, Any]:
        """What an export records to rebuild the fitted task (`task_from_metadata`)."""
        return {"task": self.name, "temperature": None, "thresholds": None, "rejection": None}


def format_value(value: Any) -> str:
    """A metric for a Markdown table: floats with 4 decimals."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _spoken(metric: str) -> str:
    return metric.replace("_", " ").replace("f1", "F1")
