"""Drift statistics against scipy and hand-computed values, and the decision rule."""

import numpy as np
import pytest
from scipy import stats

from kcls.monitoring.drift import (
    build_profile,
    class_shift_test,
    compare,
    confidence_test,
    mmd_permutation_test,
    population_stability_index,
    project,
)

CLASSES = ["a", "b", "c"]


def test_psi_matches_the_formula_by_hand():
    # (0.7-0.5) ln(0.7/0.5) + (0.2-0.3) ln(0.2/0.3) + (0.1-0.2) ln(0.1/0.2)
    expected = 0.2 * np.log(1.4) - 0.1 * np.log(2 / 3) - 0.1 * np.log(0.5)
    assert population_stability_index(np.array([50, 30, 20]), np.array([0.7, 0.2, 0.1])) \
        == pytest.approx(expected)
    assert population_stability_index(np.array([1, 1]), np.array([5, 5])) == 0.0
    # An empty class is floored, not infinite.
    assert np.isfinite(population_stability_index(np.array([1, 1]), np.array([1, 0])))


def test_class_shift_test_is_scipys_chi_square_of_homogeneity():
    reference, current = np.array([40, 35, 25, 0]), np.array([10, 30, 60, 0])
    result = class_shift_test(reference, current)
    expected = stats.chi2_contingency(np.array([[40, 35, 25], [10, 30, 60]]), correction=False)
    assert result["chi2"] == pytest.approx(expected.statistic)
    assert result["p_value"] == pytest.approx(expected.pvalue) and result["dof"] == 2
    assert result["psi"] == pytest.approx(population_stability_index(reference, current))
    # One class only on both sides: nothing to test.
    assert class_shift_test(np.array([5, 0]), np.array([7, 0]))["p_value"] == 1.0


def test_confidence_test_is_scipys_two_sample_ks():
    rng = np.random.default_rng(0)
    reference, current = rng.beta(8, 1, 300), rng.beta(4, 1, 200)
    result = confidence_test(reference, current)
    expected = stats.ks_2samp(reference, current)
    assert result["ks"] == pytest.approx(expected.statistic)
    assert result["p_value"] == pytest.approx(expected.pvalue)
    assert result["current_mean"] == pytest.approx(current.mean())


def test_mmd_is_zero_for_equal_samples_and_matches_a_hand_computed_kernel():
    x = np.array([[0.0], [1.0]])
    y = np.array([[3.0]])
    result = mmd_permutation_test(x, y, permutations=20)
    # Pairwise distances 1, 3, 2: median 2, so 2 sigma^2 = 8.
    k = lambda a, b: np.exp(-((a - b) ** 2) / 8.0)  # noqa: E731
    expected = (k(0, 0) + k(1, 1) + 2 * k(0, 1)) / 4 + k(3, 3) - (k(0, 3) + k(1, 3))
    assert result["bandwidth"] == pytest.approx(2.0)
    assert result["mmd2"] == pytest.approx(expected)
    assert mmd_permutation_test(x, x.copy(), permutations=20)["mmd2"] == pytest.approx(0.0)


def test_mmd_permutation_p_value_is_small_for_a_shift_and_uniform_under_the_null():
    rng = np.random.default_rng(0)
    shifted = mmd_permutation_test(rng.normal(size=(100, 4)), rng.normal(0.8, 1, (80, 4)),
                                   permutations=200)
    assert shifted["p_value"] == pytest.approx(1 / 201)
    p_values = [mmd_permutation_test(rng.normal(size=(60, 4)), rng.normal(size=(40, 4)),
                                     permutations=100, seed=seed)["p_value"]
                for seed in range(40)]
    assert 0.2 < np.mean(p_values) < 0.8  # roughly uniform: mean 0.5
    assert np.mean(np.array(p_values) < 0.05) <= 0.15


def profile_and_outputs(seed=0, count=400):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, count)
    logits = rng.normal(size=(count, 3)) + 3 * np.eye(3)[labels]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    embeddings = rng.normal(size=(count, 6)) + np.eye(3, 6)[labels] * 2
    return probabilities, embeddings, labels


def test_profile_summarises_the_outputs():
    probabilities, embeddings, labels = profile_and_outputs()
    profile = build_profile(probabilities, embeddings, labels, CLASSES, components=4)
    assert profile["examples"] == 400
    assert profile["predicted_counts"] == np.bincount(probabilities.argmax(1), minlength=3
                                                      ).tolist()
    assert profile["class_prior"] == pytest.approx(np.bincount(labels) / 400)
    assert sum(profile["confidence_histogram"]["counts"]) == 400
    embedding = profile["embedding"]
    basis = np.array(embedding["components"])
    assert basis.shape == (4, 6)
    np.testing.assert_allclose(basis @ basis.T, np.eye(4), atol=1e-5)
    np.testing.assert_allclose(embedding["mean"], embeddings.mean(0), atol=1e-6)
    # The first component carries the most variance, as PCA's does.
    variance = np.var(project(embeddings, embedding), axis=0, ddof=1)
    np.testing.assert_allclose(variance, embedding["explained_variance"], rtol=1e-4)
    assert list(variance) == sorted(variance, reverse=True)
    with pytest.raises(ValueError, match="dimension 6"):
        project(np.zeros((2, 5)), embedding)


def test_build_profile_refuses_mismatched_inputs():
    probabilities, embeddings, labels = profile_and_outputs()
    with pytest.raises(ValueError, match=r"\[N >= 1, 4\]"):
        build_profile(probabilities, embeddings, labels, CLASSES + ["d"])
    with pytest.raises(ValueError, match="labels"):
        build_profile(probabilities, embeddings, labels[:5], CLASSES)
    with pytest.raises(ValueError, match="embeddings"):
        build_profile(probabilities, embeddings[:5], labels, CLASSES)


def test_compare_stays_quiet_on_iid_data_and_flags_each_kind_of_shift():
    probabilities, embeddings, labels = profile_and_outputs(seed=0)
    profile = build_profile(probabilities, embeddings, labels, CLASSES)
    fresh, fresh_embeddings, fresh_labels = profile_and_outputs(seed=1, count=200)
    quiet = compare(profile, fresh.argmax(1), fresh.max(1), fresh_embeddings,
                    permutations=100)
    assert not quiet["drift"] and quiet["flagged"] == []
    assert quiet["threshold"] == pytest.approx(0.05 / 3)

    only_a = fresh_labels == 0
    prior = compare(profile, fresh[only_a].argmax(1), fresh[only_a].max(1))
    assert prior["drift"] and "predicted_class" in prior["flagged"]
    assert prior["threshold"] == pytest.approx(0.05 / 2)  # no embeddings: two tests

    flattened = fresh ** 0.3 / (fresh ** 0.3).sum(axis=1, keepdims=True)
    confidence = compare(profile, flattened.argmax(1), flattened.max(1))
    assert confidence["flagged"] == ["confidence"]

    moved = compare(profile, fresh.argmax(1), fresh.max(1), fresh_embeddings + 1.5,
                    permutations=100)
    assert moved["flagged"] == ["embedding"]


def test_compare_refuses_bad_inputs():
    probabilities, embeddings, labels = profile_and_outputs()
    profile = build_profile(probabilities, None, labels, CLASSES)
    with pytest.raises(ValueError, match="at least one"):
        compare(profile, np.zeros(0, int), np.zeros(0))
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        compare(profile, np.array([0, 3]), np.array([0.9, 0.9]))
    with pytest.raises(ValueError, match="no embedding"):
        compare(profile, np.array([0, 1]), np.array([0.9, 0.9]), np.zeros((2, 6)))
