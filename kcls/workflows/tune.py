"""`kcls tune`: a hyperparameter search within a wall-clock budget, each trial a normal run.

    kcls tune finetune --set data.source=folder:PATH --budget 40m --space finetune

`tune_recipe` reads as its steps:

1. check: Optuna installed, the budgets, the search space against the recipe (every key
   and bound), a validation split to score on;
2. claim the search directory (locked like a run directory) and open the study, kept in
   `study.db` (SQLite) there: started again with the same `--out`, the search resumes,
   keeps every trial that ended, and runs the values of a trial the interruption cut
   short again first; the budget counts the time spent before;
3. trials until the budget (or `--trials`) is spent: each is `run_recipe` of the recipe
   with the trial's values, `train.time_budget` set to the trial budget (the planner fits
   the epochs into it, so trials of slow and fast settings cost the same),
   `evaluate.test=false` (scored on the validation split; the test split is never read)
   and no export, pruned on its validation loss per epoch (`kcls.tuning.pruning`);
   the objective is the final validation loss;
4. conclude: the best trial's recipe as a recipe page (`best_recipe.py`), its model
   evaluated once on the test split (`best_test/`), the report (`tune_report.md`, trial
   table, parameter importance, `tune_curves.png`) and `tune.json`.

Example:

>>> result = tune_recipe(recipe, budget="40m", space="finetune")  # doctest: +SKIP
>>> result.best_recipe_file, result.test_metrics["accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import keras

from kcls.config import ConfigError, Recipe, apply_overrides, parse_duration
from kcls.data.sources import Splits
from kcls.evaluation.evaluate import evaluate_model
from kcls.files import write_json, write_text
from kcls.layout import (
    BEST_RECIPE_FILE,
    RUN_INFO_FILE,
    TUNE_CURVES_PLOT,
    TUNE_REPORT_FILE,
    TUNE_RUNS_DIR,
    TUNE_STUDY_FILE,
    TUNE_SUMMARY_FILE,
    TUNE_TEST_DIR,
    TUNE_TRIALS_DIR,
)
from kcls.train.compute import describe_devices
from kcls.tuning import import_optuna
from kcls.tuning.pruning import PruningObserver, TrialPruned
from kcls.tuning.recipe_page import recipe_page
from kcls.tuning.report import parameter_importance, plot_curves, trial_rows, write_report
from kcls.tuning.space import Range, distributions, load_space, overrides, rounded
from kcls.workflows.run import run_recipe
from kcls.workflows.run_directory import claim_run_dir

STUDY_NAME = "kcls-tune"
# Trials a search runs at random before TPE models the results (Optuna's default is 10,
# more than a CPU budget of a few dozen minutes affords), and the pruner's patience:
# trials that always finish, and epochs never judged (the frozen phase's first ones).
RANDOM_TRIALS, PRUNER_STARTUP_TRIALS, PRUNER_WARMUP_EPOCHS = 4, 3, 2
# `--trial-budget auto`: this share of the search budget per trial.
AUTO_TRIAL_SHARE = 1 / 8


@dataclass(frozen=True)
class TuneSettings:
    """What bounds a search.

    Attributes:
        budget_seconds: wall-clock seconds of the whole search (trials and the end).
        trial_budget: each trial's `train.time_budget` (`240s`), or None: the recipe's
            epochs as configured.
        space: the search space's name or file, for the report.
        max_trials: stop after this many trials (interrupted ones not counted), or None.
        seed: the sampler's seed.
    """

    budget_seconds: float
    trial_budget: str | None
    space: str
    max_trials: int | None = None
    seed: int = 0


@dataclass
class SearchClock:
    """The search's budget against the time spent, this session and before it."""

    budget_seconds: float
    spent_before: float = 0.0
    started: float = field(default_factory=time.monotonic)

    def spent(self) -> float:
        return self.spent_before + time.monotonic() - self.started

    def left(self) -> float:
        return self.budget_seconds - self.spent()


