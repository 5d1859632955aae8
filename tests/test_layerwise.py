"""Layer-wise learning rates: per-variable multipliers in the optimizer, with XLA, mixed
precision and resume."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from kcls.config import ConfigError, ModelConfig, Recipe, TrainConfig, apply_overrides
from kcls.models.backbones import backbone_blocks
from kcls.models.classifier import BACKBONE_LAYER, build_classifier
from kcls.train.layerwise import LayerwiseSGD, layer_decay_multipliers
from kcls.train.phases import _optimizer, fit_phases
from kcls.train.schedule import make_optimizer

NUM_CLASSES = 4
DECAY = 0.5


def tiny_classifier(precision: str = "float32") -> keras.Model:
    keras.utils.set_random_seed(0)
    return build_classifier(ModelConfig(backbone="resnet_v2_tiny", dropout=0.0), NUM_CLASSES,
                            32, precision)


def batches() -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (32, 32, 32, 3)).astype("float32")
    labels = keras.utils.to_categorical(np.arange(32) % NUM_CLASSES, NUM_CLASSES)
    return tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(8)


def gradients(variables: list[keras.Variable], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=variable.shape).astype("float32") for variable in variables]


def test_block_k_from_the_top_gets_decay_to_the_k_and_the_head_the_full_rate():
    classifier = tiny_classifier()
    multipliers = layer_decay_multipliers(classifier, DECAY)
    blocks = backbone_blocks(classifier.get_layer(BACKBONE_LAYER))
    assert len(blocks) == 7  # stem + 6 residual blocks
    for depth, block in enumerate(reversed(blocks), start=1):
        for layer in block:
            for variable in layer.weights:
                assert multipliers[variable.path] == pytest.approx(DECAY ** depth)
    head = classifier.get_layer("logits").weights
    assert head and all(variable.path not in multipliers for variable in head)


def test_plain_sgd_moves_each_block_in_proportion_to_its_multiplier():
    classifier = tiny_classifier()
    multipliers = layer_decay_multipliers(classifier, DECAY)
    variables = classifier.trainable_variables
    optimizer = LayerwiseSGD(learning_rate=0.1, momentum=0.0,
                             learning_rate_multipliers=multipliers)
    before = [variable.numpy().copy() for variable in variables]
    grads = gradients(variables)
    optimizer.apply_gradients(zip(grads, variables))
    seen = set()
    for variable, old, grad in zip(variables, before, grads):
        multiplier = multipliers.get(variable.path, 1.0)
        seen.add(multiplier)
        np.testing.assert_allclose(variable.numpy() - old, -0.1 * multiplier * grad,
                                   rtol=1e-5, atol=1e-7, err_msg=variable.path)
    assert len(seen) == 8  # the head's 1 and the 7 blocks' DECAY**k


def adamw_reference(value: np.ndarray, grads: list[np.ndarray], rate: float,
                    weight_decay: float) -> np.ndarray:
    """Keras AdamW's update (decoupled decay, then Adam with bias correction), by hand."""
    first = np.zeros_like(value, dtype="float64")
    second = np.zeros_like(value, dtype="float64")
    value = value.astype("float64")
    for step, grad in enumerate(grads, start=1):
        value = value - value * weight_decay * rate
        first = 0.9 * first + 0.1 * grad
        second = 0.999 * second + 0.001 * grad.astype("float64") ** 2
        alpha = rate * np.sqrt(1 - 0.999 ** step) / (1 - 0.9 ** step)
        value = value - alpha * first / (np.sqrt(second) + 1e-7)
    return value


def test_adamw_applies_the_multipliers_to_the_step_and_the_weight_decay():
    classifier = tiny_classifier()
    multipliers = layer_decay_multipliers(classifier, DECAY)
    config = TrainConfig(optimizer="adamw", learning_rate=0.01, weight_decay=0.1)
    optimizer = make_optimizer(config.learning_rate, config, multipliers)
    variables = classifier.trainable_variables
    before = [variable.numpy().copy() for variable in variables]
    steps = [gradients(variables, seed) for seed in range(3)]
    for grads in steps:
        optimizer.apply_gradients(zip(grads, variables))
    exempt = 0
    for index, (variable, old) in enumerate(zip(variables, before)):
        rate = 0.01 * multipliers.get(variable.path, 1.0)
        decays = variable.name not in ("bias", "gamma", "beta")
        exempt += not decays
        expected = adamw_reference(old, [grads[index] for grads in steps], rate,
                                   0.1 if decays else 0.0)
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-4, atol=1e-6,
                                   err_msg=variable.path)
    assert 0 < exempt < len(variables)


