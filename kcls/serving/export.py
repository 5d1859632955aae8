"""Float32 SavedModel export in TF Serving's versioned layout.

`saved_models/<model_name>/<version>/` holds:

- signature `serving_default`: `image_bytes` (tf.string `[N]`, encoded JPEG/PNG/GIF/BMP)
  -> `probabilities` (float32 `[N, C]`), `classes` (int32 `[N, k]`), `scores`
  (float32 `[N, k]`), `labels` (tf.string `[N, k]`). Decoding and resizing happen in
  the graph with `kcls.data.pipeline.prepare_image`, exactly as in evaluation. This is
  what TF Serving's REST API calls with `{"instances": [{"b64": "..."}]}`.
- signature `predict_images`: `images` (uint8 `[N, H, W, 3]`) -> the same outputs and
  `embedding` (float32 `[N, D]`, the penultimate layer: what `kcls monitor` compares
  with the reference profile).
- signature `classify`, for TF Serving's Classify API (method name
  `tensorflow/serving/classify`): `inputs` (tf.string `[N]`, serialized `tf.Example`s
  with a bytes feature `image_bytes`) -> `classes` (tf.string `[N, k]`, labels) and
  `scores` (float32 `[N, k]`).
- `assets/reference.json`: the reference profile of the test split
  (`kcls.monitoring.profile`), which `kcls monitor` compares production images or
  logged predictions with.
- `assets/labels.txt` (one class name per line), `kcls.json` (recipe, metrics, versions)
  and `model.weights.h5` (the Keras weights, from which `kcls.load.load_classifier`
  rebuilds the classifier; TF Serving ignores it). File names: `kcls.layout`.

The outputs are the task's (`kcls.tasks.Task.serving_outputs`). With a calibration
temperature T (`evaluate.calibrate`, `kcls.metrics.calibration.fit_temperature`) every
signature serves `probabilities = softmax(logits / T)` (the argmax, hence the classes,
unchanged) and `kcls.json` records T under `temperature` (null: T = 1).

A multi-label model (`model.task=multilabel`) serves `probabilities = sigmoid(logits)`
per label, `predicted` (int32 `[N, C]`, 1 where a label's probability reaches its
threshold), and `classes`, `scores` and `labels` over all C labels, best first, with
the labels below their thresholds blanked (`""`): the labels above threshold, in
order. The per-label thresholds (tuned on the validation split,
`kcls.metrics.multilabel.tune_thresholds`) are constants of the graph and listed in
`kcls.json` under `thresholds`; `task` names the task there.

With `export.flip_tta` every signature averages the probabilities of each image and its
horizontal mirror (the test-time augmentation `evaluate.flip_tta` measures).

After each export, `<base_dir>/models.config` lists every model under `base_dir` for
TF Serving (`kcls.serving.publish`).

Exports are always float32: a model trained under a mixed policy is rebuilt under
float32 and its weights copied, because bf16/fp16 graphs break CPU serving and the
TFLite converter. A version is written to a hidden temporary sibling folder and then
renamed (`kcls.serving.publish`), so a server polling the base path never loads a
half-written version.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from kcls.config import Recipe, to_dict
from kcls.data.pipeline import prepare_image
from kcls.environment import software_versions
from kcls.files import write_bytes, write_json, write_text
from kcls.layout import LABELS_FILE, METADATA_FILE, REFERENCE_FILE, SAVED_MODEL_FILE, WEIGHTS_FILE
from kcls.load import float32_architecture
from kcls.serving.graph import decode_images, served_outputs
from kcls.serving.onnx import write_onnx
from kcls.serving.publish import (
    check_model_labels,
    new_version_folder,
    publish_version,
    write_models_config,
)
from kcls.tasks import Task, get_task

IMAGE_INPUT = "image_bytes"  # serving_default input, and the tf.Example feature of `classify`
CLASSIFY_SIGNATURE = "classify"
CLASSIFY_METHOD_NAME = "tensorflow/serving/classify"

def export_saved_model(classifier: keras.Model, recipe: Recipe, class_names: list[str],
                       metrics: dict[str, Any] | None = None,
                       base_dir: str | Path | None = None, task: Task | None = None,
                       reference: dict[str, Any] | None = None,
                       test_files: list[str] | None = None,
                       parity_examples: tf.data.Dataset | None = None) -> Path:
    """Writes the next version of `recipe.model_name` under `base_dir` and returns its path.

    Args:
        classifier: trained keras.Model, float images `[B, S, S, 3]` in [0, 255] -> logits.
        recipe: Recipe that trained it (image size, model config, export settings).
        class_names: list[str], one per output class.
        metrics: test-split metrics to record in `kcls.json`.
        base_dir: overrides `recipe.export.base_dir`.
        task: the fitted Task (`kcls.tasks`), whose probabilities and outputs every
            signature serves (its calibration temperature or per-label thresholds are
            constants of the graph); default the recipe's task, unfitted.
        reference: the reference profile (`kcls.monitoring.profile.reference_profile`)
            written to `assets/reference.json`; None writes none (`kcls monitor` then
            says how to get one).
        test_files: the image files of the test split the metrics come from
            (`kcls.data.sources.Splits.test_files`), recorded in `kcls.json` so that
            `kcls evaluate` scores the same images later; None for sources without files.
        parity_examples: with `export.onnx`, the unbatched `(uint8 image, label)` test
            images ONNX Runtime is checked on against the SavedModel
            (`kcls.serving.onnx.write_onnx`); default the recipe's test split.

    Returns:
        Path of the new version directory, e.g. `saved_models/quickstart/3`. The
        base dir's `models.config` is rewritten to list it.

    Raises:
        ConfigError: the model's latest version serves other classes
            (`kcls.serving.publish.check_model_labels`).
        MissingOnnxError, OnnxError: with `export.onnx`, the ONNX packages are missing
            or the ONNX model disagrees with the SavedModel; nothing is published.
    """
    task = task or get_task(recipe.model.task)
    base_dir = Path(base_dir or recipe.export.base_dir)
    model_dir = base_dir / recipe.model_name
    check_model_labels(model_dir, class_names)
    temporary = new_version_folder(model_dir)
    try:
        float32_classifier = _float32_copy(classifier, recipe, len(class_names))
        archive = _serving_archive(float32_classifier, class_names, task, recipe)
        archive.write_out(str(temporary), verbose=False)
        # Keras' own weights file, which `kcls.load` reads: it addresses weights by layer
        # and variable, where the SavedModel only keeps a list of variables.
        float32_classifier.save_weights(temporary / WEIGHTS_FILE)
        _set_method_name(temporary, CLASSIFY_SIGNATURE, CLASSIFY_METHOD_NAME)
        write_text(temporary / LABELS_FILE, "\n".join(class_names) + "\n")
        if reference is not None:
            write_json(temporary / REFERENCE_FILE, reference, indent=None)
        metadata = {**software_versions(), "model_name": recipe.model_name,
                    "image_size": recipe.data.image_size, "class_names": class_names,
                    **task.metadata(), "metrics": metrics or {}, "recipe": to_dict(recipe),
                    "test_files": test_files}
        if recipe.export.onnx:
            metadata["onnx"] = write_onnx(temporary, float32_classifier, recipe, class_names,
                                          task, parity_examples)
        write_json(temporary / METADATA_FILE, metadata)
        version_dir = publish_version(temporary, model_dir)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    write_models_config(base_dir)
    return version_dir


def _set_method_name(export_dir: Path, signature: str, method_name: str) -> None:
    """Sets the `method_name` of one signature in `export_dir/saved_model.pb`.

    `tf.saved_model.save` (which Keras export uses) marks every signature
    `tensorflow/serving/predict`; TF Serving's Classify API wants
    `tensorflow/serving/classify`. TF2 loaders ignore the field.
    """
    path = export_dir / SAVED_MODEL_FILE
    saved_model = saved_model_pb2.SavedModel.FromString(path.read_bytes())
    for meta_graph in saved_model.meta_graphs:
        meta_graph.signature_def[signature].method_name = method_name
    write_bytes(path, saved_model.SerializeToString(deterministic=True))
    _refresh_fingerprint(export_dir)


def _refresh_fingerprint(export_dir: Path) -> None:
    """Recomputes `fingerprint.pb`, whose checksum covers the `saved_model.pb` just edited."""
    fingerprint = export_dir / "fingerprint.pb"
    if not fingerprint.exists():
        return
    try:
        from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting
    except ImportError:  # private API: a stale fingerprint is worse than none
        fingerprint.unlink()
        return
    write_bytes(fingerprint, fingerprinting.CreateFingerprintDef(str(export_dir)))


def _float32_copy(classifier: keras.Model, recipe: Recipe, num_classes: int) -> keras.Model:
    if all(layer.dtype_policy.name == "float32" for layer in classifier._flatten_layers()):
        return classifier
    float32_model = float32_architecture(recipe, num_classes)
    float32_model.set_weights(classifier.get_weights())
    return float32_model


def _serving_archive(model: keras.Model, class_names: list[str], task: Task,
                     recipe: Recipe) -> keras.export.ExportArchive:
    image_size, resize = recipe.data.image_size, recipe.data.resize
    outputs = served_outputs(model, class_names, task, recipe)

    def serve_image_bytes(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        images = decode_images(image_bytes, image_size, resize)
        served = outputs(images)
        del served["embedding"]  # TF Serving clients get the outputs they always got
        return served

    def predict_images(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return outputs(prepare_image(images, image_size, resize))

    def classify(inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        features = tf.io.parse_example(
            inputs, {IMAGE_INPUT: tf.io.FixedLenFeature([], tf.string)})
        served = serve_image_bytes(features[IMAGE_INPUT])
        return {"classes": served["labels"], "scores": served["scores"]}

    # No `archive.track(model)`: the endpoints track the variables they use, and tracking
    # the model too saved its Keras variables beside them, every weight twice in
    # variables/ (Keras 3.15; tests/test_run_details.py pins one copy).
    archive = keras.export.ExportArchive()
    archive.add_endpoint("serving_default", serve_image_bytes,
                         input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_INPUT)])
    archive.add_endpoint("predict_images", predict_images,
                         input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8,
                                                        name="images")])
    archive.add_endpoint(CLASSIFY_SIGNATURE, classify,
                         input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    return archive
