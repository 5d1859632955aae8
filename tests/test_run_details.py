"""Issue 29's minor items: the run header's CPU count, samples across classes, exports
holding their weights once, and a killed `kcls pretrain`."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kcls.config import DataConfig, Recipe
from kcls.data.sources import splits_from_arrays
from kcls.tasks import SingleLabelTask
from kcls.train.compute import cpu_cores, describe_devices
from kcls.workflows.run import SAMPLE_IMAGES, write_samples


def test_the_header_counts_the_cores_the_run_may_use_not_tensorflows_one_cpu_device():
    cores = len(os.sched_getaffinity(0))
    assert cpu_cores() == cores
    assert describe_devices().startswith(f"CPU ({cores} core{'s' if cores > 1 else ''})")


def test_samples_are_drawn_across_the_classes_of_a_split_listed_class_by_class(tmp_path):
    images = np.zeros((60, 8, 8, 3), np.uint8)
    labels = np.repeat([0, 1, 2], 20)  # a folder's order: every cat, then every dog, ...
    splits = splits_from_arrays(images, labels, ["cat", "dog", "owl"],
                                DataConfig(test_fraction=0.5, validation_fraction=0.0))
    write_samples(splits, Recipe(name="r"), SingleLabelTask(), tmp_path / "samples")
    names = sorted(path.stem.split("_", 1)[1] for path in (tmp_path / "samples").iterdir())
    assert len(names) == SAMPLE_IMAGES == 8
    assert names == ["cat"] * 3 + ["dog"] * 3 + ["owl"] * 2


def test_an_export_holds_each_weight_once_in_its_saved_model(tmp_path):
    # Keras' ExportArchive.track(model) saved the Keras variables beside the TensorFlow
    # variables the signatures use: 27.5 MB of variables/ for EfficientNet-Lite0's
    # 13.7 MB of weights (44 MB exports, with model.weights.h5).
    import keras
    import tensorflow as tf

    from kcls.config import apply_overrides
    from kcls.layout import WEIGHTS_FILE
    from kcls.models.classifier import build_classifier
    from kcls.recipes import load_recipe
    from kcls.serving.export import export_saved_model

    recipe = apply_overrides(load_recipe("quickstart"), [
        f"export.base_dir={tmp_path}", "export.reject_coverage=none"])
    keras.utils.set_random_seed(0)
    classifier = build_classifier(recipe.model, 3, recipe.data.image_size, "float32")
    export_dir = export_saved_model(classifier, recipe, ["a", "b", "c"])
    reader = tf.train.load_checkpoint(str(export_dir / "variables" / "variables"))
    stored = sum(int(np.prod(shape)) for name, shape in reader.get_variable_to_shape_map().items()
                 if name != "_CHECKPOINTABLE_OBJECT_GRAPH")
    assert classifier.count_params() <= stored < classifier.count_params() + 100
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    served = tf.saved_model.load(str(export_dir)).signatures["predict_images"](
        images=tf.constant(images))["probabilities"].numpy()
    expected = keras.ops.softmax(classifier(images.astype("float32"), training=False)).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert (export_dir / WEIGHTS_FILE).is_file()  # the Keras weights, for kcls.load


# Pretrains in a child process that SIGKILLs itself when epoch `argv[3]` begins: a real
# kill, as a preempted machine does; first it leaves the temporary a kill during a
# weights save leaves.
KILLED_PRETRAINING = """
import os, signal, sys
from pathlib import Path

import keras

import kcls.workflows.pretrain as workflow
from kcls.config import PretrainConfig
from kcls.files import temporary_name

class Kill(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == int(sys.argv[3]):
            (Path(sys.argv[2]) / temporary_name("backbone.weights.h5")).write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)

callbacks = workflow.pretraining_callbacks
workflow.pretraining_callbacks = lambda *args: (lambda made: ([*made[0], Kill()], *made[1:]))(
    callbacks(*args))
config = PretrainConfig(source=f"folder:{sys.argv[1]}", image_size=16, batch_size=8, epochs=4,
                        projection_hidden=16, projection_dim=8)
workflow.pretrain(config, sys.argv[2], log=print, verbose=0)
"""


@pytest.mark.slow
def test_a_killed_pretraining_resumes_from_its_last_epoch_and_leaves_no_temporary(tmp_path,
                                                                                 monkeypatch):
    import json
    import subprocess
    import sys

    import keras
    from PIL import Image

    import kcls.workflows.pretrain as workflow
    from kcls.config import ConfigError, PretrainConfig
    from kcls.layout import BACKUP_DIR, RUN_INFO_FILE
    from kcls.workflows.pretrain import pretrain

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for index in range(16):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"{index}.png")
    run_dir = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILLED_PRETRAINING, str(tmp_path / "images"),
                             str(run_dir), "2"], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [path.name for path in run_dir.iterdir() if path.name.startswith(".tmp-")]

    config = PretrainConfig(source=f"folder:{tmp_path / 'images'}", image_size=16,
                            batch_size=8, epochs=4, projection_hidden=16, projection_dim=8)
    with pytest.raises(ConfigError, match="epochs"):  # other settings: refused, named
        pretrain(PretrainConfig(**{**config.__dict__, "epochs": 5}), run_dir,
                 log=lambda line: None, verbose=0)
    begun: list[int] = []
    callbacks = workflow.pretraining_callbacks
    monkeypatch.setattr(workflow, "pretraining_callbacks", lambda *args: (
        lambda made: ([*made[0], keras.callbacks.LambdaCallback(
            on_epoch_begin=lambda epoch, logs: begun.append(epoch))], *made[1:]))(
        callbacks(*args)))
    lines: list[str] = []
    result = pretrain(config, run_dir, log=lines.append, verbose=0)
    assert begun == [2, 3]  # epochs 0 and 1 were done before the kill
    assert f"resuming the interrupted pretraining in {run_dir} after its epoch 2" in lines
    assert len(result.history["loss"]) == 4  # the two epochs before the kill included
    info = json.loads((run_dir / RUN_INFO_FILE).read_text())
    assert info["epochs"] == 4 and info["resumed"] is True
    assert not (run_dir / BACKUP_DIR).exists()
    assert [path.name for path in run_dir.iterdir() if path.name.startswith(".")] == []
