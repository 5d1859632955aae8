"""TFLite post-training quantization on a tiny trained model, with the real converter."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from kcls.cli import main
from kcls.config import DataConfig, ExportConfig, ModelConfig, Recipe, TrainConfig
from kcls.layout import optimized_dir
from kcls.optimize.convert import (
    OptimizeError,
    convert,
    representative_images,
    write_probability_saved_model,
)
from kcls.optimize.interpreter import TFLiteClassifier
from kcls.optimize.tflite import held_out_examples, optimize

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A resnet_v2_tiny trained for 60 steps on digits, exported; (recipe, classifier, export)."""
    from kcls.data.pipeline import train_pipeline
    from kcls.data.sources import load_splits
    from kcls.models.classifier import build_classifier
    from kcls.serving.export import export_saved_model
    from kcls.train.phases import fit_phases

    base_dir = tmp_path_factory.mktemp("saved_models")
    data = DataConfig(source="sklearn:digits", image_size=IMAGE_SIZE, batch_size=32,
                      augment="none")
    recipe = Recipe(name="tiny", data=data, model=ModelConfig(backbone="resnet_v2_tiny"),
                    train=TrainConfig(frozen_epochs=0, unfrozen_epochs=3, jit_compile=False,
                                      steps_per_epoch=20, learning_rate=3e-3,
                                      unfrozen_lr_factor=1.0, train_batchnorm=False),
                    export=ExportConfig(base_dir=str(base_dir)))
    keras.utils.set_random_seed(0)
    splits = load_splits(data)
    classifier = build_classifier(recipe.model, 10, IMAGE_SIZE)
    fit_phases(classifier, train_pipeline(splits.train, 10, data), None, 20, recipe.train,
               verbose=0)
    export_dir = export_saved_model(classifier, recipe, splits.class_names, base_dir=base_dir)
    return recipe, classifier, export_dir


@pytest.mark.slow
@pytest.mark.parametrize("method, io_type, input_dtype", [
    ("ptq-dynamic", "int8", np.float32),
    ("ptq-float16", "int8", np.float32),
    ("ptq-int8", "int8", np.int8),
    ("ptq-int8", "uint8", np.uint8),
])
def test_ptq_agrees_with_float_model(trained, tmp_path, method, io_type, input_dtype):
    recipe, classifier, export_dir = trained
    report = optimize(export_dir, method, tmp_path / method, io_type=io_type,
                      calibration_images=64, latency_runs=5)

    model = TFLiteClassifier.from_bytes((tmp_path / method / "model.tflite").read_bytes())
    assert model.input_dtype == input_dtype
    assert model.input_shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert model.output_shape == (1, 10)
    images, labels = held_out_examples(recipe)
    keras_top1 = np.argmax(classifier.predict(images, verbose=0), axis=-1)
    tflite_top1 = np.argmax(model.predict(images), axis=-1)
    assert np.mean(keras_top1 == tflite_top1) >= 0.9
    assert report["agreement"] >= 0.9
    assert report["interpreter"] in ("tf.lite", "ai_edge_litert")
    assert report["per_channel"] is (True if method == "ptq-int8" else None)
    assert report["float32"]["accuracy"] > 0.4  # trained: chance is 0.1
    assert report["optimized"]["size_bytes"] < report["float32"]["size_bytes"] / 1.5
    saved = json.loads((tmp_path / method / "optimize.json").read_text())
    assert saved["test_examples"] == len(labels) == 360
    assert "| float32 |" in (tmp_path / method / "optimize.md").read_text()


