"""Reports a person reads at a glance: `report.md` and four PNG plots in the run directory.

    training_curves.png     loss and accuracy per epoch, both phases, unfreeze point marked
    confusion_matrix.png    row-normalised, class names on the axes
    reliability.png         accuracy vs confidence in 15 bins, with the ECE (before and
                            after temperature scaling, when the model was calibrated)
    confident_mistakes.png  the held-out images the model got wrong most confidently

Example:

>>> paths = write_report(run_dir, evaluation, class_names, history, phases,
...                      test_images)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kcls.figures import plt, save_figure
from kcls.files import write_json, write_text
from kcls.layout import (
    CONFIDENT_MISTAKES_PLOT,
    CONFUSION_MATRIX_PLOT,
    METRICS_FILE,
    PR_CURVES_PLOT,
    RELIABILITY_PLOT,
    REPORT_FILE,
    TRAINING_CURVES_PLOT,
)
from kcls.metrics.calibration import calibration_bins
from kcls.metrics.classification import Evaluation
from kcls.metrics.multilabel import precision_recall_curves


def write_report(run_dir: str | Path, evaluation: Evaluation, class_names: list[str],
                 history: dict[str, list[float]] | None = None,
                 phases: list[dict[str, Any]] | None = None,
                 images: Mapping[int, np.ndarray] | None = None,
                 mistakes: int = 16) -> list[Path]:
    """Writes `metrics.json`, `report.md` and the plots into `run_dir`.

    Args:
        run_dir: output folder (created if missing).
        evaluation: Evaluation of the held-out split.
        class_names: list[str], one per class.
        history: metric name -> per-epoch values over both phases (curves skipped if None).
        phases: `[{"name", "first_epoch", "epochs", ...}]` to mark the unfreeze point.
        images: held-out images by evaluation index (uint8 `[H, W, 3]`), at least those
            of `confident_mistakes(evaluation, mistakes)`, for the mistakes grid
            (skipped if None).
        mistakes: how many confident mistakes to show.

    Returns:
        Paths of the files written.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    written = [write_json(run_dir / METRICS_FILE, evaluation.metrics)]
    if history:
        written.append(plot_training_curves(history, phases or [], run_dir / TRAINING_CURVES_PLOT))
    written.append(plot_confusion_matrix(np.asarray(evaluation.metrics["confusion_matrix"]),
                                         class_names, run_dir / CONFUSION_MATRIX_PLOT))
    written.append(plot_reliability(evaluation, run_dir / RELIABILITY_PLOT))
    if images is not None:
        written.append(plot_confident_mistakes(evaluation, images, class_names,
                                               run_dir / CONFIDENT_MISTAKES_PLOT, mistakes))
    report = write_text(run_dir / REPORT_FILE, markdown_report(
        evaluation.metrics, [p.name for p in written[1:]], evaluation.skipped))
    return [*written, report]


