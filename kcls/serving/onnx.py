"""ONNX export: the SavedModel's outputs, preprocessing inside, checked by ONNX Runtime.

`export.onnx=true` (or `kcls export RUN_DIR --format onnx`) adds `model.onnx` to the
export version, for ONNX Runtime, OpenVINO, TensorRT or Triton (whose model repository
layout, `<model>/<version>/model.onnx`, is the export's). Its contract:

- input `images`: float32 `[N, H, W, 3]`, RGB, channels last, pixel values in [0, 255]
  (not normalised); any H and W, one size per call. The graph resizes to the model's
  `S x S` as evaluation does (`data.resize`; `kcls.data.pipeline.prepare_images_by_products`,
  the same weights as `prepare_image` in matrix products, which converters translate
  exactly) and normalises as the backbone does.
- outputs: `probabilities` float32 `[N, C]` (calibrated: `softmax(logits / T)`),
  `classes` int32 `[N, k]` and `scores` float32 `[N, k]` (the top k), `embedding` float32
  `[N, D]`, the task's other numeric outputs (multi-label: `predicted` int32 `[N, C]`)
  and, with a rejection rule, `known` bool `[N]` and `known_score` float32 `[N]`. No
  string tensors (TensorRT has none): class names are in the metadata.
- metadata (`metadata_props`): `kcls.class_names` (JSON list, index = class), `kcls.input`
  (this contract in one line), `kcls.image_size`, `kcls.resize`, `kcls.task` (the task's
  `metadata()`, temperature and rejection rule included, as JSON), `kcls.version`.

The graph is the SavedModel's (`kcls.serving.graph.served_outputs`) behind the resize,
converted by `tf2onnx.convert.from_function` at opset `OPSET`. Keras 3's
`model.export(format="onnx")` and `tf2onnx.convert.from_keras` convert the network alone
(fixed input size, logits): the resize, temperature, top-k and rejection would be the
user's to redo. Before the version is published, ONNX Runtime runs the converted model
on the run's test split beside the SavedModel (`check_parity`); top-1 agreement under
`MINIMUM_AGREEMENT` refuses the export. `pip install "kcls[onnx]"` installs the
converter and the runtime.

Example:

>>> record = write_onnx(version_dir, classifier, recipe, class_names, task)  # doctest: +SKIP
>>> record["parity"]["top1_agreement"]  # doctest: +SKIP
1.0
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kcls import __version__
from kcls.config import Recipe
from kcls.data.pipeline import prepare_images_by_products
from kcls.data.sources import load_splits
from kcls.files import write_bytes
from kcls.layout import METADATA_FILE, ONNX_FILE
from kcls.serving.graph import image_decoder, served_outputs
from kcls.serving.predict import PredictionError
from kcls.tasks import Task, task_from_metadata

OPSET = 17  # ONNX Runtime, OpenVINO and TensorRT 8.6+ all run opset 17
MINIMUM_AGREEMENT = 0.999
INPUT_NAME = "images"
INPUT_CONTRACT = ("float32 [N, H, W, 3], RGB, channels last, values in [0, 255] (not "
                  "normalised), any H and W (one size per call); resized to {size}x{size} "
                  "({resize}) inside")
PARITY_BATCH = 32
INSTALL = 'pip install "kcls[onnx]"'


class OnnxError(ValueError):
    """An ONNX export or model kcls cannot make or use; the message says what to do."""


class MissingOnnxError(ImportError):
    """The optional ONNX packages (`tf2onnx`, `onnx`, `onnxruntime`) are not installed."""


def require_onnx(what: str = "ONNX export") -> None:
    """Raises `MissingOnnxError`, naming the install, unless the ONNX packages import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError as error:
        raise MissingOnnxError(f"{what} needs tf2onnx, onnx and onnxruntime ({error.name} is "
                               f"missing): {INSTALL}.") from None


