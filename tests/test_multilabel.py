"""Multi-label classification: metrics against scikit-learn, the manifest source and its
bad rows, the loss, and a tiny model trained, exported and served end to end."""

from __future__ import annotations

import csv
import importlib.util
import json
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score

from kcls.config import (
    ConfigError,
    DataConfig,
    EvaluateConfig,
    ExportConfig,
    ModelConfig,
    Recipe,
    TrainConfig,
)
from kcls.data.manifest import read_manifest
from kcls.data.pipeline import eval_pipeline
from kcls.data.sources import load_splits
from kcls.metrics.multilabel import multilabel_metrics, sigmoid, tune_thresholds
from kcls.optimize.interpreter import TFLiteClassifier
from kcls.tasks.multi_label import WeightedBinaryCrossentropy

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_train_10k"
LABELS = ["cat", "dog", "sun"]


def _random_predictions(seed: int = 0, count: int = 200, labels: int = 4):
    rng = np.random.default_rng(seed)
    targets = (rng.random((count, labels)) < 0.35).astype(np.float32)
    # Informative but noisy scores.
    probabilities = np.clip(0.6 * targets + 0.5 * rng.random((count, labels)), 0, 1)
    return probabilities, targets


def test_metrics_match_scikit_learn():
    probabilities, targets = _random_predictions()
    thresholds = np.array([0.3, 0.5, 0.6, 0.45])
    names = ["a", "b", "c", "d"]
    metrics = multilabel_metrics(probabilities, targets, thresholds, names)
    predicted = (probabilities >= thresholds).astype(int)
    assert metrics["mAP"] == pytest.approx(
        average_precision_score(targets, probabilities, average="macro"))
    assert metrics["micro_f1"] == pytest.approx(f1_score(targets, predicted, average="micro"))
    assert metrics["macro_f1"] == pytest.approx(f1_score(targets, predicted, average="macro"))
    assert metrics["label_cardinality"] == pytest.approx(targets.sum(1).mean())
    assert metrics["predicted_cardinality"] == pytest.approx(predicted.sum(1).mean())
    for index, name in enumerate(names):
        assert metrics["per_label"][name]["average_precision"] == pytest.approx(
            average_precision_score(targets[:, index], probabilities[:, index]))
        assert metrics["per_label"][name]["support"] == int(targets[:, index].sum())


def test_tuned_thresholds_maximise_each_labels_f1():
    probabilities, targets = _random_predictions(seed=1)
    thresholds = tune_thresholds(probabilities, targets)
    for label in range(targets.shape[1]):
        best = f1_score(targets[:, label], probabilities[:, label] >= thresholds[label])
        for candidate in np.unique(probabilities[:, label]):
            assert f1_score(targets[:, label], probabilities[:, label] >= candidate) <= best + 1e-12
    # A label without positives keeps the default threshold; its AP is undefined.
    targets[:, 0] = 0
    assert tune_thresholds(probabilities, targets)[0] == 0.5
    metrics = multilabel_metrics(probabilities, targets, [0.5] * 4, list("abcd"))
    assert metrics["per_label"]["a"]["average_precision"] is None


def test_weighted_binary_crossentropy_with_unit_weights_is_keras_bce():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 3)).astype(np.float32)
    targets = (rng.random((6, 3)) < 0.5).astype(np.float32)
    expected = keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=0.1)(
        targets, logits)
    ours = WeightedBinaryCrossentropy(np.ones(3), label_smoothing=0.1)(targets, logits)
    assert float(ours) == pytest.approx(float(expected), rel=1e-5)
    heavier = WeightedBinaryCrossentropy(np.full(3, 3.0), label_smoothing=0.1)(targets, logits)
    assert float(heavier) > float(ours)
    np.testing.assert_allclose(sigmoid(np.array([-800.0, 0.0, 800.0])), [0.0, 0.5, 1.0])