@pytest.mark.slow
def test_ptq_int8_per_tensor_scales_are_smaller(trained, tmp_path):
    recipe, classifier, _ = trained
    saved_model = write_probability_saved_model(classifier, IMAGE_SIZE, tmp_path / "saved_model")
    calibration = representative_images(recipe, 32)
    images, _ = held_out_examples(recipe)
    float_top1 = np.argmax(TFLiteClassifier.from_bytes(convert(saved_model)).predict(images),
                           axis=-1)
    models, most_scales = {}, {}
    for per_channel in (True, False):
        models[per_channel] = convert(saved_model, "ptq-int8", calibration,
                                      per_channel=per_channel)
        runner = TFLiteClassifier.from_bytes(models[per_channel])
        most_scales[per_channel] = max(
            len(detail["quantization_parameters"]["scales"])
            for detail in runner.interpreter.get_tensor_details())
        assert np.mean(np.argmax(runner.predict(images), axis=-1) == float_top1) >= 0.9
    assert most_scales[True] > 1 and most_scales[False] == 1
    assert len(models[False]) < len(models[True])


@pytest.mark.slow
def test_float_tflite_matches_keras(trained, tmp_path):
    recipe, classifier, _ = trained
    model = TFLiteClassifier.from_bytes(convert(write_probability_saved_model(
        classifier, IMAGE_SIZE, tmp_path / "saved_model")))
    images, _ = held_out_examples(recipe)
    expected = np.asarray(keras.ops.softmax(classifier(images[:8], training=False)))
    np.testing.assert_allclose(model.predict(images[:8]), expected, atol=1e-4)


def test_optimized_dir_is_beside_the_versions_or_in_the_run(tmp_path):
    for version in ("1", "2"):
        (tmp_path / "saved_models" / "tiny" / version).mkdir(parents=True)
        (tmp_path / "saved_models" / "tiny" / version / "saved_model.pb").write_bytes(b"")
    model_dir = tmp_path / "saved_models" / "tiny"
    assert optimized_dir(model_dir, "ptq-int8") == model_dir / "optimized" / "2" / "ptq-int8"
    assert optimized_dir(model_dir / "1", "qat") == model_dir / "optimized" / "1" / "qat"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    assert optimized_dir(tmp_path / "run", "prune") == tmp_path / "run" / "optimized" / "prune"


def test_unknown_methods_fail_clearly(tmp_path):
    with pytest.raises(OptimizeError, match="Unknown method"):
        optimize(tmp_path, "ptq-int4")


@pytest.mark.slow
def test_cli_optimize(trained, tmp_path):
    _, _, export_dir = trained
    result = CliRunner().invoke(main, ["optimize", str(export_dir), "--method", "ptq-dynamic",
                                       "--out", str(tmp_path / "out"), "--latency-runs", "3"])
    assert result.exit_code == 0, result.output
    assert "smaller" in result.output and (tmp_path / "out" / "model.tflite").is_file()

    result = CliRunner().invoke(main, ["optimize", str(tmp_path), "--method", "ptq-int8"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "neither a kcls run directory" in result.output

    result = CliRunner().invoke(main, ["optimize", str(export_dir), "--method", "ptq-float16",
                                       "--io-type", "uint8"])
    assert result.exit_code == 2 and "--io-type" in result.output
    result = CliRunner().invoke(main, ["optimize", str(export_dir), "--method", "prune",
                                       "--per-tensor"])
    assert result.exit_code == 2 and "--per-tensor" in result.output


@pytest.mark.slow
def test_prune_reaches_target_sparsity(trained, tmp_path):
    _, _, export_dir = trained
    progress = []
    report = optimize(export_dir, "prune", tmp_path, latency_runs=3, mot_epochs=1,
                      target_sparsity=0.5, mot_steps_per_epoch=4, log=progress.append)
    assert any(line.startswith("prune: epoch 1/1 done") for line in progress), progress

    # Count the zeros ourselves, in the stripped SavedModel the TF-MOT child wrote.
    saved = tf.saved_model.load(str(tmp_path / "saved_model"))
    kernels = [v.numpy() for v in saved.model_variables if v.name.endswith("kernel:0")]
    assert len(kernels) > 10
    zeros = sum(int(np.sum(k == 0)) for k in kernels) / sum(k.size for k in kernels)
    assert 0.45 <= zeros <= 0.55
    assert report["sparsity"]["overall"] == pytest.approx(zeros)
    assert report["optimized"]["zipped_bytes"] < report["float32"]["zipped_bytes"] * 0.8
    # No accuracy bound: 4 steps from 0 to 50% sparsity on a model trained for 30 steps
    # is a smoke test; the README reports prune's accuracy on the fully trained quickstart.


@pytest.mark.slow
def test_qat_yields_an_int8_tflite_model(trained, tmp_path):
    _, _, export_dir = trained
    report = optimize(export_dir, "qat", tmp_path, latency_runs=3, mot_epochs=1,
                      mot_steps_per_epoch=3, log=lambda line: None)

    interpreter = TFLiteClassifier.from_bytes((tmp_path / "model.tflite").read_bytes())
    types = {detail["dtype"] for detail in interpreter.interpreter.get_tensor_details()}
    assert np.int8 in types
    assert interpreter.output_shape == (1, 10)
    assert report["optimized"]["size_bytes"] < report["float32"]["size_bytes"] / 2.5
    # Loose: 3 QAT steps move a model trained for only 30 steps (0.79-0.99 seen with 8).
    assert report["agreement"] >= 0.6


def with_moved_batchnorm(classifier: keras.Model, seed: int = 0) -> keras.Model:
    """`classifier` with every BatchNorm vector set to distinct random values.

    At their initial values (gamma 1, beta 0, mean 0, variance 1) two of the four `[C]`
    vectors are equal, so a transfer that swaps them would go unnoticed.
    """
    rng = np.random.default_rng(seed)
    for layer in classifier._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            for variable in layer.weights:
                variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))
    return classifier


