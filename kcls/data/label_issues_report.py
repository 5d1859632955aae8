"""The files of `kcls data label-issues`: `label_issues.csv` (every flagged image, most
suspect first), `label_issues.json` (the summary) and `label_issues.png` (a grid of the
top suspects), written atomically (`kcls.files`, `kcls.figures`).

Example:

>>> write_label_issues(out_dir, files, labels, class_names, issues, summary)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kcls.data.label_issues import LabelIssues
from kcls.files import write_json, write_text
from kcls.layout import LABEL_ISSUES_FILE, LABEL_ISSUES_PLOT, LABEL_ISSUES_SUMMARY_FILE

PLOTTED_SUSPECTS = 24
PLOT_COLUMNS = 6
PREVIEW_SIDE = 96


def write_label_issues(out_dir: str | Path, files: list[str], labels: np.ndarray,
                       class_names: list[str], issues: LabelIssues,
                       summary: dict[str, Any]) -> list[Path]:
    """Writes the CSV, the JSON summary (`summary` plus the counts) and the PNG (none
    without issues) into `out_dir`; returns their paths.

    Args:
        files: the N scored image files; labels: int `(N,)` their given classes.
        class_names: list[str]; issues: `LabelIssues` of the N images.
        summary: what to record besides the counts (backbone, folds, seconds, ...).
    """
    out_dir = Path(out_dir)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "given_label", "suggested_label", "score"])
    for index in issues.indices:
        writer.writerow([files[index], class_names[labels[index]],
                         class_names[issues.suggested[index]], f"{issues.scores[index]:.4f}"])
    written = [write_text(out_dir / LABEL_ISSUES_FILE, buffer.getvalue())]
    written.append(write_json(out_dir / LABEL_ISSUES_SUMMARY_FILE, {
        **summary, "images": len(files), "flagged": len(issues.indices),
        "out_of_fold_accuracy": round(issues.out_of_fold_accuracy(labels), 4),
        "flagged_per_class": {name: int(np.sum(labels[issues.indices] == number))
                              for number, name in enumerate(class_names)}}))
    plot = plot_suspects(files, labels, class_names, issues, out_dir / LABEL_ISSUES_PLOT)
    return written + ([plot] if plot else [])


def plot_suspects(files: list[str], labels: np.ndarray, class_names: list[str],
                  issues: LabelIssues, path: Path) -> Path | None:
    """A grid of the `PLOTTED_SUSPECTS` most suspect images, each titled `given ->
    suggested` with its score; None without issues."""
    shown = issues.indices[:PLOTTED_SUSPECTS]
    if not len(shown):
        return None
    from kcls.figures import plt, save_figure

    rows = -(-len(shown) // PLOT_COLUMNS)
    figure, axes = plt.subplots(rows, PLOT_COLUMNS, squeeze=False,
                                figsize=(1.9 * PLOT_COLUMNS, 2.1 * rows))
    for position, axis in enumerate(axes.flat):
        axis.axis("off")
        if position >= len(shown):
            continue
        index = shown[position]
        axis.imshow(_preview(files[index]))
        axis.set_title(f"{class_names[labels[index]]} -> {class_names[issues.suggested[index]]}"
                       f"\n{issues.scores[index]:.3f} {Path(files[index]).name}"[:60],
                       fontsize=7)
    return save_figure(figure, path)


def _preview(path: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB").resize((PREVIEW_SIDE, PREVIEW_SIDE)))
    except (OSError, ValueError):
        return np.full((PREVIEW_SIDE, PREVIEW_SIDE, 3), 128, np.uint8)