def _write_manifest(folder: Path, rows: list[dict[str, str]], labels: list[str] | None = LABELS,
                    images: int = 12) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(images):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), np.uint8)).save(folder / f"{index}.png")
    if labels is not None:
        (folder / "labels.txt").write_text("\n".join(labels) + "\n")
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def test_manifest_counts_and_names_every_bad_row(tmp_path: Path):
    rows = [{"path": f"{index}.png", "labels": ["cat", "dog;sun", "cat; sun"][index % 3]}
            for index in range(10)]
    rows += [{"path": "missing.png", "labels": "cat"},
             {"path": "10.png", "labels": "cat;horse"},
             {"path": "11.png", "labels": " ; "},
             {"path": "3.png", "labels": "dog"}]
    (tmp_path / "data").mkdir()
    manifest = _write_manifest(tmp_path / "data", rows)
    with pytest.warns(UserWarning, match=r"skipped 4 row\(s\): 1 unknown labels, 1 empty label "
                                         r"sets, 1 duplicate rows, 1 missing or undecodable"):
        files = read_manifest(manifest, "multi_hot")
    assert files.class_names == LABELS
    assert len(files.paths) == 10
    np.testing.assert_array_equal(files.targets[:3], [[1, 0, 0], [0, 1, 1], [1, 0, 1]])
    skipped = "\n".join(files.skipped)
    assert "row 12 (missing.png): missing, unreadable or undecodable image" in skipped
    assert "row 13 (10.png): unknown label(s) horse" in skipped
    assert "row 14 (11.png): empty label set" in skipped
    assert "row 15 (3.png): duplicate of row 5" in skipped


def test_manifest_that_cannot_be_read_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_manifest(tmp_path / "nope.csv", "multi_hot")
    manifest = _write_manifest(tmp_path / "a", [{"file": "0.png", "tags": "cat"}])
    with pytest.raises(ConfigError, match="columns path,labels"):
        read_manifest(manifest, "multi_hot")
    manifest = _write_manifest(tmp_path / "b", [{"path": "0.png", "labels": "cat",
                                                 "split": "dev"}])
    with pytest.raises(ConfigError, match="unknown split 'dev'"):
        read_manifest(manifest, "multi_hot")


def test_a_manifest_saved_by_excel_with_a_byte_order_mark_reads(tmp_path: Path):
    """Issue 29, defect 5: the BOM became part of the first column's name, and the error
    said it needs path,labels and has path, labels."""
    manifest = _write_manifest(tmp_path, [{"path": "0.png", "labels": "cat"},
                                          {"path": "1.png", "labels": "dog;sun"}])
    manifest.write_bytes(b"\xef\xbb\xbf" + manifest.read_bytes())
    (tmp_path / "labels.txt").write_bytes(b"\xef\xbb\xbf" + b"cat\ndog\nsun\n")
    files = read_manifest(manifest, "multi_hot")
    assert files.class_names == LABELS and len(files.paths) == 2


def test_a_latin1_manifest_is_one_error_naming_the_line(tmp_path: Path):
    manifest = _write_manifest(tmp_path, [{"path": "0.png", "labels": "cat"}], labels=None)
    manifest.write_bytes(manifest.read_bytes() + "1.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xe9 on line 3.*CSV UTF-8"):
        read_manifest(manifest, "multi_hot")


@pytest.mark.parametrize("label", ["two\nlines", "line\u2028separator", "tab\there"])
def test_labels_that_would_corrupt_labels_txt_are_refused(tmp_path: Path, label: str):
    manifest = _write_manifest(tmp_path, [{"path": "0.png", "labels": f"cat;{label}"},
                                          {"path": "1.png", "labels": "cat"}], labels=None)
    with pytest.raises(ConfigError, match=r"row 2: the label .* cannot be a class name"):
        read_manifest(manifest, "multi_hot")
    (tmp_path / "labels.txt").write_text(f"cat\n{label}\n")
    manifest.write_text("path,labels\n0.png,cat\n")
    if "\n" not in label:  # str.splitlines made two class names of U+2028 and kept a tab
        with pytest.raises(ConfigError, match="labels.txt: the label"):
            read_manifest(manifest, "multi_hot")


