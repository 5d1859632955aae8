"""The patch-whitening stem: fitted to the training images, then frozen."""

import dataclasses

import keras
import numpy as np
import pytest

from kcls.config import ModelConfig, apply_overrides
from kcls.data.sources import splits_from_arrays
from kcls.models.classifier import build_classifier
from kcls.models.whitening import (
    PatchWhitening,
    fit_patch_whitening,
    patch_whitening_layers,
    whitening_kernel,
)
from kcls.recipes import load_recipe
from kcls.train.schedule import set_backbone_trainable
from kcls.workflows.prepare import prepare


def correlated_images(count: int = 300, side: int = 16, seed: int = 0) -> np.ndarray:
    """Smooth, colour-correlated images: neighbouring pixels and channels covary."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(count, side + 1, side + 1, 3))
    smooth = (noise[:, 1:, 1:] + noise[:, :-1, 1:] + noise[:, 1:, :-1]) / 3
    mixing = np.array([[1.0, 0.8, 0.6], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    return (smooth @ mixing).astype("float32")


def output_covariance(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Covariance of the first 12 (the positive) output channels, away from the padded edge."""
    outputs = model.predict(images, verbose=0)[:, :-1, :-1, :12].reshape(-1, 12)
    return outputs.T @ outputs / len(outputs)


def test_the_fitted_layer_decorrelates_patches_to_unit_variance():
    images = correlated_images()
    model = keras.Sequential([keras.Input((16, 16, 3)), PatchWhitening()])
    before = output_covariance(model, images)
    assert np.abs(before - np.eye(12)).max() > 0.5  # a random projection

    assert fit_patch_whitening(model, images) == 1
    after = output_covariance(model, images)
    np.testing.assert_allclose(np.diag(after), 1.0, atol=0.05)
    assert np.abs(after - np.diag(np.diag(after))).max() < 0.05


def test_the_kernel_holds_each_filter_and_its_negative():
    kernel = whitening_kernel(correlated_images(50))
    assert kernel.shape == (2, 2, 3, 24) and kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel[..., 12:], -kernel[..., :12])


def test_the_kernel_stays_frozen_when_the_backbone_unfreezes_and_trains():
    classifier = build_classifier(ModelConfig(backbone="compact_resnet_whitened", weights=None),
                                  num_classes=3, image_size=16)
    (layer,) = patch_whitening_layers(classifier)
    set_backbone_trainable(classifier, True, train_batchnorm=True)
    kernel, bias = layer.kernel.numpy().copy(), layer.bias.numpy().copy()
    assert all(weight is not layer.kernel for weight in classifier.trainable_weights)

    classifier.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    classifier.fit(rng.uniform(0, 255, (32, 16, 16, 3)), np.eye(3)[rng.integers(0, 3, 32)],
                   epochs=1, batch_size=16, verbose=0)
    np.testing.assert_array_equal(layer.kernel.numpy(), kernel)
    assert not np.array_equal(layer.bias.numpy(), bias)


def test_prepare_fits_the_stem_to_the_training_images_as_the_model_sees_them(tmp_path):
    recipe = apply_overrides(load_recipe("cifar10_fast"), [
        "model.backbone=compact_resnet_whitened", "data.image_size=16",
        f"export.base_dir={tmp_path}"])
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(
        recipe.train, precision="float32", time_budget=None))
    images = (np.clip(correlated_images(120) * 40 + 128, 0, 255)).astype("uint8")
    splits = splits_from_arrays(images, np.arange(120) % 3, ["a", "b", "c"], recipe.data)

    prepared = prepare(recipe, splits)

    # Whitened as the layer receives them: after the backbone's division by 255.
    (layer,) = patch_whitening_layers(prepared.classifier)
    backbone = prepared.classifier.get_layer("backbone")
    stem = keras.Model(backbone.inputs, layer.output)
    training = np.stack([image for image, _ in splits.train.as_numpy_iterator()])
    covariance = output_covariance(stem, training.astype("float32"))
    assert np.abs(covariance - np.diag(np.diag(covariance))).max() < 0.05
    # Unit variance along the strongest directions; the weakest are damped by the
    # epsilon added to their eigenvalues (5e-4, small against pixels in [0, 1]).
    assert 0.95 < covariance[0, 0] < 1.05 and np.diag(covariance).max() < 1.05


@pytest.mark.parametrize("backbone", ["compact_resnet", "resnet_v2_tiny"])
def test_a_backbone_without_the_stem_is_left_alone(backbone):
    classifier = build_classifier(ModelConfig(backbone=backbone, weights=None), 3, 16)
    assert patch_whitening_layers(classifier) == []
    assert fit_patch_whitening(classifier, np.zeros((4, 16, 16, 3), "float32")) == 0
