"""Results per slice for `kcls evaluate --slice-by`: the scores, their files, their report.

`score_slices` groups an Evaluation's images by a manifest column or a folder of their
path (`kcls.data.slices`) and scores every slice (`kcls.metrics.slices`); `write_slices`
writes `slices.json` and `slices.png` (`kcls.evaluation.plots.plot_slices`) and returns
the report's section, which `kcls.evaluation.report.write_report` puts in report.md.

Example:

>>> sliced = score_slices(evaluation, "site", "manifest:photos.csv")  # doctest: +SKIP
>>> sliced.results.worst.name, sliced.summary_line()  # doctest: +SKIP
('north', 'worst slice north: accuracy 0.61 [0.48, 0.74] ...')
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kcls.data.slices import MISSING_SLICE, slice_values
from kcls.evaluation.plots import plot_slices
from kcls.files import write_json
from kcls.layout import SLICES_FILE, SLICES_PLOT
from kcls.metrics.slices import Interval, SliceResults, slice_metrics
from kcls.tasks import Evaluation


@dataclass(frozen=True)
class SlicedEvaluation:
    """The slices of one evaluation.

    Attributes:
        slice_by: what the images were grouped by (`site`, `path:1`).
        source: the `data.source` whose files were grouped.
        missing: how many images had no value (the `(missing)` slice).
        overall_accuracy: the accuracy on all the images, for comparison.
        results: the scores per slice, worst and gap (`kcls.metrics.slices`).
    """

    slice_by: str
    source: str
    missing: int
    overall_accuracy: float
    results: SliceResults

    def to_dict(self) -> dict:
        """What `slices.json` holds."""
        return {"slice_by": self.slice_by, "source": self.source,
                "missing_slice": MISSING_SLICE, "missing": self.missing,
                "overall_accuracy": self.overall_accuracy, **self.results.to_dict()}

    def summary_line(self) -> str:
        """One line naming the worst slice and the gap, for the command line."""
        worst, best, gap = self.results.worst, self.results.best, self.results.gap
        verdict = ("excludes 0" if self.results.gap_excludes_zero
                   else "includes 0: not a clear difference")
        return (f"slices by {self.slice_by}: {len(self.results.slices)}; worst {worst.name} "
                f"accuracy {_interval(worst.accuracy)} (n={worst.images}); largest gap "
                f"{best.name} - {worst.name} {_interval(gap)} ({verdict})")

    def report_section(self, plot: str | None = SLICES_PLOT) -> list[str]:
        """Markdown lines: a table of the slices, worst first, the gap, the plot."""
        results = self.results
        level = f"{results.confidence_level:.0%}"
        lines = ["", f"## Slices by `{self.slice_by}`", "",
                 f"{len(results.slices)} slices of `{self.source}`; {level} percentile "
                 f"bootstrap intervals ({results.resamples} resamples per slice, seed "
                 f"{results.seed}). Accuracy on all images: {self.overall_accuracy:.4f}.", "",
                 "| slice | images | accuracy | macro F1 | ECE |",
                 "| --- | --- | --- | --- | --- |"]
        lines += [f"| {_cell(scores.name)} | {scores.images} | {_interval(scores.accuracy)} | "
                  f"{_interval(scores.macro_f1)} | {_interval(scores.ece)} |"
                  for scores in results.slices]
        lines += ["", f"- Worst slice: **{results.worst.name}** ({results.worst.images} "
                  f"images), accuracy {_interval(results.worst.accuracy)}.",
                  f"- Largest gap: {results.best.name} - {results.worst.name} = "
                  f"{_interval(results.gap)}; the interval "
                  + ("excludes 0." if results.gap_excludes_zero
                     else "includes 0: no clear difference on this many images.")]
        unranked = len(results.slices) - len(results.ranked)
        if unranked:
            lines.append(f"- {unranked} slice(s) of under {results.min_images} images: "
                         "listed, never ranked worst or best (their intervals are too "
                         "narrow to trust).")
        if self.missing:
            lines.append(f"- {self.missing} images had no `{self.slice_by}`: the slice "
                         f"`{MISSING_SLICE}`.")
        return lines + (["", f"![{plot}]({plot})"] if plot else [])


def _cell(text: str) -> str:
    """`text` for a Markdown table cell: a `|` would end the cell."""
    return text.replace("|", "\\|")


def _interval(interval: Interval) -> str:
    return f"{interval.value:.3f} [{interval.low:.3f}, {interval.high:.3f}]"


def score_slices(evaluation: Evaluation, slice_by: str, source: str) -> SlicedEvaluation:
    """Scores the slices of a single-label `evaluation` (its `files` from `source`).

    Raises:
        ConfigError: the slicing cannot apply to this data (`kcls.data.slices`).
    """
    groups = slice_values(slice_by, evaluation.files, source)
    results = slice_metrics(evaluation.probabilities, evaluation.labels, groups)
    return SlicedEvaluation(slice_by, source, groups.count(MISSING_SLICE),
                            float(evaluation.metrics["accuracy"]), results)


def write_slices(out_dir: str | Path, sliced: SlicedEvaluation) -> list[Path]:
    """Writes `slices.json` and `slices.png` into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    return [write_json(out_dir / SLICES_FILE, sliced.to_dict()),
            plot_slices(sliced.results, sliced.overall_accuracy,
                        f"accuracy per {sliced.slice_by}", out_dir / SLICES_PLOT)]