@dataclass
class TuneResult:
    """What a search found.

    Attributes:
        tune_dir: the search directory.
        best_recipe_file: the best trial's recipe page.
        best_trial: its number.
        validation_loss: its objective; validation_accuracy: float or None.
        test_metrics: its model's metrics on the test split (read once, at the end).
        trials: trials per state: `completed`, `pruned`, `failed`.
    """

    tune_dir: Path
    best_recipe_file: Path
    best_trial: int
    validation_loss: float
    validation_accuracy: float | None
    test_metrics: dict[str, Any]
    trials: dict[str, int]


def tune_recipe(recipe: Recipe, budget: str, space: str = "finetune",
                trial_budget: str | None = "auto", max_trials: int | None = None,
                out_dir: str | Path | None = None, seed: int = 0,
                log: Callable[[str], None] = print, verbose: int | str = 0,
                splits: Splits | None = None) -> TuneResult:
    """Searches `space` for the recipe scoring best on validation within `budget`.

    Args:
        recipe: Recipe to start from (its values outside the space stay as they are).
        budget: the search's wall-clock budget (`40m`, `2h`).
        space: a preset of `kcls.tuning.space.PRESETS` or a `.py` file with `get_space()`.
        trial_budget: each trial's `train.time_budget`; `auto`: an eighth of `budget`;
            None: the recipe's epochs as configured.
        max_trials: stop after this many trials; None: when the budget is spent.
        out_dir: the search directory (a search there resumes); None: a new
            `runs/tune/<recipe>/<timestamp>`.
        seed: the sampler's seed.
        log: receives one-line progress messages.
        verbose: Keras `fit()` verbosity of the trials.
        splits: data to use instead of `recipe.data.source` (trials and the test).

    Returns:
        TuneResult: the best trial, its recipe page and its test metrics.

    Raises:
        ConfigError: Optuna missing, a bad budget or space, no validation split,
            train.strategy=multiworker, a search directory in use, or no trial finished
            within the budget.
    """
    optuna = import_optuna()
    settings = tune_settings(recipe, budget, trial_budget, space, max_trials, seed)
    ranges = load_space(space, recipe)
    with claim_run_dir(out_dir, recipe.name, log, parent=TUNE_RUNS_DIR) as tune_dir:
        study, storage = open_study(optuna, tune_dir, seed)
        clock = SearchClock(settings.budget_seconds, study.user_attrs.get("seconds_spent", 0.0))
        log(f"kcls tune | recipe {recipe.name} | space {space}: {', '.join(ranges)} | budget "
            f"{settings.budget_seconds / 60:.1f} min, each trial "
            f"{settings.trial_budget or 'its configured epochs'} | study "
            f"{tune_dir / TUNE_STUDY_FILE}")
        recover_interrupted(optuna, study, storage, clock, log)
        search(optuna, study, recipe, ranges, settings, tune_dir, clock, log, verbose, splits)
        return conclude(optuna, study, recipe, ranges, settings, tune_dir, clock, log, splits)


def tune_settings(recipe: Recipe, budget: str, trial_budget: str | None, space: str,
                  max_trials: int | None, seed: int) -> TuneSettings:
    """The search's bounds, checked (see `tune_recipe`'s Raises)."""
    if recipe.train.strategy == "multiworker":
        # A trial's pruning stops the chief alone; the other workers would wait for it.
        raise ConfigError("kcls tune runs its trials in one process: use --set "
                          "train.strategy=auto (a single run can use train.strategy=multiworker).")
    if recipe.data.validation_fraction <= 0:
        raise ConfigError("kcls tune scores trials on the validation split, and the recipe "
                          "has none: set data.validation_fraction above 0, e.g. 0.1.")
    if max_trials is not None and max_trials < 1:
        raise ConfigError(f"--trials {max_trials}: give at least 1, or leave it out.")
    seconds = _duration(budget, "--budget")
    if trial_budget == "auto":
        trial_budget = f"{max(seconds * AUTO_TRIAL_SHARE, 1.0):.0f}s"
    if trial_budget is not None and _duration(trial_budget, "--trial-budget") > seconds:
        raise ConfigError(f"--trial-budget {trial_budget} is longer than --budget {budget}: "
                          "give each trial a share of the search's time.")
    return TuneSettings(seconds, trial_budget, space, max_trials, seed)


