"""A run killed at any stage after training finishes when run again, and never resumes as
another run (issue 29, defects 1 and 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from kcls.cli import main
from kcls.config import ConfigError, apply_overrides
from kcls.layout import RUN_CONFIG_FILE, RUN_INFO_FILE, RUN_STATE_FILE, WEIGHTS_FILE
from kcls.recipes import load_recipe
from kcls.tracking import RunObserver
from kcls.workflows.run import run_recipe

TINY = ["train.frozen_epochs=1", "train.unfrozen_epochs=1", "train.steps_per_epoch=2",
        "data.batch_size=16"]

# Runs the tiny recipe in a child process that SIGKILLs itself when a log line contains
# `argv[2]`: a real kill at a stage boundary, as a preempted machine or an OOM kill does.
KILLED_RUN = """
import os, signal, sys
from kcls.config import apply_overrides
from kcls.recipes import load_recipe
from kcls.workflows.run import run_recipe

recipe = apply_overrides(load_recipe("quickstart"), sys.argv[3:])

def log(line):
    print(line, flush=True)
    if sys.argv[2] in line:
        os.kill(os.getpid(), signal.SIGKILL)

run_recipe(recipe, sys.argv[1], log=log, verbose=0)
"""


def kill_run_at(run_dir: Path, marker: str, overrides: list[str]) -> str:
    """Runs the recipe in a child killed at the first log line containing `marker`."""
    child = subprocess.run([sys.executable, "-c", KILLED_RUN, str(run_dir), marker, *overrides],
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert child.returncode == -9, child.stdout + child.stderr
    return child.stdout


@pytest.mark.slow
@pytest.mark.parametrize("marker, finish", [
    ("temperature scaling: T", "run again"),  # killed after calibration, before the test
    ("; report ", "kcls export"),  # after evaluation, before the export
    ("exported float32 SavedModel", "run again"),  # after the export, before run.json
], ids=["after-calibration", "after-evaluation", "after-export"])
def test_a_run_killed_after_training_is_finished_with_nothing_trained_or_exported_twice(
        tmp_path, marker, finish):
    run_dir, exports = tmp_path / "run", tmp_path / "saved_models"
    overrides = [*TINY, f"export.base_dir={exports}"]
    kill_run_at(run_dir, marker, overrides)
    assert not (run_dir / RUN_INFO_FILE).exists()
    trained = json.loads((run_dir / RUN_STATE_FILE).read_text())["training"]

    if finish == "kcls export":
        result = CliRunner().invoke(main, ["export", str(run_dir)])
        assert result.exit_code == 0, result.output
        assert "finishing it" in result.output and "resumed after training" in result.output
    else:
        lines: list[str] = []
        result = run_recipe(apply_overrides(load_recipe("quickstart"), overrides), run_dir,
                            log=lines.append, verbose=0)
        assert any(line.startswith("resumed after training") for line in lines), lines
        assert result.export_dir == exports / "quickstart" / "1"
        saved = keras.models.clone_model(result.classifier)
        saved.load_weights(run_dir / WEIGHTS_FILE)
        for left, right in zip(saved.get_weights(), result.classifier.get_weights()):
            np.testing.assert_array_equal(left, right)
    run_info = json.loads((run_dir / RUN_INFO_FILE).read_text())
    assert run_info["history"] == trained["history"]  # not trained again
    # One version: the killed run's export is this run's, never exported twice.
    assert sorted(path.name for path in (exports / "quickstart").iterdir()
                  if path.name.isdigit()) == ["1"]
    assert run_info["export_dir"] == str(exports / "quickstart" / "1")


class StopAtEpoch(keras.callbacks.Callback):
    """Ends the run with an error when epoch `epoch` begins (an interrupted run)."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


class Interrupter(RunObserver):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def started(self, recipe, run_dir, settings):
        pass

    def callbacks(self):
        return [StopAtEpoch(self.epoch)]

    def finished(self, run_dir, record):
        pass

    def failed(self, run_dir, error):
        pass


