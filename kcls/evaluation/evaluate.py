"""Evaluating a classifier: predictions over a dataset, and `kcls evaluate` for saved models.

`evaluate_classifier` runs a Keras classifier over an evaluation pipeline (optionally
with horizontal-flip test-time augmentation, where the task supports it) and scores the
one set of predictions with the task (`kcls.tasks.Task.evaluate`); `evaluate_model` does
it for an export or a run directory on held-out data and writes the report
(`kcls.evaluation.report`).

Example:

>>> evaluation = evaluate_model("saved_models/quickstart", out_dir="report")  # doctest: +SKIP
>>> evaluation.metrics["accuracy"]  # doctest: +SKIP
0.99
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from kcls.config import ConfigError
from kcls.data.folder import skipped_files_line
from kcls.data.pipeline import eval_pipeline
from kcls.data.slices import slice_values
from kcls.data.sources import HeldOut, Splits, has_files, split_folders_note, test_examples
from kcls.data.tta import View, tta_transforms
from kcls.evaluation.report import write_report
from kcls.evaluation.slices import score_slices, write_slices
from kcls.files import check_output_dir
from kcls.load import LoadedClassifier, load_classifier
from kcls.models.classifier import embedding_model, inference_function
from kcls.tasks import CalibrationPlan, Evaluation, SingleLabelTask, Task


def predict_batches(classifier: keras.Model, batches: tf.data.Dataset,
                    view: View | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Runs `classifier` in inference mode over `batches`.

    Args:
        classifier: keras.Model, images -> float32 logits `[B, C]`.
        batches: finite dataset of `(float32 images, float32 labels [B, C])` (one-hot or
            multi-hot).
        view: predict on this view of the images instead (`kcls.data.tta`: the mirror,
            a shift), or None.

    Returns:
        `(logits float32 [N, C], labels float32 [N, C])`.

    Raises:
        ConfigError: a logit is NaN or infinite (training diverged; the message says
            what to change).
    """
    (logits,), labels = _predict_views(classifier, batches, [view])
    return logits, labels


def predict_views(classifier: keras.Model, batches: tf.data.Dataset,
                  views: list[View]) -> list[np.ndarray]:
    """`predict_batches`' logits `[N, C]` for each of `views`, in one pass over `batches`
    (each batch read and decoded once, however many views)."""
    return _predict_views(classifier, batches, views)[0]


def _predict_views(classifier: keras.Model, batches: tf.data.Dataset,
                   views: list[View | None]) -> tuple[list[np.ndarray], np.ndarray]:
    # One pass, batch by batch: `predict()` would read the data twice (images, then
    # labels) and warn that a dataset of unknown length "ran out of data". Run here alone
    # (`inference_function`), so that the chief of several workers can evaluate.
    predict = inference_function(classifier)
    logits: list[list[np.ndarray]] = [[] for _ in views]
    labels = []
    for images, batch_labels in batches:
        for view_logits, view in zip(logits, views):
            view_logits.append(predict(images if view is None else view(images)))
        labels.append(batch_labels.numpy())
    return ([_finite(np.concatenate(each).astype(np.float32)) for each in logits],
            np.concatenate(labels).astype(np.float32))


def _finite(logits: np.ndarray) -> np.ndarray:
    """`logits`, or a ConfigError when one of them is NaN or infinite."""
    broken = int(np.count_nonzero(~np.isfinite(logits).all(axis=1)))
    if broken:  # every metric, the temperature and scikit-learn would fail on them
        raise ConfigError(
            f"The classifier outputs NaN or infinite logits for {broken} of {len(logits)} "
            "images: its training diverged (a NaN loss). Train again with a lower "
            "train.learning_rate (`kcls lr-find NAME` suggests one) or with train.clipnorm=1.")
    return logits


