"""Metrics on hand-made predictions whose right answers are known, and the report files."""

import numpy as np
import pytest
from PIL import Image

from kcls.evaluation.plots import confident_mistakes
from kcls.evaluation.report import write_report
from kcls.layout import PLOT_FILES
from kcls.metrics.calibration import expected_calibration_error
from kcls.metrics.classification import (
    class_balance_warning,
    classification_metrics,
)
from kcls.metrics.evaluation import Evaluation
from kcls.tasks import SingleLabelTask


def one_hot_probabilities(predictions, num_classes, confidence=0.9):
    """Rows putting `confidence` on the predicted class and the rest evenly elsewhere."""
    rest = (1.0 - confidence) / (num_classes - 1)
    probabilities = np.full((len(predictions), num_classes), rest)
    probabilities[np.arange(len(predictions)), predictions] = confidence
    return probabilities


def one_hot_logits(predictions, num_classes, confidence=0.9):
    """The logits (log-probabilities) of `one_hot_probabilities`."""
    return np.log(one_hot_probabilities(predictions, num_classes, confidence))


def test_confusion_matrix_and_per_class_scores_on_a_known_case():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    predictions = np.array([0, 0, 1, 2, 1, 1, 2, 2, 0, 2])
    metrics = classification_metrics(one_hot_logits(predictions, 3), labels, ["a", "b", "c"])
    assert metrics["confusion_matrix"] == [[2, 1, 1], [0, 2, 0], [1, 0, 3]]
    assert metrics["accuracy"] == pytest.approx(0.7)
    a, b, c = (metrics["per_class"][name] for name in "abc")
    # a: precision 2/3, recall 2/4 -> F1 = 2 * (2/3 * 1/2) / (2/3 + 1/2) = 4/7
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == pytest.approx(0.5)
    assert a["f1"] == pytest.approx(4 / 7)
    assert b == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8),
                 "support": 2}
    assert c["f1"] == pytest.approx(0.75) and c["support"] == 4
    assert metrics["macro_avg"]["f1"] == pytest.approx((4 / 7 + 0.8 + 0.75) / 3)
    assert metrics["weighted_avg"]["recall"] == pytest.approx(0.7)  # weighted recall = accuracy


def test_a_class_never_predicted_has_zero_precision_not_nan():
    metrics = classification_metrics(one_hot_logits([0, 0, 0], 2), np.array([0, 1, 1]))
    assert metrics["per_class"]["1"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                         "support": 2}


def test_ece_is_zero_for_a_perfectly_calibrated_predictor():
    # Confidence 0.8 and exactly 80% right; confidence 0.6 and exactly 60% right.
    labels = np.zeros(20, dtype=np.int64)
    predictions = np.array([0] * 8 + [1] * 2 + [0] * 6 + [1] * 4)
    probabilities = np.concatenate([one_hot_probabilities(predictions[:10], 2, 0.8),
                                    one_hot_probabilities(predictions[10:], 2, 0.6)])
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_measures_overconfidence():
    # Always 90% confident, right half the time: |0.5 - 0.9| = 0.4.
    labels = np.array([0, 1] * 10)
    probabilities = one_hot_probabilities(np.zeros(20, dtype=np.int64), 2, 0.9)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.4)
    metrics = classification_metrics(np.log(probabilities), labels)
    assert metrics["ece"] == pytest.approx(0.4)
    assert metrics["nll"] == pytest.approx(-(np.log(0.9) + np.log(0.1)) / 2)


def test_top5_accuracy_only_with_more_than_five_classes():
    probabilities = np.tile(np.linspace(0.3, 0.01, 7)[None], (2, 1))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    metrics = classification_metrics(np.log(probabilities), np.array([4, 6]))
    assert metrics["top5_accuracy"] == pytest.approx(0.5)
    assert "top5_accuracy" not in classification_metrics(np.log(probabilities[:, :5]),
                                                         np.array([4, 1]))