def open_study(optuna: Any, tune_dir: Path, seed: int) -> tuple[Any, Any]:
    """The study in `tune_dir/study.db`, created or (resumed) loaded, and its storage.

    The sampler is seeded with `seed` plus the trials already run, so a resumed search
    draws new values rather than replaying its first ones.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(tune_dir / TUNE_STUDY_FILE).resolve()}")
    earlier = 0
    if STUDY_NAME in [summary.study_name for summary in optuna.get_all_study_summaries(storage)]:
        earlier = len(optuna.load_study(study_name=STUDY_NAME, storage=storage).trials)
    study = optuna.create_study(
        storage=storage, study_name=STUDY_NAME, direction="minimize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(n_startup_trials=RANDOM_TRIALS, seed=seed + earlier),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS,
                                           n_warmup_steps=PRUNER_WARMUP_EPOCHS))
    return study, storage


def recover_interrupted(optuna: Any, study: Any, storage: Any, clock: SearchClock,
                        log: Callable[[str], None]) -> None:
    """Marks trials left running by a killed search failed and queues their values again."""
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    study_id = storage.get_study_id_from_name(STUDY_NAME)
    for trial in running:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, "interrupted", True)
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params)
        log(f"trial {trial.number} was cut short by an interruption: marked failed; its "
            "values run again first")
    kept = [trial for trial in study.trials if trial.state.is_finished()
            and not trial.user_attrs.get("interrupted")]
    if kept:
        log(f"resuming the search: {len(kept)} trials kept, not run again; "
            f"{clock.spent_before / 60:.1f} of {clock.budget_seconds / 60:.1f} min spent")


def search(optuna: Any, study: Any, recipe: Recipe, ranges: dict[str, Range],
           settings: TuneSettings, tune_dir: Path, clock: SearchClock,
           log: Callable[[str], None], verbose: int | str, splits: Splits | None) -> None:
    """Runs trials until `stop_reason` gives one."""
    wanted = distributions(ranges)
    while (reason := stop_reason(optuna, study, settings, clock)) is None:
        trial = study.ask(wanted)
        run_trial(optuna, study, trial, recipe, settings, tune_dir, log, verbose, splits)
        study.set_user_attr("seconds_spent", clock.spent())
        keras.backend.clear_session()  # each trial builds its own model: free the last one
    log(f"search ends: {reason}")


def stop_reason(optuna: Any, study: Any, settings: TuneSettings,
                clock: SearchClock) -> str | None:
    """Why no further trial starts (the trial count, or a budget too short), or None."""
    counted = [trial for trial in study.trials if trial.state.is_finished()
               and not trial.user_attrs.get("interrupted")]
    if settings.max_trials is not None and len(counted) >= settings.max_trials:
        return f"{len(counted)} trials, as --trials asked"
    finished = [trial.duration.total_seconds() for trial in counted
                if trial.state == optuna.trial.TrialState.COMPLETE and trial.duration]
    expected = (sum(finished) / len(finished) if finished
                else parse_duration(settings.trial_budget) if settings.trial_budget else 0.0)
    if clock.left() <= 0 or clock.left() < expected:
        return (f"{max(clock.left(), 0):.0f} s of the budget left, a trial takes about "
                f"{expected:.0f} s")
    return None


def trial_recipe(recipe: Recipe, values: dict[str, Any], trial_budget: str | None) -> Recipe:
    """`recipe` with a trial's values, its time budget, no test evaluation and no export."""
    budget = [f"train.time_budget={trial_budget}"] if trial_budget else []
    return apply_overrides(recipe, overrides(values) + budget
                           + ["evaluate.test=false", "export.enabled=false"])


