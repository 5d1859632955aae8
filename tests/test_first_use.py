"""Issue 29, defect 6 and minors: values that passed validation and crashed later, output
folders checked before the work, and where explain, monitor and optimize write by default."""

from __future__ import annotations

import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from kcls.cli import main
from kcls.config import ConfigError, ModelConfig, PretrainConfig, Recipe, apply_overrides
from kcls.evaluation.evaluate import evaluate_classifier
from kcls.files import OutputFolderError, check_output_dir, safe_file_name
from kcls.layout import CACHE_ENVIRONMENT_VARIABLE, OPTIMIZE_REPORT_FILE, CacheDirError, cache_root
from kcls.models.classifier import build_classifier

TINY = ["--set", "train.frozen_epochs=1", "--set", "train.unfrozen_epochs=0",
        "--set", "train.steps_per_epoch=1", "--set", "train.jit_compile=false"]


def invoke(*args: object):
    return CliRunner().invoke(main, [str(arg) for arg in args])


@pytest.mark.parametrize("override", [
    "data.image_size=100000", "train.learning_rate=inf", "train.learning_rate=nan",
    "data.seed=-1", "train.seed=-5", "train.seed=4294967296", "data.mixup=nan",
    "model.dropout=nan", "train.clipnorm=inf", "train.weight_decay=inf"])
def test_values_that_crashed_later_are_refused_by_the_dataclasses(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=f"for '{key}'"):
        apply_overrides(Recipe(name="x"), [override])


def test_the_image_size_ceiling_says_why():
    with pytest.raises(ConfigError, match="at most 2048 pixels.*memory"):
        apply_overrides(Recipe(name="x"), ["data.image_size=100000"])
    with pytest.raises(ConfigError, match="pretrain.image_size"):
        PretrainConfig(source="folder:x", image_size=100000)
    for key in ("seed", "learning_rate"):
        with pytest.raises(ConfigError, match=f"pretrain.{key}"):
            PretrainConfig(source="folder:x", **{key: -1 if key == "seed" else float("inf")})
    assert apply_overrides(Recipe(name="x"), ["data.image_size=2048", "train.seed=0"])


def test_a_huge_image_size_fails_before_the_run_dir_exists(tmp_path):
    result = invoke("recipe", "run", "quickstart", *TINY, "--set", "data.image_size=100000",
                    "--out", tmp_path / "run")
    assert result.exit_code == 2 and "data.image_size" in result.output
    assert not (tmp_path / "run").exists()


def test_a_diverged_model_is_one_error_not_a_scikit_learn_traceback():
    keras.utils.set_random_seed(0)
    classifier = build_classifier(ModelConfig(backbone="resnet_v2_tiny"), 2, 32)
    kernel = classifier.layers[-1].kernel
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))  # what a NaN loss leaves
    batches = tf.data.Dataset.from_tensor_slices(
        (tf.zeros([4, 32, 32, 3]), tf.one_hot([0, 1, 0, 1], 2))).batch(2)
    with pytest.raises(ConfigError, match="4 of 4 images.*diverged.*train.learning_rate"):
        evaluate_classifier(classifier, batches, ["a", "b"])


def test_a_cache_dir_that_is_a_file_is_one_line_before_the_run_dir_exists(
        tmp_path, monkeypatch):
    blocking = tmp_path / "cache-file"
    blocking.write_text("")
    for value in (blocking, blocking / "kcls"):
        monkeypatch.setenv(CACHE_ENVIRONMENT_VARIABLE, str(value))
        with pytest.raises(CacheDirError, match=f"{blocking} is a file"):
            cache_root()
    # The cache holds converted ImageNet weights: a run that needs them reads it.
    result = invoke("recipe", "run", "quickstart", *TINY, "--set",
                    "model.backbone=efficientnet_lite0", "--set", "model.weights=imagenet",
                    "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert CACHE_ENVIRONMENT_VARIABLE in result.output and "is a file" in result.output
    assert not (tmp_path / "run").exists()


def test_check_output_dir_refuses_a_file_in_the_way_and_creates_nothing(tmp_path):
    blocking = tmp_path / "file"
    blocking.write_text("")
    for path in (blocking, blocking / "sub" / "dir"):
        with pytest.raises(OutputFolderError, match="is a file"):
            check_output_dir(path)
    assert check_output_dir(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"
    assert not (tmp_path / "new").exists()


def test_lr_find_checks_its_out_folder_before_the_range_test(tmp_path):
    blocking = tmp_path / "file"
    blocking.write_text("")
    result = invoke("lr-find", "quickstart", "--steps", "5", "--out", blocking / "lr")
    assert result.exit_code == 2 and "is a file" in result.output, result.output
    assert "range test |" not in result.output  # refused before preparing anything


def test_every_out_option_is_checked_before_the_work(untrained_models, tmp_path):
    run_dir, export_dir, incoming = untrained_models
    blocking = tmp_path / "file"
    blocking.write_text("")
    out = blocking / "out"
    image = next(incoming.iterdir())
    for command in (["evaluate", run_dir, "--out", out], ["explain", export_dir, image,
                                                          "--out", out],
                    ["optimize", export_dir, "--method", "ptq-dynamic", "--out", out],
                    ["monitor", export_dir, "--data", incoming, "--out", out]):
        result = invoke(*command)
        assert result.exit_code == 2, (command, result.output)
        assert f"--out {str(out)!r} cannot be a folder: {blocking} is a file" in result.output


def test_explain_and_monitor_write_beside_the_model_by_default(untrained_models, tmp_path,
                                                               monkeypatch):
    run_dir, export_dir, incoming = untrained_models
    model_dir = tmp_path / "saved_models" / "tiny"
    shutil.copytree(export_dir, model_dir / "1")
    monkeypatch.chdir(tmp_path / "saved_models")  # nothing may land in the current folder
    image = next(incoming.iterdir())
    explained = invoke("explain", model_dir, image)
    assert explained.exit_code == 0, explained.output
    assert (model_dir / "explanations" / "1" / f"{image.stem}_gradcam.png").is_file()
    monitored = invoke("monitor", model_dir, "--data", incoming)
    assert monitored.exit_code == 0, monitored.output
    (report,) = (model_dir / "monitor" / "1").glob("*/monitor.md")
    assert str(report) in monitored.output
    assert sorted(path.name for path in (tmp_path / "saved_models").iterdir()) == ["tiny"]
    copied_run = tmp_path / "run"
    shutil.copytree(run_dir, copied_run)
    assert invoke("explain", copied_run, image).exit_code == 0
    assert (copied_run / "explanations" / f"{image.stem}_gradcam.png").is_file()


def test_optimize_never_overwrites_an_earlier_report_unless_asked(untrained_models, tmp_path):
    _, export_dir, _ = untrained_models
    out = tmp_path / "optimized"
    out.mkdir()
    (out / OPTIMIZE_REPORT_FILE).write_text("{}")
    result = invoke("optimize", export_dir, "--method", "ptq-dynamic", "--out", out)
    assert result.exit_code == 1 and "--overwrite" in result.output, result.output
    assert (out / OPTIMIZE_REPORT_FILE).read_text() == "{}"


def test_safe_file_names_are_distinct_one_component_names():
    names = ["in/out", "in_out", "in%2Fout", "..", ".x", "a\nb", "a\u2028b", "C:", "x" * 300]
    escaped = [safe_file_name(name) for name in names]
    assert len(set(escaped)) == len(names)
    for name in escaped:
        assert "/" not in name and "\\" not in name and not name.startswith(".")
        assert name.isprintable() and len(name) <= 100