@pytest.mark.slow
def test_tf_mot_child_receives_every_weight_by_name(tmp_path):
    """EfficientNetV2's blocks list their BatchNorm statistics in another order in tf-keras."""
    from kcls.models.classifier import build_classifier
    from kcls.optimize.mot import fine_tune_with_mot

    recipe = Recipe(name="effnet", data=DataConfig(image_size=IMAGE_SIZE, batch_size=8),
                    model=ModelConfig(backbone="efficientnetv2_b0", dropout=0.0))
    keras.utils.set_random_seed(0)
    classifier = with_moved_batchnorm(build_classifier(recipe.model, 3, IMAGE_SIZE))
    images = np.random.default_rng(1).uniform(0, 255, (4, IMAGE_SIZE, IMAGE_SIZE, 3))
    expected = np.asarray(keras.ops.softmax(classifier(images, training=False)))
    # Zero epochs: the child only rebuilds, loads the weights and converts.
    model, _ = fine_tune_with_mot(classifier, recipe, 3, "prune", tmp_path, epochs=0,
                                  steps_per_epoch=1)
    probabilities = TFLiteClassifier.from_bytes(model).predict(images.astype(np.float32))
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)


def test_weight_keys_survive_the_name_counters_of_another_build():
    from kcls.models.classifier import build_classifier
    from kcls.optimize.weight_keys import weight_keys

    # MobileNetV3 leaves its squeeze-and-excite layers unnamed: a second build in the same
    # process gets other counters (conv2d_36, ...), as the TF-MOT child process does.
    first, second = (build_classifier(ModelConfig(backbone="mobilenet_v3_small"), 3, 32)
                     for _ in range(2))
    assert [v.path for v in first.weights] != [v.path for v in second.weights]
    first_keys, second_keys = weight_keys(first.weights), weight_keys(second.weights)
    assert list(first_keys) == list(second_keys)
    assert len(first_keys) == len(first.weights)
    for key, variable in first_keys.items():
        assert variable.shape == second_keys[key].shape, key


def child(code: str) -> list[str]:
    import sys

    return [sys.executable, "-c", code]