def run_trial(optuna: Any, study: Any, trial: Any, recipe: Recipe, settings: TuneSettings,
              tune_dir: Path, log: Callable[[str], None], verbose: int | str,
              splits: Splits | None) -> None:
    """Runs one trial as a normal run and tells the study how it ended."""
    values = rounded(trial.params)
    trial.set_user_attr("values", values)
    log(f"trial {trial.number} | " + ", ".join(overrides(values)))
    run_dir = tune_dir / TUNE_TRIALS_DIR / f"trial-{trial.number:03d}"
    trial.set_user_attr("run_dir", str(run_dir))
    states, started = optuna.trial.TrialState, time.monotonic()
    try:
        result = run_recipe(trial_recipe(recipe, values, settings.trial_budget), run_dir,
                            log=lambda line: log(f"  {line}"), verbose=verbose, splits=splits,
                            observers=[PruningObserver(trial)])
    except TrialPruned as pruned:
        trial.set_user_attr("epochs", pruned.epoch + 1)
        study.tell(trial, state=states.PRUNED)
        log(f"trial {trial.number} pruned after epoch {pruned.epoch + 1} (validation loss "
            f"{pruned.value:.4f}, worse than the median of earlier trials then; "
            f"{time.monotonic() - started:.0f} s)")
        return
    except Exception as error:  # one trial's failure (a setting that diverges, OOM) ends it only
        study.tell(trial, state=states.FAIL)
        log(f"trial {trial.number} failed: {type(error).__name__}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}")
        return
    value = float(result.history["val_loss"][-1])
    trial.set_user_attr("validation_accuracy", result.metrics.get("accuracy"))
    trial.set_user_attr("epochs", len(result.history["val_loss"]))
    if not math.isfinite(value):
        study.tell(trial, state=states.FAIL)
        log(f"trial {trial.number} failed: its validation loss diverged")
        return
    study.tell(trial, value)
    log(f"trial {trial.number} finished: validation loss {value:.4f}, "
        f"{result.headline()} ({time.monotonic() - started:.0f} s); best so far trial "
        f"{study.best_trial.number} ({study.best_value:.4f})")


def conclude(optuna: Any, study: Any, recipe: Recipe, ranges: dict[str, Range],
             settings: TuneSettings, tune_dir: Path, clock: SearchClock,
             log: Callable[[str], None], splits: Splits | None) -> TuneResult:
    """Evaluates the best trial on the test split, writes its recipe page and the report."""
    states = optuna.trial.TrialState
    counts = {name.lower(): len(study.get_trials(deepcopy=False, states=(state,)))
              for name, state in (("COMPLETED", states.COMPLETE), ("PRUNED", states.PRUNED),
                                  ("FAILED", states.FAIL))}
    if not counts["completed"]:
        raise ConfigError(f"No trial finished within the budget ({counts['pruned']} pruned, "
                          f"{counts['failed']} failed; see the log): give --budget more time, "
                          "or each trial less with --trial-budget.")
    best = study.best_trial
    best_dir = Path(best.user_attrs["run_dir"])
    log(f"best trial {best.number} (validation loss {best.value:.4f}): evaluating its model "
        "on the test split, read for the first time")
    evaluation = evaluate_model(str(best_dir), out_dir=str(tune_dir / TUNE_TEST_DIR),
                                log=log, splits=splits)
    summary = search_summary(recipe, study, best, evaluation.metrics, settings, clock, counts,
                             tune_dir)
    header = page_header(summary)
    best_recipe = dataclasses.replace(
        trial_recipe(recipe, best.user_attrs["values"], settings.trial_budget),
        name=f"{recipe.name}_tuned", description=header.splitlines()[0],
        evaluate=recipe.evaluate, export=recipe.export)
    write_text(tune_dir / BEST_RECIPE_FILE, recipe_page(best_recipe, header, recipe))
    write_search_report(study, summary, ranges, tune_dir, best_dir)
    log(f"test {evaluation.metrics.get('accuracy', float('nan')):.4f} accuracy of the best "
        f"trial; recipe {tune_dir / BEST_RECIPE_FILE}; report {tune_dir / TUNE_REPORT_FILE}")
    return TuneResult(tune_dir, tune_dir / BEST_RECIPE_FILE, best.number, best.value,
                      best.user_attrs.get("validation_accuracy"), evaluation.metrics, counts)


