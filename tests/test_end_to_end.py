"""One tiny real run: digits, tiny ResNetV2 (XLA as `auto` decides), both phases, export, reload,
predict."""

import json

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from kcls.cli import main
from kcls.data.pipeline import prepare_image
from kcls.data.sources import load_splits
from kcls.models.classifier import embedding_model
from kcls.serving.export import export_saved_model
from kcls.workflows.run import run_recipe


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from kcls.config import apply_overrides
    from kcls.recipes import load_recipe

    base = tmp_path_factory.mktemp("e2e")
    recipe = apply_overrides(load_recipe("quickstart"), [
        "train.frozen_epochs=1", "train.unfrozen_epochs=1", "train.steps_per_epoch=3",
        "data.batch_size=16", f"export.base_dir={base / 'saved_models'}"])
    result = run_recipe(recipe, base / "run", log=lambda message: None, verbose=0)
    return recipe, result


def test_run_writes_run_dir_and_first_version(tiny_run):
    recipe, result = tiny_run
    assert result.export_dir.name == "1"
    assert result.export_dir.parent.name == "quickstart"
    run_info = json.loads((result.run_dir / "run.json").read_text())
    assert isinstance(run_info["jit_compile"], bool) and run_info["jit_compile_reason"]
    assert [phase["name"] for phase in run_info["phases"]] == ["frozen", "unfrozen"]
    assert len(run_info["history"]["loss"]) == 2
    assert result.metrics["examples"] == 360
    # The reported accuracy is the trained classifier's on the held-out split, recomputed
    # here without the evaluation pipeline (within one image: float rounding near ties).
    test = list(load_splits(recipe.data).test.as_numpy_iterator())
    images = prepare_image(np.stack([image for image, _ in test]), recipe.data.image_size)
    predictions = result.classifier.predict(images, verbose=0).argmax(axis=1)
    recomputed = np.mean(predictions == np.array([label for _, label in test]))
    assert abs(result.metrics["accuracy"] - recomputed) <= 1 / 360
    assert json.loads((result.run_dir / "config.json").read_text())["name"] == "quickstart"
    assert len(list((result.run_dir / "samples").glob("*.png"))) == 8
    assert list((result.run_dir / "logs" / "train").glob("events.out.tfevents.*"))
    from PIL import Image

    from kcls.layout import PLOT_FILES

    for name in PLOT_FILES:  # the report's four plots open as valid PNGs
        with Image.open(result.run_dir / name) as plot:
            plot.verify()
            assert plot.format == "PNG"
    report = (result.run_dir / "report.md").read_text()
    assert "## Per class" in report
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics == result.metrics
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 360
    assert np.trace(matrix) / 360 == pytest.approx(metrics["accuracy"])
    assert matrix.sum(axis=1).tolist() == [row["support"] for row in metrics["per_class"].values()]
    labels = (result.export_dir / "assets" / "labels.txt").read_text().split()
    assert labels == [str(digit) for digit in range(10)]
    # The reference profile `kcls monitor` reads: the run's, copied into the export.
    reference = json.loads((result.export_dir / "assets" / "reference.json").read_text())
    assert reference == json.loads((result.run_dir / "reference.json").read_text())
    # Every held-out image: the 360 test and 144 validation digits (issue 29, defect 9).
    assert reference["examples"] == 360 + 144 and reference["class_names"] == labels
    assert sum(reference["predicted_counts"]) == 504 and reference["split"] == "validation+test"
    assert reference["temperature"] == result.metrics["calibration"]["temperature"]


def test_exported_signatures_match_the_keras_model(tiny_run):
    recipe, result = tiny_run
    splits = load_splits(recipe.data)
    images = np.stack([image for image, _ in splits.test.take(6).as_numpy_iterator()])
    # The quickstart has a validation split, so the export serves softmax(logits / T).
    temperature = result.metrics["calibration"]["temperature"]
    prepared = prepare_image(images, recipe.data.image_size)
    expected = tf.nn.softmax(result.classifier(prepared, training=False) / temperature).numpy()

    loaded = tf.saved_model.load(str(result.export_dir))
    encoded = tf.constant([tf.io.encode_png(image).numpy() for image in images])
    from_bytes = loaded.signatures["serving_default"](image_bytes=encoded)
    from_pixels = loaded.signatures["predict_images"](images=tf.constant(images))
    assert set(from_bytes) == {"probabilities", "classes", "scores", "labels"}
    embedding = embedding_model(result.classifier)(prepared, training=False)[0].numpy()
    np.testing.assert_allclose(from_pixels["embedding"].numpy(), embedding, atol=1e-4)
    for outputs in (from_bytes, from_pixels):
        np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, atol=1e-5)
        np.testing.assert_array_equal(outputs["classes"].numpy()[:, 0], expected.argmax(axis=1))
        assert outputs["labels"].numpy()[0, 0].decode() == str(expected[0].argmax())