def test_mixed_float16_wraps_the_layerwise_optimizer_in_loss_scaling():
    classifier = tiny_classifier("mixed_float16")
    config = TrainConfig(optimizer="sgd", learning_rate=0.1, weight_decay=0.0,
                         layer_decay=DECAY, warmup_fraction=0.0)
    optimizer = _optimizer(classifier, 0.1, config)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(optimizer.inner_optimizer, LayerwiseSGD)
    multipliers = layer_decay_multipliers(classifier, DECAY)
    variables = classifier.trainable_variables
    before = [variable.numpy().copy() for variable in variables]
    grads = gradients(variables)
    # Loss-scaled gradients, as a mixed_float16 train step hands them over.
    scale = float(optimizer.scale_loss(1.0))
    optimizer.apply_gradients([(grad * scale, variable)
                               for grad, variable in zip(grads, variables)])
    for variable, old, grad in zip(variables, before, grads):
        # Nesterov momentum 0.9, first step: rate x (1 + momentum) x gradient.
        expected = -0.1 * 1.9 * multipliers.get(variable.path, 1.0) * grad
        np.testing.assert_allclose(variable.numpy() - old, expected, rtol=1e-4, atol=1e-6,
                                   err_msg=variable.path)


@pytest.mark.slow
def test_layer_decay_keeps_xla_on_and_trains_as_without_it():
    config = TrainConfig(frozen_epochs=0, unfrozen_epochs=1, optimizer="sgd",
                         learning_rate=0.05, unfrozen_lr_factor=1.0, layer_decay=DECAY,
                         warmup_fraction=0.0, train_batchnorm=False, ema=True)
    trained = {}
    for jit_compile in (True, False):
        classifier = tiny_classifier()
        result = fit_phases(classifier, batches(), None, 2,
                            dataclasses.replace(config, jit_compile=jit_compile), verbose=0)
        assert result.jit_compile is jit_compile
        trained[jit_compile] = classifier.get_weights()
    for compiled, eager in zip(trained[True], trained[False]):
        np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-5)


class KilledError(RuntimeError):
    """Stands in for a preempted machine."""


class Multipliers(keras.callbacks.Callback):
    """Records the optimizer's multiplier per trainable variable; kills at epoch `kill_at`."""

    def __init__(self, kill_at: int | None = None) -> None:
        super().__init__()
        self.kill_at = kill_at
        self.seen: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, batch, logs=None):
        optimizer = self.model.optimizer
        self.seen[self.epoch] = {variable.path: optimizer.variable_multiplier(variable)
                                 for variable in self.model.trainable_variables}

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        if epoch == self.kill_at:
            raise KilledError(f"killed at the start of epoch {epoch}")


@pytest.mark.slow
def test_a_resumed_run_continues_with_the_same_multipliers(tmp_path):
    config = TrainConfig(frozen_epochs=1, unfrozen_epochs=3, unfreeze="2", layer_decay=DECAY,
                         train_batchnorm=False, jit_compile=False, learning_rate=1e-2)
    whole = Multipliers()
    fit_phases(tiny_classifier(), batches(), None, 2, config, callbacks=[whole], verbose=0,
               run_dir=tmp_path / "whole")
    killed = Multipliers(kill_at=2)  # the middle of the unfrozen phase
    with pytest.raises(KilledError):
        fit_phases(tiny_classifier(), batches(), None, 2, config, callbacks=[killed],
                   verbose=0, run_dir=tmp_path / "resumed")
    resumed = Multipliers()
    result = fit_phases(tiny_classifier(), batches(), None, 2, config, callbacks=[resumed],
                        verbose=0, run_dir=tmp_path / "resumed")
    assert result.resumed and sorted(resumed.seen) == [2, 3]
    for epoch in (2, 3):
        assert resumed.seen[epoch] == whole.seen[epoch]
    # Phase 2 trains the top two blocks and the head.
    assert sorted(set(whole.seen[3].values())) == [DECAY ** 2, DECAY, 1.0]


def test_layer_decay_and_automatic_learning_rate_parse_and_validate():
    recipe = apply_overrides(Recipe(name="r"), ["train.layer_decay=0.75",
                                                "train.learning_rate=auto"])
    assert recipe.train.layer_decay == 0.75 and recipe.train.learning_rate == "auto"
    assert apply_overrides(recipe, ["train.layer_decay=none"]).train.layer_decay is None
    assert apply_overrides(recipe, ["train.learning_rate=3e-4"]).train.learning_rate == 3e-4
    for bad in ("train.layer_decay=0", "train.layer_decay=1.5",
                "train.learning_rate=fast", "train.learning_rate=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            apply_overrides(recipe, [bad])
    with pytest.raises(ConfigError, match="train.layer_decay"):
        TrainConfig(layer_decay=-0.5)
