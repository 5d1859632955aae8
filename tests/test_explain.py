"""Grad-CAM on a tiny trained model, and loading a classifier back from an export."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from kcls.cli import main
from kcls.config import ModelConfig, Recipe, TrainConfig
from kcls.evaluation.explain import grad_cam
from kcls.load import load_classifier
from kcls.models.classifier import build_classifier
from kcls.serving.export import export_saved_model
from kcls.train.phases import fit_phases


def patch_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grey 32x32 images with a 10x10 patch at a random place: red for class 0, blue for 1.

    Returns images float32 `[N, 32, 32, 3]`, labels `[N]` and patch masks bool `[N, 32, 32]`.
    """
    rng = np.random.default_rng(seed)
    images = rng.uniform(100, 140, (count, 32, 32, 3)).astype(np.float32)
    labels = np.arange(count) % 2
    masks = np.zeros((count, 32, 32), dtype=bool)
    for image, label, mask in zip(images, labels, masks):
        top, left = rng.integers(0, 23, size=2)
        image[top:top + 10, left:left + 10] = (40.0, 40.0, 250.0) if label else (250.0, 40.0, 40.0)
        mask[top:top + 10, left:left + 10] = True
    return images, labels, masks


def save_patch_images(count: int, seed: int, folder, name: str):
    """`patch_images` saved as PNGs named `name.format(index)`: (images, paths)."""
    images, _, _ = patch_images(count, seed)
    paths = [folder / name.format(index) for index in range(count)]
    for path, image in zip(paths, images):
        Image.fromarray(image.astype(np.uint8)).save(path)
    return images, paths


@pytest.fixture(scope="module")
def trained_classifier():
    keras.utils.set_random_seed(0)
    classifier = build_classifier(ModelConfig(backbone="resnet_v2_tiny", dropout=0.0), 2, 32)
    images, labels, _ = patch_images(128, 0)
    batches = tf.data.Dataset.from_tensor_slices(
        (images, keras.utils.to_categorical(labels, 2))).shuffle(128, seed=0).batch(
        32, drop_remainder=True).repeat()
    fit_phases(classifier, batches, None, steps_per_epoch=20,
               config=TrainConfig(frozen_epochs=0, unfrozen_epochs=3, learning_rate=3e-3,
                                  train_batchnorm=False, jit_compile=False), verbose=0)
    return classifier


def test_grad_cam_heatmaps_have_the_image_size_and_look_at_the_patch(trained_classifier):
    images, labels, masks = patch_images(16, 1)
    heatmaps, classes = grad_cam(trained_classifier, tf.constant(images))
    assert heatmaps.shape == (16, 32, 32)
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    assert np.mean(classes == labels) >= 0.9, "the tiny model should have learned the task"
    assert all(heatmap.max() - heatmap.min() > 0.1 for heatmap in heatmaps)
    # The colour of the patch is the only evidence: the map must be hotter on it.
    inside = np.array([heatmap[mask].mean() for heatmap, mask in zip(heatmaps, masks)])
    outside = np.array([heatmap[~mask].mean() for heatmap, mask in zip(heatmaps, masks)])
    assert np.mean(inside > outside) >= 0.75


def test_an_export_loads_back_as_the_same_keras_classifier(trained_classifier, tmp_path):
    recipe = Recipe(name="patches", model=ModelConfig(backbone="resnet_v2_tiny", dropout=0.0))
    export_dir = export_saved_model(trained_classifier, recipe, ["left", "right"],
                                    base_dir=tmp_path)
    loaded = load_classifier(export_dir.parent)
    assert loaded.class_names == ["left", "right"] and loaded.recipe.name == "patches"
    images, _, _ = patch_images(4, 2)
    np.testing.assert_allclose(loaded.classifier(images, training=False).numpy(),
                               trained_classifier(images, training=False).numpy(), atol=1e-5)


