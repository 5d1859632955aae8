"""Self-supervised pretraining (`kcls pretrain`): the loss, the views, the run, its weights."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from kcls.cli import main
from kcls.config import (
    ConfigError,
    ModelConfig,
    PretrainConfig,
    apply_pretrain_overrides,
)
from kcls.data.folder import scan_images
from kcls.layout import (
    BACKBONE_WEIGHTS_FILE,
    PRETRAIN_CONFIG_FILE,
    PRETRAIN_CURVES_PLOT,
    RUN_INFO_FILE,
)
from kcls.models.backbones import build_backbone
from kcls.models.classifier import BACKBONE_LAYER, build_classifier
from kcls.ssl.augment import ContrastiveAugment
from kcls.ssl.simclr import knn_accuracy, nt_xent_loss
from kcls.workflows.pretrain import PretrainResult, pretrain


def hand_nt_xent(first: np.ndarray, second: np.ndarray, temperature: float) -> float:
    """NT-Xent written out term by term, as in the SimCLR paper (Algorithm 1)."""
    views = np.concatenate([first, second])
    views = views / np.linalg.norm(views, axis=1, keepdims=True)
    count, batch = len(views), len(first)
    total = 0.0
    for i in range(count):
        partner = (i + batch) % count
        similarity = [float(views[i] @ views[k]) / temperature for k in range(count)]
        denominator = sum(math.exp(similarity[k]) for k in range(count) if k != i)
        total += -math.log(math.exp(similarity[partner]) / denominator)
    return total / count


def test_nt_xent_matches_a_hand_computed_loss():
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    for temperature in (0.5, 0.1):
        loss = nt_xent_loss(tf.constant(first, tf.float32), tf.constant(second, tf.float32),
                            temperature)
        assert float(loss) == pytest.approx(hand_nt_xent(first, second, temperature), rel=1e-5)


def test_nt_xent_is_low_when_partners_agree_and_others_differ():
    basis = np.eye(4, dtype=np.float32)
    aligned = float(nt_xent_loss(tf.constant(basis), tf.constant(basis), 0.1))
    shuffled = float(nt_xent_loss(tf.constant(basis), tf.constant(basis[::-1]), 0.1))
    assert aligned < 0.01 < shuffled


def test_views_differ_keep_range_and_shape_and_compile_with_xla():
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (6, 16, 16, 3)), tf.float32)
    layer = ContrastiveAugment(seed=1)
    first, second = layer(images, training=True), layer(images, training=True)
    assert first.shape == images.shape
    assert 0.0 <= float(tf.reduce_min(first)) and float(tf.reduce_max(first)) <= 255.0
    assert not np.allclose(first, second)
    assert np.array_equal(layer(images, training=False), images)
    compiled = tf.function(lambda batch: layer(batch, training=True), jit_compile=True)
    assert compiled(images).shape == images.shape


def test_greyscale_views_have_equal_channels_and_a_full_crop_is_the_image():
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (4, 8, 8, 3)), tf.float32)
    grey = ContrastiveAugment(crop_scale=1.0, color_jitter=0.0, grayscale=1.0,
                              horizontal_flip=False, seed=0)(images, training=True).numpy()
    assert np.allclose(grey[..., 0], grey[..., 1], atol=1e-3)
    # Area 1 and aspect ratio != 1 still crops; aspect ratio is drawn per image, so
    # compare the luma of images whose box covered everything: ratio draws near 1.
    plain = ContrastiveAugment(crop_scale=1.0, color_jitter=0.0, grayscale=0.0,
                               horizontal_flip=False, seed=0)
    plain._uniform = lambda shape, low=0.0, high=1.0: tf.fill(shape, (low + high) / 2)
    assert np.allclose(plain(images, training=True), images, atol=1e-3)


def test_knn_accuracy_of_separated_clusters_and_a_wrong_vote():
    memory = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = np.array([0, 0, 1, 1])
    queries = np.array([[1.0, 0.05], [0.05, 1.0]])
    assert knn_accuracy(memory, labels, queries, np.array([0, 1]), neighbors=2) == 1.0
    assert knn_accuracy(memory, labels, queries, np.array([1, 1]), neighbors=2) == 0.5


def write_images(root: Path, count: int, size: int = 20, seed: int = 0) -> None:
    """Coloured squares on noise, in two sub-folders and one nested deeper."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        top, left = rng.integers(0, size // 2, 2)
        image[top:top + size // 2, left:left + size // 2] = rng.integers(0, 255, 3)
        folder = root / ("a" if index % 2 else "b/deeper")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index}.png")


