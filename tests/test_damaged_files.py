"""Issue 29, defect 3: a damaged file of a run directory or an export is one line naming
the file and the fix, in every command that reads it, never a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import keras
import pytest
import tensorflow as tf
from click.testing import CliRunner

from kcls.cli import main
from kcls.config import DataConfig, ExportConfig, ModelConfig, Recipe, to_json
from kcls.files import save_weights, write_json, write_text
from kcls.layout import (
    METADATA_FILE,
    METRICS_FILE,
    REFERENCE_FILE,
    RUN_CONFIG_FILE,
    RUN_INFO_FILE,
    RUN_REFERENCE_FILE,
    SAVED_MODEL_FILE,
    WEIGHTS_FILE,
)
from kcls.models.classifier import build_classifier
from kcls.monitoring.profile import reference_profile
from kcls.serving.export import export_saved_model

CLASS_NAMES = ["cat", "dog"]
VARIABLES_FILE = "variables/variables.data-00000-of-00001"


def invoke(*args: object):
    return CliRunner().invoke(main, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A run directory as `kcls recipe run` leaves it (untrained weights), its export, and
    a folder of 12 images to monitor."""
    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("originals")
    recipe = Recipe(name="tiny", data=DataConfig(image_size=32),
                    model=ModelConfig(backbone="resnet_v2_tiny"),
                    export=ExportConfig(base_dir=str(root / "saved_models")))
    classifier = build_classifier(recipe.model, len(CLASS_NAMES), 32)
    images = tf.random.stateless_uniform([12, 32, 32, 3], (0, 1), maxval=255)
    batches = tf.data.Dataset.from_tensor_slices(
        (images, tf.one_hot(tf.range(12) % 2, 2))).batch(6)
    reference = reference_profile(classifier, batches, CLASS_NAMES)
    run_dir = root / "run"
    write_text(run_dir / RUN_CONFIG_FILE, to_json(recipe))
    write_json(run_dir / RUN_INFO_FILE, {"class_names": CLASS_NAMES, "temperature": None})
    write_json(run_dir / METRICS_FILE, {"accuracy": 0.5})
    write_json(run_dir / RUN_REFERENCE_FILE, reference)
    save_weights(classifier, run_dir / WEIGHTS_FILE)
    export_dir = export_saved_model(classifier, recipe, CLASS_NAMES, reference=reference)
    incoming = root / "incoming"
    incoming.mkdir()
    for index, image in enumerate(tf.cast(images, tf.uint8)):
        (incoming / f"{index}.png").write_bytes(tf.io.encode_png(image).numpy())
    return run_dir, export_dir, incoming


def damage(path: Path, how: str) -> None:
    if how == "garbage":
        path.write_text("garbage{")
    else:  # cut short, as a full disk or an interrupted copy leaves a file
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def commands(kind: str, model: Path, incoming: Path) -> dict[str, list[object]]:
    image = next(incoming.iterdir())
    common = {"evaluate": ["evaluate", model],
              "explain": ["explain", model, image, "--out", model.parent / "explained"],
              "optimize": ["optimize", model, "--method", "ptq-dynamic"]}
    if kind == "run":
        return {**common, "export": ["export", model, "--base-dir", model.parent / "exports"]}
    return {**common, "predict": ["predict", model, image],
            "monitor": ["monitor", model, "--data", incoming, "--out", model.parent / "mon"]}


CASES = [
    ("run", RUN_CONFIG_FILE, "garbage", ["evaluate", "explain", "optimize", "export"]),
    ("run", RUN_INFO_FILE, "garbage", ["evaluate", "explain", "export"]),
    ("run", METRICS_FILE, "garbage", ["evaluate", "export"]),
    ("run", RUN_REFERENCE_FILE, "garbage", ["export"]),
    ("run", WEIGHTS_FILE, "truncated", ["evaluate", "explain", "optimize", "export"]),
    ("export", METADATA_FILE, "garbage", ["evaluate", "explain", "optimize", "monitor"]),
    ("export", WEIGHTS_FILE, "truncated", ["evaluate", "explain", "optimize"]),
    ("export", REFERENCE_FILE, "garbage", ["monitor"]),
    ("export", SAVED_MODEL_FILE, "garbage", ["predict", "monitor"]),
    ("export", VARIABLES_FILE, "truncated", ["predict", "monitor"]),
]


@pytest.mark.parametrize("kind, name, how, names", CASES,
                         ids=[f"{kind}-{name}-{how}" for kind, name, how, _ in CASES])
def test_a_damaged_file_is_one_line_naming_it_and_the_fix(originals, tmp_path, kind, name,
                                                           how, names):
    run_dir, export_dir, incoming = originals
    model = tmp_path / kind / "1"  # a version folder for exports
    shutil.copytree(run_dir if kind == "run" else export_dir, model)
    damage(model / name, how)
    for command, arguments in commands(kind, model, incoming).items():
        if command not in names:
            continue
        result = invoke(*arguments)
        assert result.exit_code == 1, (command, result.output)
        assert isinstance(result.exception, SystemExit), (command, result.exception)
        message = result.output.strip()
        assert message.startswith("Error: ") and "\n" not in message, (command, message)
        assert (str(model / name) in message if name.endswith(".json") or
                name == WEIGHTS_FILE else str(model) in message), (command, message)
        assert "kcls export" in message or "kcls recipe run" in message or "delete it" in message


def test_the_undamaged_originals_work(originals, tmp_path):
    run_dir, export_dir, incoming = originals
    exported = invoke("export", run_dir, "--base-dir", tmp_path / "exports")
    assert exported.exit_code == 0, exported.output
    predicted = invoke("predict", export_dir, next(incoming.iterdir()))
    assert predicted.exit_code == 0, predicted.output
