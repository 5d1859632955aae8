"""`kcls monitor` on a real export: verdicts, exit codes, reports and bad inputs."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from kcls.cli import main
from kcls.config import DataConfig, ExportConfig, ModelConfig, Recipe
from kcls.layout import REFERENCE_FILE
from kcls.models.classifier import build_classifier
from kcls.monitoring.monitor import DRIFT_EXIT_CODE, MonitorError, image_files, monitor
from kcls.monitoring.prediction_log import (
    PredictionLogError,
    append_predictions,
    prediction_record,
    read_predictions,
)
from kcls.monitoring.profile import reference_profile
from kcls.serving.export import export_saved_model
from kcls.tasks import SingleLabelTask

CLASS_NAMES = ["red", "green", "blue"]
IMAGE_SIZE = 32


def colour_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 `[count, 32, 32, 3]` images, each mostly one random primary colour (its label)
    with random brightness and a gradient."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, count)
    base = 40 + 60 * rng.random((count, 1, 1, 3))
    base[np.arange(count), 0, 0, labels] += 120 + 60 * rng.random(count)
    gradient = np.linspace(0.7, 1.0, IMAGE_SIZE)[None, :, None, None]
    return np.clip(base * gradient + rng.normal(0, 8, (count, IMAGE_SIZE, IMAGE_SIZE, 3)),
                   0, 255).astype(np.uint8), labels


def write_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index:03d}.png")
    return folder


@pytest.fixture(scope="module")
def classifier():
    """A tiny classifier whose head is trained for a few steps on the colour images."""
    keras.utils.set_random_seed(0)
    model = build_classifier(ModelConfig(backbone="resnet_v2_tiny"), 3, IMAGE_SIZE)
    images, labels = colour_images(240, seed=10)
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images.astype("float32"), labels, epochs=3, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def exported(classifier, tmp_path_factory):
    """An export whose reference profile comes from 300 colour images (seed 0)."""
    base = tmp_path_factory.mktemp("saved_models")
    recipe = Recipe(name="colours", data=DataConfig(image_size=IMAGE_SIZE),
                    model=ModelConfig(backbone="resnet_v2_tiny"),
                    export=ExportConfig(base_dir=str(base), top_k=2))
    images, labels = colour_images(300, seed=0)
    batches = tf.data.Dataset.from_tensor_slices(
        (images.astype("float32"), tf.one_hot(labels, 3))).batch(64)
    reference = reference_profile(classifier, batches, CLASS_NAMES, SingleLabelTask(1.5))
    return export_saved_model(classifier, recipe, CLASS_NAMES, task=SingleLabelTask(1.5),
                              reference=reference)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("incoming")
    fresh, _ = colour_images(150, seed=1)
    return {"iid": write_folder(root / "iid", fresh),
            "dark": write_folder(root / "dark", (fresh * 0.35).astype(np.uint8)),
            "few": write_folder(root / "few", fresh[:5])}


def test_reference_profile_is_what_the_export_serves(exported, folders):
    profile = json.loads((exported / REFERENCE_FILE).read_text())
    assert profile["examples"] == 300 and profile["temperature"] == 1.5
    assert len(profile["embedding"]["mean"]) == profile["embedding"]["dimension"]
    # The same images through the export's own signature give the profile's counts.
    images, _ = colour_images(300, seed=0)
    served = tf.saved_model.load(str(exported)).signatures["predict_images"](
        images=tf.constant(images))
    counts = np.bincount(served["probabilities"].numpy().argmax(1), minlength=3)
    assert counts.tolist() == profile["predicted_counts"]
    np.testing.assert_allclose(served["embedding"].numpy().mean(0),
                               profile["embedding"]["mean"], atol=1e-4)


def test_iid_images_pass_and_exit_zero(exported, folders, tmp_path):
    result = CliRunner().invoke(main, ["monitor", str(exported), "--data", str(folders["iid"]),
                                       "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("no drift: 150 current predictions vs 300 reference")
    report = json.loads((tmp_path / "report" / "monitor.json").read_text())
    assert report["drift"] is False and set(report["tests"]) == {
        "predicted_class", "confidence", "embedding"}
    for name in ("monitor.md", "monitor_classes.png", "monitor_confidence.png",
                 "monitor_embedding.png"):
        assert (tmp_path / "report" / name).is_file()


def test_darkened_images_are_flagged_with_the_drift_exit_code(exported, folders, tmp_path):
    result = CliRunner().invoke(main, ["monitor", str(exported), "--data",
                                       f"folder:{folders['dark']}", "--out", str(tmp_path)])
    assert result.exit_code == DRIFT_EXIT_CODE, result.output
    assert result.output.startswith("DRIFT: 150 current predictions")
    report = json.loads((tmp_path / "monitor.json").read_text())
    assert report["drift"] and "embedding" in report["flagged"]
    assert "**yes**" in (tmp_path / "monitor.md").read_text()
    # A second report into the same folder needs --overwrite.
    again = CliRunner().invoke(main, ["monitor", str(exported), "--data", str(folders["dark"]),
                                      "--out", str(tmp_path)])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_logged_predictions_are_monitored_without_images(exported, tmp_path):
    log = tmp_path / "served.jsonl"
    images, _ = colour_images(120, seed=2)
    served = tf.saved_model.load(str(exported)).signatures["serving_default"](
        image_bytes=tf.constant([tf.io.encode_png(image).numpy() for image in images]))
    records = [prediction_record(f"{index}.png", [label.decode() for label in labels],
                                 scores.tolist(), classes.tolist(), probabilities.tolist(),
                                 "colours", 1)
               for index, (labels, scores, classes, probabilities) in enumerate(zip(
                   served["labels"].numpy(), served["scores"].numpy(),
                   served["classes"].numpy(), served["probabilities"].numpy()))]
    append_predictions(log, records[:60])
    # Raw TF Serving response bodies, one per line, are read too.
    rows = [{key: record[key] for key in ("labels", "scores", "classes")}
            for record in records[60:]]
    with open(log, "a") as file:
        file.write(json.dumps({"predictions": rows}) + "\n\n")
    classes, confidences = read_predictions(log, CLASS_NAMES)
    np.testing.assert_array_equal(classes, served["classes"].numpy()[:, 0])
    np.testing.assert_allclose(confidences, served["scores"].numpy()[:, 0], rtol=1e-6)

    result = CliRunner().invoke(main, ["monitor", str(exported), "--predictions", str(log),
                                       "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert set(json.loads((tmp_path / "report" / "monitor.json").read_text())["tests"]) == {
        "predicted_class", "confidence"}


@pytest.mark.parametrize("line, message", [
    (b"not json", "line 2: Expecting value"),
    (b'{"scores": [0.9]}', "need probabilities, or scores with classes or labels"),
    (b'{"labels": ["purple"], "scores": [0.9]}', "'purple' is not one of the model's classes"),
    (b'{"probabilities": [0.5, 0.5]}', "2 probabilities for 3 classes"),
    # Issue 29, defect 8: a traceback (UnicodeDecodeError, StopIteration) or a "DRIFT".
    ('{"labels": ["r\xe9d"], "scores": [0.9]}'.encode("latin-1"), "line 2: not UTF-8 text"),
    (b'{"outputs": {}}', "line 2: empty outputs"),
    (b'{"probabilities": [NaN, 0.5, 0.5]}', "not probabilities in [0, 1]"),
    (b'{"labels": ["red"], "scores": [NaN]}', "not probabilities in [0, 1]"),
    (b'{"probabilities": [1.5, 0.0, 0.0]}', "not probabilities in [0, 1]"),
])
def test_a_bad_log_line_is_skipped_and_named(tmp_path, line, message):
    log = tmp_path / "served.jsonl"
    good = b'{"labels": ["red"], "scores": [0.9]}\n'
    log.write_bytes(good + line + b"\n" + good)
    skipped = []
    classes, confidences = read_predictions(log, CLASS_NAMES, skipped)
    assert classes.tolist() == [0, 0] and confidences.tolist() == [0.9, 0.9]
    assert len(skipped) == 1 and skipped[0].startswith("line 2: ") and message in skipped[0]
    log.write_bytes(line + b"\n" + line + b"\n")
    with pytest.raises(PredictionLogError, match="no usable prediction") as raised:
        read_predictions(log, CLASS_NAMES)
    assert message in str(raised.value) and "line 1" in str(raised.value)


def test_monitor_counts_the_bad_lines_of_a_log_and_names_a_few(exported, tmp_path):
    log = tmp_path / "served.jsonl"
    good = json.dumps({"probabilities": [0.8, 0.1, 0.1]}).encode()
    log.write_bytes(b"\n".join([good] * 30 + [b"\xff garbage"] * 5 + [b'{"outputs": {}}']))
    result = CliRunner().invoke(main, ["monitor", str(exported), "--predictions", str(log),
                                       "--out", str(tmp_path / "report")])
    assert result.exit_code in (0, DRIFT_EXIT_CODE), result.output
    assert ("skipped 6 unusable line(s) of " in result.output
            and "line 31: not UTF-8 text; line 32: not UTF-8 text" in result.output)
    report = json.loads((tmp_path / "report" / "monitor.json").read_text())
    assert report["examples"] == 30 and len(report["skipped_lines"]) == 6


@pytest.mark.slow
def test_an_export_without_a_reference_says_how_to_get_one(classifier, tmp_path):
    recipe = Recipe(name="old", data=DataConfig(image_size=IMAGE_SIZE),
                    model=ModelConfig(backbone="resnet_v2_tiny"),
                    export=ExportConfig(base_dir=str(tmp_path)))
    old = export_saved_model(classifier, recipe, CLASS_NAMES)
    result = CliRunner().invoke(main, ["monitor", str(old.parent), "--predictions",
                                       str(tmp_path / "x.jsonl")])
    assert result.exit_code == 1
    assert "has no reference profile (assets/reference.json" in result.output
    assert "kcls export RUN_DIR" in result.output and "Traceback" not in result.output


def test_bad_arguments_are_usage_errors(exported, folders, tmp_path):
    def run(*arguments):
        return CliRunner().invoke(main, ["monitor", str(exported), *arguments,
                                         "--out", str(tmp_path / "out")])

    both = run("--data", str(folders["iid"]), "--predictions", str(tmp_path / "x.jsonl"))
    assert both.exit_code == 2 and "exactly one of --data" in both.output
    assert run().exit_code == 2
    few = run("--data", str(folders["few"]))
    assert few.exit_code == 2 and "5 usable predictions" in few.output
    (tmp_path / "empty").mkdir()
    empty = run("--data", str(tmp_path / "empty"))
    assert empty.exit_code == 2 and "holds no image file" in empty.output
    alpha = run("--data", str(folders["iid"]), "--alpha", "1.5")
    assert alpha.exit_code == 2 and "--alpha 1.5" in alpha.output
    missing = run("--predictions", str(tmp_path / "missing.jsonl"))
    assert missing.exit_code == 1 and "No prediction log" in missing.output


def test_image_files_skip_hidden_folders_and_undecodable_files_are_named(exported, folders,
                                                                         tmp_path):
    folder = tmp_path / "mixed"
    write_folder(folder, colour_images(12, seed=3)[0])
    (folder / ".thumbnails").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / ".thumbnails" / "a.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    assert len(image_files(folder)) == 13
    lines = []
    result = monitor(exported, data=folder, out_dir=tmp_path / "report", log=lines.append)
    assert result["examples"] == 12 and result["skipped"] == [str(folder / "broken.jpg")]
    assert "broken.jpg" in lines[0]
    with pytest.raises(MonitorError, match="not a folder"):
        image_files(tmp_path / "nowhere")


def test_monitor_follows_symlinked_folders_as_training_does(tmp_path):
    """Issue 29 minor: `kcls monitor --data` ignored a symlinked class folder."""
    images, _ = colour_images(4, seed=3)
    real = write_folder(tmp_path / "elsewhere" / "cats", images)
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "cats").symlink_to(real, target_is_directory=True)
    (incoming / "loop").symlink_to(incoming, target_is_directory=True)  # listed once
    assert [path.name for path in image_files(incoming)] == [
        "000.png", "001.png", "002.png", "003.png"]
