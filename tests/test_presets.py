"""Preset backbones offline: KerasHub (`keras_hub:PATH`) and KerasCV (`keras_cv:PATH`, and
`model.weights=DIR` for cifar10_effnet's ImageNet preset), through preset folders the
tests write themselves (a tiny backbone from a config, `save_to_preset`) and load through
kcls by path: the code path a hub name takes once the preset is downloaded."""

from __future__ import annotations

import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from kcls.config import ConfigError, ModelConfig, TrainConfig, apply_overrides
from kcls.models.backbones import backbone_blocks, build_backbone
from kcls.models.classifier import BACKBONE_LAYER, build_classifier
from kcls.recipes import load_recipe
from kcls.train.layerwise import layer_decay_multipliers
from kcls.train.schedule import describe_normalization, make_optimizer, set_backbone_trainable

keras_hub = pytest.importorskip("keras_hub", reason='KerasHub is the extra kcls[hub]')

# ImageNet's mean and standard deviation, as KerasHub's ViT and DINOv2 converters use them.
SCALE = [1 / (255 * 0.229), 1 / (255 * 0.224), 1 / (255 * 0.225)]
OFFSET = [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]


@pytest.fixture(scope="module")
def presets(tmp_path_factory) -> dict[str, Path]:
    """Tiny preset folders: a ViT and a DINOv2 (patch 8 at 32 px, 3 and 2 blocks) and a
    ResNet with ImageNet-normalising image converters, a ResNet without one, a BERT."""
    root = tmp_path_factory.mktemp("presets")
    keras.utils.set_random_seed(0)
    backbones = {
        "vit": (keras_hub.models.ViTBackbone(
            image_shape=(32, 32, 3), patch_size=8, num_layers=3, num_heads=2, hidden_dim=16,
            mlp_dim=32), keras_hub.layers.ViTImageConverter),
        "dinov2": (keras_hub.models.DINOV2Backbone(
            patch_size=8, num_layers=2, hidden_dim=16, num_heads=2, intermediate_dim=32,
            num_register_tokens=2, image_shape=(32, 32, 3),
            position_embedding_shape=(32, 32, 3)), keras_hub.layers.DINOV2ImageConverter),
        "resnet": (keras_hub.models.ResNetBackbone(
            input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 16],
            stackwise_num_blocks=[2, 2], stackwise_num_strides=[1, 2],
            block_type="basic_block"), keras_hub.layers.ResNetImageConverter),
        "resnet_without_converter": (keras_hub.models.ResNetBackbone(
            input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64],
            stackwise_num_blocks=[1], stackwise_num_strides=[1], block_type="basic_block"), None),
        "bert": (keras_hub.models.BertBackbone(
            vocabulary_size=10, num_layers=1, num_heads=1, hidden_dim=4, intermediate_dim=4),
            None),
    }
    folders = {}
    for name, (backbone, converter) in backbones.items():
        folders[name] = root / name
        backbone.save_to_preset(str(folders[name]))
        if converter is not None:
            converter(image_size=(32, 32), scale=SCALE, offset=OFFSET).save_to_preset(
                str(folders[name]))
    keras.backend.clear_session()
    return folders


def hub(folder: Path) -> str:
    return f"keras_hub:{folder}"


def test_the_image_converter_is_folded_into_the_backbone(presets):
    backbone = build_backbone(hub(presets["vit"]), 32, "imagenet")
    original = keras_hub.models.Backbone.from_preset(str(presets["vit"]))
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    # [0, 255] in: the converter's per-channel scale and offset, then the ViT, whose 16
    # patch tokens (after the class token) come out as a 4x4 feature map.
    tokens = original(images * np.float32(SCALE) + np.float32(OFFSET))
    expected = np.asarray(tokens)[:, 1:, :].reshape(2, 4, 4, 16)
    np.testing.assert_allclose(np.asarray(backbone(images)), expected, atol=1e-5)

    # model.weights=none: the preset's architecture, randomly initialised.
    random = build_backbone(hub(presets["vit"]), 32, None)
    assert random.count_params() == original.count_params()
    assert not np.allclose(np.asarray(random(images)), expected, atol=1e-3)
    # Convolutional backbones run at any size (the converter's 32 px is where it trained).
    resnet = build_backbone(hub(presets["resnet"]), 48, "imagenet")
    assert resnet.output.shape == (None, 6, 6, 16)


