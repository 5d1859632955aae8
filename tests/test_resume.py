"""A killed run resumes from its run directory: completed phases are skipped, epochs add up."""

import dataclasses
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from kcls.config import ConfigError, ModelConfig, TrainConfig, apply_overrides
from kcls.layout import BACKUP_DIR, BEST_WEIGHTS_FILE
from kcls.models.classifier import build_classifier
from kcls.recipes import load_recipe
from kcls.train.phases import TrainingResult, fit_phases
from kcls.workflows.run import run_recipe

# Phase 2 trains the top block only: a smaller backward pass to trace, a faster test.
CONFIG = TrainConfig(frozen_epochs=2, unfrozen_epochs=3, unfreeze="1", train_batchnorm=False,
                     jit_compile=False)
TOTAL_EPOCHS = CONFIG.frozen_epochs + CONFIG.unfrozen_epochs


class KilledError(RuntimeError):
    """Stands in for a preempted machine."""


class KillAt(keras.callbacks.Callback):
    """Raises when epoch `epoch` begins, after saving the weights it would start from."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch
        self.weights_at_kill = None

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            self.weights_at_kill = self.model.classifier.get_weights()
            raise KilledError(f"killed at the start of epoch {epoch}")


class EpochLog(keras.callbacks.Callback):
    """Records the epochs begun and the weights each began with."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs, self.weights = [], {}

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)
        self.weights[epoch] = self.model.classifier.get_weights()


def data() -> tuple[tf.data.Dataset, tf.data.Dataset]:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (32, 32, 32, 3)).astype("float32")
    labels = keras.utils.to_categorical(np.arange(32) % 4, 4)
    examples = tf.data.Dataset.from_tensor_slices((images, labels))
    return examples.repeat().batch(8), examples.batch(16)


def classifier(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return build_classifier(ModelConfig(backbone="resnet_v2_tiny"), 4, 32)


def fit(model: keras.Model, run_dir, callbacks: list[keras.callbacks.Callback],
        config: TrainConfig = CONFIG) -> TrainingResult:
    train, validation = data()
    return fit_phases(model, train, validation, 2, config, callbacks=callbacks, verbose=0,
                      run_dir=run_dir)


@pytest.mark.slow
def test_run_killed_twice_resumes_and_ends_with_the_same_epochs(tmp_path):
    start_of_phase_2 = CONFIG.frozen_epochs
    # Process 1 is killed as phase 2 starts, process 2 in the middle of phase 2.
    first_kill, first_log = KillAt(start_of_phase_2), EpochLog()
    with pytest.raises(KilledError):
        fit(classifier(seed=0), tmp_path, [first_log, first_kill])
    first_logs = json.loads((tmp_path / BACKUP_DIR / "progress.json").read_text())["epochs"]
    assert sorted(map(int, first_logs)) == list(range(start_of_phase_2))

    with pytest.raises(ConfigError, match="unfrozen_epochs changed"):
        fit(classifier(seed=1), tmp_path, [], dataclasses.replace(CONFIG, unfrozen_epochs=4))

    # Every process starts from a differently initialised model, in the same run directory.
    second_kill, second_log = KillAt(start_of_phase_2 + 1), EpochLog()
    with pytest.raises(KilledError):
        fit(classifier(seed=1), tmp_path, [second_log, second_kill])
    assert second_log.epochs == [start_of_phase_2, start_of_phase_2 + 1]  # phase 1 skipped
    for expected, actual in zip(first_kill.weights_at_kill,
                                second_log.weights[start_of_phase_2]):
        np.testing.assert_array_equal(expected, actual)

    log = EpochLog()
    model = classifier(seed=2)
    result = fit(model, tmp_path, [log])
    assert log.epochs == list(range(start_of_phase_2 + 1, TOTAL_EPOCHS))
    for expected, actual in zip(second_kill.weights_at_kill, log.weights[start_of_phase_2 + 1]):
        np.testing.assert_array_equal(expected, actual)
    assert len(result.history["loss"]) == TOTAL_EPOCHS
    assert result.history["loss"][:start_of_phase_2] == [
        first_logs[str(epoch)]["loss"] for epoch in range(start_of_phase_2)]
    assert result.resumed is True
    assert [(p.name, p.first_epoch, p.epochs, p.skipped_on_resume)
            for p in result.phases] == [("frozen", 0, 2, True), ("unfrozen", 2, 3, False)]
    assert not (tmp_path / BACKUP_DIR).exists()

    # The best checkpoint spans the processes: the weights of the lowest val_loss epoch,
    # i.e. the ones the next epoch began with.
    assert result.best_weights == str(tmp_path / BEST_WEIGHTS_FILE)
    best_epoch = int(np.argmin(result.history["val_loss"]))
    began_with = {**first_log.weights, **second_log.weights, **log.weights}
    end_of_best = began_with.get(best_epoch + 1, model.get_weights())
    reloaded = classifier(seed=3)
    reloaded.load_weights(result.best_weights)
    for expected, actual in zip(end_of_best, reloaded.get_weights()):
        np.testing.assert_array_equal(expected, actual)


@pytest.mark.slow
def test_run_json_records_the_training_setup(tmp_path):
    recipe = apply_overrides(load_recipe("quickstart"), [
        "train.frozen_epochs=1", "train.unfrozen_epochs=1", "train.steps_per_epoch=2",
        "train.jit_compile=false", "train.unfreeze=2", "train.ema=true",
        "train.class_weights=balanced", "data.batch_size=16", "export.enabled=false"])
    result = run_recipe(recipe, tmp_path / "run", log=lambda message: None, verbose=0)
    run_info = json.loads((result.run_dir / "run.json").read_text())
    assert run_info["strategy"] == "DefaultDistributionStrategy x 1 replicas"
    assert run_info["global_batch_size"] == 16 and run_info["resumed"] is False
    # The digits are nearly balanced: balanced weights stay close to 1.
    assert sorted(run_info["class_weights"]) == [str(digit) for digit in range(10)]
    assert all(0.9 < weight < 1.1 for weight in run_info["class_weights"].values())
    assert run_info["best_weights"].endswith(BEST_WEIGHTS_FILE)
    # quickstart's `light` policy without flips (digits), on the device, XLA off.
    assert run_info["augmentation"] == {"host": [], "device": ["RandomShift"],
                                        "compiled": False, "model_step_compiled": False}
    frozen, unfrozen = run_info["phases"]
    assert (frozen["unfreeze"], unfrozen["unfreeze"]) == ("none", "2")
    assert frozen["trainable_params"] < unfrozen["trainable_params"]
    assert len(run_info["history"]["val_loss"]) == 2
    assert not (result.run_dir / BACKUP_DIR).exists()