def onnx_model(classifier: keras.Model, recipe: Recipe, class_names: list[str],
               task: Task) -> Any:
    """The `onnx.ModelProto` of the contract above (module docstring).

    Args:
        classifier: float32 keras.Model, images `[N, S, S, 3]` in [0, 255] -> logits `[N, C]`.
        recipe: Recipe: image size, resize mode, `export.top_k`, `export.flip_tta`.
        class_names: list[str], one per class, for the metadata.
        task: the fitted Task whose outputs (and rejection rule) the graph serves.
    """
    require_onnx()
    import onnx
    import tf2onnx

    image_size, resize = recipe.data.image_size, recipe.data.resize
    outputs = served_outputs(classifier, class_names, task, recipe)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32,
                                                name=INPUT_NAME)])
    def graph(images: tf.Tensor) -> dict[str, tf.Tensor]:
        served = outputs(prepare_images_by_products(images, image_size, resize))
        return {name: value for name, value in served.items() if value.dtype != tf.string}

    _patch_tf2onnx()
    model, _ = tf2onnx.convert.from_function(graph, input_signature=graph.input_signature,
                                             opset=OPSET)
    contract = INPUT_CONTRACT.format(size=image_size, resize=resize)
    onnx.helper.set_model_props(model, {
        "kcls.class_names": json.dumps(class_names), "kcls.input": contract,
        "kcls.image_size": str(image_size), "kcls.resize": resize,
        "kcls.task": json.dumps(task.metadata()), "kcls.version": __version__})
    model.doc_string = f"kcls {recipe.model_name} classifier; input {contract}."
    model.producer_name = "kcls"
    return model


def _patch_tf2onnx() -> None:
    """Keras's own fix of tf2onnx 1.17 for numpy 2 (`np.object`, its constant folding).

    Private (`keras.src`): Keras applies it in `model.export(format="onnx")` and has no
    public way; tests/test_onnx.py converts through it, so a Keras that drops it fails
    there first.
    """
    from keras.src.export.tf2onnx_lib import patch_tf2onnx

    with warnings.catch_warnings():  # its `hasattr(np, "object")` warns under numpy 2
        warnings.simplefilter("ignore", FutureWarning)
        patch_tf2onnx()


def write_onnx(version_dir: str | Path, classifier: keras.Model, recipe: Recipe,
               class_names: list[str], task: Task,
               parity_examples: tf.data.Dataset | None = None) -> dict[str, Any]:
    """Converts, checks against the SavedModel in `version_dir`, writes `model.onnx`.

    Args:
        version_dir: an export version (not yet published) holding the SavedModel.
        classifier, recipe, class_names, task: as `onnx_model`.
        parity_examples: unbatched `(uint8 [H, W, 3], label)` images to compare on;
            default the recipe's test split.

    Returns:
        What `kcls.json` records under `onnx`: `file`, `opset`, `bytes`, versions and
        `parity` (`check_parity`).

    Raises:
        MissingOnnxError: the ONNX packages are not installed.
        OnnxError: top-1 agreement under `MINIMUM_AGREEMENT` (nothing is written).
    """
    import onnxruntime
    import tf2onnx

    model_bytes = onnx_model(classifier, recipe, class_names, task).SerializeToString()
    examples = parity_examples if parity_examples is not None else load_splits(
        recipe.data, recipe.label_format).test
    parity = check_parity(model_bytes, version_dir, examples)
    if parity["top1_agreement"] < MINIMUM_AGREEMENT:
        raise OnnxError(
            f"The ONNX model agrees with the SavedModel on {parity['top1_agreement']:.2%} of "
            f"{parity['images']} test images (top-1), under the {MINIMUM_AGREEMENT:.1%} "
            "required, so it was not exported; export without --format onnx (or "
            "export.onnx=false) and report the model's backbone to kcls.")
    write_bytes(Path(version_dir) / ONNX_FILE, model_bytes)
    return {"file": ONNX_FILE, "opset": OPSET, "bytes": len(model_bytes),
            "tf2onnx": tf2onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "parity": parity}


