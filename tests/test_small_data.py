"""Small data, honestly (#29 defect 12): a time budget is a ceiling (a validation plateau
ends a phase), a stable plan with each phase announced, small splits named, and a
separate test source."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import add_images

from kcls.config import ModelConfig, TrainConfig
from kcls.models.classifier import build_classifier
from kcls.train.budget import CALIBRATION_STEPS, BudgetPlanner, TimeBudget, epoch_header
from kcls.train.phases import fit_phases
from kcls.train.schedule import WarmupCosine

NUM_CLASSES = 4


class Clock:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TickingClock:
    """A clock that moves `tick` seconds each time it is read."""

    def __init__(self, tick: float) -> None:
        self.tick, self.now = tick, 0.0

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def tiny_classifier() -> keras.Model:
    keras.utils.set_random_seed(0)
    return build_classifier(ModelConfig(backbone="resnet_v2_tiny", dropout=0.0), NUM_CLASSES, 32)


def batches(repeat: bool = True) -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    labels = keras.utils.to_categorical(np.arange(16) % NUM_CLASSES, NUM_CLASSES)
    examples = tf.data.Dataset.from_tensor_slices((images, labels))
    return (examples.repeat() if repeat else examples).batch(8, drop_remainder=repeat)


def test_a_budgeted_phase_stops_on_a_validation_plateau_and_says_why():
    # A learning rate too small to move a float32 weight: the validation loss is flat
    # from the first epoch, and the budget (a clock ticking 1 ms per reading, 1000 s)
    # would have allowed thousands of epochs.
    budget = TimeBudget(1000.0, clock=TickingClock(0.001), patience=3)
    config = TrainConfig(frozen_epochs=1, unfrozen_epochs=0, learning_rate=1e-12,
                         jit_compile=False)
    lines: list[str] = []
    result = fit_phases(tiny_classifier(), batches(), batches(repeat=False), 2, config,
                        verbose=0, time_budget=budget, log=lines.append)
    (phase,) = result.phases
    (plan,) = budget.plans
    assert phase.epochs == 4 < plan["first_planned_epochs"]  # epoch 1 best, then 3 more
    assert phase.stopped_early.startswith("val_loss did not improve for 3 epochs (best ")
    assert "at epoch 1; its weights restored" in phase.stopped_early
    assert plan["stopped_early"] == phase.stopped_early and plan["actual_epochs"] == 4
    assert phase.to_dict()["stopped_early"] == phase.stopped_early
    assert budget.summary()["plateau_patience"] == 3
    assert lines[0].startswith("phase 1/1, frozen: the head trains on the frozen backbone, "
                               "from epoch 1, its epochs planned from the time budget")
    assert "stops after 3 epochs without a better validation loss" in lines[0]
    assert lines[-1].startswith("frozen phase stopped early after epoch 4: val_loss did not")


def test_every_phase_is_announced_with_its_epochs_without_a_budget():
    config = TrainConfig(frozen_epochs=1, unfrozen_epochs=2, learning_rate=1e-3,
                         jit_compile=False, train_batchnorm=False, steps_per_epoch=1)
    lines: list[str] = []
    result = fit_phases(tiny_classifier(), batches(), None, 1, config, verbose=0,
                        log=lines.append)
    assert [phase.epochs for phase in result.phases] == [1, 2]
    assert all(phase.stopped_early is None for phase in result.phases)
    assert "stopped_early" not in result.phases[0].to_dict()
    assert lines[0].startswith("phase 1/2, frozen: the head trains on the frozen backbone, "
                               "epochs 1-1, peak learning rate 1.00e-03")
    assert lines[1].startswith("phase 2/2, unfrozen: the backbone trains too (all its layers, "
                               "BatchNorm in inference mode), epochs 2-3, peak learning rate "
                               "1.00e-04")
    assert len(lines) == 2  # no early stopping without a budget or a patience


def planner_with(clock: Clock, budget_seconds: float, steps_per_epoch: int = 10,
                 log=None) -> tuple[BudgetPlanner, WarmupCosine]:
    budget = TimeBudget(budget_seconds, clock=clock)
    schedule = WarmupCosine(1.0, total_steps=1, warmup_fraction=0.1)
    planner = BudgetPlanner(budget, schedule, first_epoch=2, steps_per_epoch=steps_per_epoch,
                            batch_size=10, share=1.0, name="unfrozen", log=log)
    planner.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    planner.model.stop_training = False
    return planner, schedule


def run_epoch(planner: BudgetPlanner, clock: Clock, epoch: int, step_seconds: float,
              steps: int = 10) -> None:
    planner.on_epoch_begin(epoch)
    for _ in range(steps):
        planner.on_train_batch_begin(0)
        clock.now += step_seconds
        planner.on_train_batch_end(0)
    planner.on_epoch_end(epoch)


def test_the_plan_grows_only_when_clearly_more_fits_and_shrinks_at_once():
    clock = Clock()
    planner, schedule = planner_with(clock, 400.0)
    planner.on_train_begin()
    assert epoch_header(planner, 2) == (
        f"unfrozen epoch 1 (its epochs are planned after its first {CALIBRATION_STEPS + 1} "
        "steps) (run epoch 3)")
    run_epoch(planner, clock, 2, 1.0)  # 10 s epochs: 40 of them fit in 400 s
    first = planner.planned_epochs
    assert first == 40
    assert epoch_header(planner, 3) == "unfrozen epoch 2/40 (run epoch 4)"
    # 5% faster epochs fit 42: measurement noise, not a reason to move the total.
    run_epoch(planner, clock, 3, 0.95)
    run_epoch(planner, clock, 4, 0.95)
    assert planner.planned_epochs == first
    run_epoch(planner, clock, 5, 0.5)  # twice as fast: clearly more fit, the plan grows
    grown = planner.planned_epochs
    assert grown > first * 1.1
    assert float(schedule.total_steps.numpy()) == grown * 10
    run_epoch(planner, clock, 6, 1.05)  # slower than planned: shrinks at once (the deadline)
    assert planner.planned_epochs < grown


def test_a_budget_shorter_than_one_epoch_says_so_and_what_it_does():
    clock, lines = Clock(), []
    planner, _ = planner_with(clock, 1.0, log=lines.append)
    planner.on_train_begin()
    run_epoch(planner, clock, 2, 1.0)
    assert planner.planned_epochs == 1
    (line,) = lines
    assert line.startswith("warning: the unfrozen phase's share of the time budget (1 s) is "
                           "shorter than one of its epochs (~10 s measured): it trains 1 epoch")
    assert "the run takes longer than its budget" in line
    run_epoch(planner, clock, 3, 1.0)
    assert len(lines) == 1  # said once


def test_a_test_source_is_the_test_split_and_nothing_is_carved_from_the_source(tmp_path):
    from kcls.config import DataConfig
    from kcls.data.sources import file_splits, load_splits, test_examples

    train, test = add_images(tmp_path / "photos", 10), add_images(tmp_path / "held", 4)
    config = DataConfig(source=f"folder:{train}", test_source=f"folder:{test}",
                        validation_fraction=0.2)
    splits = load_splits(config)
    assert splits.sizes == {"train": 16, "validation": 4, "test": 8}
    assert sorted(splits.test_files) == sorted(str(path) for path in test.rglob("*.png"))
    files = file_splits(config)
    trained = set(files.paths[files.indices["train"]]) | set(
        files.paths[files.indices["validation"]])
    assert all(path.startswith(str(train)) for path in trained) and len(trained) == 20
    assert [label for _, label in splits.test.as_numpy_iterator()] == [0] * 4 + [1] * 4
    # The run's recorded test files are read back from the test source.
    held_out = test_examples(config, ["cat", "dog"], test_files=splits.test_files)
    assert held_out.files == splits.test_files
    # Without it the same folder carves its test split: another fingerprint (no cache
    # of one replays the other, no resume mixes them).
    assert load_splits(DataConfig(source=f"folder:{train}")).fingerprint != splits.fingerprint


def test_a_test_source_of_other_classes_or_beside_a_given_test_split_is_one_line(tmp_path):
    from kcls.config import ConfigError, DataConfig
    from kcls.data.sources import load_splits

    train = add_images(tmp_path / "photos", 10)
    other = add_images(tmp_path / "other", 3, classes=("cat", "fox"))
    with pytest.raises(ConfigError) as error:
        load_splits(DataConfig(source=f"folder:{train}", test_source=f"folder:{other}"))
    message = str(error.value)
    assert "\n" not in message
    assert (f"data.test_source=folder:{other} has classes ['cat', 'fox'] and data.source="
            f"folder:{train} has ['cat', 'dog']") in message
    split = tmp_path / "split"
    add_images(split / "train", 6), add_images(split / "test", 2)
    with pytest.raises(ConfigError, match="has its own test split .*keep one of them"):
        load_splits(DataConfig(source=f"folder:{split}", test_source=f"folder:{train}"))
    with pytest.raises(ConfigError, match="is a folder of split folders"):
        load_splits(DataConfig(source=f"folder:{train}", test_source=f"folder:{split}"))
    with pytest.raises(ConfigError, match="data.test_source"):
        DataConfig(source="sklearn:digits", test_source=f"folder:{train}")
    with pytest.raises(ConfigError, match="data.test_source"):
        DataConfig(source=f"folder:{train}", test_source="tfds:mnist")


@pytest.mark.slow
def test_a_small_budgeted_run_stops_on_plateaus_and_names_its_small_splits(tmp_path,
                                                                          monkeypatch, capsys):
    import functools
    import json

    import kcls.workflows.run as run_module
    from kcls.config import apply_overrides
    from kcls.recipes import load_recipe
    from kcls.workflows.run import run_recipe

    # The budget reads a clock ticking 10 ms per reading: a plan of tens of epochs
    # whatever the machine's load; a learning rate too small to move a weight makes the
    # frozen phase's validation loss flat (the unfrozen phase's BatchNorm statistics
    # would move it: the phases' own tests are above).
    monkeypatch.setattr(run_module, "TimeBudget",
                        functools.partial(run_module.TimeBudget, clock=TickingClock(0.01)))
    recipe = apply_overrides(load_recipe("quickstart"), [
        "train.time_budget=60s", "train.learning_rate=1e-12", "train.steps_per_epoch=2",
        "train.frozen_epochs=1", "train.unfrozen_epochs=0",
        "train.jit_compile=false", "data.batch_size=16", "data.validation_fraction=0.02",
        "data.test_fraction=0.02", "export.enabled=false"])
    lines: list[str] = []
    result = run_recipe(recipe, tmp_path / "run", log=lines.append, verbose=2)
    record = json.loads((result.run_dir / "run.json").read_text())
    assert record["splits"] == {"train": 1725, "validation": 36, "test": 36}
    for phase, plan in zip(record["phases"], record["time_budget"]["phases"]):
        assert phase["epochs"] == 11 < plan["first_planned_epochs"]
        assert phase["stopped_early"].startswith("val_loss did not improve for 10 epochs")
        assert plan["stopped_early"] == phase["stopped_early"]
    assert record["time_budget"]["plateau_patience"] == 10
    # The 36 test images and the 30 validation images are named as too few.
    test_warning, temperature_warning = record["small_splits"]
    assert test_warning.startswith("the test split has 36 images (under 50): its score is "
                                   "known to about +-16 points")
    assert temperature_warning.startswith("the validation split has 36 images, under 50: ")
    assert record["temperature"] == 1.0
    assert record["calibration"] == {"method": "none", "skipped": temperature_warning}
    assert f"warning: {test_warning}" in lines and f"warning: {temperature_warning}" in lines
    report = (result.run_dir / "report.md").read_text()
    assert f"> **Warning:** {test_warning}" in report
    assert ("- recipe `quickstart`, data `sklearn:digits`: train 1725, validation 36, test 36 "
            "images, 10 classes") in report
    assert "- image size 32 px (resize), backbone `resnet_v2_tiny`" in report
    assert "- epochs: frozen 11 (stopped early) (time budget 60s)" in report
    assert "- duration: " in report
    assert [line.split(":")[0] for line in lines if line.startswith("phase ")] == [
        "phase 1/1, frozen"]
    # Epoch headers count within the phase, never "?".
    printed = capsys.readouterr().out
    headers = [line for line in printed.splitlines() if "(run epoch" in line]
    assert len(headers) == 11
    assert headers[0].startswith("frozen epoch 1 (its epochs are planned after")
    assert headers[1].startswith("frozen epoch 2/") and "/?" not in printed
