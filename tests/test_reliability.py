"""Issue 15: no run overwrites another, nothing escapes its folder, user errors are one line.

Run directories are unique and locked, finished runs are never retrained over, damaged
exports give clear errors, and logs that are not a terminal get one line per epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from kcls.cli import main
from kcls.config import (
    ConfigError,
    DataConfig,
    ExportConfig,
    ModelConfig,
    Recipe,
    TrainConfig,
)
from kcls.layout import (
    BACKUP_DIR,
    LABELS_FILE,
    METADATA_FILE,
    MODELS_CONFIG_FILE,
    PROGRESS_FILE,
    RUN_CONFIG_FILE,
    RUN_INFO_FILE,
    RUN_LOCK_FILE,
    SAVED_MODEL_FILE,
    WEIGHTS_FILE,
    exported_versions,
    versions,
)
from kcls.models.classifier import build_classifier
from kcls.serving.export import export_saved_model
from kcls.train.phases import fit_phases
from kcls.workflows.run import run_recipe
from kcls.workflows.run_directory import claim_run_dir

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


TINY = ["--set", "train.frozen_epochs=1", "--set", "train.unfrozen_epochs=1",
        "--set", "train.steps_per_epoch=3", "--set", "data.batch_size=16",
        "--set", "train.jit_compile=false"]


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(run_dir: Path, pid: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_LOCK_FILE).write_text(json.dumps(
        {"pid": pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}))


def test_default_run_dirs_are_distinct_even_in_the_same_second(tmp_path):
    with claim_run_dir(None, "r", parent=tmp_path) as first, \
            claim_run_dir(None, "r", parent=tmp_path) as second:
        assert first != second and first.parent == second.parent == tmp_path / "r"
        assert (first / RUN_LOCK_FILE).is_file() and (second / RUN_LOCK_FILE).is_file()
        assert second.name.startswith(first.name)  # e.g. 20260101-120000 and ...-2
    assert not (first / RUN_LOCK_FILE).exists() and not (second / RUN_LOCK_FILE).exists()


def test_a_run_dir_in_use_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    other_run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(run_dir, other_run.pid)
        result = invoke("recipe", "run", "quickstart", *TINY, "--out", run_dir,
                        "--set", f"export.base_dir={tmp_path / 'saved_models'}")
    finally:
        other_run.kill()
        other_run.wait()
    assert result.exit_code == 2, result.output
    assert f"in use by process {other_run.pid}" in result.output and "--out" in result.output
    assert sorted(path.name for path in run_dir.iterdir()) == [RUN_LOCK_FILE]


def test_a_refused_resume_leaves_the_interrupted_run_untouched(tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / BACKUP_DIR).mkdir(parents=True)
    (run_dir / RUN_CONFIG_FILE).write_text('{"the": "interrupted run"}')
    progress = {"schedule": {"frozen_epochs": 7}, "completed": {}, "epochs": {"0": {}}}
    (run_dir / BACKUP_DIR / PROGRESS_FILE).write_text(json.dumps(progress))
    with pytest.raises(ConfigError, match="different training schedule"):
        run_recipe(tiny_recipe, run_dir, log=lambda message: None, verbose=0)
    assert (run_dir / RUN_CONFIG_FILE).read_text() == '{"the": "interrupted run"}'
    assert sorted(path.name for path in run_dir.iterdir()) == [BACKUP_DIR, RUN_CONFIG_FILE]


def test_a_cache_folder_that_does_not_exist_fails_before_the_run_dir_is_made(tmp_path):
    result = invoke("recipe", "run", "quickstart", *TINY, "--out", tmp_path / "run",
                    "--set", f"data.cache={tmp_path / 'nonexistent' / 'dir' / 'cache'}")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{tmp_path / 'nonexistent' / 'dir'}" in result.output
    assert "does not exist" in result.output and "data.cache=memory" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_cli_run_logs_an_epoch_per_line_takes_over_a_stale_lock_and_is_never_redone(
        tmp_path):
    run_dir = tmp_path / "run"
    stale = dead_pid()
    write_lock(run_dir, stale)
    result = invoke("recipe", "run", "quickstart", *TINY, "--out", run_dir,
                    "--set", f"export.base_dir={tmp_path / 'saved_models'}")
    assert result.exit_code == 0, result.output
    assert f"locked by process {stale}, which is no longer running" in result.output
    # CliRunner's stdout is not a terminal: no progress-bar frames, one line per epoch.
    assert "\r" not in result.output and "\x1b[" not in result.output
    lines = result.output.splitlines()
    # Keras heads an epoch with "Epoch N/M" only when a fit() call has several epochs.
    assert [line for line in lines if line.startswith("Epoch ")] == ["Epoch 2/2"]
    assert len([line for line in lines if line.startswith("3/3 - ") and " - loss: " in line
                and " - val_loss: " in line]) == 2, result.output
    assert "ran out of data" not in result.output
    assert not (run_dir / RUN_LOCK_FILE).exists() and (run_dir / RUN_INFO_FILE).is_file()

    finished = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
    again = invoke("recipe", "run", "quickstart", *TINY, "--out", run_dir,
                   "--set", "train.frozen_epochs=2")
    assert again.exit_code == 2 and "holds a finished run" in again.output
    assert "new --out" in again.output and "delete the folder" in again.output
    assert {path.name: path.read_bytes() for path in run_dir.iterdir()
            if path.is_file()} == finished


def test_a_validation_set_of_unknown_length_does_not_warn_that_input_ran_out(recwarn):
    """Folder sources drop unreadable files with `filter`, so tf.data cannot tell the
    number of validation batches, and Keras warned at the end of every validation pass."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (32, 32, 32, 3)).astype("float32")
    labels = keras.utils.to_categorical(np.arange(32) % 2, 2)
    examples = tf.data.Dataset.from_tensor_slices((images, labels))
    validation = examples.filter(lambda image, label: True).batch(16)
    assert validation.cardinality() == tf.data.UNKNOWN_CARDINALITY
    keras.utils.set_random_seed(0)
    classifier = build_classifier(ModelConfig(backbone="resnet_v2_tiny"), 2, 32)
    config = TrainConfig(frozen_epochs=2, unfrozen_epochs=0, jit_compile=False)
    fit_phases(classifier, examples.repeat().batch(8), validation, 2, config, verbose=0)
    assert not [str(warning.message) for warning in recwarn
                if "ran out of data" in str(warning.message)]


