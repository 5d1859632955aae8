"""Single-label classification (`model.task=multiclass`): one class per image.

Softmax over the logits and categorical cross-entropy (with label smoothing; one-hot
labels, so MixUp/CutMix soft labels train the same way). After training, temperature
scaling (`kcls.metrics.calibration.fit_temperature`) fits one T on held-out logits, and
everything served is `softmax(logits / T)`: the argmax, hence accuracy, never changes.
Test metrics are `kcls.metrics.classification`'s; exports serve the top-k classes.

Example:

>>> task = SingleLabelTask().fit(logits, labels, "validation split")  # doctest: +SKIP
>>> task.temperature  # doctest: +SKIP
1.31
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import keras
import numpy as np
import tensorflow as tf
from scipy.special import softmax

from kcls.config import Calibrate as CalibrateSetting
from kcls.config import RejectCoverage, require_choice
from kcls.data.pipeline import balanced_class_weights
from kcls.data.tta import measured_tta_name
from kcls.metrics.calibration import fit_temperature
from kcls.metrics.classification import (
    class_balance_warning,
    evaluate_predictions,
    summary_metrics,
)
from kcls.tasks.base import (
    CalibrationPlan,
    Evaluation,
    LossWeights,
    Objective,
    Task,
    format_value,
)
from kcls.tasks.rejection import RejectionRule

# `export.reject_coverage=auto` with a validation split (docs/serving.md, "Rejecting
# unknown images").
AUTO_REJECT_COVERAGE = 0.95


@dataclass(frozen=True)
class SingleLabelTask(Task):
    """One class per image, softmax probabilities, optionally temperature-scaled.

    Attributes:
        temperature: the calibration temperature T > 0 served probabilities divide the
            logits by, or None (T = 1).
        calibration: how T was fitted (`fitted_on`, `fit_examples`, `fit_nll_before`,
            `fit_nll_after`), recorded in the metrics; None when it was not fitted here.
        rejection: the rule for unknown images (`kcls.tasks.rejection.RejectionRule`), or
            None.
    """

    temperature: float | None = None
    calibration: dict[str, Any] | None = None
    rejection: RejectionRule | None = None

    name: ClassVar[str] = "multiclass"
    description: ClassVar[str] = "single-label"
    label_rank: ClassVar[int] = 0
    wrong_labels: ClassVar[str] = "gives each image a set of labels: set model.task=multilabel."
    training_score: ClassVar[str] = "accuracy"
    headline_metrics: ClassVar[tuple[str, ...]] = ("accuracy",)
    supports_monitoring: ClassVar[bool] = True
    supports_slices: ClassVar[bool] = True
    explains_each_label: ClassVar[bool] = False
    agreement_kind: ClassVar[str] = "top-1"
    report_title: ClassVar[str] = "Evaluation on the held-out split"
    plots: ClassVar[tuple[str, ...]] = ("confusion_matrix", "reliability", "confident_mistakes")

    def balanced_weights(self, class_counts: Callable[[], np.ndarray],
                         targets: Callable[[], np.ndarray]) -> LossWeights:
        return LossWeights(per_class=balanced_class_weights(class_counts()))

    def objective(self, label_smoothing: float, weights: LossWeights) -> Objective:
        def make() -> tuple[keras.losses.Loss, list[keras.metrics.Metric]]:
            return (keras.losses.CategoricalCrossentropy(from_logits=True,
                                                         label_smoothing=label_smoothing),
                    [keras.metrics.CategoricalAccuracy(name="accuracy")])

        return make

    def legacy_objective(self) -> dict[str, Any]:
        return {"loss": "CategoricalCrossentropy", "metric": "CategoricalAccuracy",
                "metric_arguments": {}, "activation": "softmax"}

    def calibration_plan(self, calibrate: str, has_validation: bool,
                         reject_coverage: float | str | None = None) -> CalibrationPlan:
        """`temperature` when asked (`auto`: with a validation split), and the rejection
        rule's coverage (`auto`: `AUTO_REJECT_COVERAGE` with a validation split); without
        a validation split, either one carves training images out to fit on."""
        require_choice(calibrate, CalibrateSetting, "evaluate.calibrate")
        require_choice(reject_coverage, RejectCoverage | None, "export.reject_coverage")
        temperature = calibrate == "temperature" or (calibrate == "auto" and has_validation)
        coverage = (None if reject_coverage is None or (reject_coverage == "auto"
                                                        and not has_validation)
                    else AUTO_REJECT_COVERAGE if reject_coverage == "auto"
                    else float(reject_coverage))
        return CalibrationPlan("temperature" if temperature else "none",
                               carve_out=not has_validation and (temperature
                                                                 or coverage is not None),
                               reject_coverage=coverage)

    def fit(self, logits: np.ndarray, labels: np.ndarray, fitted_on: str) -> SingleLabelTask:
        """Fits the temperature by the NLL of held-out `logits` `[N, C]` and `labels` (int
        `[N]` or one-hot `[N, C]`)."""
        labels = class_indices(labels)
        temperature = fit_temperature(logits, labels)
        return dataclasses.replace(self, temperature=temperature, calibration={
            "fitted_on": fitted_on, "fit_examples": int(len(labels)),
            "fit_nll_before": summary_metrics(logits, labels)["nll"],
            "fit_nll_after": summary_metrics(logits / temperature, labels)["nll"]})

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(np.asarray(logits, np.float64) / (self.temperature or 1.0), axis=-1)

    def probabilities_graph(self, logits: tf.Tensor) -> tf.Tensor:
        # A constant of the graph: T is fixed at export.
        return tf.nn.softmax(logits * (1.0 / (self.temperature or 1.0)))

    def predicted(self, probabilities: np.ndarray) -> np.ndarray:
        return np.argmax(probabilities, axis=-1).astype(np.int64)

    def explained_labels(self, probabilities: np.ndarray) -> list[int]:
        return [int(np.argmax(probabilities))]

    def ranked_labels(self, probabilities: np.ndarray, top_k: int) -> list[int]:
        """The `top_k` most probable classes, best first."""
        return [int(index) for index in np.argsort(-np.asarray(probabilities),
                                                   kind="stable")[:top_k]]

    def evaluate(self, logits: np.ndarray, labels: np.ndarray, class_names: list[str],
                 view_logits: list[np.ndarray] | None = None,
                 embeddings: np.ndarray | None = None) -> Evaluation:
        """`kcls.metrics.classification.evaluate_predictions` at the task's temperature,
        and with `embeddings` `[N, D]` the rejection rule's test coverage (`rejection`).

        Args:
            logits: float `[N, C]`; labels: int `[N]` (or one-hot float `[N, C]`).
        """
        classes = class_indices(labels)
        evaluation = evaluate_predictions(logits, classes, class_names, view_logits,
                                          self.temperature)
        if self.calibration and "calibration" in evaluation.metrics:
            evaluation.metrics["calibration"].update(self.calibration)
        if self.rejection is not None and embeddings is not None:
            evaluation.metrics["rejection"] = self.rejection.evaluate(
                embeddings, np.argmax(logits, axis=-1) == classes)
        return evaluation

    def edge_metrics(self, probabilities: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        return {"accuracy": float(np.mean(self.predicted(probabilities) == labels))}

    def notes(self, metrics: dict[str, Any]) -> list[str]:
        """Log lines on the test metrics: calibration before/after, support, imbalance."""
        lines = []
        calibration = metrics.get("calibration", {})
        if "fitted_on" in calibration:
            before, after = calibration["before"], calibration["after"]
            lines.append(f"temperature scaling: T {calibration['temperature']:.3f} fitted on "
                         f"{calibration['fitted_on']} ({calibration['fit_examples']} images); "
                         f"test nll {before['nll']:.4f} -> {after['nll']:.4f}, ece "
                         f"{before['ece']:.4f} -> {after['ece']:.4f}")
        support = {name: row["support"] for name, row in metrics["per_class"].items()}
        lines.append("test support per class: "
                     + ", ".join(f"{name} {count}" for name, count in support.items()))
        imbalance = class_balance_warning(support)
        if self.rejection is not None:
            lines.append(self.rejection.describe() + _rejection_test_line(metrics))
        return lines + ([f"warning: {imbalance}"] if imbalance else [])

    def summary_line(self, metrics: dict[str, Any], chance: float) -> str:
        tta = (f"; {measured_tta_name(metrics)} TTA accuracy "
               f"{metrics['tta']['accuracy']:.4f}" if "tta" in metrics else "")
        return (f"test accuracy {metrics['accuracy']:.4f} on {metrics['examples']} held-out "
                f"images (chance {chance:.4f}), nll {metrics['nll']:.4f}, ece "
                f"{metrics['ece']:.4f}{tta}")

    def report_sections(self, metrics: dict[str, Any]) -> list[str]:
        lines = ["| metric | value |", "| --- | --- |"]
        for key in ("examples", "accuracy", "top5_accuracy", "nll", "ece"):
            if key in metrics:
                lines.append(f"| {key} | {format_value(metrics[key])} |")
        for key, value in metrics.get("tta", {}).items():
            lines.append(
                f"| {key} ({measured_tta_name(metrics)} TTA) | {format_value(value)} |")
        return (lines + _calibration_section(metrics.get("calibration"))
                + _rejection_section(metrics.get("rejection")) + _per_class_section(metrics))

    def serving_outputs(self, probabilities: tf.Tensor, label_table: tf.Tensor,
                        top_k: int) -> dict[str, tf.Tensor]:
        scores, classes = tf.math.top_k(probabilities, k=min(top_k, int(label_table.shape[0])))
        return {"probabilities": probabilities, "classes": classes, "scores": scores,
                "labels": tf.gather(label_table, classes)}

    def metadata(self) -> dict[str, Any]:
        return {"task": self.name, "temperature": self.temperature, "thresholds": None,
                "rejection": self.rejection.metadata() if self.rejection else None}


def class_indices(labels: np.ndarray) -> np.ndarray:
    """int64 `[N]` classes of labels given as classes `[N]` or one-hot rows `[N, C]`."""
    labels = np.asarray(labels)
    return (np.argmax(labels, axis=-1) if labels.ndim == 2 else labels).astype(np.int64)


def _calibration_section(calibration: dict[str, Any] | None) -> list[str]:
    if not calibration or calibration.get("method") != "temperature":
        return []
    fitted = (f" fitted on the {calibration['fitted_on']} ({calibration['fit_examples']} "
              "images)" if "fitted_on" in calibration else "")
    lines = ["", "## Calibration", "",
             f"Temperature scaling: T = {calibration['temperature']:.4f}{fitted}; the "
             "export serves softmax(logits / T). Accuracy is unchanged.", "",
             "| metric | before (T = 1) | after |", "| --- | --- | --- |"]
    return lines + [f"| {key} | {calibration['before'][key]:.4f} | "
                    f"{calibration['after'][key]:.4f} |" for key in ("nll", "ece")]


def _rejection_test_line(metrics: dict[str, Any]) -> str:
    rejection = metrics.get("rejection")
    if not rejection:
        return ""
    accuracy = rejection["accuracy_known"]
    return (f"; test: {rejection['coverage']:.1%} known"
            + (f", accuracy on them {accuracy:.4f}" if accuracy is not None else ""))


def _rejection_section(rejection: dict[str, Any] | None) -> list[str]:
    if not rejection:
        return []
    accuracy = rejection["accuracy_known"]
    return ["", "## Unknown images", "",
            f"Known when the embedding's cosine similarity to the nearest class mean is at "
            f"least {rejection['threshold']:.4f}, chosen on the {rejection['fitted_on']} to "
            f"keep {rejection['target_coverage']:.0%} of in-distribution images (it kept "
            f"{rejection['fitted_coverage']:.1%} there); the export serves `known` and "
            "`known_score`.", "",
            "| metric | value |", "| --- | --- |",
            f"| test images known (coverage) | {rejection['coverage']:.4f} |",
            "| accuracy on the known test images | "
            + (f"{accuracy:.4f} |" if accuracy is not None else "- |")]


def _per_class_section(metrics: dict[str, Any]) -> list[str]:
    lines = ["", "## Per class", "", "| class | precision | recall | F1 | support |",
             "| --- | --- | --- | --- | --- |"]
    for name, row in metrics["per_class"].items():
        lines.append(f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | "
                     f"{row['f1']:.3f} | {row['support']} |")
    for average in ("macro_avg", "weighted_avg"):
        row = metrics[average]
        lines.append(f"| *{average.replace('_', ' ')}* | {row['precision']:.3f} | "
                     f"{row['recall']:.3f} | {row['f1']:.3f} | |")
    return lines
