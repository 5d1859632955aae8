"""Backbone registry: offline builds match KerasCV presets; blocks; local weights; errors."""

import dataclasses
import math

import keras
import keras_cv
import numpy as np
import pytest

from kcls.config import ConfigError
from kcls.models.backbones import BACKBONES, backbone_blocks, build_backbone

WITH_PRESET = [name for name, spec in BACKBONES.items() if spec.preset]


def expected_block_count(name: str) -> int:
    """The stem plus one block per repeated unit the architecture arguments declare."""
    arguments = BACKBONES[name].arguments
    if "stackwise_num_repeats" in arguments:  # EfficientNetV2 rounds repeats up
        depth = arguments["depth_coefficient"]
        return 1 + sum(math.ceil(depth * repeats)
                       for repeats in arguments["stackwise_num_repeats"])
    if "stackwise_blocks" in arguments:  # ResNetV2
        return 1 + sum(arguments["stackwise_blocks"])
    return 1 + len(arguments["stackwise_filters"])  # MobileNetV3


def test_registry_covers_the_promised_families():
    assert {"efficientnetv2_b0", "efficientnetv2_b1", "efficientnetv2_b2", "efficientnetv2_b3",
            "efficientnetv2_s", "resnet50_v2", "mobilenet_v3_small",
            "mobilenet_v3_large", "efficientnet_lite0", "efficientnet_lite1",
            "efficientnet_lite2"} <= set(BACKBONES)
    for spec in BACKBONES.values():
        if spec.weights_preset:
            assert spec.weights_preset in spec.constructor.presets_with_weights