@pytest.mark.parametrize("name, blocks", [("vit", 4), ("dinov2", 3), ("resnet", 5)])
def test_blocks_are_found_and_cover_every_weight_once(presets, name, blocks):
    classifier = build_classifier(ModelConfig(backbone=hub(presets[name]), weights="imagenet"),
                                  3, 32)
    backbone = classifier.get_layer(BACKBONE_LAYER)
    found = backbone_blocks(backbone)
    # The stem (embedding), one block per encoder block (per residual block for ResNet),
    # the final norm with the last block.
    assert len(found) == blocks
    in_blocks = [id(variable) for block in found for layer in block for variable in layer.weights]
    assert sorted(in_blocks) == sorted(id(variable) for variable in backbone.weights)

    multipliers = layer_decay_multipliers(classifier, 0.5)
    assert set(multipliers) == {variable.path for variable in backbone.weights}
    assert sorted(set(multipliers.values()))[0] == 0.5 ** blocks

    if name == "resnet":  # BatchNorm stays in inference mode on pretrained weights
        assert describe_normalization(classifier, False) == (
            "10 BatchNormalization layers in inference mode")
    set_backbone_trainable(classifier, True, unfreeze="1")
    last = {id(variable) for layer in found[-1] for variable in layer.trainable_weights}
    trained = {id(variable) for variable in backbone.trainable_weights}
    assert trained == last and trained


def test_layer_norm_trains_and_tokens_embeddings_and_norms_are_not_decayed(presets):
    classifier = build_classifier(ModelConfig(backbone=hub(presets["dinov2"]),
                                              weights="imagenet"), 3, 32)
    set_backbone_trainable(classifier, True, train_batchnorm=False)
    norms = [layer for layer in classifier._flatten_layers()
             if isinstance(layer, keras.layers.LayerNormalization)]
    assert len(norms) == 5 and all(layer.trainable for layer in norms)
    assert describe_normalization(classifier, False) == (
        "5 LayerNormalization layers train with their blocks; no BatchNormalization")
    # One AdamW step with zero gradients moves a variable only by its weight decay.
    optimizer = make_optimizer(0.1, TrainConfig(weight_decay=0.5))
    variables = classifier.trainable_variables
    before = [variable.numpy().copy() for variable in variables]
    optimizer.apply_gradients([(tf.zeros_like(variable), variable) for variable in variables])
    decayed = {variable.name for variable, value in zip(variables, before)
               if not np.allclose(variable.numpy(), value)}
    assert decayed == {"kernel"}  # not bias, gamma, beta, cls_token, register_tokens,
    # mask_token, interpolated_position_embeddings (position) nor lambda1 (layer scale)


def xla_trainer(folder: Path):
    from kcls.data.augment import build_augmentation
    from kcls.train.trainer import Trainer

    classifier = build_classifier(ModelConfig(backbone=hub(folder), weights="imagenet"), 3, 32)
    trainer = Trainer(classifier, build_augmentation("light"))
    trainer.compile(optimizer="adam", loss="categorical_crossentropy", jit_compile=True)
    return trainer


def test_a_keras_hub_backbone_keeps_xla(presets):
    # Keras turns jit_compile off, silently, for a model with a layer that does not
    # support XLA: the converter's scale and offset are a Rescaling layer, not KerasHub's
    # preprocessing layer, and the ViT and its patch grid compile.
    assert xla_trainer(presets["vit"]).jit_compile is True


@pytest.mark.slow
def test_a_keras_hub_training_step_runs_under_xla(presets):
    trainer = xla_trainer(presets["vit"])
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    history = trainer.fit(images, np.eye(3, dtype="float32")[[0, 1, 2, 0]], epochs=1, verbose=0)
    assert trainer.jit_compile is True and np.isfinite(history.history["loss"][0])


