"""Augmentation policies: the XLA split, and a compiled step with randaugment + mixup."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kcls.config import ModelConfig, TrainConfig
from kcls.data.augment import RandomShift, build_augmentation, compiles_with_xla
from kcls.models.classifier import build_classifier
from kcls.train.runner import fit_phases


def test_layers_xla_cannot_compile_are_kept_out_of_the_device_stack():
    augmentation = build_augmentation("strong", horizontal_flip=True)
    device_layers = [type(layer).__name__ for layer in augmentation.device.layers]
    host_layers = [type(layer).__name__ for layer in augmentation.host.layers]
    assert device_layers == ["RandomFlip", "RandomShift"]
    assert host_layers == ["RandAugment", "MixUpOrCutMix"]
    assert all(compiles_with_xla(layer) for layer in augmentation.device.layers)
    assert not any(compiles_with_xla(layer) for layer in augmentation.host.layers)


def test_no_flip_when_mirrors_change_the_class():
    augmentation = build_augmentation("light", horizontal_flip=False)
    assert augmentation.host is None
    assert [type(layer).__name__ for layer in augmentation.device.layers] == ["RandomShift"]


def test_random_shift_moves_whole_images_by_at_most_the_factor():
    layer = RandomShift(0.125, seed=3)
    # A ramp along the columns: a shift by k columns adds k to every interior value.
    ramp = np.tile(np.arange(32, dtype=np.float32), (16, 32, 1))[..., None]
    shifted = layer(tf.constant(ramp), training=True).numpy()
    deltas = shifted[:, :, 8:24, 0] - ramp[:, :, 8:24, 0]
    per_image = deltas.reshape(16, -1)
    assert np.all(per_image == per_image[:, :1])  # one whole-pixel shift per image
    assert np.abs(per_image).max() <= 4 and len(np.unique(per_image[:, 0])) > 1
    assert np.array_equal(layer(tf.constant(ramp), training=False).numpy(), ramp)
    assert compiles_with_xla(layer)
    compiled = tf.function(lambda x: layer(x, training=True), jit_compile=True)
    assert compiled(tf.constant(ramp)).shape == ramp.shape


@pytest.mark.parametrize("policy", ["randaugment", "strong"])
def test_augmentation_runs_eagerly_and_in_tf_data(policy):
    augmentation = build_augmentation(policy, seed=1)
    images = tf.random.uniform((4, 32, 32, 3), 0, 255)
    labels = tf.one_hot([0, 1, 2, 3], 4)
    eager = augmentation.host({"images": images, "labels": labels}, training=True)
    batches = tf.data.Dataset.from_tensors({"images": images, "labels": labels}).map(
        lambda batch: augmentation.host(batch, training=True))
    in_graph = next(iter(batches))
    assert eager["images"].shape == in_graph["images"].shape == images.shape
    mixed = augmentation.device(in_graph, training=True)
    assert mixed["images"].shape == images.shape
    np.testing.assert_allclose(mixed["labels"].numpy().sum(axis=1), 1.0, atol=1e-5)
    if policy == "strong":  # MixUp makes soft labels (a row can pair with itself)
        assert np.min(np.max(mixed["labels"].numpy(), axis=1)) < 0.99


def test_training_with_randaugment_and_mixup_stays_xla_compiled():
    augmentation = build_augmentation("strong", seed=0)
    classifier = build_classifier(ModelConfig(backbone="resnet_v2_tiny"), 4, 32)
    images = np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    labels = keras.utils.to_categorical(np.arange(16) % 4, 4)
    batches = tf.data.Dataset.from_tensors({"images": images, "labels": labels}).repeat().map(
        lambda batch: augmentation.host(batch, training=True)).map(
        lambda batch: (batch["images"], batch["labels"]))
    result = fit_phases(classifier, batches, None, steps_per_epoch=2,
                        config=TrainConfig(frozen_epochs=1, unfrozen_epochs=0, jit_compile=True),
                        device_augment=augmentation.device, verbose=0)
    assert result["jit_compile"] is True
    assert np.isfinite(result["history"]["loss"][0])