def test_cli_explain_writes_overlays(trained_classifier, tmp_path):
    export_dir = export_saved_model(trained_classifier, Recipe(name="patches"),
                                    ["left", "right"], base_dir=tmp_path / "models")
    images, paths = save_patch_images(2, 3, tmp_path, "img {}.png")
    result = CliRunner().invoke(main, ["explain", str(export_dir), *map(str, paths),
                                       "--out", str(tmp_path / "cams")])
    assert result.exit_code == 0, result.output
    for index in range(2):
        with Image.open(tmp_path / "cams" / f"img {index}_gradcam.png") as overlay:
            # The image and its overlay side by side, enlarged 7x, under a caption.
            assert overlay.size == (2 * 224, 224 + 24) and overlay.mode == "RGB"
            pixels = np.asarray(overlay)
            enlarged = images[index].astype(np.uint8).repeat(7, 0).repeat(7, 1)
            np.testing.assert_array_equal(pixels[24:, :224], enlarged)
            assert pixels[:24].min() < 100  # the caption's text
    # Each line names the trained classifier's top class for that image and its probability.
    probabilities = tf.nn.softmax(trained_classifier(images.astype(np.uint8).astype(np.float32),
                                                     training=False)).numpy()
    lines = result.output.splitlines()
    assert len(lines) == 2
    for index, (line, row) in enumerate(zip(lines, probabilities)):
        image, target, label, probability = re.fullmatch(
            r"(.*) -> (.*): (\w+) \(([\d.]+)\)", line).groups()
        assert image == str(paths[index])
        assert target == str(tmp_path / "cams" / f"img {index}_gradcam.png")
        assert label == ["left", "right"][row.argmax()]
        assert float(probability) == pytest.approx(row.max(), abs=1e-3)

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    result = CliRunner().invoke(main, ["explain", str(export_dir), str(bad)])
    assert result.exit_code == 1 and "bad.png: not a decodable" in result.output


def test_images_with_the_same_name_get_their_own_overlays_and_none_is_overwritten(
        trained_classifier, tmp_path):
    from kcls.evaluation.explain import explain_files

    recipe = Recipe(name="patches", model=ModelConfig(backbone="resnet_v2_tiny", dropout=0.0))
    loaded = load_classifier(export_saved_model(trained_classifier, recipe, ["left", "right"],
                                                base_dir=tmp_path / "models"))
    images, _, _ = patch_images(2, 5)
    paths = [tmp_path / folder / "photo.png" for folder in ("first", "second")]
    for path, image in zip(paths, images):
        path.parent.mkdir()
        Image.fromarray(image.astype(np.uint8)).save(path)
    out_dir = tmp_path / "cams"
    written = [target for target, _, _ in explain_files(loaded, paths, out_dir)]
    assert [target.name for target in written] == ["photo_gradcam.png", "photo_gradcam-2.png"]
    contents = [target.read_bytes() for target in written]
    assert contents[0] != contents[1]  # two images, two overlays

    again = [target for target, _, _ in explain_files(loaded, paths[::-1], out_dir)]
    assert [target.name for target in again] == ["photo_gradcam-3.png", "photo_gradcam-4.png"]
    assert [target.read_bytes() for target in written] == contents  # untouched

    replaced = [target for target, _, _ in explain_files(loaded, paths[::-1], out_dir,
                                                         overwrite=True)]
    assert replaced == written
    assert [target.read_bytes() for target in replaced] == contents[::-1]


def test_predict_and_explain_print_the_same_calibrated_probability(trained_classifier,
                                                                    tmp_path):
    """Issue 29, defect 4: explain read softmax(logits), predict softmax(logits / T)."""
    from kcls.tasks import SingleLabelTask

    recipe = Recipe(name="patches", model=ModelConfig(backbone="resnet_v2_tiny", dropout=0.0))
    export_dir = export_saved_model(trained_classifier, recipe, ["left", "right"],
                                    base_dir=tmp_path / "models",
                                    task=SingleLabelTask(temperature=3.0))
    images, paths = save_patch_images(3, 7, tmp_path, "{}.png")
    predicted = CliRunner().invoke(main, ["predict", str(export_dir), *map(str, paths),
                                          "--top-k", "1"])
    explained = CliRunner().invoke(main, ["explain", str(export_dir), *map(str, paths),
                                          "--out", str(tmp_path / "cams")])
    assert predicted.exit_code == 0 and explained.exit_code == 0, (predicted.output,
                                                                    explained.output)
    served = [re.search(r": (\w+) \(([\d.]+)\)$", line).groups()
              for line in predicted.output.splitlines() if ".png: " in line]  # not the summary
    drawn = [re.search(r": (\w+) \(([\d.]+)\)$", line).groups()
             for line in explained.output.splitlines()]
    assert served == drawn and len(served) == 3
    uncalibrated = tf.nn.softmax(trained_classifier(images.astype(np.uint8).astype(np.float32),
                                                    training=False)).numpy().max(axis=1)
    # T = 3 pulls the probabilities towards 1/2: the test would see an unscaled softmax.
    assert all(float(probability) < top - 0.01
               for (_, probability), top in zip(served, uncalibrated))