def tiny_config(root: Path, **overrides) -> PretrainConfig:
    return PretrainConfig(**{**dict(source=f"folder:{root}", image_size=16, batch_size=8,
                                    epochs=4, learning_rate=3e-3, warmup_fraction=0.0,
                                    projection_hidden=32, projection_dim=16), **overrides})


def test_scan_images_searches_sub_folders_and_skips_hidden_and_broken_files(tmp_path):
    write_images(tmp_path / "images", 6)
    (tmp_path / "images" / ".hidden").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / ".hidden" / "x.png")
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    files = scan_images(tmp_path / "images")
    assert len(files.paths) == 6 and not any(".hidden" in path for path in files.paths)
    assert [Path(path).name for path in files.skipped] == ["broken.jpg"]


PRETRAIN_EPOCHS = 6


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[PretrainConfig, Path, PretrainResult]:
    """One run shared by the tests that only read it: 32 images, 6 epochs, kNN accuracy
    on a labelled folder of two classes. Returns its config, run directory and result."""
    root = tmp_path_factory.mktemp("pretrain")
    write_images(root / "images", 32)
    write_images(root / "labelled" / "one", 10, seed=1)
    write_images(root / "labelled" / "two", 10, seed=2)
    config = tiny_config(root / "images", epochs=PRETRAIN_EPOCHS,
                         knn_source=f"folder:{root / 'labelled'}")
    result = pretrain(config, root / "run", log=lambda line: None, verbose=0)
    return config, root / "run", result


@pytest.mark.slow
def test_short_pretraining_lowers_the_loss_and_writes_weights_that_build_backbone_loads(
        pretrained):
    _, run_dir, result = pretrained
    losses = result.history["loss"]
    assert len(losses) == PRETRAIN_EPOCHS and losses[-1] < losses[0]
    assert result.weights_path == run_dir / BACKBONE_WEIGHTS_FILE
    assert (run_dir / PRETRAIN_CURVES_PLOT).is_file()
    info = json.loads((run_dir / RUN_INFO_FILE).read_text())
    assert info["history"]["loss"] == losses and info["images"] == 32
    assert [path.name for path in run_dir.iterdir() if path.name.startswith(".")] == []

    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)), tf.float32)
    loaded = build_backbone("resnet_v2_tiny", 16, weights=str(result.weights_path))
    assert np.allclose(loaded(images), result.model.backbone(images), atol=1e-5)
    # The fine-tune builds its classifier the same way, from model.weights=PATH.
    classifier = build_classifier(ModelConfig(weights=str(result.weights_path)), 3, 16)
    assert np.allclose(classifier.get_layer(BACKBONE_LAYER)(images),
                       result.model.backbone(images), atol=1e-5)
    random_init = build_backbone("resnet_v2_tiny", 16)
    assert not np.allclose(random_init(images), loaded(images), atol=1e-3)


@pytest.mark.slow
def test_knn_accuracy_is_reported_each_epoch_with_a_labelled_folder(pretrained):
    _, _, result = pretrained
    assert len(result.history["knn_accuracy"]) == PRETRAIN_EPOCHS
    assert all(0.0 <= value <= 1.0 for value in result.history["knn_accuracy"])


@pytest.mark.slow
def test_a_time_budget_plans_the_epochs(tmp_path):
    write_images(tmp_path / "images", 16)
    result = pretrain(tiny_config(tmp_path / "images", time_budget="4s"), tmp_path / "run",
                      log=lambda line: None, verbose=0)
    info = json.loads((tmp_path / "run" / RUN_INFO_FILE).read_text())
    assert info["time_budget"]["phases"][0]["actual_epochs"] == len(result.history["loss"])


