"""Issue 15: no run overwrites another, nothing escapes its folder, user errors are one line.

Run directories are unique and locked, finished runs are never retrained over, damaged
exports give clear errors, and logs that are not a terminal get one line per epoch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import keras
import pytest
import tensorflow as tf
from click.testing import CliRunner

from kcls.cli import main
from kcls.config import DataConfig, ExportConfig, ModelConfig, Recipe
from kcls.export import export_saved_model
from kcls.layout import SAVED_MODEL_FILE
from kcls.models.classifier import build_classifier

CLASS_NAMES = ["cat", "dog"]


def invoke(*args: str):
    return CliRunner().invoke(main, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """Version 1 of a tiny untrained export, `<base>/tiny/1`."""
    keras.utils.set_random_seed(0)
    classifier = build_classifier(ModelConfig(backbone="resnet_v2_tiny"), len(CLASS_NAMES), 32)
    base = tmp_path_factory.mktemp("saved_models")
    recipe = Recipe(name="tiny", data=DataConfig(image_size=32),
                    model=ModelConfig(backbone="resnet_v2_tiny"),
                    export=ExportConfig(base_dir=str(base)))
    return export_saved_model(classifier, recipe, CLASS_NAMES)


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "image.png"
    path.write_bytes(tf.io.encode_png(tf.zeros([8, 8, 3], tf.uint8)).numpy())
    return path


def test_predict_with_an_empty_latest_version_names_it_and_the_fix(export_dir, tmp_path, image):
    model_dir = tmp_path / "tiny"
    shutil.copytree(export_dir, model_dir / "1")
    (model_dir / "2").mkdir()  # e.g. an interrupted copy onto the server
    result = invoke("predict", model_dir, image)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{model_dir / '2'}" in result.output and "incomplete" in result.output
    assert f"{model_dir / '1'}" in result.output and "kcls export" in result.output
    assert invoke("predict", model_dir / "1", image).exit_code == 0


def test_predict_with_a_corrupt_saved_model_names_the_folder(export_dir, tmp_path, image):
    version_dir = tmp_path / "tiny" / "1"
    shutil.copytree(export_dir, version_dir)
    (version_dir / SAVED_MODEL_FILE).write_bytes(b"not a SavedModel")
    result = invoke("predict", version_dir.parent, image)
    assert result.exit_code == 1 and result.exception is not None
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert f"{version_dir}" in result.output and "kcls export" in result.output