def check_parity(model_bytes: bytes, saved_model_dir: str | Path,
                 examples: tf.data.Dataset) -> dict[str, Any]:
    """ONNX Runtime against the SavedModel's `predict_images` on the same images.

    Both get the decoded images at their own sizes (uint8 for the SavedModel, the same
    values as float32 for ONNX), so the resize inside is compared too.

    Returns:
        `{"images", "top1_agreement", "max_probability_difference", "known_agreement"
        (None without a rejection rule), "runtime"}`.
    """
    import onnxruntime

    signature = tf.saved_model.load(str(saved_model_dir)).signatures["predict_images"]
    session = OnnxSession(model_bytes)
    same, differences, known_same = [], [], []
    for images in _same_size_batches(examples):
        expected = signature(images=tf.constant(images))
        actual = session.run(images.astype(np.float32))
        probabilities = expected["probabilities"].numpy()
        same.append(np.argmax(probabilities, -1) == np.argmax(actual["probabilities"], -1))
        differences.append(np.abs(probabilities - actual["probabilities"]).max())
        if "known" in actual:
            known_same.append(expected["known"].numpy() == actual["known"])
    if not same:
        raise OnnxError("No test image to check the ONNX model on: the recipe's test split "
                        "is empty; export without --format onnx.")
    return {"images": int(sum(len(batch) for batch in same)),
            "top1_agreement": float(np.mean(np.concatenate(same))),
            "max_probability_difference": float(max(differences)),
            "known_agreement": float(np.mean(np.concatenate(known_same))) if known_same
            else None,
            "runtime": f"onnxruntime {onnxruntime.__version__}"}


def _same_size_batches(examples: tf.data.Dataset) -> Iterator[np.ndarray]:
    """uint8 `[B, H, W, 3]` batches of consecutive images of one size (at most 32)."""
    batch: list[np.ndarray] = []
    for image, _ in examples.as_numpy_iterator():
        if batch and (image.shape != batch[0].shape or len(batch) == PARITY_BATCH):
            yield np.stack(batch)
            batch = []
        batch.append(image)
    if batch:
        yield np.stack(batch)


class OnnxSession:
    """An ONNX Runtime session of a kcls ONNX model, with its metadata.

    Attributes:
        class_names: list[str]; image_size: int; resize: str; task: the fitted Task its
            metadata records (temperature, rejection rule).
    """

    def __init__(self, model: bytes | str | Path, threads: int | None = None) -> None:
        require_onnx("Running an ONNX model")
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        source = model if isinstance(model, bytes) else str(model)
        self.session = onnxruntime.InferenceSession(source, options,
                                                    providers=["CPUExecutionProvider"])
        metadata = self.session.get_modelmeta().custom_metadata_map
        if "kcls.class_names" not in metadata:
            raise OnnxError(f"{model if not isinstance(model, bytes) else 'The model'} is not "
                            "a kcls ONNX model (no kcls.class_names metadata); export one "
                            "with `kcls export RUN_DIR --format onnx`.")
        self.class_names = json.loads(metadata["kcls.class_names"])
        self.image_size = int(metadata["kcls.image_size"])
        self.resize = metadata["kcls.resize"]
        task_metadata = json.loads(metadata["kcls.task"])
        self.task = task_from_metadata(task_metadata["task"], task_metadata)
        self.output_names = [output.name for output in self.session.get_outputs()]
        self._decoder = image_decoder(self.image_size, self.resize)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every output for float32 images `[N, H, W, 3]` in [0, 255]."""
        values = self.session.run(None, {INPUT_NAME: np.asarray(images, np.float32)})
        return dict(zip(self.output_names, values))

    def run_encoded(self, images: list[bytes]) -> dict[str, np.ndarray]:
        """Every output for encoded images, decoded and resized on the host as the
        SavedModel does (`kcls.serving.graph.image_decoder`; the graph's own resize of a
        `S x S` image is then the identity), so images of any sizes share a batch.

        Raises:
            PredictionError: one of the images does not decode (the batch fails whole).
        """
        try:
            prepared = self._decoder(images).numpy()
        except tf.errors.InvalidArgumentError:
            raise PredictionError("not a decodable JPEG, PNG, GIF or BMP image") from None
        return self.run(prepared)


def onnx_line(version_dir: Path) -> str | None:
    """One line on the version's ONNX model and its parity check, or None without one."""
    onnx = json.loads((Path(version_dir) / METADATA_FILE).read_text()).get("onnx")
    if not onnx:
        return None
    parity = onnx["parity"]
    return (f"ONNX model {Path(version_dir) / onnx['file']} (opset {onnx['opset']}): top-1 "
            f"agreement with the SavedModel {parity['top1_agreement']:.4f} on "
            f"{parity['images']} test images, largest probability difference "
            f"{parity['max_probability_difference']:.2e} ({parity['runtime']})")
