"""The SavedModel export as TF Serving sees it.

Served outputs are compared with the in-memory Keras model (evaluation mode) for raw
JPEG bytes and for the tensors TF Serving builds from our REST request JSON; the
signatures are checked with the real `saved_model_cli`; corrupt images, interrupted
exports, `models.config` and `kcls export RUN_DIR` are covered too.
"""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from kcls.cli import main
from kcls.config import DataConfig, ExportConfig, ModelConfig, Recipe, apply_overrides
from kcls.data.pipeline import prepare_image
from kcls.files import owner_tag
from kcls.layout import versions
from kcls.models.classifier import build_classifier
from kcls.recipes import load_recipe
from kcls.serving import client as serving_client
from kcls.serving import export as export_module
from kcls.serving.export import export_saved_model
from kcls.serving.publish import write_models_config

CLASS_NAMES = ["cat", "dog", "owl"]
IMAGE_SIZE = 32
TOP_K = 2
# Different sizes and aspect ratios: the signature decodes and resizes each image alone.
IMAGE_SHAPES = [(48, 40), (32, 32), (27, 61), (64, 64)]


def tiny_recipe(base_dir: Path, name: str = "tiny") -> Recipe:
    return Recipe(name=name, data=DataConfig(image_size=IMAGE_SIZE),
                  model=ModelConfig(backbone="resnet_v2_tiny"),
                  export=ExportConfig(base_dir=str(base_dir), top_k=TOP_K))


@pytest.fixture(scope="module")
def classifier():
    """Tiny untrained classifier whose head is spread out, so images get distinct outputs."""
    keras.utils.set_random_seed(0)
    model = build_classifier(ModelConfig(backbone="resnet_v2_tiny"), len(CLASS_NAMES),
                             IMAGE_SIZE)
    logits = model.get_layer("logits")
    kernel, bias = logits.get_weights()
    rng = np.random.default_rng(0)
    logits.set_weights([rng.normal(0.0, 5.0, kernel.shape).astype("float32"),
                        np.zeros_like(bias)])
    return model


@pytest.fixture(scope="module")
def exported(classifier, tmp_path_factory):
    """(version dir, loaded SavedModel) of the first export of `tiny`."""
    base = tmp_path_factory.mktemp("saved_models")
    version_dir = export_saved_model(classifier, tiny_recipe(base), CLASS_NAMES,
                                     metrics={"accuracy": 0.5})
    return version_dir, tf.saved_model.load(str(version_dir))


@pytest.fixture(scope="module")
def jpegs():
    """JPEG bytes of smooth colour images of several sizes (JPEG is lossy: see `expected`)."""
    images = []
    for index, (height, width) in enumerate(IMAGE_SHAPES):
        rows = np.linspace(0, 1, height)[:, None, None]
        columns = np.linspace(0, 1, width)[None, :, None]
        colour = np.array([[[(37 * index) % 256, (91 * index + 60) % 256, 200 - 40 * index]]])
        image = colour * (0.3 + 0.7 * rows) + 80 * columns * np.sin(index + rows * 6)
        images.append(tf.io.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8)).numpy())
    return images


@pytest.fixture(scope="module")
def expected(classifier, jpegs):
    """Keras-model probabilities `[N, C]` for the *decoded* JPEG pixels, evaluation mode."""
    batch = tf.stack([prepare_image(tf.io.decode_jpeg(data, channels=3), IMAGE_SIZE)
                      for data in jpegs])
    return tf.nn.softmax(classifier(batch, training=False)).numpy()