def test_a_label_with_a_slash_never_becomes_a_path(tmp_path: Path):
    """`kcls explain` of a label `in/out` wrote `000_in/out_gradcam.png` ([Errno 2])."""
    from kcls.evaluation.explain import explain_files
    from kcls.load import LoadedClassifier
    from kcls.models.classifier import build_classifier
    from kcls.tasks import task_from_metadata

    manifest = _write_manifest(tmp_path, [{"path": "0.png", "labels": "in/out"},
                                          {"path": "1.png", "labels": "cat"}], labels=None)
    assert read_manifest(manifest, "multi_hot").class_names == ["cat", "in/out"]
    recipe = Recipe(name="slash", model=ModelConfig(backbone="resnet_v2_tiny",
                                                    task="multilabel"))
    task = task_from_metadata("multilabel", {"thresholds": [0.0, 0.0]})  # explain both
    loaded = LoadedClassifier(build_classifier(recipe.model, 2, 32), recipe, ["cat", "in/out"],
                              task)
    written = explain_files(loaded, [tmp_path / "0.png"], tmp_path / "cams")
    assert sorted(target.name for target, _, _ in written) == [
        "0_cat_gradcam.png", "0_in%2Fout_gradcam.png"]
    assert all(target.parent == tmp_path / "cams" for target, _, _ in written)


def test_manifest_splits_carry_multi_hot_labels_through_the_pipeline(tmp_path: Path):
    rows = [{"path": f"{index}.png", "labels": ["cat", "dog;sun", "cat;sun"][index % 3],
             "split": ["train"] * 8 + ["validation"] * 2 + ["test"] * 2}
            for index in range(12)]
    rows = [dict(row, split=row["split"][index]) for index, row in enumerate(rows)]
    manifest = _write_manifest(tmp_path, rows, labels=None)
    splits = load_splits(DataConfig(source=f"manifest:{manifest}", image_size=16, batch_size=4),
                         "multi_hot")
    assert splits.sizes == {"train": 8, "validation": 2, "test": 2}
    assert splits.class_names == ["cat", "dog", "sun"]
    images, targets = next(iter(eval_pipeline(splits.test, 3, DataConfig(image_size=16))))
    assert images.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(targets.numpy(), [[0, 1, 1], [1, 0, 1]])  # rows 10, 11


def test_multilabel_config_refuses_temperature_scaling():
    with pytest.raises(ConfigError, match="evaluate.calibrate"):
        Recipe(name="x", model=ModelConfig(task="multilabel"),
               evaluate=EvaluateConfig(calibrate="temperature"))
    with pytest.raises(ConfigError, match="model.task"):
        ModelConfig(task="multi")


def _make_mosaics():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "make_mosaics.py"
    spec = importlib.util.spec_from_file_location("make_mosaics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_mosaics


@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason=f"needs {SHARED_CIFAR}")
def test_mosaics_keep_every_source_image_in_one_split(tmp_path: Path):
    manifest = _make_mosaics()(SHARED_CIFAR, tmp_path / "mosaics", seed=3, limit=200)
    rows = list(csv.DictReader(open(manifest)))
    assert len(rows) == 50 and {row["split"] for row in rows} == {"train", "validation", "test"}
    assert Image.open(tmp_path / "mosaics" / rows[0]["path"]).size == (64, 64)
    with pytest.raises(FileExistsError):
        _make_mosaics()(SHARED_CIFAR, tmp_path / "mosaics", seed=3, limit=200)