def markdown_report(metrics: dict[str, Any], plots: list[str],
                    skipped: list[str] | None = None) -> str:
    """The metrics as Markdown tables, with the plots embedded and, when there are any,
    the `skipped` files of the data that did not reach the model."""
    lines = ["# Evaluation on the held-out split", "",
             "| metric | value |", "| --- | --- |"]
    for key in ("examples", "accuracy", "top5_accuracy", "nll", "ece"):
        if key in metrics:
            lines.append(f"| {key} | {_format(metrics[key])} |")
    if "tta" in metrics:
        for key, value in metrics["tta"].items():
            lines.append(f"| {key} (flip TTA) | {_format(value)} |")
    calibration = metrics.get("calibration")
    if calibration and calibration.get("method") == "temperature":
        fitted = (f" fitted on the {calibration['fitted_on']} ({calibration['fit_examples']} "
                  "images)" if "fitted_on" in calibration else "")
        lines += ["", "## Calibration", "",
                  f"Temperature scaling: T = {calibration['temperature']:.4f}{fitted}; the "
                  "export serves softmax(logits / T). Accuracy is unchanged.", "",
                  "| metric | before (T = 1) | after |", "| --- | --- | --- |"]
        for key in ("nll", "ece"):
            lines.append(f"| {key} | {calibration['before'][key]:.4f} | "
                         f"{calibration['after'][key]:.4f} |")
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | support |",
              "| --- | --- | --- | --- | --- |"]
    for name, row in metrics["per_class"].items():
        lines.append(f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | "
                     f"{row['f1']:.3f} | {row['support']} |")
    for average in ("macro_avg", "weighted_avg"):
        row = metrics[average]
        lines.append(f"| *{average.replace('_', ' ')}* | {row['precision']:.3f} | "
                     f"{row['recall']:.3f} | {row['f1']:.3f} | |")
    if skipped:
        lines += ["", f"## Skipped files ({len(skipped)})", "",
                  "Unreadable or undecodable; not among the examples above.", ""]
        lines += [f"- `{name}`" for name in skipped]
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def write_multilabel_report(run_dir: str | Path, metrics: dict[str, Any],
                            probabilities: np.ndarray, targets: np.ndarray,
                            class_names: list[str],
                            history: dict[str, list[float]] | None = None,
                            phases: list[dict[str, Any]] | None = None,
                            skipped: list[str] | None = None) -> list[Path]:
    """Writes `metrics.json`, `report.md`, the PR curves and the training curves of a
    multi-label model (`kcls.metrics.multilabel.multilabel_metrics` gives `metrics`).

    Args:
        probabilities: float `[N, C]` test probabilities; targets: `[N, C]` of 0/1.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    written = [write_json(run_dir / METRICS_FILE, metrics)]
    if history:
        written.append(plot_training_curves(history, phases or [], run_dir / TRAINING_CURVES_PLOT))
    written.append(plot_precision_recall(probabilities, targets, class_names,
                                         metrics["thresholds"], run_dir / PR_CURVES_PLOT))
    lines = ["# Multi-label evaluation on the held-out split", "",
             "| metric | value |", "| --- | --- |"]
    for key in ("examples", "mAP", "micro_f1", "macro_f1", "micro_precision", "micro_recall",
                "exact_match", "label_cardinality", "predicted_cardinality"):
        lines.append(f"| {key} | {_format(metrics[key])} |")
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
    if skipped:
        lines += ["", f"## Skipped files ({len(skipped)})", "",
                  "Not among the examples above.", ""]
        lines += [f"- `{name}`" for name in skipped]
    lines += ["", "## Plots", ""] + [f"![{path.name}]({path.name})" for path in written[1:]]
    report = write_text(run_dir / REPORT_FILE, "\n".join(lines) + "\n")
    return [*written, report]


def plot_precision_recall(probabilities: np.ndarray, targets: np.ndarray,
                          class_names: list[str], thresholds: Mapping[str, float],
                          path: Path) -> Path:
    """One precision-recall curve per label, its tuned threshold marked with a dot."""
    figure, axis = plt.subplots(figsize=(7, 6))
    curves = precision_recall_curves(probabilities, targets)
    truth = np.asarray(targets) > 0.5
    for label, (name, curve) in enumerate(zip(class_names, curves)):
        if curve is None:
            continue
        precision, recall = curve
        lines = axis.plot(recall, precision, label=name)
        predicted = probabilities[:, label] >= thresholds[name]
        hits = np.sum(predicted & truth[:, label])
        axis.plot(hits / max(truth[:, label].sum(), 1), hits / max(predicted.sum(), 1), "o",
                  color=lines[0].get_color())
    axis.set_xlabel("recall")
    axis.set_ylabel("precision")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.set_title("Precision-recall per label (dots: tuned thresholds)")
    axis.legend(fontsize="small", loc="lower left")
    return save_figure(figure, path)


def plot_training_curves(history: dict[str, list[float]], phases: list[dict[str, Any]],
                         path: Path) -> Path:
    """Loss and accuracy (train and validation) per epoch; a line where phase 2 starts."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    # Multi-label runs track the PR AUC (kcls.train.losses) instead of accuracy.
    score = next((name for name in ("accuracy", "pr_auc") if name in history), "accuracy")
    for axis, metric in zip(axes, ("loss", score)):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            if key in history:
                epochs = np.arange(1, len(history[key]) + 1)
                axis.plot(epochs, history[key], style, marker="o", label=key)
        for phase in phases[1:]:
            axis.axvline(phase["first_epoch"] + 0.5, color="gray", linestyle=":",
                         label=f"{phase['name']} from here")
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.legend()
    return save_figure(figure, path)


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: Path) -> Path:
    """Row-normalised confusion matrix (each true class sums to 1), counts in the cells."""
    totals = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    size = max(4.0, 0.5 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    image = axis.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    if len(class_names) <= 30:
        for row in range(len(class_names)):
            for column in range(len(class_names)):
                axis.text(column, row, int(matrix[row, column]), ha="center", va="center",
                          fontsize=7, color="white" if normalised[row, column] > 0.5 else "black")
    figure.colorbar(image, ax=axis, fraction=0.046)
    axis.set_title("confusion matrix (row-normalised)")
    return save_figure(figure, path)


def plot_reliability(evaluation: Evaluation, path: Path) -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal; with a
    calibrated model, the curve before temperature scaling too."""
    binned = calibration_bins(evaluation.probabilities, evaluation.labels)
    centres = (binned["edges"][:-1] + binned["edges"][1:]) / 2
    width = binned["edges"][1] - binned["edges"][0]
    filled = binned["count"] > 0
    figure, axis = plt.subplots(figsize=(5, 5))
    calibration = evaluation.metrics.get("calibration")
    scaled = evaluation.uncalibrated_probabilities is not None and calibration
    axis.bar(centres[filled], binned["accuracy"][filled], width=width, edgecolor="black",
             label=f"after T = {calibration['temperature']:.2f}" if scaled else "accuracy")
    if scaled:
        before = calibration_bins(evaluation.uncalibrated_probabilities, evaluation.labels)
        shown = before["count"] > 0
        axis.plot(before["confidence"][shown], before["accuracy"][shown], "o-", color="tab:red",
                  label=f"before (ECE {calibration['before']['ece']:.3f})")
    axis.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("confidence (top-1 probability)")
    axis.set_ylabel("accuracy")
    axis.set_title(f"reliability (ECE {evaluation.metrics['ece']:.3f})")
    axis.legend(loc="upper left")
    return save_figure(figure, path)


def confident_mistakes(evaluation: Evaluation, count: int = 16) -> np.ndarray:
    """Indices of the `count` most confident wrong predictions, most confident first."""
    predictions = evaluation.probabilities.argmax(axis=1)
    confidence = evaluation.probabilities.max(axis=1)
    wrong = np.flatnonzero(predictions != evaluation.labels)
    return wrong[np.argsort(-confidence[wrong], kind="stable")][:count]


def plot_confident_mistakes(evaluation: Evaluation, images: Mapping[int, np.ndarray],
                            class_names: list[str], path: Path, count: int = 16) -> Path:
    """A grid of the wrong predictions with the highest confidence, titled `true -> predicted`."""
    predictions = evaluation.probabilities.argmax(axis=1)
    confidence = evaluation.probabilities.max(axis=1)
    chosen = confident_mistakes(evaluation, count)
    columns = 4
    rows = max(1, int(np.ceil(len(chosen) / columns)))
    figure, axes = plt.subplots(rows, columns, figsize=(2.5 * columns, 2.7 * rows),
                                squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, chosen):
        axis.imshow(images[index])
        axis.set_title(f"{class_names[evaluation.labels[index]]} -> "
                       f"{class_names[predictions[index]]}\n{confidence[index]:.2f}", fontsize=8)
    if not len(chosen):
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    figure.suptitle("most confident mistakes (true -> predicted, confidence)")
    return save_figure(figure, path)


def _format(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