def predict_embeddings(classifier: keras.Model, batches: tf.data.Dataset
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`predict_batches` with the penultimate-layer embeddings too: `(embeddings float32
    [N, D], logits float32 [N, C], labels float32 [N, C])`."""
    with_embedding = inference_function(embedding_model(classifier))  # the chief alone
    embeddings, logits, labels = [], [], []
    for images, batch_labels in batches:
        embedding, logit = with_embedding(images)
        embeddings.append(embedding)
        logits.append(logit)
        labels.append(batch_labels.numpy())
    return tuple(np.concatenate(values).astype(np.float32)
                 for values in (embeddings, logits, labels))


def fit_after_training(classifier: keras.Model, task: Task, plan: CalibrationPlan,
                       held_out: tf.data.Dataset, fitted_on: str,
                       training: tf.data.Dataset | None = None) -> Task:
    """What a run fits after training: the task's calibration (`plan.method`) on the
    held-out batches, then, with `plan.reject_coverage`, the rejection rule: class means
    of the `training` batches' embeddings, the threshold on the held-out ones.

    Args:
        classifier: keras.Model, images -> logits.
        task: the unfitted Task.
        plan: its CalibrationPlan.
        held_out: finite `(images, labels [B, C])` batches of held-out images.
        fitted_on: where they come from, for reports (`validation split`).
        training: finite batches of training images in evaluation mode; needed with a
            rejection coverage.
    """
    if plan.reject_coverage is None:
        logits, labels = predict_batches(classifier, held_out)
        return task.fit(logits, labels, fitted_on) if plan.method != "none" else task
    embeddings, logits, labels = predict_embeddings(classifier, held_out)
    if plan.method != "none":
        task = task.fit(logits, labels, fitted_on)
    train_embeddings, _, train_labels = predict_embeddings(classifier, training)
    return task.fit_rejection(train_embeddings, train_labels, embeddings, plan.reject_coverage,
                              fitted_on, labels.shape[1])


def predict_logits(classifier: keras.Model, batches: tf.data.Dataset
                   ) -> tuple[np.ndarray, np.ndarray]:
    """`predict_batches` with one-hot labels read as classes: `(logits float32 [N, C],
    labels int64 [N])`."""
    logits, one_hot = predict_batches(classifier, batches)
    return logits, np.argmax(one_hot, axis=-1).astype(np.int64)


def evaluate_classifier(classifier: keras.Model, batches: tf.data.Dataset,
                        class_names: list[str] | None = None, flip_tta: bool = False,
                        task: Task | None = None, shift_tta: bool = False) -> Evaluation:
    """All metrics of `classifier` on `batches`, as `task` scores them.

    Args:
        classifier: keras.Model, images -> float32 logits `[B, C]`.
        batches: finite dataset of `(float32 images, float32 labels [B, C])`.
        class_names: list[str] of C names; default "0".."C-1".
        flip_tta: also score the average of the probabilities of each image and its
            mirror (under `metrics["tta"]`, never in place of the plain ones).
        task: the fitted Task (its temperature or thresholds apply, and its rejection
            rule's coverage is measured); default a single-label task without calibration.
        shift_tta: with `flip_tta`, average six views: the image and its mirror, each also
            shifted by a pixel up-left and down-right (`kcls.data.tta`).
    """
    task = task or SingleLabelTask()
    embeddings = None
    if task.rejection is not None:  # its coverage on the test images is measured too
        embeddings, logits, labels = predict_embeddings(classifier, batches)
    else:
        logits, labels = predict_batches(classifier, batches)
    class_names = class_names or [str(index) for index in range(logits.shape[1])]
    views = predict_views(classifier, batches, tta_transforms(shift_tta)) if flip_tta else None
    return task.evaluate(logits, labels, class_names, views, embeddings)


def evaluate_model(model_path: str, data_source: str | None = None,
                   out_dir: str | None = None, flip_tta: bool = False,
                   log: Callable[[str], None] = print,
                   splits: Splits | None = None, slice_by: str | None = None,
                   shift_tta: bool = False) -> Evaluation:
    """Evaluates an export or a run directory and writes the report (what `kcls evaluate` does).

    The model's task scores it as it serves (its calibration temperature or per-label
    thresholds, from `kcls.json` or `run.json` / `metrics.json`).

    Args:
        model_path: an export (version or model folder) or a run directory.
        data_source: `folder:PATH` evaluates every image of that folder (its class
            folders must be the model's classes; a folder of split folders, `train/`,
            `val/`, `test/`: its test split, `test/` or carved from `train/` as training
            carves it, said in a log line); any other source (`tfds:NAME`,
            `sklearn:digits`, `manifest:PATH.csv`) the test split of that source. `None`:
            the test split the model held out: the test files its run recorded (`run.json`,
            `kcls.json`), however the folder grew since, or for sources without files the
            recipe's split (same seed, so never an image it trained on).
        out_dir: where `metrics.json`, `report.md` and the plots go (None: no files).
        flip_tta: also report flip test-time augmentation metrics.
        log: receives a line naming the files of the data that did not reach the model
            (unreadable or undecodable images of a folder), when there are any.
        splits: evaluate on `splits.test` (the data the model was trained with, e.g.
            in-memory arrays) instead of loading `data_source` or the recipe's source.
        slice_by: also score slices of the images, by a manifest column (`site`) or a
            folder of their path (`path:1`; `kcls.data.slices`): `slices.json`,
            `slices.png` and a report section in `out_dir`, a summary line to `log`.
        shift_tta: the six-view flip+shift TTA metrics instead (implies `flip_tta`).

    Returns:
        The Evaluation; its `skipped` lists those files (also in `report.md`).

    Raises:
        ConfigError: unusable data, class names that differ from the model's, flip
            TTA for a task without it, or a `slice_by` that cannot apply.
        FileNotFoundError: `model_path` is neither an export nor a run directory.
        OutputFolderError: `out_dir` cannot be written.
    """
    if out_dir:
        check_output_dir(out_dir)  # before the model and the data are read
    loaded = load_classifier(model_path)
    flip_tta = flip_tta or shift_tta  # the shifted views are added to the mirror
    if flip_tta and not loaded.task.supports_flip_tta:
        raise ConfigError(f"--flip-tta is not supported for {loaded.task.description} models "
                          f"(model.task={loaded.task.name}); evaluate without it.")
    held_out = (HeldOut(splits.test, splits.skipped, splits.test_files) if splits is not None
                else recorded_or_given(loaded, model_path, data_source, log))
    slice_source = data_source or loaded.recipe.data.test_source or loaded.recipe.data.source
    if slice_by:  # an unknown column fails here, before the model's pass
        check_slicing(loaded.task, slice_by, held_out.files, slice_source)
    batches = eval_pipeline(held_out.examples, len(loaded.class_names),
                            dataclasses.replace(loaded.recipe.data, cache="none"))
    evaluation = evaluate_classifier(loaded.classifier, batches, loaded.class_names, flip_tta,
                                     loaded.task, shift_tta)
    # Read after the pass: files failing to decode during it were appended to `skipped`.
    evaluation.skipped, evaluation.files = list(held_out.skipped), held_out.evaluated_files()
    if held_out.skipped:
        log(skipped_files_line(held_out.skipped))
    sliced = score_slices(evaluation, slice_by, slice_source) if slice_by else None
    if sliced:
        log(sliced.summary_line())
    if out_dir:
        if sliced:
            write_slices(out_dir, sliced)
        write_report(out_dir, evaluation, loaded.task, loaded.class_names,
                     sections=sliced.report_section() if sliced else None)
    return evaluation


def check_slicing(task: Task, slice_by: str, files: list[str] | None, source: str) -> None:
    """Raises `ConfigError` unless `slice_by` can group `files` of `source` and `task`
    supports slices (`Task.supports_slices`), naming the fix."""
    if not task.supports_slices:
        raise ConfigError(f"--slice-by is not supported for {task.description} models "
                          f"(model.task={task.name}) yet; evaluate without it.")
    slice_values(slice_by, files, source)


def recorded_or_given(loaded: LoadedClassifier, model_path: str, data_source: str | None,
                      log: Callable[[str], None]) -> HeldOut:
    """What `evaluate_model` scores: `data_source`, or else the test files the model's run
    recorded (for older models without them, the recipe's test split made again)."""
    data = loaded.recipe.data
    test_files = loaded.metadata.get("test_files") if data_source is None else None
    if data_source is None and test_files is None and has_files(data):
        log(f"warning: {model_path} recorded no test files (trained by an older kcls): its "
            f"test split is made again from {data.source} as it is now; if images were "
            "added since, some of them may be images it trained on.")
    if data_source:
        note = split_folders_note(data_source)
        if note:
            log(note)
    return test_examples(data, loaded.class_names, data_source, test_files,
                         loaded.recipe.label_format)
