"""train.wise_ft: the fine-tuned weights are moved back toward the frozen phase's end."""

import keras
import numpy as np
import pytest
from test_resume import data  # random images, 4 classes: training and validation batches

from kcls.config import ConfigError, ModelConfig, Recipe, TrainConfig, apply_overrides
from kcls.models.classifier import build_classifier
from kcls.train.interpolate import interpolate_weights, snapshot_weights
from kcls.train.phases import fit_phases

CONFIG = TrainConfig(frozen_epochs=1, unfrozen_epochs=2, unfreeze="1", train_batchnorm=False,
                     jit_compile=False, learning_rate=1e-2, unfrozen_lr_factor=1.0,
                     wise_ft=0.25)


class KilledError(RuntimeError):
    """Stands in for a preempted machine."""


class PhaseEnds(keras.callbacks.Callback):
    """Records the weights each phase's fit() ends with (before fit_phases finishes it),
    and kills the run when epoch `kill_at` begins."""

    def __init__(self, kill_at: int | None = None) -> None:
        super().__init__()
        self.kill_at, self.ends = kill_at, []

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.kill_at:
            raise KilledError(f"killed at the start of epoch {epoch}")

    def on_train_end(self, logs=None):
        self.ends.append(self.model.classifier.get_weights())


def classifier(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return build_classifier(ModelConfig(backbone="resnet_v2_tiny", dropout=0.0), 4, 32)


def fit(model: keras.Model, callback: PhaseEnds, run_dir=None):
    train, validation = data()
    return fit_phases(model, train, validation, 2, CONFIG, callbacks=[callback], verbose=0,
                      run_dir=run_dir)


def assert_blended(model: keras.Model, frozen_end: list, fine_tuned: list) -> None:
    moved = 0
    for actual, start, end in zip(model.get_weights(), frozen_end, fine_tuned):
        np.testing.assert_allclose(actual, 0.75 * start + 0.25 * end, rtol=1e-5, atol=1e-6)
        moved += not np.allclose(start, end)
    assert moved > 0  # the unfrozen phase did change weights


def test_the_run_ends_a_quarter_of_the_way_from_the_frozen_end_to_the_fine_tuned():
    model, ends = classifier(), PhaseEnds()
    fit(model, ends)
    frozen_end, fine_tuned = ends.ends
    assert_blended(model, frozen_end, fine_tuned)


@pytest.mark.slow
def test_a_run_killed_in_the_unfrozen_phase_resumes_from_the_frozen_end_it_saved(tmp_path):
    first = PhaseEnds(kill_at=CONFIG.frozen_epochs + 1)
    with pytest.raises(KilledError):
        fit(classifier(seed=0), first, tmp_path)
    frozen_end = first.ends[0]
    # A differently initialised model: the frozen end must come from the run directory.
    model, second = classifier(seed=1), PhaseEnds()
    fit(model, second, tmp_path)
    assert_blended(model, frozen_end, second.ends[-1])


def test_interpolation_keeps_integer_variables_and_checks_the_snapshot():
    model = classifier()
    model.add_weight(shape=(), dtype="int32", initializer="zeros", name="counter")
    start = snapshot_weights(model)
    for variable in model.weights:
        variable.assign(keras.ops.ones_like(variable) * 3)
    interpolate_weights(model, start, alpha=0.5)
    counter = next(variable for variable in model.weights if variable.name == "counter")
    assert int(counter.numpy()) == 3
    kernel_index = next(index for index, variable in enumerate(model.weights)
                        if variable.dtype == "float32")
    np.testing.assert_allclose(model.weights[kernel_index].numpy(),
                               0.5 * start[kernel_index] + 1.5, rtol=1e-6)
    with pytest.raises(ValueError, match="snapshot_weights"):
        interpolate_weights(model, start[:-1], alpha=0.5)


@pytest.mark.parametrize("overrides, message", [
    (["train.wise_ft=1.5"], r"expected a number in \[0, 1\]"),
    (["train.wise_ft=0.5", "train.frozen_epochs=0"], "frozen_epochs and train.unfrozen_epochs"),
    (["train.wise_ft=0.5", "train.unfrozen_epochs=0"], "frozen_epochs and train.unfrozen_epochs"),
    (["train.wise_ft=0.5", "model.weights=none"], "model.weights=none"),
])
def test_settings_it_cannot_work_with_are_refused(overrides, message):
    recipe = Recipe(name="r", model=ModelConfig(weights="imagenet"),
                    train=TrainConfig(frozen_epochs=1, unfrozen_epochs=1))
    with pytest.raises(ConfigError, match=message):
        apply_overrides(recipe, overrides)