def test_a_child_streams_its_output_and_a_dead_or_silent_child_fails_clearly():
    import os
    import time

    from kcls.optimize.mot import run_child

    received = []
    run_child(child("import sys\nprint('epoch 1/2', flush=True)\n"
                    "print('a warning', file=sys.stderr)\nprint('epoch 2/2')"),
              received.append, "the demo child")
    assert received == ["epoch 1/2", "epoch 2/2"]

    with pytest.raises(OptimizeError, match="(?s)exit status 3.*it broke"):
        run_child(child("import sys\nprint('it broke', file=sys.stderr)\nsys.exit(3)"),
                  received.append, "the demo child")
    with pytest.raises(OptimizeError, match="(?s)killed by signal SIGKILL.*out of memory"):
        run_child(child("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"),
                  received.append, "the demo child")
    started = time.monotonic()
    with pytest.raises(OptimizeError, match="printed nothing for 1 s") as error:
        run_child(child("import time\nprint('working', flush=True)\ntime.sleep(60)"),
                  received.append, "the demo child", idle_timeout=1)
    assert time.monotonic() - started < 30
    pid = int(str(error.value).split("process ")[1].split(")")[0])
    with pytest.raises(ProcessLookupError):  # stopped, not left running
        os.kill(pid, 0)


def test_calibration_and_held_out_images_name_the_files_they_skip(damaged_folder):
    recipe = Recipe(name="damaged", data=DataConfig(
        source=f"folder:{damaged_folder}", image_size=16, test_fraction=0.25,
        validation_fraction=0.0))
    names = ["caf\\xe9.png", "bomb.png", "half.jpg"]
    calibration_skipped: list[str] = []
    calibration = list(representative_images(recipe, 100, calibration_skipped)())
    test_skipped: list[str] = []
    images, labels = held_out_examples(recipe, test_skipped)
    # 15 files with an image extension: each reaches calibration or the test, or is named.
    assert len(calibration) + len(labels) == 12 and images.shape[1:] == (16, 16, 3)
    # The scan's refusals are named by both; the truncated JPEG by the split it is in
    # (training), once its images were read.
    assert [path.rsplit("/", 1)[1] for path in calibration_skipped] == names
    assert [path.rsplit("/", 1)[1] for path in test_skipped] == names[:2]


def test_optimize_prints_no_converter_lines_and_points_at_the_edge_extra(trained, tmp_path,
                                                                          capfd, monkeypatch):
    """Issue 29 minor: the converter's `Ignored output_format` lines, the interpreter's
    XNNPACK line and TensorFlow's "deletion in TF 2.20" warning reached the terminal."""
    import kcls.optimize.interpreter as interpreter

    _, _, export_dir = trained
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)  # as from Python, not the CLI
    monkeypatch.setattr(interpreter, "_warned_about_tf_lite", False)
    with pytest.warns(UserWarning) as warned:
        optimize(export_dir, "ptq-dynamic", tmp_path / "out", latency_runs=2)
    printed = capfd.readouterr()
    for line in ("Ignored output_format", "XNNPACK", "drop_control_dependency"):
        assert line not in printed.err + printed.out
    messages = [str(warning.message) for warning in warned]
    assert not [message for message in messages if "scheduled for deletion" in message]
    if interpreter.interpreter_name() == "tf.lite":
        assert [message for message in messages if 'pip install "kcls[edge]"' in message]


def test_importing_the_tf_mot_worker_leaves_this_process_on_keras_3():
    # The worker switches a process to tf-keras only when it runs as the program: a test
    # (or a docs check) importing it once must not hand TF_USE_LEGACY_KERAS=1 to every
    # child process started after it (CLI runs, notebook kernels).
    import os
    import subprocess
    import sys

    environment = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    code = ("import os, kcls.optimize.mot_worker\n"
            "print(os.environ.get('TF_USE_LEGACY_KERAS', 'unset'))")
    printed = subprocess.run([sys.executable, "-c", code], env=environment, check=True,
                             capture_output=True, text=True).stdout
    assert printed.split()[-1] == "unset"