def tf_serving_inputs(body: dict, signature) -> dict[str, tf.Tensor]:
    """The input tensors TF Serving's REST handler builds from a `:predict` JSON body.

    Mirrors `FillTensorMapFromInstancesList` / `FillTensorMapFromInputsMap` in
    tensorflow_serving/util/json_tensor.cc for string inputs: `{"b64": ...}` objects
    are base64-decoded into DT_STRING elements; a plain `instances` list (or a
    non-object `inputs` value) feeds the single named input; rows are stacked on a new
    batch dimension.
    """
    specs = signature.structured_input_signature[1]
    assert ("instances" in body) != ("inputs" in body), "exactly one of instances/inputs"

    def is_b64(value) -> bool:
        return isinstance(value, dict) and list(value) == ["b64"] and isinstance(
            value["b64"], str)

    def decode(value):
        if isinstance(value, list):
            return [decode(item) for item in value]
        if is_b64(value):
            return base64.b64decode(value["b64"], validate=True)
        return value.encode() if isinstance(value, str) else value

    if "instances" in body:
        rows = body["instances"]
        assert isinstance(rows, list) and rows, "instances must be a non-empty list"
        if isinstance(rows[0], dict) and not is_b64(rows[0]):
            assert all(set(row) == set(specs) for row in rows)
            columns = {name: [row[name] for row in rows] for name in specs}
        else:
            assert len(specs) == 1, "a plain instances list needs a single-input signature"
            columns = {next(iter(specs)): rows}
    else:
        value = body["inputs"]
        if isinstance(value, dict) and not is_b64(value):
            columns = {name: value[name] for name in specs}
        else:
            assert len(specs) == 1
            columns = {next(iter(specs)): value}
    return {name: tf.constant(decode(values), dtype=specs[name].dtype)
            for name, values in columns.items()}


def tf_serving_examples(body: dict) -> tf.Tensor:
    """The serialized tf.Examples TF Serving builds from a `:classify` JSON body."""
    serialized = []
    for example in body["examples"]:
        features = {}
        for name, value in example.items():
            data = base64.b64decode(value["b64"], validate=True)
            features[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))
        serialized.append(tf.train.Example(
            features=tf.train.Features(feature=features)).SerializeToString())
    return tf.constant(serialized)


def assert_matches_keras(outputs: dict, expected: np.ndarray) -> None:
    np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, atol=1e-5)
    top = np.argsort(-expected, axis=1)[:, :TOP_K]
    np.testing.assert_array_equal(outputs["classes"].numpy(), top)
    np.testing.assert_allclose(outputs["scores"].numpy(),
                               np.take_along_axis(expected, top, axis=1), atol=1e-5)
    labels = [[label.decode() for label in row] for row in outputs["labels"].numpy()]
    assert labels == [[CLASS_NAMES[index] for index in row] for row in top]


def test_test_images_are_told_apart_by_the_model(expected):
    # Guards the comparisons below against a model that answers the same for every image.
    assert expected.shape == (len(IMAGE_SHAPES), len(CLASS_NAMES))
    assert np.ptp(expected, axis=0).max() > 0.05
    assert len(set(expected.argmax(axis=1))) > 1


def test_serving_default_on_jpeg_bytes_matches_the_keras_model(exported, jpegs, expected):
    _, loaded = exported
    outputs = loaded.signatures["serving_default"](image_bytes=tf.constant(jpegs))
    assert_matches_keras(outputs, expected)


@pytest.mark.parametrize("columnar", [False, True], ids=["instances", "inputs"])
def test_rest_request_as_tf_serving_decodes_it_matches_the_keras_model(
        exported, jpegs, expected, columnar):
    _, loaded = exported
    signature = loaded.signatures["serving_default"]
    wire = json.dumps(serving_client.rest_predict_request(jpegs, columnar=columnar))
    body = json.loads(wire)
    assert body["signature_name"] == "serving_default"
    inputs = tf_serving_inputs(body, signature)
    assert list(inputs) == ["image_bytes"] and inputs["image_bytes"].shape == (len(jpegs),)
    assert inputs["image_bytes"].numpy().tolist() == jpegs
    assert_matches_keras(signature(**inputs), expected)


def test_classify_signature_returns_labels_and_scores_of_the_top_k(exported, jpegs, expected):
    _, loaded = exported
    body = json.loads(json.dumps(serving_client.rest_classify_request(jpegs)))
    outputs = loaded.signatures[body["signature_name"]](inputs=tf_serving_examples(body))
    assert set(outputs) == {"classes", "scores"}
    top = np.argsort(-expected, axis=1)[:, :TOP_K]
    assert outputs["classes"].dtype == tf.string and outputs["scores"].dtype == tf.float32
    assert [[label.decode() for label in row] for row in outputs["classes"].numpy()] == [
        [CLASS_NAMES[index] for index in row] for row in top]
    np.testing.assert_allclose(outputs["scores"].numpy(),
                               np.take_along_axis(expected, top, axis=1), atol=1e-5)


