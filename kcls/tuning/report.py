"""The report of a search: the trial table, parameter importance and the curves.

Reads an Optuna study whose trials carry kcls's user attributes (`kcls tune` sets
`validation_accuracy`, `epochs`, `seconds`, `run_dir`, and `pruned_epoch` for pruned
trials) and writes `tune_report.md` and `tune_curves.png` (validation loss per epoch of
every trial, faded, and the best trial's training and validation loss).

Example:

>>> rows = trial_rows(study)  # doctest: +SKIP
>>> write_report(tune_dir, summary, rows, parameter_importance(study), space)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kcls.figures import plt, save_figure
from kcls.files import write_text
from kcls.layout import TUNE_CURVES_PLOT, TUNE_REPORT_FILE
from kcls.tuning.space import Range, describe

# fANOVA needs a few finished trials to say anything.
MIN_TRIALS_FOR_IMPORTANCE = 3


@dataclass
class TrialRow:
    """One trial of the table.

    Attributes:
        number: the trial's number in the study.
        state: `COMPLETE`, `PRUNED`, `FAIL` or `RUNNING`.
        validation_loss: the objective (final validation loss), or the last reported
            one of a pruned trial; None when there is none.
        validation_accuracy: float or None.
        epochs: epochs trained, None when unknown.
        seconds: wall-clock seconds of the trial, None when unknown.
        params: the values it ran with.
        curve: validation loss per epoch, as reported to the pruner.
    """

    number: int
    state: str
    validation_loss: float | None
    validation_accuracy: float | None
    epochs: int | None
    seconds: float | None
    params: dict[str, Any]
    curve: dict[int, float]


def trial_rows(study: Any) -> list[TrialRow]:
    """The study's trials as `TrialRow`s, in trial order."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        curve = dict(sorted(trial.intermediate_values.items()))
        value = trial.value if trial.value is not None else (
            curve[max(curve)] if curve else None)
        seconds = trial.duration.total_seconds() if trial.duration else None
        rows.append(TrialRow(trial.number, trial.state.name, value,
                             trial.user_attrs.get("validation_accuracy"),
                             trial.user_attrs.get("epochs", len(curve) or None), seconds,
                             dict(trial.user_attrs.get("values", trial.params)), curve))
    return rows


def parameter_importance(study: Any) -> tuple[dict[str, float] | None, str]:
    """Optuna's fANOVA importance of each parameter for the objective, and a note.

    Returns:
        `(importances, note)`: importances sum to 1, or None with the reason in `note`.
    """
    import optuna

    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(finished) < MIN_TRIALS_FOR_IMPORTANCE:
        return None, (f"{len(finished)} finished trials: parameter importance needs at "
                      f"least {MIN_TRIALS_FOR_IMPORTANCE}.")
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as error:  # e.g. every trial with the same values
        return None, f"parameter importance could not be computed: {error}"
    return dict(importances), (f"fANOVA (Optuna) over {len(finished)} finished trials; with "
                               "few trials, read it as a hint.")


def plot_curves(rows: list[TrialRow], best: TrialRow, best_history: dict[str, list[float]],
                path: Path) -> Path:
    """Every trial's validation loss per epoch (faded) and the best trial's curves."""
    figure, axis = plt.subplots(figsize=(7, 4))
    for row in rows:
        if row.curve and row.number != best.number:
            axis.plot(list(row.curve), list(row.curve.values()), color="grey", alpha=0.35,
                      linestyle="--" if row.state == "PRUNED" else "-")
    for name, style in (("loss", "-"), ("val_loss", "-")):
        values = best_history.get(name, [])
        axis.plot(range(len(values)), values, style, linewidth=2,
                  label=f"best trial {best.number}: {name}")
    axis.set_xlabel("epoch (both phases)")
    axis.set_ylabel("loss")
    axis.set_title("validation loss of every trial (grey; dashed: pruned)")
    axis.legend()
    return save_figure(figure, path)


def write_report(tune_dir: Path, summary: dict[str, Any], rows: list[TrialRow],
                 importance: tuple[dict[str, float] | None, str],
                 space: dict[str, Range]) -> Path:
    """Writes `tune_report.md`: the summary, the winner's test metrics, importance,
    the space and the trial table."""
    best, test = summary["best_trial"], summary.get("test_metrics", {})
    lines = [f"# kcls tune: {summary['recipe']}", "",
             f"Budget {summary['budget_seconds'] / 60:.1f} minutes, "
             f"{summary['seconds_spent'] / 60:.1f} spent; {summary['trials']} trials: "
             f"{summary['completed']} finished, {summary['pruned']} pruned, "
             f"{summary['failed']} failed. Trials are scored on the validation split only "
             "(final validation loss); the test split was read once, for the best trial.", "",
             f"Best trial {best['number']}: validation loss {best['validation_loss']:.4f}, "
             f"validation accuracy {_number(best.get('validation_accuracy'))}; test "
             + ", ".join(f"{key} {_number(test.get(key))}" for key in ("accuracy", "nll")
                         if key in test) + ".", "",
             f"Best recipe: `{summary['best_recipe_file']}`", "",
             f"![curves]({TUNE_CURVES_PLOT})", "", "## Parameter importance", ""]
    values, note = importance
    if values:
        lines += ["| parameter | importance |", "| --- | ---: |"]
        lines += [f"| `{key}` | {value:.3f} |" for key, value in values.items()]
    lines += ["", note, "", "## Search space", "", "```", describe(space), "```", "",
              "## Trials", ""]
    keys = list(space)
    lines += ["| trial | state | validation loss | validation accuracy | epochs | seconds | "
              + " | ".join(f"`{key}`" for key in keys) + " |",
              "| ---: | --- | ---: | ---: | ---: | ---: |" + " --- |" * len(keys)]
    for row in rows:
        lines.append(f"| {row.number} | {row.state.lower()} | {_number(row.validation_loss)} | "
                     f"{_number(row.validation_accuracy)} | {row.epochs or ''} | "
                     f"{_number(row.seconds, 0)} | "
                     + " | ".join(_value(row.params.get(key)) for key in keys) + " |")
    return write_text(tune_dir / TUNE_REPORT_FILE, "\n".join(lines) + "\n")


def _number(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _value(value: Any) -> str:
    return "" if value is None else (f"{value:.3g}" if isinstance(value, float) else str(value))
