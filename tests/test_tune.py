"""`kcls tune`: search spaces, pruning on epoch curves, the best recipe page, and whole
searches on tiny digits runs (offline): the test split read only at the end, and a
search killed with SIGKILL resuming without running a finished trial again."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kcls.config import ConfigError, Recipe, apply_overrides
from kcls.recipes import load_recipe
from kcls.tuning.recipe_page import recipe_page
from kcls.tuning.space import Choice, FloatRange, IntRange, load_space, overrides, rounded

optuna = pytest.importorskip("optuna", reason='needs Optuna: pip install -e ".[test]"')

ROOT = Path(__file__).resolve().parents[1]
# Trials of a few seconds: one phase of two 2-step epochs of the tiny ResNetV2.
TINY = ["train.frozen_epochs=0", "train.unfrozen_epochs=2", "train.steps_per_epoch=2",
        "data.batch_size=16"]
SPACE_FILE = '''from kcls.tuning.space import Choice, FloatRange

def get_space():
    return {"train.learning_rate": FloatRange(1e-3, 1e-2, log=True),
            "data.augment": Choice(("none", "light"))}
'''


def test_presets_fit_their_recipes_and_mistakes_are_one_line_errors(tmp_path):
    finetune, quickstart = load_recipe("finetune"), load_recipe("quickstart")
    assert "train.layer_decay" in load_space("finetune", finetune)
    assert "model.backbone" in load_space("scratch", quickstart)
    (tmp_path / "space.py").write_text(SPACE_FILE)
    assert load_space(str(tmp_path / "space.py"), quickstart)["data.augment"].options \
        == ("none", "light")
    (tmp_path / "typo.py").write_text(
        "from kcls.tuning.space import IntRange\n"
        "def get_space():\n    return {'train.epochz': IntRange(1, 3)}\n")
    with pytest.raises(ConfigError, match=r"'train.epochz', which is no recipe key\. Valid"):
        load_space(str(tmp_path / "typo.py"), quickstart)
    (tmp_path / "bad.py").write_text(
        "from kcls.tuning.space import Choice\n"
        "def get_space():\n    return {'data.augment': Choice(('light', 'heavy'))}\n")
    with pytest.raises(ConfigError, match=r"offers data.augment='heavy', which the recipe"):
        load_space(str(tmp_path / "bad.py"), quickstart)
    with pytest.raises(ConfigError, match=r"Unknown search space 'big'.*finetune, scratch"):
        load_space("big", quickstart)
    for empty in (lambda: FloatRange(0.0, 1.0, log=True), lambda: IntRange(3, 3),
                  lambda: Choice(("only",))):
        with pytest.raises(ConfigError):
            empty()


def test_values_become_typed_overrides_rounded_as_trials_use_them():
    values = rounded({"train.learning_rate": 0.0012345678, "train.layer_decay": None,
                      "data.horizontal_flip": False, "data.image_size": 160})
    assert values["train.learning_rate"] == 0.00123
    recipe = apply_overrides(Recipe(name="demo"), overrides(values))
    assert (recipe.train.learning_rate, recipe.train.layer_decay, recipe.data.horizontal_flip,
            recipe.data.image_size) == (0.00123, None, False, 160)


def test_the_best_recipe_page_loads_back_as_the_recipe(tmp_path):
    base = apply_overrides(load_recipe("finetune"), ["data.source=folder:/data/my photos"])
    header = 'finetune tuned by `kcls tune`.\n\nA "quoted" line and a \\ backslash.'
    tuned = dataclasses.replace(
        apply_overrides(base, ["train.learning_rate=0.0042", "train.layer_decay=0.85",
                               "data.augment=strong", "train.time_budget=2m"]),
        name="finetune_tuned", description=header.splitlines()[0])
    page = recipe_page(tuned, header, base)
    (tmp_path / "best_recipe.py").write_text(page)
    assert load_recipe(str(tmp_path / "best_recipe.py")) == tuned
    assert 'augment="strong",  # tuned (the base recipe: "light")' in page
    assert 'source="folder:/data/my photos",\n' in page  # the base's own settings, unmarked
    subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F,E9",
                    str(tmp_path / "best_recipe.py")], check=True, cwd=ROOT)


def test_a_trial_is_pruned_on_its_validation_curve():
    import keras

    from kcls.tuning.pruning import PruningCallback, TrialPruned

    # Prunes any trial whose validation loss is above 0 once the warm-up epoch is over.
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0,
                                                                      n_warmup_steps=1))
    trial = study.ask()
    rng = np.random.default_rng(0)
    images, labels = rng.normal(size=(32, 4)).astype("float32"), rng.integers(0, 2, 32)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(TrialPruned, match="pruned after epoch 2") as pruned:
        model.fit(images, labels, validation_split=0.25, epochs=5, verbose=0,
                  callbacks=[PruningCallback(trial)])
    assert pruned.value.epoch == 1
    assert sorted(study.trials[0].intermediate_values) == [0, 1]


class CountingTest:
    """A real tf.data test split that counts the examples read from it."""

    def __init__(self, examples) -> None:
        import tensorflow as tf

        self.read = 0
        stored = list(examples.as_numpy_iterator())

        def generate():
            for example in stored:
                self.read += 1
                yield example

        self.dataset = tf.data.Dataset.from_generator(generate,
                                                      output_signature=examples.element_spec)


@pytest.mark.slow
def test_a_search_scores_on_validation_and_reads_the_test_split_once_at_the_end(tmp_path):
    from kcls.data.sources import load_splits
    from kcls.layout import BEST_RECIPE_FILE, RUN_CONFIG_FILE, TUNE_REPORT_FILE
    from kcls.workflows.tune import tune_recipe

    recipe = apply_overrides(load_recipe("quickstart"),
                             TINY + [f"export.base_dir={tmp_path / 'saved_models'}"])
    splits = load_splits(recipe.data)
    test = CountingTest(splits.test)
    splits = dataclasses.replace(splits, test=test.dataset)
    (tmp_path / "space.py").write_text(SPACE_FILE)
    lines = []
    result = tune_recipe(recipe, "10m", str(tmp_path / "space.py"), trial_budget=None,
                         max_trials=2, out_dir=tmp_path / "search",
                         log=lambda line: lines.append((line, test.read)), splits=splits)
    start = next(index for index, (line, _) in enumerate(lines) if "on the test split" in line)
    assert {read for _, read in lines[:start + 1]} == {0}  # no test image during the trials
    assert test.read == splits.sizes["test"] == result.test_metrics["examples"]
    assert result.trials == {"completed": 2, "pruned": 0, "failed": 0}
    for trial in ("trial-000", "trial-001"):
        trial_config = json.loads((tmp_path / "search" / "trials" / trial / RUN_CONFIG_FILE)
                                  .read_text())
        assert trial_config["evaluate"]["test"] is False
        assert trial_config["export"]["enabled"] is False
    assert not (tmp_path / "saved_models").exists()
    best = load_recipe(str(tmp_path / "search" / BEST_RECIPE_FILE))
    study = optuna.load_study(study_name="kcls-tune",
                              storage=f"sqlite:///{tmp_path / 'search' / 'study.db'}")
    values = study.best_trial.user_attrs["values"]
    assert best == dataclasses.replace(apply_overrides(recipe, overrides(values)),
                                       name="quickstart_tuned", description=best.description)
    assert result.best_trial == study.best_trial.number
    report = (tmp_path / "search" / TUNE_REPORT_FILE).read_text()
    assert "| 0 | complete |" in report and "| 1 | complete |" in report
    assert (tmp_path / "search" / "best_test" / "metrics.json").is_file()


@pytest.mark.slow
def test_a_search_killed_mid_trial_resumes_without_running_finished_trials_again(tmp_path):
    (tmp_path / "space.py").write_text(SPACE_FILE)
    command = [sys.executable, "-m", "kcls.cli", "tune", "quickstart",
               *[part for setting in TINY for part in ("--set", setting)],
               "--set", f"export.base_dir={tmp_path / 'saved_models'}", "--budget", "15m",
               "--trial-budget", "none", "--trials", "2", "--space", str(tmp_path / "space.py"),
               "--out", str(tmp_path / "search")]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    storage = f"sqlite:///{tmp_path / 'search' / 'study.db'}"
    with open(tmp_path / "first.log", "wb") as first_log:
        search = subprocess.Popen(command, stdout=first_log, stderr=subprocess.STDOUT,
                                  env=environment, cwd=tmp_path)
        try:
            finished = wait_for_a_finished_and_a_running_trial(search, storage, tmp_path)
        finally:
            search.send_signal(signal.SIGKILL)
            search.wait()
    stamps = {trial.number: run_info_stamp(tmp_path, trial.number) for trial in finished}
    second = subprocess.run(command, capture_output=True, text=True, env=environment,
                            cwd=tmp_path, timeout=1200)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming the search: {len(finished)} trials kept" in second.stdout
    trials = optuna.load_study(study_name="kcls-tune", storage=storage).trials
    for trial in finished:  # kept as they were: not run again
        assert trials[trial.number].state.name == "COMPLETE"
        assert run_info_stamp(tmp_path, trial.number) == stamps[trial.number]
    cut = trials[len(finished)]
    assert cut.state.name == "FAIL" and cut.user_attrs["interrupted"] is True
    assert trials[len(finished) + 1].params == cut.params  # its values, run again first
    # --trials counts the trials that ended, not the one cut short.
    assert [trial.state.name for trial in trials].count("COMPLETE") == 2


def wait_for_a_finished_and_a_running_trial(search, storage: str, tmp_path: Path,
                                            seconds: float = 900):
    """The finished trials once a search has finished one and runs the next."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert search.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        states = trial_states(tmp_path / "search" / "study.db")
        if "COMPLETE" in states and states[-1] == "RUNNING":
            trials = optuna.load_study(study_name="kcls-tune", storage=storage).trials
            return [trial for trial in trials if trial.state.name == "COMPLETE"]
        time.sleep(0.5)
    raise AssertionError("the search did not start a second trial in time")


def trial_states(database: Path) -> list[str]:
    """The trials' states, read without writing to the database.

    optuna.load_study would create the tables when they are missing, racing the search that is
    creating them (sqlite3.IntegrityError on alembic_version, seen in CI).
    """
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            return [state for (state,) in db.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.OperationalError:  # no file, or no table yet
        return []


def run_info_stamp(tmp_path: Path, number: int) -> int:
    return (tmp_path / "search" / "trials" / f"trial-{number:03d}" / "run.json").stat().st_mtime_ns
