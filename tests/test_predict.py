"""`kcls predict` at scale: folders, globs, batches, results files, unreadable files listed
and never fatal, `unknown` answers; (slow) .onnx and .tflite models as MODEL."""

import csv
import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_truncated_jpeg
from PIL import Image

from kcls.cli import main
from kcls.config import DataConfig, ExportConfig, ModelConfig, Recipe
from kcls.models.classifier import build_classifier
from kcls.serving.export import export_saved_model
from kcls.serving.predict import load_predictor
from kcls.tasks import RejectionRule, SingleLabelTask
from kcls.workflows.predict import PredictInputError, find_images, predict_images

CLASS_NAMES = ["cat", "dog", "owl"]


@pytest.fixture(scope="module")
def classifier():
    keras.utils.set_random_seed(0)
    model = build_classifier(ModelConfig(backbone="resnet_v2_tiny"), len(CLASS_NAMES), 32)
    logits = model.get_layer("logits")
    kernel, bias = logits.get_weights()
    logits.set_weights([np.random.default_rng(0).normal(0, 5, kernel.shape).astype("float32"),
                        bias])
    return model


def export(classifier, base_dir, task=None):
    recipe = Recipe(name="tiny", data=DataConfig(image_size=32),
                    export=ExportConfig(base_dir=str(base_dir), top_k=3))
    return export_saved_model(classifier, recipe, CLASS_NAMES, task=task)


@pytest.fixture(scope="module")
def export_dir(classifier, tmp_path_factory):
    return export(classifier, tmp_path_factory.mktemp("saved_models"))


@pytest.fixture
def folder(tmp_path):
    """5 images (one in a sub-folder with a space in its name, one GIF), a truncated JPEG,
    a text file named like a JPEG and a notes.txt."""
    rng = np.random.default_rng(1)
    root = tmp_path / "photos"
    (root / "sub folder").mkdir(parents=True)
    for index, name in enumerate(["a.png", "b.jpg", "c.jpeg", "sub folder/d e.png", "f.gif"]):
        size = (20 + 7 * index, 40 - 3 * index)
        Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(root / name)
    write_truncated_jpeg(root / "sub folder" / "half.jpg", rng)
    (root / "fake.jpg").write_text("this is text, not a JPEG")
    (root / "notes.txt").write_text("not an image")
    return root


def test_a_folder_with_a_corrupt_file_and_a_non_image_is_predicted_in_batches(
        export_dir, folder, tmp_path):
    output = tmp_path / "predictions.csv"
    result = CliRunner().invoke(main, ["predict", str(export_dir.parent), str(folder),
                                       "--output", str(output), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(output.open()))
    assert [row["path"] for row in rows] == [str(folder / name) for name in [
        "a.png", "b.jpg", "c.jpeg", "f.gif", "sub folder/d e.png"]]
    assert "2 file(s) could not be read or decoded" in result.stderr
    for name in ("fake.jpg", "half.jpg"):
        assert f"{name}: not a decodable JPEG, PNG, GIF or BMP image" in result.stderr
    assert "notes.txt" in result.stderr and "Traceback" not in result.output
    # Batched (2 per call, one batch holding the corrupt file) = one image at a time.
    predictor = load_predictor(export_dir)
    for row in rows:
        single = predictor.predict_file(row["path"])
        assert [row["label_1"], row["label_2"], row["label_3"]] == [label for label, _ in single]
        assert float(row["score_1"]) == pytest.approx(single[0][1], abs=1e-5)
        assert row["known"] == "" and row["known_score"] == ""  # no rejection rule


def test_globs_jsonl_and_every_image_once(export_dir, folder, tmp_path):
    output = tmp_path / "out.jsonl"
    result = CliRunner().invoke(main, ["predict", str(export_dir), str(folder / "**" / "*.png"),
                                       str(folder / "a.png"), "--output", str(output),
                                       "--top-k", "1"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [record["path"] for record in records] == [str(folder / "a.png"),
                                                      str(folder / "sub folder" / "d e.png")]
    assert len(records[0]["labels"]) == 1 and records[0]["known"] is None


@pytest.mark.slow
def test_an_export_with_a_rejection_rule_says_unknown(classifier, tmp_path, folder):
    # A threshold above any cosine similarity: every image is unknown.
    means = np.eye(3, 256, dtype=np.float32)  # resnet_v2_tiny embeds in 256 dimensions
    rule = RejectionRule(means, 1.5, 0.95, "validation split (10 images)", 0.95)
    version = export(classifier, tmp_path / "saved_models", SingleLabelTask(rejection=rule))
    run = predict_images(version, [folder / "a.png", folder / "b.jpg"], top_k=2)
    assert [prediction.known for prediction in run.predictions] == [False, False]
    result = CliRunner().invoke(main, ["predict", str(version), str(folder / "a.png")])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{folder / 'a.png'}: unknown; closest: ")
    assert "1 unknown" in result.stderr


def test_inputs_that_cannot_be_used_are_one_line_usage_errors(export_dir, folder, tmp_path):
    with pytest.raises(PredictInputError, match="does not exist"):
        find_images([tmp_path / "missing.png"])
    with pytest.raises(PredictInputError, match="No file matches"):
        find_images([str(tmp_path / "*.webp")])
    for arguments, message in [
            ([str(export_dir), str(folder / "a.png"), "--output", str(tmp_path / "o.txt")],
             "use a .csv or .jsonl file name"),
            ([str(folder / "notes.txt"), str(folder / "a.png")], "neither .onnx nor .tflite"),
            ([str(export_dir), str(tmp_path / "missing.png")], "does not exist")]:
        result = CliRunner().invoke(main, ["predict", *arguments])
        assert result.exit_code == 2 and message in result.output, result.output
    only_bad = CliRunner().invoke(main, ["predict", str(export_dir), str(folder / "fake.jpg")])
    assert only_bad.exit_code == 1 and "fake.jpg: not a decodable" in only_bad.output


@pytest.mark.slow
def test_onnx_and_tflite_models_predict_like_the_saved_model(trained_quickstart, folder):
    pytest.importorskip("tf2onnx")
    from kcls.optimize import optimize

    _, result = trained_quickstart
    report = optimize(result.export_dir, "ptq-float16", latency_runs=2)
    saved_model = predict_images(result.export_dir, [folder], top_k=3)
    for model in (result.export_dir / "model.onnx",
                  result.export_dir.parent / "optimized" / "1" / "ptq-float16" / "float32.tflite"):
        run = predict_images(model, [folder], top_k=3)
        assert len(run.unreadable) == 2 and len(run.predictions) == 5
        for expected, actual in zip(saved_model.predictions, run.predictions):
            assert actual.labels == expected.labels and actual.known == expected.known
            np.testing.assert_allclose(actual.scores, expected.scores, atol=1e-5)
            assert actual.known_score == pytest.approx(expected.known_score, abs=1e-5)
    assert report["task_metadata"]["rejection"]["threshold"] == result.task.rejection.threshold
