"""Temperature scaling: the fit, the metrics before and after, and T in exports and runs."""

import json
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.special import log_softmax
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

from kcls.config import ConfigError, apply_overrides
from kcls.data.sources import carve_calibration_split, splits_from_arrays
from kcls.load import load_classifier
from kcls.metrics.calibration import expected_calibration_error, fit_temperature
from kcls.metrics.classification import evaluate_predictions
from kcls.models.classifier import build_classifier
from kcls.optimize.convert import convert, write_probability_saved_model
from kcls.optimize.interpreter import TFLiteClassifier
from kcls.serving.export import export_saved_model
from kcls.tasks import SingleLabelTask
from kcls.workflows.run import run_recipe


def nll(logits, labels):
    return -np.mean(log_softmax(logits, axis=1)[np.arange(len(labels)), labels])


def test_fit_temperature_recovers_the_temperature_labels_were_drawn_at():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, (4000, 5))
    true_temperature = 2.5
    probabilities = np.exp(log_softmax(logits / true_temperature, axis=1))
    labels = np.array([rng.choice(5, p=row) for row in probabilities])
    assert fit_temperature(logits, labels) == pytest.approx(true_temperature, rel=0.1)


def test_fit_temperature_is_the_minimum_of_the_nll_over_a_grid():
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 4.0, (300, 3))
    labels = rng.integers(0, 3, 300)
    labels[:150] = logits[:150].argmax(axis=1)  # half right: over-confident logits
    fitted = fit_temperature(logits, labels)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 2001))
    best = grid[np.argmin([nll(logits / t, labels) for t in grid])]
    assert fitted == pytest.approx(best, rel=0.01)
    assert nll(logits / fitted, labels) <= nll(logits, labels)


@pytest.mark.parametrize("logits, labels", [(np.zeros((0, 3)), np.zeros(0, int)),
                                            (np.zeros((4, 3)), np.zeros(3, int))])
def test_fit_temperature_refuses_empty_or_mismatched_inputs(logits, labels):
    with pytest.raises(ValueError, match="logits"):
        fit_temperature(logits, labels)


def test_evaluate_predictions_reports_before_and_after_with_accuracy_unchanged():
    logits = np.array([[6.0, 0.0], [0.0, 6.0], [6.0, 0.0], [0.0, 6.0]])
    labels = np.array([0, 1, 1, 1])
    plain = evaluate_predictions(logits, labels)
    scaled = evaluate_predictions(logits, labels, temperature=3.0)
    assert scaled.metrics["accuracy"] == plain.metrics["accuracy"] == 0.75
    calibration = scaled.metrics["calibration"]
    assert calibration["temperature"] == 3.0
    assert calibration["before"] == {"nll": plain.metrics["nll"], "ece": plain.metrics["ece"]}
    assert calibration["after"]["nll"] == pytest.approx(nll(logits / 3.0, labels))
    np.testing.assert_allclose(scaled.uncalibrated_probabilities, plain.probabilities)
    assert "calibration" not in plain.metrics and plain.uncalibrated_probabilities is None


