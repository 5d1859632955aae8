"""The report's plots: figures from arrays and metrics, saved as PNG (`kcls.figures`).

    training_curves.png     loss and the training score per epoch, both phases, the
                            unfreeze point marked
    confusion_matrix.png    row-normalised, class names on the axes (single-label)
    reliability.png         accuracy vs confidence in 15 bins, with the ECE (before and
                            after temperature scaling, when the model was calibrated)
    confident_mistakes.png  the held-out images the model got wrong most confidently,
                            with their file names (`write_mistakes_table` lists them all
                            in confident_mistakes.csv)
    pr_curves.png           one precision-recall curve per label, thresholds marked
                            (multi-label)
    slices.png              accuracy per slice with its bootstrap interval, the overall
                            accuracy marked (`kcls evaluate --slice-by`, `plot_slices`)

A task names the plots of its report (`kcls.tasks.Task.plots`); `PLOTS` maps each name to
its file and drawing function, which all take `(evaluation, class_names, path, images,
mistakes)` and return the path written, or None when they have nothing to draw.

Example:

>>> plot_training_curves(history, phases, run_dir / "training_curves.png")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kcls.figures import plt, save_figure
from kcls.files import write_text
from kcls.layout import (
    CONFIDENT_MISTAKES_PLOT,
    CONFUSION_MATRIX_PLOT,
    PR_CURVES_PLOT,
    RELIABILITY_PLOT,
)
from kcls.metrics.calibration import calibration_bins
from kcls.metrics.multilabel import precision_recall_curves
from kcls.metrics.slices import SliceResults
from kcls.tasks import Evaluation

Images = Mapping[int, np.ndarray]


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


def plot_slices(results: SliceResults, overall_accuracy: float, title: str,
                path: Path) -> Path:
    """Accuracy per slice (worst at the top) with its bootstrap interval as error bars,
    the number of images beside each, and a dashed line at the `overall_accuracy`."""
    slices = results.slices
    figure, axis = plt.subplots(figsize=(7, max(2.5, 0.4 * len(slices) + 1.5)))
    rows = np.arange(len(slices))[::-1]  # worst first, from the top
    values = np.array([scores.accuracy.value for scores in slices])
    errors = np.array([[scores.accuracy.value - scores.accuracy.low,
                        scores.accuracy.high - scores.accuracy.value] for scores in slices]).T
    axis.errorbar(values, rows, xerr=errors, fmt="o", capsize=4)
    axis.axvline(overall_accuracy, color="gray", linestyle="--",
                 label=f"all images {overall_accuracy:.3f}")
    axis.set_yticks(rows, [f"{_shortened(scores.name)} (n={scores.images})"
                           for scores in slices])
    axis.set_xlim(0, 1.02)
    axis.set_xlabel(f"accuracy ({results.confidence_level:.0%} bootstrap interval, "
                    f"{results.resamples} resamples)")
    axis.set_title(title)
    axis.legend(loc="lower left", fontsize="small")
    return save_figure(figure, path)


def plot_training_curves(history: dict[str, list[float]], phases: list[dict[str, Any]],
                         path: Path, score: str = "accuracy") -> Path:
    """Loss and the task's training `score` (train and validation) per epoch; a line
    where each later phase starts (`phases` as run.json records them)."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
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
    """A grid of the wrong predictions with the highest confidence, titled `true ->
    predicted confidence` over the image's file name (its test index without files)."""
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
        name = Path(evaluation.files[index]).name if evaluation.files else f"#{index}"
        axis.set_title(f"{class_names[evaluation.labels[index]]} -> "
                       f"{class_names[predictions[index]]} {confidence[index]:.2f}\n"
                       f"{_shortened(name)}", fontsize=8)
    if not len(chosen):
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    figure.suptitle("most confident mistakes (true -> predicted, confidence)")
    return save_figure(figure, path)


def _shortened(name: str, length: int = 28) -> str:
    return name if len(name) <= length else name[:12] + "..." + name[-(length - 15):]


def write_mistakes_table(evaluation: Evaluation, class_names: list[str], path: Path) -> Path:
    """Writes every wrong single-label prediction, most confident first, as CSV:
    `rank,file,true,predicted,confidence` (`file` empty when the data has no files)."""
    predictions = evaluation.probabilities.argmax(axis=1)
    confidence = evaluation.probabilities.max(axis=1)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["rank", "file", "true", "predicted", "confidence"])
    for rank, index in enumerate(confident_mistakes(evaluation, len(predictions)), start=1):
        writer.writerow([rank, evaluation.files[index] if evaluation.files else "",
                         class_names[evaluation.labels[index]],
                         class_names[predictions[index]], f"{confidence[index]:.4f}"])
    return write_text(path, buffer.getvalue())


def _confusion_matrix(evaluation: Evaluation, class_names: list[str], path: Path,
                      images: Images | None, mistakes: int) -> Path:
    return plot_confusion_matrix(np.asarray(evaluation.metrics["confusion_matrix"]),
                                 class_names, path)


def _reliability(evaluation: Evaluation, class_names: list[str], path: Path,
                 images: Images | None, mistakes: int) -> Path:
    return plot_reliability(evaluation, path)


def _confident_mistakes(evaluation: Evaluation, class_names: list[str], path: Path,
                        images: Images | None, mistakes: int) -> Path | None:
    if images is None:
        return None
    return plot_confident_mistakes(evaluation, images, class_names, path, mistakes)


def _pr_curves(evaluation: Evaluation, class_names: list[str], path: Path,
               images: Images | None, mistakes: int) -> Path:
    return plot_precision_recall(evaluation.probabilities, evaluation.labels, class_names,
                                 evaluation.metrics["thresholds"], path)


Plot = Callable[[Evaluation, list[str], Path, "Images | None", int], "Path | None"]
PLOTS: dict[str, tuple[str, Plot]] = {
    "confusion_matrix": (CONFUSION_MATRIX_PLOT, _confusion_matrix),
    "reliability": (RELIABILITY_PLOT, _reliability),
    "confident_mistakes": (CONFIDENT_MISTAKES_PLOT, _confident_mistakes),
    "pr_curves": (PR_CURVES_PLOT, _pr_curves),
}