def test_export_writes_labels_metadata_and_a_valid_fingerprint(exported):
    version_dir, _ = exported
    assert version_dir.name == "1"
    assert (version_dir / "assets" / "labels.txt").read_text().split() == CLASS_NAMES
    metadata = json.loads((version_dir / "kcls.json").read_text())
    assert metadata["class_names"] == CLASS_NAMES and metadata["metrics"] == {"accuracy": 0.5}
    # saved_model.pb was edited after saving (classify's method name): the fingerprint's
    # checksum must describe the edited file, not the original.
    from tensorflow.core.protobuf import fingerprint_pb2
    from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting

    fingerprint = tf.saved_model.experimental.read_fingerprint(str(version_dir))
    fresh = fingerprint_pb2.FingerprintDef.FromString(
        fingerprinting.CreateFingerprintDef(str(version_dir)))
    assert fingerprint.saved_model_checksum == fresh.saved_model_checksum


def parse_saved_model_cli(output: str) -> dict[str, dict]:
    """`saved_model_cli show --all` text -> {signature: {inputs, outputs, method}}."""
    output = output.split("Concrete Functions:")[0]
    parts = re.split(r"^signature_def\['([^']+)'\]:\s*$", output, flags=re.MULTILINE)
    signatures = {}
    for name, text in zip(parts[1::2], parts[2::2]):
        tensors = {"inputs": {}, "outputs": {}}
        for kind, key, dtype, shape in re.findall(
                r"(inputs|outputs)\['([^']+)'\] tensor_info:\s+dtype: (\w+)\s+shape: ([^\n]+)",
                text):
            tensors[kind][key] = (dtype, shape.strip())
        method = re.search(r"Method name is: (\S+)", text)
        signatures[name] = {**tensors, "method": method.group(1) if method else None}
    return signatures