@pytest.mark.parametrize("problem", ["empty folder", "unknown backbone", "missing folder"])
def test_bad_input_fails_clearly_before_any_training(tmp_path, problem):
    (tmp_path / "empty" / "class").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    write_images(tmp_path / "images", 4)
    config = {"empty folder": tiny_config(tmp_path / "empty"),
              "unknown backbone": tiny_config(tmp_path / "images", backbone="resnet9000"),
              "missing folder": tiny_config(tmp_path / "nowhere")}[problem]
    with pytest.raises(ConfigError, match="no readable image|Unknown backbone|does not exist"):
        pretrain(config, tmp_path / "run", log=lambda line: None, verbose=0)
    assert not (tmp_path / "run").exists()


def test_cli_reports_bad_input_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["pretrain", str(tmp_path / "empty"),
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "no readable image" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
    result = CliRunner().invoke(main, ["pretrain", str(tmp_path), "--set", "pretrain.epoch=3"])
    assert result.exit_code == 2
    assert "pretrain.epoch=3" in result.output and "epochs" in result.output


def test_config_checks_values_and_override_types():
    config = apply_pretrain_overrides(PretrainConfig(source="folder:x"),
                                      ["pretrain.epochs=3", "pretrain.knn_source=none",
                                       "pretrain.temperature=0.5"])
    assert (config.epochs, config.knn_source, config.temperature) == (3, None, 0.5)
    for override in ("pretrain.batch_size=1", "pretrain.crop_scale=0",
                     "pretrain.time_budget=soon", "pretrain.source=photos",
                     "pretrain.epochs=many", "train.epochs=3"):
        with pytest.raises(ConfigError):
            apply_pretrain_overrides(config, [override])


@pytest.fixture(scope="module")
def cli_pretrained(tmp_path_factory) -> tuple[Path, Path, str]:
    """`kcls pretrain` as the README runs it, 1 epoch on a labelled folder of 24 images.
    Returns the folder, the run directory and the command's output."""
    root = tmp_path_factory.mktemp("cli_pretrain")
    labelled = root / "labelled"
    write_images(labelled / "one", 12, seed=1)
    write_images(labelled / "two", 12, seed=2)
    result = CliRunner().invoke(main, [
        "pretrain", str(labelled), "--backbone", "resnet_v2_tiny", "--out", str(root / "ssl"),
        "--set", "pretrain.epochs=1", "--set", "pretrain.batch_size=8"])
    assert result.exit_code == 0, result.output
    return labelled, root / "ssl", result.output


@pytest.mark.slow
def test_the_same_seed_gives_the_same_first_loss(tmp_path, cli_pretrained):
    # The config the command recorded, run again in the same process, as a user's rerun.
    _, run_dir, _ = cli_pretrained
    config = PretrainConfig(**json.loads((run_dir / PRETRAIN_CONFIG_FILE).read_text()))
    first = json.loads((run_dir / RUN_INFO_FILE).read_text())["history"]["loss"][0]
    again = pretrain(config, tmp_path / "run", log=lambda line: None, verbose=0)
    assert again.history["loss"][0] == pytest.approx(first, rel=1e-4)


@pytest.mark.slow
def test_the_readme_flow_pretrain_then_fine_tune_from_the_weights(tmp_path, tiny_recipe,
                                                                    cli_pretrained):
    from kcls.config import apply_overrides
    from kcls.workflows.run import run_recipe

    labelled, run_dir, output = cli_pretrained
    weights = run_dir / BACKBONE_WEIGHTS_FILE
    assert f"backbone weights {weights}" in output
    # The frozen phase alone: the fine-tuned classifier's backbone is the pretrained one.
    recipe = apply_overrides(tiny_recipe, [
        f"data.source=folder:{labelled}", f"model.weights={weights}", "train.unfrozen_epochs=0",
        "export.enabled=false", "data.validation_fraction=0"])
    run = run_recipe(recipe, tmp_path / "run", log=lambda line: None, verbose=0)
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)), tf.float32)
    pretrained = build_backbone("resnet_v2_tiny", 32, weights=str(weights))
    assert np.allclose(run.classifier.get_layer(BACKBONE_LAYER)(images), pretrained(images),
                       atol=1e-4)
