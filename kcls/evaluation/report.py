"""Reports a person reads at a glance: `metrics.json`, `report.md` and the task's plots.

The task (`kcls.tasks.Task`) gives the report its title, its metric sections and the
names of its plots (`kcls.evaluation.plots`); this module writes them, with the
training curves of a run and the files of the data that did not reach the model.

Example:

>>> paths = write_report(run_dir, evaluation, task, class_names, history, phases,
...                      test_images)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kcls.evaluation.plots import PLOTS, plot_training_curves, write_mistakes_table
from kcls.files import write_json, write_text
from kcls.layout import (
    CONFIDENT_MISTAKES_FILE,
    METRICS_FILE,
    REPORT_FILE,
    TRAINING_CURVES_PLOT,
)
from kcls.tasks import Evaluation, Task


def write_report(run_dir: str | Path, evaluation: Evaluation, task: Task,
                 class_names: list[str], history: dict[str, list[float]] | None = None,
                 phases: list[dict[str, Any]] | None = None,
                 images: Mapping[int, np.ndarray] | None = None,
                 mistakes: int = 16, about: list[str] | None = None,
                 warnings: list[str] | None = None,
                 sections: list[str] | None = None) -> list[Path]:
    """Writes `metrics.json`, `report.md`, the plots and, for a task with the confident
    mistakes plot, `confident_mistakes.csv` (`evaluation.files` names the images) into
    `run_dir`.

    Args:
        run_dir: output folder (created if missing).
        evaluation: Evaluation of the held-out split (`Task.evaluate`), its `skipped`
            files listed in the report.
        task: the Task that evaluated it.
        class_names: list[str], one per class.
        history: metric name -> per-epoch values over both phases (curves skipped if None).
        phases: `[{"name", "first_epoch", "epochs", ...}]` to mark the unfreeze point.
        images: held-out images by evaluation index (uint8 `[H, W, 3]`), at least those
            of `confident_mistakes(evaluation, mistakes)`, for the mistakes grid
            (skipped if None).
        mistakes: how many confident mistakes to show.
        about: lines saying what was evaluated (data, image size, epochs, duration),
            listed under the title; none for an evaluation outside a run.
        warnings: lines the report puts first (held-out splits too small to judge).
        sections: Markdown lines about the data to add before the plots (the run's data
            leaks, `kcls.data.leaks.LeakCheck.report_section`).

    Returns:
        Paths of the files written.
    """
    run_dir = Path(run_dir)
    written = [write_json(run_dir / METRICS_FILE, evaluation.metrics)]
    if history:
        written.append(plot_training_curves(history, phases or [],
                                            run_dir / TRAINING_CURVES_PLOT,
                                            task.training_score))
    for name in task.plots:
        file_name, plot = PLOTS[name]
        path = plot(evaluation, class_names, run_dir / file_name, images, mistakes)
        if path is not None:
            written.append(path)
    tables = []
    if "confident_mistakes" in task.plots:
        tables.append(write_mistakes_table(evaluation, class_names,
                                           run_dir / CONFIDENT_MISTAKES_FILE))
    report = write_text(run_dir / REPORT_FILE, markdown_report(
        task, evaluation.metrics, [path.name for path in written[1:]], evaluation.skipped,
        [path.name for path in tables], about, warnings, sections))
    return [*written, *tables, report]


def markdown_report(task: Task, metrics: dict[str, Any], plots: list[str],
                    skipped: list[str] | None = None, tables: list[str] | None = None,
                    about: list[str] | None = None, warnings: list[str] | None = None,
                    sections: list[str] | None = None) -> str:
    """Under the task's title the `about` lines and the `warnings`, then its metric
    sections, links to the `tables` (CSV files), the `skipped` files of the data that
    did not reach the model (when there are any), the data's `sections` (Markdown
    lines) and the plots embedded."""
    lines = [f"# {task.report_title}", ""]
    if about:
        lines += [f"- {line}" for line in about] + [""]
    if warnings:
        lines += [f"> **Warning:** {line}" for line in warnings] + [""]
    lines += task.report_sections(metrics)
    if tables:
        lines += ["", "Every wrong prediction, most confident first, with its file: "
                  + ", ".join(f"[{name}]({name})" for name in tables) + "."]
    if skipped:
        lines += ["", f"## Skipped files ({len(skipped)})", "",
                  "Unreadable or undecodable; not among the examples above.", ""]
        lines += [f"- `{name}`" for name in skipped]
    lines += sections or []
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"