def write_folder(root: Path, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for name in ("ants", "bees"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")


def interrupted(run_dir: Path, recipe) -> str:
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, run_dir, log=lambda line: None, verbose=0,
                   observers=[Interrupter(1)])
    return (run_dir / RUN_CONFIG_FILE).read_text()


@pytest.mark.slow
def test_a_resume_with_other_settings_or_other_data_is_refused_and_names_them(tmp_path):
    photos = tmp_path / "photos"
    write_folder(photos, 10)
    recipe = apply_overrides(load_recipe("quickstart"), [
        *TINY, f"data.source=folder:{photos}", "data.image_size=16", "export.enabled=false"])
    run_dir = tmp_path / "run"
    config = interrupted(run_dir, recipe)

    other = apply_overrides(recipe, ["data.image_size=24", "model.dropout=0.5",
                                     "data.batch_size=8"])
    with pytest.raises(ConfigError) as refused:
        run_recipe(other, run_dir, log=lambda line: None, verbose=0)
    message = str(refused.value)
    for setting in ("data.image_size 16 -> 24", "model.dropout", "data.batch_size 16 -> 8"):
        assert setting in message, message
    assert "\n" not in message and "--out" in message
    assert (run_dir / RUN_CONFIG_FILE).read_text() == config  # left as it was

    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(photos / "bees" / "new.png")
    with pytest.raises(ConfigError, match="files of data.source .* changed since"):
        run_recipe(recipe, run_dir, log=lambda line: None, verbose=0)
    (photos / "bees" / "new.png").unlink()
    lines: list[str] = []
    run_recipe(recipe, run_dir, log=lines.append, verbose=0)  # the same run: it resumes
    assert any(line.startswith("resumed an interrupted run") for line in lines), lines


@pytest.mark.slow
def test_an_interrupted_run_says_how_to_resume(tmp_path):
    recipe = apply_overrides(load_recipe("quickstart"), [*TINY, "export.enabled=false"])
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, tmp_path / "run", log=lines.append, verbose=0,
                   observers=[Interrupter(1)])
    assert lines[-1].startswith("interrupted: "), lines
    assert f"--out {tmp_path / 'run'}" in lines[-1]


@pytest.mark.slow
def test_a_rerun_without_out_names_the_unfinished_same_run_and_resume_takes_it(tmp_path,
                                                                              monkeypatch):
    from kcls.workflows.prepare import prepare
    from kcls.workflows.run import same_unfinished_run

    monkeypatch.chdir(tmp_path)  # runs/quickstart/ of "the same place"
    recipe = apply_overrides(load_recipe("quickstart"), [
        *TINY, "export.enabled=false", "evaluate.test=false"])
    command = "kcls recipe run quickstart --set data.batch_size=16"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, log=lambda line: None, verbose=0, observers=[Interrupter(1)],
                   command=command)
    (killed,) = (tmp_path / "runs" / "quickstart").iterdir()
    killed = Path("runs") / "quickstart" / killed.name
    # Other settings are another run: never offered.
    assert same_unfinished_run(prepare(apply_overrides(recipe, ["model.dropout=0.5"]))) is None

    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):  # the same command again: named, not resumed
        run_recipe(recipe, log=lines.append, verbose=0, observers=[Interrupter(0)],
                   command=command)
    (offer,) = [line for line in lines if "unfinished run" in line]
    assert offer == (f"{killed} is an unfinished run of quickstart with the same settings and "
                     "data; this run starts afresh in a new folder. To resume that one "
                     f"instead: {command} --resume (or {command} --out {killed})")
    (second,) = {Path("runs") / "quickstart" / path.name
                 for path in (tmp_path / "runs" / "quickstart").iterdir()} - {killed}
    assert lines[-1] == (f"interrupted: run `{command} --out {second}` to resume from its last "
                         "finished epoch (or stage, once trained)")

    lines.clear()  # --resume takes the latest of the two
    resumed = run_recipe(recipe, log=lines.append, verbose=0, resume=True, command=command)
    assert resumed.run_dir == second and (second / RUN_INFO_FILE).is_file()
    assert lines[0] == f"resuming the unfinished run {second} (the same recipe, settings and data)"
    assert same_unfinished_run(prepare(recipe)) == killed  # the older one is still there


def test_resume_with_out_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["recipe", "run", "quickstart", "--resume", "--out",
                                       str(tmp_path / "run")])
    assert result.exit_code == 2 and "--resume finds the run to resume" in result.output
