"""Test-time augmentation views: the mirror and one-pixel shifts, scored and recorded."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.special import softmax

from kcls.config import ConfigError, EvaluateConfig, ExportConfig
from kcls.data.tta import tta_views, view_count
from kcls.evaluation.evaluate import evaluate_classifier
from kcls.tasks import SingleLabelTask


def test_the_views_are_the_mirror_and_the_two_shifts_of_the_image_and_its_mirror():
    images = np.arange(2 * 5 * 5 * 3, dtype=np.float32).reshape(2, 5, 5, 3)
    mirror, up_left, up_left_mirror, down_right, down_right_mirror = (
        view.numpy() for view in tta_views(images, shifts=True))
    np.testing.assert_array_equal(mirror, images[:, :, ::-1])
    np.testing.assert_array_equal(up_left[:, :-1, :-1], images[:, 1:, 1:])
    np.testing.assert_array_equal(down_right[:, 1:, 1:], images[:, :-1, :-1])
    np.testing.assert_array_equal(down_right[:, 0, 1:], images[:, 1, :-1])  # reflected
    np.testing.assert_array_equal(up_left_mirror, up_left[:, :, ::-1])
    np.testing.assert_array_equal(down_right_mirror, down_right[:, :, ::-1])
    assert len(tta_views(images)) == 1
    assert [view_count(False, False), view_count(True, False), view_count(True, True)] == [1, 2, 6]


def test_shift_tta_scores_the_mean_probability_of_six_views():
    keras.utils.set_random_seed(0)
    images = keras.Input((6, 6, 3))
    features = keras.layers.Conv2D(4, 3, padding="same")(images)
    logits = keras.layers.Dense(3)(keras.layers.Flatten()(features))
    model = keras.Model(images, logits)
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 1, (8, 6, 6, 3)).astype(np.float32)
    labels = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 8)]
    batches = tf.data.Dataset.from_tensor_slices((pixels, labels)).batch(4)

    metrics = evaluate_classifier(model, batches, flip_tta=True, shift_tta=True).metrics

    views = [pixels, *(view.numpy() for view in tta_views(pixels, shifts=True))]
    mean = np.mean([softmax(model.predict(view, verbose=0), axis=1) for view in views], axis=0)
    expected_nll = -np.mean(np.log(mean[np.arange(8), labels.argmax(1)]))
    assert metrics["tta_views"] == 6
    assert metrics["tta"]["nll"] == pytest.approx(expected_nll, rel=1e-4)
    assert metrics["tta"]["accuracy"] == pytest.approx(np.mean(mean.argmax(1) == labels.argmax(1)))
    assert "flip+shift TTA accuracy" in SingleLabelTask().summary_line(metrics, 1 / 3)


@pytest.mark.parametrize("config", [EvaluateConfig, ExportConfig])
def test_shift_tta_without_flip_tta_is_refused_naming_the_fix(config):
    section = "evaluate" if config is EvaluateConfig else "export"
    with pytest.raises(ConfigError, match=f"{section}.shift_tta.*{section}.flip_tta=true"):
        config(shift_tta=True)


def test_kcls_evaluate_shift_tta_reports_the_six_view_accuracy(tmp_path):
    from click.testing import CliRunner
    from conftest import add_images

    from kcls.cli import main
    from kcls.config import ModelConfig, Recipe
    from kcls.models.classifier import build_classifier
    from kcls.serving.export import export_saved_model

    keras.utils.set_random_seed(0)
    classifier = build_classifier(ModelConfig(backbone="resnet_v2_tiny"), 2, 32)
    export_dir = export_saved_model(classifier, Recipe(name="views"), ["cat", "dog"],
                                    base_dir=tmp_path / "models")
    folder = add_images(tmp_path / "images", 4)
    result = CliRunner().invoke(main, ["evaluate", str(export_dir), "--data",
                                       f"folder:{folder}", "--shift-tta",
                                       "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "flip+shift TTA accuracy" in result.output
    assert "(flip+shift TTA)" in (tmp_path / "report" / "report.md").read_text()