def test_next_export_is_a_new_version_and_never_overwrites(tiny_run):
    recipe, result = tiny_run
    first_pb = (result.export_dir / "saved_model.pb").read_bytes()
    second = export_saved_model(result.classifier, recipe, result.class_names,
                                base_dir=result.export_dir.parent.parent)
    assert second.name == "2"
    assert (result.export_dir / "saved_model.pb").read_bytes() == first_pb
    assert not [p for p in second.parent.iterdir() if p.name.startswith(".tmp")]


def test_cli_predict_prints_labels_for_sample_images(tiny_run):
    _, result = tiny_run
    samples = sorted((result.run_dir / "samples").glob("*.png"))[:2]
    output = CliRunner().invoke(main, ["predict", str(result.export_dir.parent),
                                       *map(str, samples), "--top-k", "2"])
    assert output.exit_code == 0, output.output
    lines = output.output.strip().splitlines()
    assert len(lines) == 2
    for line, sample in zip(lines, samples):
        assert line.startswith(f"{sample}: ")
        label, score = line.split(": ")[1].split()[:2]
        # The top class and its probability are the trained classifier's for that image.
        image = prepare_image(tf.io.decode_png(sample.read_bytes(), channels=3), 32)
        probabilities = tf.nn.softmax(result.classifier(image[None], training=False))[0]
        assert label == str(int(np.argmax(probabilities)))
        assert float(score.strip("()")) == pytest.approx(float(np.max(probabilities)), abs=1e-3)


def test_cli_predict_rejects_a_file_that_is_not_an_image(tiny_run, tmp_path):
    _, result = tiny_run
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is text, not a JPEG")
    output = CliRunner().invoke(main, ["predict", str(result.export_dir), str(bad)])
    assert output.exit_code == 1
    assert "not a decodable" in output.output and "notes.jpg" in output.output
    assert "Traceback" not in output.output


def test_cli_evaluate_reproduces_the_run_metrics_and_checks_classes(tiny_run, tmp_path):
    _, result = tiny_run
    output = CliRunner().invoke(main, ["evaluate", str(result.export_dir),
                                       "--out", str(tmp_path / "report")])
    assert output.exit_code == 0, output.output
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["examples"] == 360
    assert metrics["accuracy"] == pytest.approx(result.metrics["accuracy"], abs=1e-6)
    assert (tmp_path / "report" / "report.md").is_file()

    folder = tmp_path / "other_classes"
    for name in ("cat", "dog"):
        (folder / name).mkdir(parents=True)
        tf.io.write_file(str(folder / name / "a.png"),
                         tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)))
    output = CliRunner().invoke(main, ["evaluate", str(result.export_dir),
                                       "--data", f"folder:{folder}"])
    assert output.exit_code == 2
    assert "not the model's classes" in output.output and "Traceback" not in output.output


def test_a_random_init_backbone_trains_its_batchnorm_and_run_json_says_so(tiny_run):
    _, result = tiny_run
    # Phase 2 of a from-scratch run updates the moving statistics (initially 0 and 1).
    means = [v.numpy() for v in result.classifier.weights if v.path.endswith("moving_mean")]
    assert means and all(np.abs(mean).max() > 0 for mean in means)
    run_info = json.loads((result.run_dir / "run.json").read_text())
    assert run_info["train_batchnorm"] is True
    frozen, unfrozen = run_info["phases"]
    # Re-estimated on the 3 batches of 16 the phase trained on (kcls.train.batchnorm).
    assert (frozen["batchnorm_recalibrated_on"], unfrozen["batchnorm_recalibrated_on"]) == (0, 48)
    from kcls.train.compute import resolve_jit_compile

    used, reason = resolve_jit_compile("auto", "resnet_v2_tiny")
    assert run_info["jit_compile"] is used and run_info["jit_compile_reason"] == reason