def test_class_imbalance_warning_threshold():
    assert class_balance_warning({"a": 100, "b": 10}) is None
    warning = class_balance_warning({"a": 100, "b": 9})
    assert "'b' has 9" in warning and "class_weights" in warning


def test_report_writes_tables_and_four_valid_pngs(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 30)
    probabilities = rng.dirichlet(np.ones(3), 30)
    evaluation = Evaluation(classification_metrics(np.log(probabilities), labels,
                                                   ["x", "y", "z"]), probabilities, labels)
    mistakes = confident_mistakes(evaluation, 4)
    assert len(mistakes) == 4
    wrong_confidence = probabilities.max(axis=1)[mistakes]
    assert np.all(np.diff(wrong_confidence) <= 0)
    assert np.all(probabilities.argmax(axis=1)[mistakes] != labels[mistakes])
    images = {int(i): rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for i in mistakes}
    history = {"loss": [2.0, 1.5, 1.0], "val_loss": [2.1, 1.6, 1.2],
               "accuracy": [0.3, 0.5, 0.7], "val_accuracy": [0.3, 0.4, 0.6]}
    phases = [{"name": "frozen", "first_epoch": 0, "epochs": 1},
              {"name": "unfrozen", "first_epoch": 1, "epochs": 2}]
    write_report(tmp_path, evaluation, SingleLabelTask(), ["x", "y", "z"], history, phases,
                 images, mistakes=4)
    for name in PLOT_FILES:
        with Image.open(tmp_path / name) as image:
            image.verify()
            assert image.format == "PNG"
    report = (tmp_path / "report.md").read_text()
    assert "| accuracy |" in report and "| z |" in report and "training_curves.png" in report


def test_nll_comes_from_the_logits_not_from_clipped_probabilities():
    import keras
    import tensorflow as tf

    from kcls.evaluation.evaluate import evaluate_classifier

    # Logits (40, 0) for every image, whose true class is 1: its probability is e^-40,
    # far below any clipping floor, and its negative log-likelihood is 40.
    images = keras.Input((2, 2, 3))
    logits = keras.layers.Dense(2, kernel_initializer="zeros",
                                bias_initializer=keras.initializers.Constant([40.0, 0.0]))(
        keras.layers.Flatten()(images))
    model = keras.Model(images, logits)
    batches = tf.data.Dataset.from_tensor_slices(
        (np.zeros((4, 2, 2, 3), np.float32), np.tile([[0.0, 1.0]], (4, 1)))).batch(2)
    metrics = evaluate_classifier(model, batches, flip_tta=True).metrics
    assert metrics["nll"] == pytest.approx(40.0, rel=1e-6)
    assert metrics["tta"]["nll"] == pytest.approx(40.0, rel=1e-6)
    assert metrics["accuracy"] == 0.0


def test_kcls_evaluate_on_a_damaged_folder_counts_and_names_every_skipped_file(
        damaged_folder, tmp_path):
    import keras

    from kcls.config import ModelConfig, Recipe
    from kcls.evaluation.evaluate import evaluate_model
    from kcls.models.classifier import build_classifier
    from kcls.serving.export import export_saved_model

    keras.utils.set_random_seed(0)
    classifier = build_classifier(ModelConfig(backbone="resnet_v2_tiny", dropout=0.0), 2, 32)
    export_dir = export_saved_model(classifier, Recipe(name="damaged"), ["ants", "bees"],
                                    base_dir=tmp_path / "models")
    lines = []
    evaluation = evaluate_model(str(export_dir), f"folder:{damaged_folder}",
                                str(tmp_path / "report"), log=lines.append)
    assert evaluation.metrics["examples"] == 12  # 15 files with an image extension, 3 bad
    names = ["caf\\xe9.png", "bomb.png", "half.jpg"]
    assert [path.rsplit("/", 1)[1] for path in evaluation.skipped] == names
    assert len(lines) == 1 and lines[0].startswith("skipped 3 file(s)")
    assert all(name in lines[0] for name in names)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Skipped files (3)" in report and all(name in report for name in names)