@pytest.mark.parametrize("name", WITH_PRESET)
def test_offline_build_matches_the_preset_metadata(name):
    spec = BACKBONES[name]
    keras.backend.clear_session()
    # Parameter counts do not depend on the input size; 32 px keeps the builds fast.
    backbone = build_backbone(name, image_size=32)
    expected = spec.constructor.presets[spec.preset]["metadata"]["params"]
    if spec.constructor is keras_cv.models.MobileNetV3Backbone:
        # The shipped MobileNetV3 metadata predates KerasCV rounding squeeze-and-excite
        # bottlenecks up to multiples of 8 (filters // 4 before); the preset weights load
        # into the current code, so the counts differ by exactly that rounding.
        expected += sum(
            (layer.bottleneck_filters - layer.filters // 4) * (2 * layer.filters + 1)
            for layer in backbone.layers
            if isinstance(layer, keras_cv.layers.SqueezeAndExcite2D))
    assert backbone.count_params() == expected

    blocks = backbone_blocks(backbone)
    assert len(blocks) == expected_block_count(name)
    assert [layer for block in blocks for layer in block] == backbone.layers
    rescale = backbone.layers[1]
    assert isinstance(rescale, keras.layers.Rescaling)
    np.testing.assert_allclose(rescale(np.array([0.0, 255.0])), spec.input_range, rtol=1e-6)


def test_blocks_of_the_tiny_resnet_follow_its_residual_blocks():
    blocks = backbone_blocks(build_backbone("resnet_v2_tiny", image_size=32))
    assert len(blocks) == expected_block_count("resnet_v2_tiny") == 7
    assert blocks[0][-1].name == "pool1_pool"  # the stem
    assert {layer.name.split("_")[3] for layer in blocks[1]} == {"block1"}
    assert [layer.name for layer in blocks[-1]][-2:] == ["post_bn", "post_relu"]


def test_local_weights_file_is_loaded(tmp_path):
    source = build_backbone("resnet_v2_tiny", image_size=32)
    for variable in source.weights:
        variable.assign(np.random.default_rng(0).normal(size=variable.shape))
    path = tmp_path / "tiny.weights.h5"
    source.save_weights(path)
    loaded = build_backbone("resnet_v2_tiny", image_size=32, weights=str(path))
    for expected, actual in zip(source.weights, loaded.weights):
        np.testing.assert_array_equal(expected.numpy(), actual.numpy())


@pytest.mark.filterwarnings("ignore:Skipping nested container")
def test_weights_of_another_backbone_are_a_clear_error(tmp_path):
    path = tmp_path / "tiny.weights.h5"
    build_backbone("resnet_v2_tiny", image_size=32).save_weights(path)
    with pytest.raises(ConfigError, match="does not fit backbone 'mobilenet_v3_small'"):
        build_backbone("mobilenet_v3_small", image_size=32, weights=str(path))


@pytest.mark.parametrize("name", ["resnet_v2_tiny", "efficientnetv2_b3"])
def test_imagenet_weights_without_a_preset_are_a_clear_error(name):
    with pytest.raises(ConfigError, match="has no ImageNet preset"):
        build_backbone(name, image_size=32, weights="imagenet")


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_backbone("resnet_v2_tiny", 32, weights=str(tmp_path / "nope.weights.h5"))


def test_compact_resnet_stages_and_an_xla_training_step():
    from kcls.config import ModelConfig
    from kcls.data.augment import build_augmentation
    from kcls.models.classifier import build_classifier
    from kcls.train.trainer import Trainer

    backbone = build_backbone("compact_resnet", image_size=32)
    assert backbone.output.shape == (None, 4, 4, 128)
    assert 400_000 < backbone.count_params() < 420_000
    blocks = backbone_blocks(backbone)
    assert [block[0].name for block in blocks] == [
        backbone.layers[0].name, "stage1_in_conv", "stage2_in_conv", "stage3_in_conv"]
    assert [layer for block in blocks for layer in block] == backbone.layers

    # cifar10_fast's step compiles with XLA, its flips and shifts running before it.
    classifier = build_classifier(ModelConfig(backbone="compact_resnet"), 10, 32)
    trainer = Trainer(classifier, build_augmentation("light"))
    trainer.compile(optimizer="sgd", loss="categorical_crossentropy", jit_compile=True)
    assert trainer.jit_compile is True


def save_keras_cv_preset(backbone: keras.Model, folder) -> None:
    # KerasCV 0.9 has no public saver (KerasHub's backbones have `save_to_preset`); this
    # writes what its hub presets hold: config.json, model.weights.h5, metadata.json.
    from keras_cv.src.utils.preset_utils import save_to_preset

    save_to_preset(backbone, str(folder))


def test_a_keras_cv_preset_folder_loads_through_kcls(tmp_path):
    source = build_backbone("resnet_v2_tiny", image_size=32)
    for variable in source.weights:
        variable.assign(np.random.default_rng(0).normal(size=variable.shape))
    save_keras_cv_preset(source, tmp_path / "tiny")
    loaded = build_backbone(f"keras_cv:{tmp_path / 'tiny'}", 32, "imagenet")
    for expected, actual in zip(source.weights, loaded.weights):
        np.testing.assert_array_equal(expected.numpy(), actual.numpy())
    images = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded(images), source(images), atol=1e-5)  # [0, 255] in
    assert len(backbone_blocks(loaded)) == 7  # the wrapped ResNetV2's, as for resnet_v2_tiny
    random = build_backbone(f"keras_cv:{tmp_path / 'tiny'}", 48, None)
    assert random.input_shape == (None, 48, 48, 3)
    assert not np.allclose(random.weights[0].numpy(), source.weights[0].numpy())
    with pytest.raises(ConfigError, match="not a usable KerasCV preset folder"):
        build_backbone(f"keras_cv:{tmp_path}", 32, "imagenet")


@pytest.mark.slow
def test_cifar10_effnet_loads_its_imagenet_preset_from_a_local_folder(tmp_path):
    """cifar10_effnet's weight loading (`from_preset`) offline: the preset folder a machine
    with internet downloaded, here written from the same architecture."""
    from kcls.models.classifier import BACKBONE_LAYER, build_classifier
    from kcls.recipes import load_recipe

    model = load_recipe("cifar10_effnet").model
    source = build_backbone(model.backbone, image_size=32)
    for variable in source.weights[:8]:
        variable.assign(np.random.default_rng(0).normal(size=variable.shape))
    save_keras_cv_preset(source, tmp_path / "efficientnetv2_b0_imagenet")
    classifier = build_classifier(dataclasses.replace(
        model, weights=str(tmp_path / "efficientnetv2_b0_imagenet")), 10, 64)
    backbone = classifier.get_layer(BACKBONE_LAYER)
    assert backbone.input_shape == (None, 64, 64, 3)
    for expected, actual in zip(source.weights, backbone.weights):
        np.testing.assert_array_equal(expected.numpy(), actual.numpy())
    # A preset of another architecture is refused, naming what differs.
    save_keras_cv_preset(build_backbone("efficientnetv2_b1", 32), tmp_path / "b1")
    with pytest.raises(ConfigError, match="another architecture than backbone "
                                          "'efficientnetv2_b0' .*depth_coefficient"):
        build_backbone("efficientnetv2_b0", 32, str(tmp_path / "b1"))