STRESS_RUNS = 3
STRESS_EXPORTS = 3
STRESS = ["--set", "train.frozen_epochs=1", "--set", "train.unfrozen_epochs=0",
          "--set", "train.steps_per_epoch=1", "--set", "data.batch_size=8",
          "--set", "data.image_size=16", "--set", "train.jit_compile=false",
          "--set", "data.validation_fraction=0", "--set", "export.enabled=false",
          "--set", "evaluate.mistakes=0"]  # 0: a traceback before, fixed with issue 15


@pytest.mark.slow
def test_concurrent_runs_and_exports_never_share_a_folder(tmp_path):
    """Runs started together in one `runs/` parent, then exports together into one base dir.

    About 40 s on an idle 2-core CPU (each process imports TensorFlow and traces its graphs).
    """
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_NUM_INTEROP_THREADS": "1",
                   "TF_NUM_INTRAOP_THREADS": "1"}

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "kcls.cli", *args], cwd=tmp_path,
                                env=environment, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def finish(processes: list[subprocess.Popen]) -> None:
        for process in processes:
            output, _ = process.communicate(timeout=300)
            assert process.returncode == 0, output

    finish([start("recipe", "run", "quickstart", *STRESS) for _ in range(STRESS_RUNS)])
    run_dirs = sorted((tmp_path / "runs" / "quickstart").iterdir())
    assert len(run_dirs) == STRESS_RUNS
    for run_dir in run_dirs:
        run_info = json.loads((run_dir / RUN_INFO_FILE).read_text())
        assert run_info["metrics"]["examples"] == 360
        assert (run_dir / WEIGHTS_FILE).is_file() and (run_dir / RUN_CONFIG_FILE).is_file()
        assert not (run_dir / RUN_LOCK_FILE).exists() and not (run_dir / BACKUP_DIR).exists()

    finish([start("export", str(run_dirs[index % STRESS_RUNS]), "--base-dir", "saved_models")
            for index in range(STRESS_EXPORTS)])
    model_dir = tmp_path / "saved_models" / "quickstart"
    assert versions(model_dir) == list(range(1, STRESS_EXPORTS + 1))
    assert exported_versions(model_dir) == versions(model_dir)
    for version in versions(model_dir):
        version_dir = model_dir / str(version)
        for name in (WEIGHTS_FILE, METADATA_FILE, LABELS_FILE, "variables/variables.index"):
            assert (version_dir / name).is_file(), version_dir / name
    assert [path.name for path in model_dir.iterdir() if path.name.startswith(".")] == []
    assert 'name: "quickstart"' in (tmp_path / "saved_models" / MODELS_CONFIG_FILE).read_text()


def test_evaluate_and_explain_name_an_incomplete_version_too(export_dir, tmp_path, image):
    model_dir = tmp_path / "tiny"
    shutil.copytree(export_dir, model_dir / "1")
    (model_dir / "2").mkdir()
    for command in (["evaluate", model_dir], ["explain", model_dir, image]):
        result = invoke(*command)
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert f"{model_dir / '2'}" in result.output and "incomplete" in result.output


def test_kcls_warnings_are_one_line_on_the_command_line(export_dir, tmp_path):
    folder = tmp_path / "photos"
    for name in (*CLASS_NAMES, ".thumbnails"):
        (folder / name).mkdir(parents=True)
        for index in range(2):
            (folder / name / f"{index}.png").write_bytes(
                tf.io.encode_png(tf.fill([8, 8, 3], tf.constant(index * 200, tf.uint8))).numpy())
    result = invoke("evaluate", export_dir, "--data", f"folder:{folder}")
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.output.splitlines() if "hidden folder" in line]
    assert line.startswith("warning: ") and ".thumbnails" in line
    assert "UserWarning" not in result.output and "warnings.warn" not in result.output
