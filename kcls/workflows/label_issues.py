"""`kcls data label-issues SOURCE`: likely label errors of a source's training split.

The steps: list the source's files and splits as a run would (`file_splits`: the scan by
names and headers, the recipe's seed and fractions), embed the training images with the
recipe's pretrained backbone (the pooled penultimate features, at `data.image_size` with
`data.resize`; the `finetune` recipe's EfficientNet-Lite0 ImageNet weights by default),
then out-of-fold probabilities and cleanlab's `find_label_issues`
(`kcls.data.label_issues`), and write `label_issues.csv`, `label_issues.json` and
`label_issues.png` (`kcls.data.label_issues_report`).

Example:

>>> result = find_label_issues_of_source(load_recipe("finetune"), "issues/")  # doctest: +SKIP
>>> len(result.issues.indices)  # doctest: +SKIP
512
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kcls.config import ConfigError, Recipe
from kcls.data.folder import decode_files
from kcls.data.label_issues import (
    DEFAULT_FOLDS,
    LabelIssues,
    check_foldable,
    out_of_fold_probabilities,
    rank_label_issues,
)
from kcls.data.label_issues_report import write_label_issues
from kcls.data.pipeline import eval_pipeline
from kcls.data.sources import evaluated_files, file_splits
from kcls.files import check_output_dir


@dataclass
class LabelIssuesResult:
    """What `find_label_issues_of_source` found and wrote.

    Attributes:
        files: the N training images scored (those that decoded), in path order.
        labels: int64 `(N,)` their given classes.
        class_names: list[str].
        issues: `LabelIssues` (flagged indices into `files`, scores, suggestions).
        skipped: files that did not decode (or that the scan refused).
        seconds: `embedding`, `cross_validation` and `total` wall-clock seconds.
        written: the files written.
    """

    files: list[str]
    labels: np.ndarray
    class_names: list[str]
    issues: LabelIssues
    skipped: list[str]
    seconds: dict[str, float]
    written: list[Path]


def find_label_issues_of_source(recipe: Recipe, out_dir: str | Path,
                                folds: int = DEFAULT_FOLDS,
                                log: Callable[[str], None] = print) -> LabelIssuesResult:
    """Finds likely label errors in `recipe.data.source`'s training split (module docstring).

    Raises:
        ConfigError: a multi-label recipe, a backbone without pretrained weights, a source
            that is not a folder or a manifest, or classes too small for `folds` folds.
        MissingCleanlabError: cleanlab is not installed.
    """
    started = time.perf_counter()
    out_dir = check_output_dir(out_dir)
    _check_recipe(recipe)
    files = file_splits(recipe.data, recipe.label_format)
    train = np.sort(files.indices["train"])
    problem = check_foldable(files.labels[train], files.class_names, folds)
    if problem:
        raise ConfigError(f"kcls data label-issues of {recipe.data.source}: {problem}. Add "
                          "images, or pass --folds with a smaller number (at least 2).")
    log(f"embedding {len(train):,} training images with {recipe.model.backbone} "
        f"({recipe.model.weights} weights) at {recipe.data.image_size} px")
    embeddings, labels = embed(recipe, files.paths[train].tolist(), files.labels[train],
                               len(files.class_names), files.skipped)
    embedded = time.perf_counter()
    probabilities = out_of_fold_probabilities(embeddings, labels, len(files.class_names),
                                              folds, recipe.data.seed)
    issues = rank_label_issues(labels, probabilities)
    seconds = {"embedding": round(embedded - started, 1),
               "cross_validation": round(time.perf_counter() - embedded, 1)}
    seconds["total"] = round(time.perf_counter() - started, 1)
    scored = evaluated_files(files.paths[train].tolist(), files.skipped)
    written = write_label_issues(out_dir, scored, labels, files.class_names, issues, {
        "source": recipe.data.source, "backbone": recipe.model.backbone,
        "weights": recipe.model.weights, "image_size": recipe.data.image_size,
        "probe": f"logistic regression on standardized embeddings, {folds}-fold "
                 "stratified cross-validation", "folds": folds,
        "method": "cleanlab.filter.find_label_issues (ranked by self_confidence)",
        "skipped": files.skipped, "seconds": seconds})
    return LabelIssuesResult(scored, labels, files.class_names, issues, files.skipped,
                             seconds, written)


def _check_recipe(recipe: Recipe) -> None:
    if recipe.label_format != "class_index":
        raise ConfigError("kcls data label-issues finds errors of single labels "
                          f"(model.task=multiclass), not model.task={recipe.model.task}.")
    if not recipe.model.weights:
        raise ConfigError(
            f"kcls data label-issues embeds images with a pretrained backbone, and "
            f"model.backbone={recipe.model.backbone} has model.weights=None: use --recipe "
            "finetune (EfficientNet-Lite0, ImageNet weights) or --set model.weights=imagenet.")


def embed(recipe: Recipe, paths: list[str], labels: np.ndarray, num_classes: int,
          skipped: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The pooled backbone embeddings of `paths` (float32 `(N, D)`) and their int64 labels,
    for the images that decode (the others are appended to `skipped`)."""
    # Imported here: bad inputs are refused before the models (KerasCV) are imported.
    from kcls.evaluation.evaluate import predict_embeddings
    from kcls.models.classifier import build_classifier

    classifier = build_classifier(recipe.model, num_classes, recipe.data.image_size)
    data = dataclasses.replace(recipe.data, cache="none")
    batches = eval_pipeline(decode_files(paths, labels, skipped), num_classes, data)
    embeddings, _, targets = predict_embeddings(classifier, batches)
    return embeddings, targets.argmax(axis=1).astype(np.int64)
