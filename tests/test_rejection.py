"""The rejection rule: its scores and conformal threshold, the rule in graphs and in
metadata, the setting's checks, and (slow) its coverage on held-out images of a trained
run, in the export and in `kcls evaluate`."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from kcls.config import ConfigError, apply_overrides
from kcls.metrics.rejection import (
    auroc,
    coverage_threshold,
    false_positive_rate,
    nearest_mean_cosine,
)
from kcls.recipes import load_recipe
from kcls.tasks import RejectionRule, SingleLabelTask, get_task, task_from_metadata


def test_coverage_threshold_is_the_conformal_rank():
    scores = np.arange(100, dtype=float)
    # k = floor(101 * 0.05) = 5: the 5th smallest score; 96 of the 100 are kept.
    assert coverage_threshold(scores, 0.95) == 4.0
    assert coverage_threshold(np.arange(10.0), 0.95) == float("-inf")  # too few to reject


def test_coverage_threshold_keeps_its_coverage_on_new_images_on_average():
    rng = np.random.default_rng(0)
    kept = [np.mean(rng.normal(size=20_000) >= coverage_threshold(rng.normal(size=150), 0.9))
            for _ in range(300)]
    # Split conformal: E[kept] = 1 - floor(151 * 0.1) / 151 = 0.9007.
    assert np.mean(kept) == pytest.approx(0.9007, abs=0.005)


def test_auroc_and_false_positive_rate_on_known_cases():
    known, unknown = np.linspace(1, 2, 100), np.linspace(-2, -1, 50)
    assert auroc(known, unknown) == 1.0 and false_positive_rate(known, unknown) == 0.0
    assert auroc(unknown, known) == 0.0 and false_positive_rate(unknown, known) == 1.0
    same = np.linspace(0, 1, 101)
    assert auroc(same, same) == pytest.approx(0.5)


@pytest.fixture
def rule():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 16))
    labels = rng.integers(0, 3, 300)
    embeddings = centres[labels] + 0.3 * rng.normal(size=(300, 16))
    held_out = centres[rng.integers(0, 3, 100)] + 0.3 * rng.normal(size=(100, 16))
    return RejectionRule.fit(embeddings, labels, held_out, 0.9, "validation split", 3)


def test_the_rule_in_a_graph_matches_numpy_and_round_trips_its_metadata(rule):
    embeddings = np.random.default_rng(2).normal(size=(8, 16)).astype(np.float32)
    outputs = rule.outputs_graph(tf.constant(embeddings))
    np.testing.assert_allclose(outputs["known_score"].numpy(), rule.scores(embeddings),
                               atol=1e-6)
    np.testing.assert_array_equal(outputs["known"].numpy(), rule.known(embeddings))
    assert rule.fitted_coverage >= 0.9 and rule.fitted_on == "validation split (100 images)"
    task = task_from_metadata("multiclass", SingleLabelTask(1.5, rejection=rule).metadata())
    assert task.temperature == 1.5 and task.rejection.threshold == rule.threshold
    np.testing.assert_array_equal(task.rejection.class_means, rule.class_means)
    assert task_from_metadata("multiclass", {"temperature": None}).rejection is None


def test_scores_are_cosine_similarities_to_the_nearest_class_mean():
    means = np.array([[1.0, 0.0], [0.0, 1.0]])
    scores = nearest_mean_cosine(np.array([[2.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]), means)
    np.testing.assert_allclose(scores, [1.0, np.sqrt(0.5), 0.0], atol=1e-12)


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2", "yes"])
def test_reject_coverage_outside_zero_one_is_refused_in_the_dataclass(value):
    with pytest.raises(ConfigError, match="export.reject_coverage"):
        apply_overrides(load_recipe("quickstart"), [f"export.reject_coverage={value}"])


def test_reject_coverage_settings_and_what_each_task_makes_of_them():
    recipe = apply_overrides(load_recipe("quickstart"), ["export.reject_coverage=0.9"])
    assert recipe.export.reject_coverage == 0.9
    assert apply_overrides(recipe, ["export.reject_coverage=none"]).export.reject_coverage is None
    with pytest.raises(ConfigError, match="auto or none with model.task=multilabel"):
        apply_overrides(recipe, ["model.task=multilabel"])
    single = get_task("multiclass")
    assert single.calibration_plan("auto", True, "auto").reject_coverage == 0.95
    assert single.calibration_plan("auto", False, "auto").reject_coverage is None
    assert not single.calibration_plan("auto", False, "auto").carve_out
    carved = single.calibration_plan("none", False, 0.9)
    assert carved.carve_out and carved.method == "none" and carved.fits_anything
    assert get_task("multilabel").calibration_plan("auto", True, "auto").reject_coverage is None


@pytest.mark.slow
def test_the_rule_keeps_close_to_its_coverage_on_held_out_images(trained_quickstart):
    from kcls.evaluation.evaluate import evaluate_model

    recipe, result = trained_quickstart
    rejection = result.metrics["rejection"]
    # 144 validation images choose the threshold; 360 held-out test images measure it
    # (standard error about 0.02 for both together).
    assert rejection["target_coverage"] == 0.95
    assert abs(rejection["coverage"] - 0.95) < 0.06, rejection
    assert rejection["accuracy_known"] >= result.metrics["accuracy"]
    # `kcls evaluate` reads the rule back from the export and measures the same.
    again = evaluate_model(str(result.export_dir)).metrics["rejection"]
    assert again["coverage"] == pytest.approx(rejection["coverage"])
    # Images of nothing the model knows: uniform noise and flat grey squares.
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    flat = np.repeat(np.linspace(0, 255, 20).astype(np.uint8), 32 * 32 * 3).reshape(noise.shape)
    served = tf.saved_model.load(str(result.export_dir)).signatures["predict_images"]
    known = served(images=tf.constant(np.concatenate([noise, flat])))["known"].numpy()
    assert known.mean() < 0.25, known


def _rejection_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "rejection.py"
    spec = importlib.util.spec_from_file_location("rejection_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_rows_keep_the_validation_threshold_and_the_accuracy_of_the_kept():
    benchmark = _rejection_benchmark()
    embeddings = np.zeros((1, 2))

    def outputs(logits, labels=None):
        logits = np.asarray(logits, float)[:, None] * [1.0, 0.0]
        labels = np.zeros(len(logits), int) if labels is None else np.asarray(labels)
        return benchmark.Outputs(np.repeat(embeddings, len(logits), 0), logits, labels)

    validation = outputs(np.arange(1.0, 41.0))  # 40 scores: the 95% threshold is the 2nd
    held_out = outputs([1.0, 3.0, 5.0, 7.0], labels=[0, 0, 1, 0])  # 5.0: a wrong answer
    rows = benchmark.score_rows({"max logit": lambda o: o.logits.max(-1)}, validation,
                                held_out, {"far": outputs([0.0, 2.5])}, 0.95)
    assert len(rows) == 1 and rows[0].score == "max logit" and rows[0].ood_set == "far"
    assert rows[0].in_kept == 0.75 and rows[0].accuracy_kept == pytest.approx(2 / 3)
    assert rows[0].out_kept == 0.5 and rows[0].auroc == pytest.approx(7 / 8)
    assert rows[0].markdown().startswith("| far | max logit | 0.875 | 0.500 | 0.750 | 0.667 |")


def test_the_proxy_picks_the_served_score_that_best_separates_corrupted_copies():
    benchmark = _rejection_benchmark()
    validation = benchmark.Outputs(np.zeros((3, 2)), np.array([[3.0], [4.0], [5.0]]),
                                   np.zeros(3, int))
    corrupted = benchmark.Outputs(np.zeros((3, 2)), np.array([[0.0], [4.5], [1.0]]),
                                  np.zeros(3, int))
    functions = {"max_logit": lambda o: o.logits[:, 0], "energy": lambda o: -o.logits[:, 0],
                 "knn": lambda o: o.logits[:, 0] * 10}
    aurocs, chosen = benchmark.proxy_choice(functions, validation, corrupted,
                                            candidates=("max_logit", "energy"))
    assert chosen == "max_logit" and aurocs["max_logit"] == pytest.approx(7 / 9)
    assert aurocs["energy"] == pytest.approx(2 / 9) and set(aurocs) == set(functions)