def search_summary(recipe: Recipe, study: Any, best: Any, test_metrics: dict[str, Any],
                   settings: TuneSettings, clock: SearchClock, counts: dict[str, int],
                   tune_dir: Path) -> dict[str, Any]:
    """`tune.json`: the bounds, the trials per state, the best trial and its test metrics."""
    return {"recipe": recipe.name, "space": settings.space,
            "budget_seconds": settings.budget_seconds, "trial_budget": settings.trial_budget,
            "seconds_spent": round(clock.spent(), 1), "trials": len(study.trials), **counts,
            "best_trial": {"number": best.number, "validation_loss": best.value,
                           "validation_accuracy": best.user_attrs.get("validation_accuracy"),
                           "values": best.user_attrs["values"],
                           "run_dir": best.user_attrs["run_dir"]},
            "test_metrics": {key: value for key, value in test_metrics.items()
                             if isinstance(value, (int, float))},
            "best_recipe_file": str(tune_dir / BEST_RECIPE_FILE),
            "machine": describe_devices(),
            "date": datetime.now().strftime("%Y-%m-%d")}


def write_search_report(study: Any, summary: dict[str, Any], ranges: dict[str, Range],
                        tune_dir: Path, best_dir: Path) -> None:
    """`tune_report.md`, `tune_curves.png` and `tune.json`."""
    rows = trial_rows(study)
    best_row = next(row for row in rows if row.number == summary["best_trial"]["number"])
    history = json.loads((best_dir / RUN_INFO_FILE).read_text()).get("history", {})
    plot_curves(rows, best_row, history, tune_dir / TUNE_CURVES_PLOT)
    write_report(tune_dir, summary, rows, parameter_importance(study), ranges)
    write_json(tune_dir / TUNE_SUMMARY_FILE, summary)


def page_header(summary: dict[str, Any]) -> str:
    """The best recipe page's docstring: what it is, how to run it, what was measured."""
    best, test = summary["best_trial"], summary["test_metrics"]
    accuracy = best.get("validation_accuracy")
    trained = (f"train.time_budget={summary['trial_budget']}" if summary["trial_budget"]
               else "the recipe's epochs")
    measured = (
        f"Found on {summary['date']} ({summary['machine']}) within a "
        f"{summary['budget_seconds'] / 60:.0f}-minute budget: {summary['trials']} trials "
        f"({summary['completed']} finished, {summary['pruned']} pruned, {summary['failed']} "
        f"failed) in {summary['seconds_spent'] / 60:.1f} minutes, each trained with {trained} "
        f"and scored on the validation split. Best trial {best['number']}: validation loss "
        f"{best['validation_loss']:.4f}"
        + (f", validation accuracy {accuracy:.4f}" if accuracy is not None else "")
        + f"; its model scored test accuracy {test.get('accuracy', float('nan')):.4f} on "
        f"{test.get('examples', '?')} held-out images (the test split, read once, after the "
        "search).")
    tuned = ("Tuned: " + ", ".join(overrides(best["values"])) + " (the base recipe's values "
             "are in the comments below).")
    return "\n".join([
        f"{summary['recipe']} tuned by `kcls tune` ({summary['space']} space), the best of "
        f"{summary['trials']} trials.", "",
        f"    kcls recipe run {summary['best_recipe_file']}", "",
        textwrap.fill(measured, 88), "", textwrap.fill(tuned, 88)])


def _duration(text: str, option: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise ConfigError(f"{option} {text}: {error}.") from None
