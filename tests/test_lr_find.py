"""The learning-rate range test: its suggestion, weights left alone, `auto` runs, the CLI."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from kcls.cli import main
from kcls.config import ModelConfig, TrainConfig
from kcls.layout import BACKUP_DIR, LR_FIND_FILE, LR_FIND_PHASE_PLOT, LR_FIND_PLOT, PROGRESS_FILE
from kcls.models.classifier import build_classifier
from kcls.train.lr_find import find_learning_rate, suggest_learning_rate
from kcls.train.phases import find_phase_learning_rate, fit_phases
from kcls.train.schedule import plan_phases


def least_squares(examples: int = 256, features: int = 8):
    """A batch whose mean squared error has Hessian 2 I: `x^T x / n = I` exactly."""
    rng = np.random.default_rng(0)
    orthonormal, _ = np.linalg.qr(rng.normal(size=(examples, features)))
    inputs = (orthonormal * np.sqrt(examples)).astype("float32")
    targets = inputs @ rng.normal(size=(features, 1)).astype("float32")
    return tf.data.Dataset.from_tensors((inputs, targets)).repeat()


def test_suggestion_for_a_convex_problem_lies_in_its_good_range_and_weights_are_kept():
    # Gradient descent on a quadratic with Hessian h I (h = 2) contracts the error by
    # |1 - rate h| per step: it diverges above 2/h = 1, and 50 steps shrink the loss
    # 100-fold only for rate h in (0.046, 1.954): rates in (0.023, 0.977) are good.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1, use_bias=False)])
    before = [variable.numpy().copy() for variable in model.variables]
    search = find_learning_rate(model, least_squares(), keras.optimizers.SGD, "mse",
                                steps=100, min_rate=1e-5, max_rate=10.0)
    assert 0.023 < search.suggestion < 0.977
    assert search.rule == "minimum/10" and search.suggestion == pytest.approx(
        search.minimum_rate / 10)
    assert search.diverged and len(search.losses) < 100  # rates past 1 blow up
    for variable, value in zip(model.variables, before):
        np.testing.assert_array_equal(variable.numpy(), value)
    # And the suggestion does train the model.
    model.compile(optimizer=keras.optimizers.SGD(search.suggestion), loss="mse")
    history = model.fit(least_squares(), steps_per_epoch=50, epochs=1, verbose=0, shuffle=False)
    assert history.history["loss"][0] < 0.1 * search.losses[0]


def test_suggestion_rule_on_a_recorded_curve():
    rates = np.logspace(-6, 0, 61)
    losses = 1.0 + (np.log10(rates) + 2.0) ** 2  # lowest at 1e-2
    search = suggest_learning_rate(list(rates), list(losses))
    assert search.minimum_rate == pytest.approx(1e-2, rel=0.05)
    assert search.suggestion == pytest.approx(1e-3, rel=0.05)
    assert search.steepest_rate < search.minimum_rate and search.notes == []
    # A loss that only falls: the minimum is the last rate, and the note says so.
    falling = suggest_learning_rate(list(rates), list(-np.log10(rates)))
    assert falling.minimum_rate > 0.5 and "still falling" in falling.notes[0]
    # Flat and noisy until it diverges: the minimum is where the loss stops improving,
    # not wherever the noise dipped lowest.
    noisy = 1.3 + 0.15 * np.random.default_rng(0).normal(size=52)
    noisy[-6:] += [0.3, 0.8, 1.5, 3.0, 6.0, 12.0]
    flat = suggest_learning_rate(list(rates[:52]), list(noisy), diverged=True)
    assert rates[38] <= flat.minimum_rate < rates[46]  # 10**-2.2 .. 10**-1.4: the divergence
    # A non-finite loss ends the usable curve.
    exploded = suggest_learning_rate(list(rates), list(losses[:45]) + [np.nan] * 16, True)
    assert exploded.minimum_rate == pytest.approx(1e-2, rel=0.05)


def tiny_classifier() -> keras.Model:
    keras.utils.set_random_seed(0)
    return build_classifier(ModelConfig(backbone="resnet_v2_tiny", dropout=0.0), 4, 32)


def batches() -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (32, 32, 32, 3)).astype("float32")
    labels = keras.utils.to_categorical(np.arange(32) % 4, 4)
    return tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(8)


def test_phase_search_leaves_every_weight_and_batchnorm_statistic_unchanged():
    classifier = tiny_classifier()
    before = {variable.path: variable.numpy().copy() for variable in classifier.variables}
    config = TrainConfig(train_batchnorm=True, jit_compile=False, layer_decay=0.8)
    unfrozen = plan_phases(config)[1]
    search = find_phase_learning_rate(classifier, batches(), config, unfrozen, steps=12)
    assert len(search.losses) == 12 and search.suggestion > 0
    assert any("moving" in path for path in before)
    for variable in classifier.variables:
        np.testing.assert_array_equal(variable.numpy(), before[variable.path],
                                      err_msg=variable.path)


class KilledError(RuntimeError):
    """Stands in for a preempted machine."""


class KillAt(keras.callbacks.Callback):
    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KilledError(f"killed at the start of epoch {epoch}")


@pytest.mark.slow
def test_automatic_rates_are_found_per_phase_recorded_and_kept_on_resume(tmp_path):
    config = TrainConfig(frozen_epochs=1, unfrozen_epochs=2, unfreeze="1", learning_rate="auto",
                         lr_find_steps=20, train_batchnorm=False, jit_compile=False)
    with pytest.raises(KilledError):  # killed in the unfrozen phase, after its search
        fit_phases(tiny_classifier(), batches(), None, 2, config, callbacks=[KillAt(2)],
                   verbose=0, run_dir=tmp_path)
    progress = json.loads((tmp_path / BACKUP_DIR / PROGRESS_FILE).read_text())
    found = {name: search["suggestion"]
             for name, search in progress["learning_rate_searches"].items()}
    assert sorted(found) == ["frozen", "unfrozen"]
    assert all(search["steps"] <= 20 for search in progress["learning_rate_searches"].values())
    for name in found:
        plot = tmp_path / LR_FIND_PHASE_PLOT.format(phase=name)
        assert plot.read_bytes()[:4] == b"\x89PNG"
        plot.unlink()
    result = fit_phases(tiny_classifier(), batches(), None, 2, config, verbose=0,
                        run_dir=tmp_path)
    assert result.resumed
    for record in result.phases:
        assert record.learning_rate == found[record.name]
        assert record.learning_rate_search["suggestion"] == found[record.name]
        assert record.learning_rate_search["rule"] == "minimum/10"
    # Resuming searched nothing again.
    assert not list(tmp_path.glob("lr_find_*.png"))


def invoke(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.slow
def test_cli_lr_find_writes_the_plot_and_never_overwrites_it(tmp_path):
    # Without --steps, the recipe's own setting.
    arguments = ("lr-find", "quickstart", "--set", "train.lr_find_steps=8", "--out",
                 str(tmp_path), "--set", "data.batch_size=16")
    result = invoke(*arguments)
    assert result.exit_code == 0, result.output
    assert "suggested learning rate (minimum/10):" in result.output
    assert (tmp_path / LR_FIND_PLOT).read_bytes()[:4] == b"\x89PNG"
    curve = json.loads((tmp_path / LR_FIND_FILE).read_text())
    assert curve["phase"] == "frozen" and len(curve["losses"]) == 8
    again = invoke(*arguments)
    assert again.exit_code == 2 and "--overwrite" in again.output
    missing = invoke("lr-find", "quickstart", "--phase", "unfrozen", "--set",
                     "train.unfrozen_epochs=0", "--out", str(tmp_path / "other"))
    assert missing.exit_code == 2 and "no 'unfrozen' phase" in missing.output
    assert "Traceback" not in missing.output