def test_saved_model_cli_lists_the_three_signatures(exported):
    version_dir, _ = exported
    executable = shutil.which("saved_model_cli") or str(Path(sys.executable).parent
                                                        / "saved_model_cli")
    result = subprocess.run([executable, "show", "--dir", str(version_dir), "--all"],
                            capture_output=True, text=True, timeout=240,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    signatures = parse_saved_model_cli(result.stdout)
    classes, k = str(len(CLASS_NAMES)), str(TOP_K)
    assert signatures["serving_default"] == {
        "inputs": {"image_bytes": ("DT_STRING", "(-1)")},
        "outputs": {"probabilities": ("DT_FLOAT", f"(-1, {classes})"),
                    "classes": ("DT_INT32", f"(-1, {k})"),
                    "scores": ("DT_FLOAT", f"(-1, {k})"),
                    "labels": ("DT_STRING", f"(-1, {k})")},
        "method": "tensorflow/serving/predict"}
    assert signatures["predict_images"]["inputs"] == {"images": ("DT_UINT8", "(-1, -1, -1, 3)")}
    # predict_images adds the penultimate-layer embedding (for `kcls monitor`).
    assert set(signatures["predict_images"]["outputs"]) == {*serving_client.OUTPUTS,
                                                            "embedding"}
    assert signatures["classify"] == {
        "inputs": {"inputs": ("DT_STRING", "(-1)")},
        "outputs": {"classes": ("DT_STRING", f"(-1, {k})"), "scores": ("DT_FLOAT", f"(-1, {k})")},
        "method": "tensorflow/serving/classify"}


@pytest.mark.parametrize("bad", [b"this is text, not an image", "truncated"])
def test_a_corrupt_image_is_an_invalid_argument_error(exported, jpegs, bad):
    _, loaded = exported
    if bad == "truncated":
        bad = jpegs[0][: len(jpegs[0]) // 2]
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"(?i)unknown image file format|invalid jpeg|corrupt|premature"):
        loaded.signatures["serving_default"](image_bytes=tf.constant([jpegs[1], bad]))


def test_an_interrupted_export_leaves_no_version_behind(exported, classifier, monkeypatch):
    version_dir, _ = exported
    base_dir, model_dir = version_dir.parent.parent, version_dir.parent
    before = versions(model_dir)
    config_before = (base_dir / "models.config").read_text()

    def interrupt(*args, **kwargs):  # runs after the SavedModel files are written
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "_set_method_name", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_saved_model(classifier, tiny_recipe(base_dir), CLASS_NAMES)
    assert versions(model_dir) == before
    assert [path.name for path in model_dir.iterdir()] == [str(v) for v in before]
    assert (base_dir / "models.config").read_text() == config_before
    assert not [path for path in base_dir.iterdir() if path.name.startswith(".")]


def parse_models_config(text: str) -> list[dict[str, str]]:
    """TF Serving's ModelServerConfig text -> [{name, base_path, model_platform}]."""
    assert text.startswith("model_config_list {")
    return [dict(re.findall(r'(\w+): "([^"]*)"', block))
            for block in re.findall(r"config \{(.*?)\}", text, flags=re.DOTALL)]


def test_models_config_lists_every_exported_model_for_the_docker_mount(exported, tmp_path):
    version_dir, _ = exported
    text = (version_dir.parent.parent / "models.config").read_text()
    assert parse_models_config(text) == [
        {"name": "tiny", "base_path": "/models/tiny", "model_platform": "tensorflow"}]

    for folder in ("zebra/3", "alpha/1", "not_exported/notes", ".tmp-x/1", "empty/2"):
        (tmp_path / folder).mkdir(parents=True)
    for model in ("zebra/3", "alpha/1", ".tmp-x/1"):
        (tmp_path / model / "saved_model.pb").write_bytes(b"")
    text = write_models_config(tmp_path).read_text()
    assert [entry["name"] for entry in parse_models_config(text)] == ["alpha", "zebra"]
    assert parse_models_config(text)[1]["base_path"] == "/models/zebra"
    assert [path.name for path in tmp_path.iterdir() if path.is_file()] == ["models.config"]
    try:  # the real parser, when the optional serving extra is installed
        from google.protobuf import text_format
        from tensorflow_serving.config import model_server_config_pb2
    except ImportError:
        return
    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    assert [c.base_path for c in config.model_config_list.config] == [
        "/models/alpha", "/models/zebra"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real (one training step) quickstart run that also exported version 1."""
    from kcls.workflows.run import run_recipe

    base = tmp_path_factory.mktemp("run")
    recipe = apply_overrides(load_recipe("quickstart"), [
        "train.frozen_epochs=1", "train.unfrozen_epochs=0", "train.steps_per_epoch=1",
        "train.jit_compile=false", "data.batch_size=8", "data.validation_fraction=0",
        "data.test_fraction=0.05", f"export.base_dir={base / 'saved_models'}"])
    return run_recipe(recipe, base / "run", log=lambda message: None, verbose=0)


def test_kcls_export_re_exports_a_finished_run_as_the_next_version(finished_run):
    run_dir, first = finished_run.run_dir, finished_run.export_dir
    assert (run_dir / "model.weights.h5").is_file()
    assert json.loads((run_dir / "run.json").read_text())["class_names"] == [
        str(digit) for digit in range(10)]

    result = CliRunner().invoke(main, ["export", str(run_dir)])
    assert result.exit_code == 0, result.output
    second = first.parent / "2"
    assert f"exported float32 SavedModel to {second}" in result.output
    assert versions(first.parent) == [1, 2]
    assert json.loads((second / "kcls.json").read_text())["metrics"] == finished_run.metrics

    # Same trained weights: the re-export serves what the run's own export and the
    # in-memory model compute.
    samples = [path.read_bytes() for path in sorted((run_dir / "samples").glob("*.png"))[:4]]
    images = tf.stack([prepare_image(tf.io.decode_png(data, channels=3), 32) for data in samples])
    keras_probabilities = tf.nn.softmax(finished_run.classifier(images, training=False)).numpy()
    for version_dir in (first, second):
        served = tf.saved_model.load(str(version_dir)).signatures["serving_default"](
            image_bytes=tf.constant(samples))
        np.testing.assert_allclose(served["probabilities"].numpy(), keras_probabilities,
                                   atol=1e-5)


def test_kcls_export_of_a_run_without_a_reference_profile_computes_it(finished_run,
                                                                      tmp_path):
    """Runs of older kcls versions have no reference.json: the export computes it on the
    recipe's test split, which gives what the run itself wrote."""
    run_dir = finished_run.run_dir
    written = json.loads((run_dir / "reference.json").read_text())
    old_run = tmp_path / "old_run"
    shutil.copytree(run_dir, old_run, ignore=shutil.ignore_patterns("reference.json"))
    result = CliRunner().invoke(main, ["export", str(old_run), "--base-dir",
                                       str(tmp_path / "exports")])
    assert result.exit_code == 0, result.output
    (version,) = (tmp_path / "exports").glob("*/1")
    computed = json.loads((version / "assets" / "reference.json").read_text())
    assert computed["predicted_counts"] == written["predicted_counts"]
    np.testing.assert_allclose(computed["confidences"], written["confidences"], atol=1e-4)
    np.testing.assert_allclose(computed["embedding"]["mean"], written["embedding"]["mean"],
                               atol=1e-4)


def test_kcls_export_explains_a_folder_that_is_not_a_run(tmp_path):
    result = CliRunner().invoke(main, ["export", str(tmp_path)])
    assert result.exit_code == 1
    assert "not a finished kcls run directory" in result.output
    assert "config.json is missing" in result.output and "Traceback" not in result.output


def test_flip_tta_export_serves_the_mean_of_each_image_and_its_mirror(classifier, tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe = apply_overrides(recipe, ["export.flip_tta=true"])
    loaded = tf.saved_model.load(str(export_saved_model(classifier, recipe, CLASS_NAMES)))
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    floats = images.astype(np.float32)
    plain = tf.nn.softmax(classifier(floats, training=False)).numpy()
    mirrored = tf.nn.softmax(classifier(floats[:, :, ::-1], training=False)).numpy()
    assert np.abs(plain - mirrored).max() > 0.01  # the mirror changes the answer
    served = loaded.signatures["predict_images"](images=tf.constant(images))
    np.testing.assert_allclose(served["probabilities"].numpy(), (plain + mirrored) / 2,
                               atol=1e-5)


def test_shift_tta_export_serves_the_mean_of_six_views_computed_by_hand(classifier, tmp_path):
    recipe = apply_overrides(tiny_recipe(tmp_path), ["export.flip_tta=true",
                                                     "export.shift_tta=true"])
    loaded = tf.saved_model.load(str(export_saved_model(classifier, recipe, CLASS_NAMES)))
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    floats = images.astype(np.float32)
    padded = np.pad(floats, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    up_left, down_right = padded[:, 2:, 2:], padded[:, :-2, :-2]
    views = [floats, up_left, down_right]
    views += [view[:, :, ::-1] for view in views]
    expected = np.mean([tf.nn.softmax(classifier(view, training=False)).numpy()
                        for view in views], axis=0)
    served = loaded.signatures["predict_images"](images=tf.constant(images))
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-5)


def test_an_export_reloads_every_weight_by_name_with_moved_batchnorm(tmp_path):
    """BatchNorm statistics away from their initial values, so no two `[C]` vectors agree."""
    from kcls.load import load_classifier

    keras.utils.set_random_seed(1)
    model = build_classifier(ModelConfig(backbone="resnet_v2_tiny"), len(CLASS_NAMES),
                             IMAGE_SIZE)
    rng = np.random.default_rng(0)
    for variable in model.weights:
        if "_bn/" in variable.path:
            variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))
    export_dir = export_saved_model(model, tiny_recipe(tmp_path), CLASS_NAMES)

    loaded = load_classifier(export_dir).classifier
    saved = {variable.path: variable.numpy() for variable in model.weights}
    for variable in loaded.weights:
        np.testing.assert_array_equal(variable.numpy(), saved[variable.path],
                                      err_msg=variable.path)
    images = rng.uniform(0, 255, (3, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")
    np.testing.assert_allclose(loaded(images, training=False).numpy(),
                               model(images, training=False).numpy(), atol=1e-5)


def test_an_export_cleans_the_temporary_folders_of_killed_exports(classifier, tmp_path):
    import time

    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)  # an export killed with `kill -9`, on this host
    stale = [model_dir / f".tmp-{owner_tag(dead_pid)}-{'a' * 32}",
             model_dir / f".tmp-{'b' * 32}",  # an older kcls's name, two hours old
             tmp_path / f".tmp-{owner_tag(dead_pid)}-{'c' * 32}-models.config"]
    kept = [model_dir / f".tmp-{owner_tag(os.getpid())}-{'d' * 32}",  # running
            model_dir / f".tmp-{'e' * 32}",  # an older kcls's name, recent
            model_dir / ".hidden-notes"]  # not a kcls temporary
    for folder in stale + kept:
        if folder.name.endswith("models.config"):
            folder.write_text("half a config")
        else:
            folder.mkdir()
            (folder / "saved_model.pb").write_bytes(b"half")
    two_hours_ago = time.time() - 7200
    os.utime(stale[1], (two_hours_ago, two_hours_ago))
    version_dir = export_saved_model(classifier, tiny_recipe(tmp_path), CLASS_NAMES)
    assert version_dir == model_dir / "1"
    assert not [path for path in stale if path.exists()]
    assert all(path.exists() for path in kept)
