"""The reference profile of a trained classifier: what it outputs on its held-out images.

`reference_profile` runs the classifier (as the export serves it: temperature-scaled,
flip-averaged with `export.flip_tta`) over evaluation batches and summarises the
probabilities, the top-1 confidences and the penultimate-layer embeddings with
`kcls.monitoring.drift.build_profile`. A run computes it on every image it held out
from training (its validation and test splits, `REFERENCE_SPLITS`: the more images, the
fewer false alarms, `kcls.monitoring.drift.MIN_REFERENCE_EXAMPLES`) and writes it into
its run directory and every export (`assets/reference.json`, see `kcls.layout`), where
`kcls monitor` reads it back.

Example:

>>> profile = reference_profile(classifier, test_batches, class_names,
...                             SingleLabelTask(temperature=1.3))  # doctest: +SKIP
>>> profile["predicted_distribution"][:2]  # doctest: +SKIP
[0.1, 0.098]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kcls.config import ConfigError, Recipe
from kcls.data.pipeline import eval_pipeline
from kcls.data.sources import load_splits
from kcls.data.tta import tta_views
from kcls.models.classifier import embedding_model, inference_function
from kcls.monitoring.drift import build_profile
from kcls.tasks import SingleLabelTask, Task


def profile_outputs(classifier: keras.Model, batches: tf.data.Dataset, task: Task,
                    flip_tta: bool = False, shift_tta: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Served probabilities, embeddings and labels of `classifier` over `batches`.

    Args:
        classifier: keras.Model from `kcls.models.classifier.build_classifier`.
        batches: finite dataset of `(float32 images, float32 one-hot labels [B, C])`.
        task: the fitted single-label Task, whose (temperature-scaled) probabilities
            the export serves.
        flip_tta: average the probabilities of each image and its mirror, as an export
            with `export.flip_tta` serves them (the embedding is the plain image's).
        shift_tta: with `flip_tta`, average six views, as `export.shift_tta` serves.

    Returns:
        `(probabilities float64 [N, C], embeddings float32 [N, D], labels int64 [N])`.
    """
    predict = inference_function(embedding_model(classifier))  # the chief alone can run it
    probabilities, embeddings, labels = [], [], []
    for images, one_hot in batches:
        embedding, logits = predict(images)
        batch_probabilities = task.probabilities(logits)
        if flip_tta:
            views = [task.probabilities(predict(view)[1])
                     for view in tta_views(images, shift_tta)]
            batch_probabilities = (batch_probabilities + sum(views)) / (1 + len(views))
        probabilities.append(batch_probabilities)
        embeddings.append(np.asarray(embedding, np.float32))
        labels.append(np.argmax(one_hot, axis=-1))
    return (np.concatenate(probabilities), np.concatenate(embeddings),
            np.concatenate(labels).astype(np.int64))


# What a run's reference profile is computed on (`split` of the profile).
REFERENCE_SPLITS = "validation+test"


def reference_profile(classifier: keras.Model, batches: tf.data.Dataset,
                      class_names: list[str], task: Task | None = None,
                      flip_tta: bool = False, split: str = "test", shift_tta: bool = False
                      ) -> dict[str, Any]:
    """The reference profile (`kcls.monitoring.drift.build_profile`) of `classifier` on
    `batches`, with the temperature (`task`'s; default none) and `flip_tta` / `shift_tta`
    it was computed under, and the name of the held-out `split` (`REFERENCE_SPLITS` for
    runs)."""
    task = task or SingleLabelTask()
    probabilities, embeddings, labels = profile_outputs(classifier, batches, task, flip_tta,
                                                        shift_tta)
    profile = build_profile(probabilities, embeddings, labels, class_names)
    profile.update(temperature=task.metadata()["temperature"], flip_tta=flip_tta,
                   shift_tta=shift_tta, split=split)
    return profile


def recipe_reference_profile(classifier: keras.Model, recipe: Recipe,
                             class_names: list[str], task: Task) -> dict[str, Any]:
    """The reference profile on every image `recipe` held out (its validation and test
    splits, same seed, so never a training image), for runs that finished before kcls
    wrote one (`kcls export`).

    Raises:
        ConfigError: the recipe's data cannot be loaded, or its classes are not
            `class_names`.
    """
    splits = load_splits(recipe.data, recipe.label_format)
    if splits.class_names != class_names:
        raise ConfigError(f"The data {recipe.data.source} now has the classes "
                          f"{splits.class_names}, the run {class_names}: the reference profile "
                          "cannot be computed on it. Restore the data, or export with the "
                          "run's reference.json.")
    examples = splits.test if splits.validation is None else splits.test.concatenate(
        splits.validation)
    batches = eval_pipeline(examples, len(class_names),
                            dataclasses.replace(recipe.data, cache="none"))
    return reference_profile(classifier, batches, class_names, task, recipe.export.flip_tta,
                             REFERENCE_SPLITS, recipe.export.shift_tta)
