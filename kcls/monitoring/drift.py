"""Drift statistics: does a deployed model still see what it was tested on?

Arrays in, numbers out. A *reference profile* (`build_profile`) summarises a model's
outputs on its held-out test split: the class prior, the predicted-class counts, the
top-1 confidences, and the penultimate-layer embedding (its mean, a PCA basis and a
sample projected onto it).
`compare` tests a batch of recent production outputs against it, in the spirit of
"Failing Loudly" (Rabanser et al. 2019: black-box shift detection on the softmax
outputs, two-sample tests on reduced embeddings):

- predicted-class distribution: population stability index (`population_stability_index`,
  an effect size) and a chi-square test of homogeneity of the two count vectors
  (`scipy.stats.chi2_contingency`);
- top-1 confidence: two-sample Kolmogorov-Smirnov test (`scipy.stats.ks_2samp`);
- embedding (when images were given): maximum mean discrepancy with an RBF kernel
  (median-heuristic bandwidth) on the PCA projection, with a permutation p-value
  (`mmd_permutation_test`), as alibi-detect's MMD detector does.

Drift is flagged when any test's p-value is below `alpha / number_of_tests` (Bonferroni),
so the chance of a false alarm on i.i.d. data stays at most `alpha` (0.05 by default;
see docs/monitoring.md for the rates measured). Nothing here runs a model or reads a
file: `kcls.monitoring.profile` and `kcls.monitoring.monitor` do, and call these functions.

Example:

>>> rng = np.random.default_rng(0)
>>> probabilities = rng.dirichlet(np.ones(3), size=200)
>>> profile = build_profile(probabilities, rng.normal(size=(200, 8)), rng.integers(0, 3, 200),
...                         ["a", "b", "c"])
>>> result = compare(profile, probabilities.argmax(1), probabilities.max(1))
>>> result["drift"]  # the reference's own outputs: no drift
False
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy import stats

PROFILE_FORMAT = 1
CONFIDENCE_BINS = 20
PCA_COMPONENTS = 16
REFERENCE_SAMPLE = 1000  # confidences and projected embeddings kept for two-sample tests
CURRENT_SAMPLE = 1000  # current embeddings used by the MMD test (a seeded subsample)
PERMUTATIONS = 500
ALPHA = 0.05
PSI_EPSILON = 1e-4  # floor on proportions, so an empty class does not make PSI infinite
# Conventional PSI bands (credit scoring): < 0.1 stable, 0.1-0.25 moderate, > 0.25 major.
PSI_MODERATE, PSI_MAJOR = 0.1, 0.25


# Below this many reference images the false-alarm rate on unchanged data measured
# above alpha (benchmarks/monitor_reference_size.py, docs/monitoring.md): the embedding's
# PCA basis is fitted on the reference itself, so with few images the reference's own
# projections spread wider than fresh images' do, and the MMD test sees a difference.
MIN_REFERENCE_EXAMPLES = 200


def small_reference_warning(examples: int, alpha: float = ALPHA) -> str | None:
    """A warning when a reference profile of `examples` images is too small for the
    false-alarm rate `alpha` to hold (`MIN_REFERENCE_EXAMPLES`), else None.

    >>> small_reference_warning(500) is None
    True
    """
    if examples >= MIN_REFERENCE_EXAMPLES:
        return None
    return (f"the reference profile holds {examples} held-out images: below "
            f"{MIN_REFERENCE_EXAMPLES}, `kcls monitor` raises false alarms on unchanged data "
            f"more often than its alpha {alpha:g} promises (measured in docs/monitoring.md). "
            "Hold out more images (data.test_fraction, data.validation_fraction) or add "
            "images, and treat a DRIFT verdict of this model with care.")


def build_profile(probabilities: np.ndarray, embeddings: np.ndarray | None,
                  labels: np.ndarray | None, class_names: list[str],
                  components: int = PCA_COMPONENTS, sample: int = REFERENCE_SAMPLE,
                  seed: int = 0) -> dict[str, Any]:
    """The reference profile of a model's outputs on held-out data, as JSON-ready data.

    Args:
        probabilities: float `[N, C]` served probabilities (after temperature scaling).
        embeddings: float `[N, D]` penultimate-layer embeddings, or None.
        labels: int `[N]` true classes (for the class prior), or None.
        class_names: list[str] of length C.
        components: PCA components kept (at most `min(N, D)`).
        sample: how many confidences and projected embeddings are kept (a seeded random
            subset when N is larger) for the two-sample tests.
        seed: seed of that subset.

    Returns:
        dict with `format`, `examples` (N), `class_names`, `class_prior` (`[C]`
        proportions, or None), `predicted_counts` (`[C]` ints), `predicted_distribution`
        (`[C]` proportions), `confidence_histogram` (`edges` `[bins + 1]`, `counts`
        `[bins]`), `confidences` (sample of top-1 probabilities) and, with embeddings,
        `embedding`: `dimension` D, `mean` `[D]`, `components` `[k, D]` (orthonormal rows,
        largest variance first), `explained_variance` `[k]`, `explained_variance_ratio`
        `[k]`, `projected` (`[m, k]` sample of centred embeddings projected on the basis),
        `projected_mean` and `projected_std` `[k]` of all N projections.

    Raises:
        ValueError: no examples, or arrays whose lengths or class counts disagree.
    """
    probabilities = np.asarray(probabilities, np.float64)
    count, num_classes = _check_probabilities(probabilities, len(class_names))
    chosen = _subsample(count, sample, seed)
    predicted = probabilities.argmax(axis=1)
    confidences = probabilities.max(axis=1)
    predicted_counts = np.bincount(predicted, minlength=num_classes)
    histogram, edges = np.histogram(confidences, bins=CONFIDENCE_BINS, range=(0.0, 1.0))
    profile: dict[str, Any] = {
        "format": PROFILE_FORMAT,
        "examples": count,
        "class_names": list(class_names),
        "class_prior": None,
        "predicted_counts": predicted_counts.tolist(),
        "predicted_distribution": (predicted_counts / count).tolist(),
        "confidence_histogram": {"edges": edges.tolist(), "counts": histogram.tolist()},
        "confidences": np.round(confidences[chosen], 6).tolist(),
    }
    if labels is not None:
        labels = np.asarray(labels, np.int64)
        if labels.shape != (count,):
            raise ValueError(f"labels {labels.shape} do not match {count} predictions.")
        profile["class_prior"] = (np.bincount(labels, minlength=num_classes) / count).tolist()
    if embeddings is not None:
        profile["embedding"] = _embedding_profile(np.asarray(embeddings, np.float64), count,
                                                  components, chosen)
    return profile


def project(embeddings: np.ndarray, embedding_profile: dict[str, Any]) -> np.ndarray:
    """Embeddings `[N, D]` centred on the reference mean and projected on its PCA basis:
    float64 `[N, k]`.

    Raises:
        ValueError: embeddings whose dimension is not the profile's.
    """
    embeddings = np.asarray(embeddings, np.float64)
    mean = np.asarray(embedding_profile["mean"], np.float64)
    if embeddings.ndim != 2 or embeddings.shape[1] != len(mean):
        raise ValueError(f"embeddings of shape {embeddings.shape} do not have the reference "
                         f"profile's dimension {len(mean)}.")
    return (embeddings - mean) @ np.asarray(embedding_profile["components"], np.float64).T


def population_stability_index(expected: np.ndarray, actual: np.ndarray,
                               epsilon: float = PSI_EPSILON) -> float:
    """PSI = sum((actual - expected) * ln(actual / expected)) over bins of proportions.

    Both vectors are normalised to sum to 1 and floored at `epsilon` (then renormalised),
    so a bin empty on one side adds a large but finite term.

    >>> round(population_stability_index(np.array([0.5, 0.5]), np.array([0.9, 0.1])), 4)
    0.8789
    """
    expected = _proportions(expected, epsilon)
    actual = _proportions(actual, epsilon)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def class_shift_test(reference_counts: np.ndarray, current_counts: np.ndarray
                     ) -> dict[str, float]:
    """Predicted-class distribution: PSI and the chi-square test that both count vectors
    come from one distribution (homogeneity of the `2 x C` table; classes absent from
    both are left out).

    Returns:
        dict with `psi`, `chi2`, `dof` and `p_value` (1.0 when only one class occurs).
    """
    reference_counts = np.asarray(reference_counts, np.float64)
    current_counts = np.asarray(current_counts, np.float64)
    present = (reference_counts + current_counts) > 0
    table = np.stack([reference_counts[present], current_counts[present]])
    psi = population_stability_index(reference_counts, current_counts)
    if table.shape[1] < 2:
        return {"psi": psi, "chi2": 0.0, "dof": 0, "p_value": 1.0}
    result = stats.chi2_contingency(table, correction=False)
    return {"psi": psi, "chi2": float(result.statistic), "dof": int(result.dof),
            "p_value": float(result.pvalue)}


def confidence_test(reference: np.ndarray, current: np.ndarray) -> dict[str, float]:
    """Top-1 confidence: the two-sample Kolmogorov-Smirnov statistic and p-value, and the
    mean confidence of each side."""
    with warnings.catch_warnings():  # ties: scipy falls back to the asymptotic p-value
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ks_2samp(np.asarray(reference, np.float64),
                                np.asarray(current, np.float64))
    return {"ks": float(result.statistic), "p_value": float(result.pvalue),
            "reference_mean": float(np.mean(reference)), "current_mean": float(np.mean(current))}


def mmd_permutation_test(reference: np.ndarray, current: np.ndarray,
                         permutations: int = PERMUTATIONS, seed: int = 0) -> dict[str, float]:
    """Maximum mean discrepancy between two samples, with a permutation p-value.

    The kernel is an RBF `exp(-|x - y|^2 / (2 sigma^2))` whose bandwidth sigma is the
    median pairwise distance of the pooled sample (the median heuristic). The statistic
    is the biased estimate `MMD^2 = mean K(X, X) + mean K(Y, Y) - 2 mean K(X, Y)`; its
    null distribution comes from `permutations` random relabellings of the pooled sample,
    and the p-value is `(1 + #{permuted >= observed}) / (1 + permutations)`.

    Args:
        reference: float `[n, k]`.
        current: float `[m, k]`.
        permutations: number of relabellings (the smallest p-value is 1 / (1 + this)).
        seed: seed of the relabellings.

    Returns:
        dict with `mmd2`, `p_value` and `bandwidth`.
    """
    reference = np.asarray(reference, np.float64)
    current = np.asarray(current, np.float64)
    pooled = np.concatenate([reference, current])
    squared = np.sum(pooled**2, axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2.0 * pooled @ pooled.T, 0.0)
    upper = distances[np.triu_indices(len(pooled), k=1)]
    bandwidth = float(np.sqrt(np.median(upper))) if upper.size else 1.0
    kernel = np.exp(-distances / (2.0 * max(bandwidth, 1e-12) ** 2))
    # MMD^2 (biased) = w^T K w with w = 1/n on one sample and -1/m on the other; every
    # permutation is a column of `weights`, so all of them cost one matrix product.
    rng = np.random.default_rng(seed)
    first = np.zeros((len(pooled), permutations + 1), dtype=bool)
    first[: len(reference), 0] = True
    for column in range(1, permutations + 1):
        first[rng.permutation(len(pooled))[: len(reference)], column] = True
    weights = np.where(first, 1.0 / len(reference), -1.0 / len(current))
    statistics = np.einsum("ip,ip->p", weights, kernel @ weights)
    observed = statistics[0]
    p_value = (1 + np.count_nonzero(statistics[1:] >= observed)) / (1 + permutations)
    return {"mmd2": float(observed), "p_value": float(p_value), "bandwidth": bandwidth}


def compare(profile: dict[str, Any], predicted_classes: np.ndarray, confidences: np.ndarray,
            embeddings: np.ndarray | None = None, alpha: float = ALPHA,
            permutations: int = PERMUTATIONS, seed: int = 0) -> dict[str, Any]:
    """Tests current outputs against a reference profile and decides whether they drifted.

    Args:
        profile: dict from `build_profile`.
        predicted_classes: int `[N]` top-1 classes of the current data.
        confidences: float `[N]` top-1 probabilities of the current data.
        embeddings: float `[N, D]` current embeddings, or None (e.g. logged predictions
            only): the embedding test is then left out.
        alpha: family-wise false-alarm rate; each test is held to `alpha / tests`.
        permutations: relabellings of the MMD permutation test.
        seed: seed of the current-embedding subsample and of the permutations.

    Returns:
        dict with `examples`, `alpha`, `threshold` (the per-test p-value threshold),
        `tests` (name -> statistics, `p_value` and `drift`), `drift` (bool: any test
        below the threshold), `flagged` (names of those tests), `current`
        (`predicted_distribution`, `confidence_histogram`, `projected_mean`, for plots).

    Raises:
        ValueError: no current examples, or classes outside the profile's.
    """
    predicted_classes = np.asarray(predicted_classes, np.int64)
    confidences = np.asarray(confidences, np.float64)
    num_classes = len(profile["class_names"])
    if len(predicted_classes) == 0 or confidences.shape != predicted_classes.shape:
        raise ValueError(f"need as many confidences as predicted classes, at least one; got "
                         f"{confidences.shape} and {predicted_classes.shape}.")
    if predicted_classes.min() < 0 or predicted_classes.max() >= num_classes:
        raise ValueError(f"predicted classes must be in [0, {num_classes}); got "
                         f"{predicted_classes.min()}..{predicted_classes.max()}.")
    counts = np.bincount(predicted_classes, minlength=num_classes)
    tests: dict[str, dict[str, Any]] = {
        "predicted_class": class_shift_test(np.asarray(profile["predicted_counts"]), counts),
        "confidence": confidence_test(np.asarray(profile["confidences"]), confidences),
    }
    histogram, _ = np.histogram(confidences, bins=CONFIDENCE_BINS, range=(0.0, 1.0))
    current: dict[str, Any] = {"predicted_distribution": (counts / counts.sum()).tolist(),
                               "confidence_histogram": histogram.tolist()}
    if embeddings is not None:
        if "embedding" not in profile:
            raise ValueError("the reference profile has no embedding statistics.")
        projected = project(embeddings, profile["embedding"])
        chosen = _subsample(len(projected), CURRENT_SAMPLE, seed)
        tests["embedding"] = mmd_permutation_test(
            np.asarray(profile["embedding"]["projected"]), projected[chosen], permutations,
            seed)
        current["projected_mean"] = projected.mean(axis=0).tolist()
        current["projected"] = projected[chosen[:200]].tolist()
    threshold = alpha / len(tests)
    for result in tests.values():
        result["drift"] = bool(result["p_value"] < threshold)
    flagged = [name for name, result in tests.items() if result["drift"]]
    return {"examples": int(len(predicted_classes)), "alpha": alpha, "threshold": threshold,
            "decision": f"drift when a p-value < alpha / {len(tests)} tests (Bonferroni)",
            "tests": tests, "drift": bool(flagged), "flagged": flagged, "current": current}


def _check_probabilities(probabilities: np.ndarray, num_classes: int) -> tuple[int, int]:
    if probabilities.ndim != 2 or len(probabilities) == 0 or probabilities.shape[1] != num_classes:
        raise ValueError(f"probabilities must be [N >= 1, {num_classes}]; got "
                         f"{probabilities.shape}.")
    return len(probabilities), num_classes


def _embedding_profile(embeddings: np.ndarray, count: int, components: int,
                       chosen: np.ndarray) -> dict[str, Any]:
    if embeddings.ndim != 2 or len(embeddings) != count:
        raise ValueError(f"embeddings {embeddings.shape} do not match {count} predictions.")
    mean = embeddings.mean(axis=0)
    centred = embeddings - mean
    # PCA by SVD of the centred data: rows of `basis` are the principal directions.
    _, singular_values, basis = np.linalg.svd(centred, full_matrices=False)
    kept = min(components, len(singular_values))
    variance = singular_values**2 / max(count - 1, 1)
    projected = centred @ basis[:kept].T
    return {
        "dimension": int(embeddings.shape[1]),
        "mean": np.round(mean, 6).tolist(),
        "components": np.round(basis[:kept], 6).tolist(),
        "explained_variance": variance[:kept].tolist(),
        "explained_variance_ratio": (variance[:kept] / max(variance.sum(), 1e-12)).tolist(),
        "projected": np.round(projected[chosen], 6).tolist(),
        "projected_mean": projected.mean(axis=0).tolist(),
        "projected_std": projected.std(axis=0).tolist(),
    }


def _subsample(count: int, size: int, seed: int) -> np.ndarray:
    """All of `range(count)`, or a seeded random `size` of them, sorted."""
    if count <= size:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size, replace=False))


def _proportions(values: np.ndarray, epsilon: float) -> np.ndarray:
    values = np.asarray(values, np.float64)
    values = values / max(values.sum(), 1e-12)
    values = np.maximum(values, epsilon)
    return values / values.sum()