@pytest.mark.slow
def test_temperature_scaling_at_least_halves_the_ece_of_an_over_confident_model():
    """An MLP trained long on 200 digits, a fifth of them mislabelled, memorises them:
    its held-out confidence is far above its accuracy. T fitted on a validation split
    (the MLP's log-probabilities are its logits) fixes the test split's ECE."""
    digits = load_digits()
    images, labels = digits.data / 16.0, digits.target
    order = np.random.default_rng(0).permutation(len(labels))
    train, validation, test = order[:200], order[200:700], order[700:]
    rng = np.random.default_rng(0)
    noisy = labels[train].copy()
    flipped = rng.random(len(noisy)) < 0.2
    noisy[flipped] = rng.integers(0, 10, flipped.sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = MLPClassifier((128,), alpha=0.0, learning_rate_init=0.01, max_iter=500,
                              tol=0.0, n_iter_no_change=500, random_state=0)
        model.fit(images[train], noisy)
    logits = {name: model.predict_log_proba(images[split])
              for name, split in (("validation", validation), ("test", test))}
    temperature = fit_temperature(logits["validation"], labels[validation])
    assert temperature > 1.5  # over-confident: softened
    before = evaluate_predictions(logits["test"], labels[test])
    after = evaluate_predictions(logits["test"], labels[test], temperature=temperature)
    assert before.metrics["ece"] > 0.08
    assert after.metrics["ece"] <= before.metrics["ece"] / 2
    assert after.metrics["nll"] < before.metrics["nll"]
    assert after.metrics["accuracy"] == before.metrics["accuracy"]
    assert after.metrics["ece"] == pytest.approx(expected_calibration_error(
        after.probabilities, labels[test]))


def test_auto_calibrates_only_with_a_validation_split():
    task = SingleLabelTask()
    assert task.calibration_plan("auto", has_validation=True).method == "temperature"
    assert task.calibration_plan("auto", has_validation=False).method == "none"
    carved = task.calibration_plan("temperature", has_validation=False)
    assert carved.method == "temperature" and carved.carve_out
    assert task.calibration_plan("none", has_validation=True).method == "none"
    with pytest.raises(ConfigError, match="evaluate.calibrate"):
        task.calibration_plan("platt", has_validation=True)


def test_the_calibration_carve_out_never_trains(tiny_recipe):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (100, 8, 8, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(100)  # an id per image
    config = apply_overrides(tiny_recipe, ["data.validation_fraction=0"]).data
    splits = splits_from_arrays(images, np.arange(100) % 2, ["a", "b"], config)
    carved, held_out = carve_calibration_split(splits)
    ids = {name: [int(image[0, 0, 0]) for image, _ in dataset.as_numpy_iterator()]
           for name, dataset in (("train", carved.train), ("held_out", held_out))}
    assert len(ids["held_out"]) == 8 and carved.sizes["train"] == len(ids["train"]) == 72
    assert not set(ids["train"]) & set(ids["held_out"])
    assert carved.fingerprint != splits.fingerprint


@pytest.mark.slow
def test_a_run_records_t_and_its_export_serves_softmax_of_logits_over_t(tiny_recipe,
                                                                          tmp_path):
    # The frozen phase alone: T is fitted and served whatever the phases trained.
    recipe = apply_overrides(tiny_recipe, ["train.unfrozen_epochs=0"])
    result = run_recipe(recipe, tmp_path / "run", log=lambda message: None, verbose=0)
    run_info = json.loads((result.run_dir / "run.json").read_text())
    metadata = json.loads((result.export_dir / "kcls.json").read_text())
    temperature = run_info["temperature"]
    assert temperature > 0 and metadata["temperature"] == temperature
    assert run_info["calibration"]["fitted_on"] == "validation split"
    assert metadata["metrics"]["calibration"]["after"]["nll"] == result.metrics["nll"]
    assert "## Calibration" in (result.run_dir / "report.md").read_text()
    assert load_classifier(result.export_dir).task.temperature == temperature
    assert load_classifier(result.run_dir).task.temperature == temperature

    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    logits = result.classifier(images.astype("float32"), training=False).numpy()
    served = tf.saved_model.load(str(result.export_dir)).signatures["predict_images"](
        images=tf.constant(images))
    np.testing.assert_allclose(served["probabilities"].numpy(),
                               tf.nn.softmax(logits / temperature).numpy(), atol=1e-5)


@pytest.mark.slow
def test_export_and_tflite_model_divide_the_logits_by_t(tiny_recipe, tmp_path):
    keras.utils.set_random_seed(0)
    classifier = build_classifier(tiny_recipe.model, 3, 32)
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    expected = tf.nn.softmax(classifier(images.astype("float32"), training=False) / 4.0)
    export_dir = export_saved_model(classifier, tiny_recipe, ["a", "b", "c"],
                                    task=SingleLabelTask(4.0))
    assert json.loads((export_dir / "kcls.json").read_text())["temperature"] == 4.0
    served = tf.saved_model.load(str(export_dir)).signatures["predict_images"](
        images=tf.constant(images))
    np.testing.assert_allclose(served["probabilities"].numpy(), expected.numpy(), atol=1e-5)
    saved = write_probability_saved_model(classifier, 32, tmp_path / "tflite_source",
                                          SingleLabelTask(4.0))
    tflite = TFLiteClassifier.from_bytes(convert(saved))
    np.testing.assert_allclose(tflite.predict(images.astype("float32")), expected.numpy(),
                               atol=1e-4)


@pytest.mark.slow
def test_without_a_validation_split_t_is_fitted_on_a_training_carve_out(tiny_recipe,
                                                                        tmp_path):
    # The frozen phase alone, at 16 px: the carve-out and the calibration do not depend
    # on how long or at what size the classifier trained.
    recipe = apply_overrides(tiny_recipe, ["data.validation_fraction=0",
                                           "evaluate.calibrate=temperature",
                                           "export.enabled=false", "train.unfrozen_epochs=0",
                                           "data.image_size=16"])
    lines = []
    result = run_recipe(recipe, tmp_path / "run", log=lines.append, verbose=0)
    calibration = json.loads((result.run_dir / "run.json").read_text())["calibration"]
    # 1,437 non-test digits: ceil(10%) held out, the rest trains.
    assert calibration["fitted_on"] == "training carve-out (no validation split)"
    assert calibration["fit_examples"] == 144
    assert any(line.startswith("144 training images held out") for line in lines)
    assert any("train 1293, validation 0" in line for line in lines)
    uncalibrated = run_recipe(apply_overrides(recipe, ["evaluate.calibrate=auto"]),
                              tmp_path / "auto", log=lambda line: None, verbose=0)
    assert json.loads((uncalibrated.run_dir / "run.json").read_text())["temperature"] is None
    assert "calibration" not in uncalibrated.metrics