def test_unusable_presets_are_one_line_errors_with_the_fix(presets, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="takes 32x32 images only .* data.image_size=32"):
        build_backbone(hub(presets["vit"]), 48, "imagenet")
    with pytest.raises(ConfigError, match="has no image converter .*save_to_preset"):
        build_backbone(hub(presets["resnet_without_converter"]), 32, "imagenet")
    with pytest.raises(ConfigError, match=r"\(BertBackbone\) is not an image backbone"):
        build_backbone(hub(presets["bert"]), 32, "imagenet")
    with pytest.raises(ConfigError, match="Could not fetch backbone keras_hub:resnet_50_imagenet "
                                          ".*model hub: ConnectionError.*keras_hub:DIR"):
        build_backbone("keras_hub:resnet_50_imagenet", 32, "imagenet")  # offline
    with pytest.raises(ConfigError, match="KerasHub cannot load .*no_such_preset.*Unknown preset "
                                          "identifier. Check the preset's name"):
        build_backbone("keras_hub:no_such_preset", 32, "imagenet")
    with pytest.raises(ConfigError, match="names no preset"):
        build_backbone("keras_hub:", 32)
    with pytest.raises(ConfigError, match="does not exist"):
        build_backbone(hub(presets["resnet"]), 32, str(tmp_path / "missing.weights.h5"))
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r'needs KerasHub, .*pip install "kcls\[hub\]"'):
        build_backbone(hub(presets["resnet"]), 32, "imagenet")


def test_tf_mot_refuses_preset_backbones_in_one_line(presets, tmp_path):
    from kcls.optimize.convert import OptimizeError
    from kcls.optimize.mot import fine_tune_with_mot

    recipe = apply_overrides(load_recipe("quickstart"),
                             [f"model.backbone={hub(presets['resnet'])}"])
    with pytest.raises(OptimizeError, match="no build for; use a post-training method .*ptq-int8"):
        fine_tune_with_mot(None, recipe, 10, "prune", tmp_path)


@pytest.mark.slow
def test_a_keras_hub_vit_trains_exports_explains_and_converts(presets, tmp_path):
    """quickstart with a KerasHub ViT: both phases, the export (raw image bytes in), the
    export reloaded by `kcls.load`, Grad-CAM on its patch grid, float32 TFLite, lr-find."""
    from kcls.data.pipeline import prepare_image
    from kcls.evaluation.explain import grad_cam
    from kcls.load import load_classifier
    from kcls.optimize.convert import convert, write_probability_saved_model
    from kcls.optimize.interpreter import TFLiteClassifier
    from kcls.workflows.lr_find import find_recipe_learning_rate
    from kcls.workflows.run import run_recipe

    recipe = apply_overrides(load_recipe("quickstart"), [
        f"model.backbone={hub(presets['vit'])}", "model.weights=imagenet",
        "train.frozen_epochs=1", "train.unfrozen_epochs=1", "train.steps_per_epoch=2",
        "data.batch_size=16", f"export.base_dir={tmp_path / 'saved_models'}"])
    result = run_recipe(recipe, run_dir=tmp_path / "run", verbose=0, log=lambda line: None)
    images = tf.io.decode_png(tf.io.read_file(str(sorted(
        (tmp_path / "run" / "samples").glob("*.png"))[0])), channels=3)
    prepared = prepare_image(images, 32)[None]
    # What the export serves: the task's probabilities (softmax at the fitted temperature).
    expected = result.task.probabilities(np.asarray(result.classifier(prepared, training=False)))

    served = tf.saved_model.load(str(result.export_dir)).signatures["serving_default"](
        image_bytes=tf.constant([tf.io.encode_png(images).numpy()]))
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-4)
    loaded = load_classifier(result.export_dir)
    np.testing.assert_allclose(
        loaded.task.probabilities(np.asarray(loaded.classifier(prepared, training=False))),
        expected, atol=1e-5)

    heatmaps, classes = grad_cam(loaded.classifier, prepared)
    assert heatmaps.shape == (1, 32, 32) and classes[0] == expected.argmax()
    tflite = TFLiteClassifier.from_bytes(convert(write_probability_saved_model(
        loaded.classifier, 32, tmp_path / "probability_model", loaded.task)))
    np.testing.assert_allclose(tflite.predict(prepared.numpy()), expected, atol=1e-4)

    search = find_recipe_learning_rate(recipe, "unfrozen", tmp_path / "lr_find", steps=6,
                                       log=lambda line: None)
    assert search.suggestion > 0 and len(search.losses) <= 6