@pytest.mark.slow
def test_trained_multilabel_model_serves_what_it_predicts_in_memory(tmp_path: Path):
    from kcls.cli import main
    from kcls.evaluation.evaluate import evaluate_model
    from kcls.evaluation.explain import explain_files
    from kcls.load import load_classifier
    from kcls.workflows.run import run_recipe

    rng = np.random.default_rng(0)
    rows = []
    for index in range(48):  # red, green or both halves: learnable labels
        image = np.zeros((16, 16, 3), np.uint8)
        labels = [["red"], ["green"], ["red", "green"]][index % 3]
        if "red" in labels:
            image[:8, :, 0] = 255
        if "green" in labels:
            image[8:, :, 1] = 255
        image = np.clip(image + rng.integers(0, 40, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / f"{index}.png")
        rows.append({"path": f"{index}.png", "labels": ";".join(labels)})
    manifest = _write_manifest(tmp_path, rows, labels=None, images=0)
    recipe = Recipe(
        name="multi",
        data=DataConfig(source=f"manifest:{manifest}", image_size=16, batch_size=8,
                        augment="none", validation_fraction=0.25, test_fraction=0.25),
        model=ModelConfig(backbone="resnet_v2_tiny", task="multilabel"),
        train=TrainConfig(frozen_epochs=0, unfrozen_epochs=2, steps_per_epoch=3,
                          class_weights="balanced"),
        export=ExportConfig(base_dir=str(tmp_path / "saved")),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_recipe(recipe, tmp_path / "run", log=lambda line: None, verbose=0)
    metrics = result.metrics
    assert metrics["task"] == "multilabel" and 0 <= metrics["mAP"] <= 1
    run_info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_info["positive_weights"] and run_info["task"] == "multilabel"
    assert (tmp_path / "run" / "pr_curves.png").is_file()

    metadata = json.loads((result.export_dir / "kcls.json").read_text())
    thresholds = np.asarray(metadata["thresholds"], np.float32)
    assert metadata["task"] == "multilabel" and thresholds.shape == (2,)
    served = tf.saved_model.load(str(result.export_dir)).signatures["serving_default"]
    files = sorted(tmp_path.glob("*.png"), key=lambda path: int(path.stem))[:6]
    outputs = served(image_bytes=tf.constant([path.read_bytes() for path in files]))
    images = np.stack([np.asarray(Image.open(path).convert("RGB"), np.float32)
                       for path in files])
    expected = sigmoid(result.classifier.predict_on_batch(images))
    np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(outputs["predicted"].numpy(),
                                  (outputs["probabilities"].numpy() >= thresholds).astype(int))
    for row, labels in enumerate(outputs["labels"].numpy()):
        above = {metadata["class_names"][c] for c in np.flatnonzero(outputs["predicted"][row])}
        assert {label.decode() for label in labels if label} == above

    evaluation = evaluate_model(str(result.export_dir))
    assert evaluation.metrics["mAP"] == pytest.approx(metrics["mAP"], abs=1e-6)
    assert evaluation.metrics["micro_f1"] == pytest.approx(metrics["micro_f1"], abs=1e-6)
    answer = CliRunner().invoke(main, ["predict", str(result.export_dir), str(files[2])])
    assert answer.exit_code == 0, answer.output
    monitor = CliRunner().invoke(main, ["monitor", str(result.export_dir), "--data",
                                        f"manifest:{manifest}"])
    assert monitor.exit_code != 0 and "multi-label" in monitor.output

    # TFLite (ptq-dynamic): sigmoid probabilities, scored with mAP and micro F1 at the
    # export's thresholds; the float32 TFLite baseline scores what `kcls evaluate` does.
    optimize = CliRunner().invoke(main, ["optimize", str(result.export_dir), "--method",
                                         "ptq-dynamic", "--out", str(tmp_path / "ptq"),
                                         "--latency-runs", "2"])
    assert optimize.exit_code == 0, optimize.output
    assert "mAP" in optimize.output and "label-set agreement" in optimize.output
    float_tflite = TFLiteClassifier.from_bytes((tmp_path / "ptq" / "float32.tflite").read_bytes())
    np.testing.assert_allclose(float_tflite.predict(images), expected, atol=1e-4)
    # int8 weights on a barely trained model: close, not equal.
    tflite = TFLiteClassifier.from_bytes((tmp_path / "ptq" / "model.tflite").read_bytes())
    np.testing.assert_allclose(tflite.predict(images), expected, atol=0.15)
    report = json.loads((tmp_path / "ptq" / "optimize.json").read_text())
    assert report["task"] == "multilabel" and report["metrics"] == ["mAP", "micro_f1"]
    assert report["float32"]["mAP"] == pytest.approx(evaluation.metrics["mAP"], abs=1e-4)
    assert report["float32"]["micro_f1"] == pytest.approx(evaluation.metrics["micro_f1"],
                                                          abs=1e-4)
    assert 0 <= report["optimized"]["mAP"] <= 1 and "mAP_delta" in report["ratios"]
    assert "| mAP | micro_f1 |" in (tmp_path / "ptq" / "optimize.md").read_text()
    # Pruning fine-tunes in the TF-MOT child with binary cross-entropy on multi-hot labels
    # and serves sigmoid probabilities.
    pruned = CliRunner().invoke(main, ["optimize", str(result.export_dir), "--method", "prune",
                                       "--out", str(tmp_path / "prune"), "--latency-runs", "2",
                                       "--epochs", "1"])
    assert pruned.exit_code == 0, pruned.output
    pruned_report = json.loads((tmp_path / "prune" / "optimize.json").read_text())
    assert pruned_report["task"] == "multilabel" and 0 <= pruned_report["optimized"]["mAP"] <= 1
    pruned_tflite = TFLiteClassifier.from_bytes(
        (tmp_path / "prune" / "model.tflite").read_bytes())
    probabilities = pruned_tflite.predict(images)
    assert probabilities.shape == expected.shape
    assert not np.allclose(probabilities.sum(axis=-1), 1.0, atol=1e-3)  # sigmoid, not softmax

    # Grad-CAM: one overlay per label the export serves for the image.
    served_labels = [label.decode() for label in outputs["labels"].numpy()[2] if label]
    written = explain_files(load_classifier(result.export_dir), [files[2]], tmp_path / "cams")
    expected_labels = served_labels or [metadata["class_names"][
        int(np.argmax(outputs["probabilities"].numpy()[2]))]]
    assert [label for _, label, _ in written] == expected_labels
    assert all(path.name == f"2_{label}_gradcam.png" for path, label, _ in written)


def test_tfds_sequence_labels_become_multi_hot(tmp_path: Path):
    import tensorflow_datasets as tfds

    class KclsTinyTags(tfds.core.GeneratorBasedBuilder):
        """Six 16x16 images with 0 to 2 of three tags, prepared locally (no download)."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(16, 16, 3)),
                "labels": tfds.features.Sequence(tfds.features.ClassLabel(names=LABELS))}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6), "test": self._generate_examples(3)}

        def _generate_examples(self, count):
            for index in range(count):
                yield index, {"image": np.full((16, 16, 3), index * 20, np.uint8),
                              "labels": [[], [0], [1, 2]][index % 3]}

    KclsTinyTags(data_dir=str(tmp_path)).download_and_prepare()
    splits = load_splits(DataConfig(source="tfds:kcls_tiny_tags", data_dir=str(tmp_path),
                                    validation_fraction=0.0))
    assert splits.class_names == LABELS and splits.sizes["test"] == 3
    expected = [[0, 0, 0], [1, 0, 0], [0, 1, 1]]
    for image, label in splits.test.as_numpy_iterator():  # TFDS shuffles the order
        assert label.dtype == np.float32
        np.testing.assert_array_equal(label, expected[image[0, 0, 0] // 20 % 3])
