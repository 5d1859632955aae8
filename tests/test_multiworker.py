"""Multi-worker training (MultiWorkerMirroredStrategy): workers, launcher, shared decisions.

The slow tests start real worker processes on 127.0.0.1 (each its own TensorFlow, as on a
cluster) with `kcls.workflows.launch.start_workers`; the run directory is one folder all
of them see, as a cluster's shared storage.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import write_digit_folder

from kcls.config import ConfigError, DataConfig, apply_overrides, check_global_batch
from kcls.data.pack import pack_source
from kcls.layout import BACKUP_DIR, PROGRESS_FILE, RUN_INFO_FILE, WEIGHTS_FILE
from kcls.recipes import load_recipe
from kcls.train import compute
from kcls.train.batchnorm import batchnorm_layers, synchronize_batchnorm
from kcls.train.budget import CALIBRATION_STEPS, BudgetPlanner, TimeBudget
from kcls.train.cluster import (
    Worker,
    WorkerBackupAndRestore,
    all_reduce_sum,
    broadcast_from_chief,
    shard_policy,
    tf_config,
    weights_digest,
    worker_cache,
    worker_from_environment,
)
from kcls.train.schedule import WarmupCosine
from kcls.train.trainer import Trainer
from kcls.workflows import launch
from kcls.workflows.lr_find import find_recipe_learning_rate
from kcls.workflows.run import run_recipe
from kcls.workflows.tune import tune_settings

# A quickstart small enough for two workers sharing two busy cores: one phase (each
# phase traces its own step functions, the slowest part here), BatchNorm trained.
TINY = ["train.frozen_epochs=0", "train.unfrozen_epochs=3", "train.steps_per_epoch=10",
        "data.batch_size=32"]
WORKER_TIMEOUT = 600
# Chance is 0.10. One process scored 0.66-0.69 and two workers 0.570 in one CI run with a
# 30-step range test, whose rate varies with the batches it sees (the workers' input is
# not deterministic): a floor well above chance and below that spread.
ACCURACY_FLOOR = 0.45


# --------------------------------------------------------------------------- who is who


def test_worker_0_is_the_chief_of_a_cluster_without_a_chief_task():
    cluster = {"worker": ["a:1", "b:2", "c:3"]}
    assert Worker.from_cluster("worker", 0, cluster) == Worker("worker", 0, 3, True)
    assert not Worker.from_cluster("worker", 2, cluster).is_chief
    with_chief = {"chief": ["a:1"], "worker": ["b:2"]}
    assert Worker.from_cluster("chief", 0, with_chief).is_chief
    assert not Worker.from_cluster("worker", 0, with_chief).is_chief
    assert Worker.from_cluster("worker", 0, with_chief).count == 2
    with pytest.raises(ConfigError, match="'evaluator'"):
        Worker.from_cluster("evaluator", 0, with_chief)


def test_workers_write_the_run_directory_into_their_scratch_folders(tmp_path):
    chief, other = Worker("worker", 0, 2, True), Worker("worker", 1, 2, False)
    path = tmp_path / "backup" / "frozen"
    assert chief.write_path(path, tmp_path) == path
    assert other.write_path(path, tmp_path) == tmp_path / "tmp_worker_1" / "backup" / "frozen"
    assert other.name == "worker 1 of 2"


def test_each_worker_caches_to_its_own_files():
    other = Worker("worker", 1, 2, False)
    assert worker_cache("/cache/digits", other) == "/cache/digits.worker-1"
    assert worker_cache("memory", other) == "memory"
    assert worker_cache("/cache/digits", Worker()) == "/cache/digits"


def test_tf_config_is_read_and_checked(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", launch.tf_config([1111, 2222], 1))
    assert tf_config()["cluster"]["worker"] == ["127.0.0.1:1111", "127.0.0.1:2222"]
    assert worker_from_environment("multiworker") == Worker("worker", 1, 2, False)
    assert worker_from_environment("auto") == Worker()
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {}}')
    with pytest.raises(ConfigError, match="is not JSON with 'cluster' and 'task'"):
        tf_config()
    monkeypatch.delenv("TF_CONFIG")
    with pytest.raises(ConfigError, match="needs the TF_CONFIG environment variable"):
        worker_from_environment("multiworker")


def test_multiworker_run_needs_a_named_run_directory(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", launch.tf_config([1111, 2222], 0))
    recipe = apply_overrides(load_recipe("quickstart"), ["train.strategy=multiworker"])
    with pytest.raises(ConfigError, match="pass --out DIR"):
        run_recipe(recipe)  # refused before any strategy is made


def test_global_batch_must_split_equally_between_replicas():
    check_global_batch(64, 2)
    with pytest.raises(ConfigError, match="data.batch_size=30 .* multiple of 4, e.g. "
                                          "data.batch_size=28"):
        check_global_batch(30, 4)


def test_training_input_is_split_by_file_only_where_each_worker_has_files(tmp_path):
    policy = tf.data.experimental.AutoShardPolicy
    digits = write_digit_folder(tmp_path / "digits", per_class=30, classes=3)
    pack_source(DataConfig(source=f"folder:{digits}"), tmp_path / "pack", shard_bytes=5_000,
                log=lambda line: None)
    shards = len(list(tmp_path.glob("pack/train-*.tfrecord")))
    assert shards >= 2
    assert shard_policy(f"tfrecord:{tmp_path / 'pack'}", shards) == policy.FILE
    # A worker without a shard would fail in tf.data: those read by element.
    assert shard_policy(f"tfrecord:{tmp_path / 'pack'}", shards + 1) == policy.DATA
    assert shard_policy(f"folder:{digits}", 2) == policy.DATA
    assert shard_policy("sklearn:digits", 2) == policy.DATA


def test_xla_is_off_under_multiworker_on_cpus(monkeypatch):
    monkeypatch.setattr(compute, "is_multiworker", lambda strategy: True)
    use_xla, reason = compute.resolve_jit_compile("auto", "resnet_v2_tiny")
    assert not use_xla and "XLA cannot compile collectives for CPU devices" in reason
    assert compute.resolve_jit_compile(False, "resnet_v2_tiny") == (False,
                                                                     "train.jit_compile=false")
    with pytest.raises(ConfigError, match="train.jit_compile=true cannot train under"):
        compute.resolve_jit_compile(True, "resnet_v2_tiny")


def test_shared_decisions_are_the_process_own_on_one_process():
    strategy = tf.distribute.get_strategy()
    assert broadcast_from_chief(strategy, 7.0) == 7.0
    summed = all_reduce_sum(strategy, [np.ones((2, 3)), np.arange(3)])
    assert [array.shape for array in summed] == [(2, 3), (3,)]


def test_a_budgeted_phase_follows_the_plan_the_workers_agree_on():
    # Every re-plan goes through `agree` (the chief's plan, broadcast): a worker whose
    # own clock says otherwise still stops with the others.
    seen, clock = [], [0.0]
    budget = TimeBudget(100.0, clock=lambda: clock[0])
    schedule = WarmupCosine(1.0, total_steps=1, warmup_fraction=0.1)
    planner = BudgetPlanner(budget, schedule, first_epoch=0, steps_per_epoch=10, batch_size=10,
                            share=1.0, name="unfrozen",
                            agree=lambda planned: seen.append(planned) or 3)
    planner.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    planner.model.stop_training = False
    planner.on_train_begin()
    for epoch in range(3):
        planner.on_epoch_begin(epoch)
        for _ in range(10):
            planner.on_train_batch_begin(0)
            clock[0] += 0.1  # this worker alone could fit far more epochs
            planner.on_train_batch_end(0)
        planner.on_epoch_end(epoch)
    assert seen[0] > 3 and len(seen) == 4  # after the calibration steps and every epoch
    assert planner.planned_epochs == 3 and planner.model.stop_training
    assert float(schedule.total_steps.numpy()) == 30.0
    assert CALIBRATION_STEPS < 10


def test_lr_find_and_tune_run_in_one_process():
    recipe = apply_overrides(load_recipe("quickstart"), ["train.strategy=multiworker"])
    with pytest.raises(ConfigError, match="kcls lr-find runs in one process"):
        find_recipe_learning_rate(recipe)
    with pytest.raises(ConfigError, match="kcls tune runs its trials in one process"):
        tune_settings(recipe, "10m", None, "finetune", None, 0)


def test_weights_digest_follows_every_weight():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2),
                              keras.layers.BatchNormalization()])
    digest = weights_digest(model)
    assert weights_digest(model) == digest
    moving_mean = model.layers[1].moving_mean
    moving_mean.assign(moving_mean + 1e-6)  # a non-trainable weight counts too
    assert weights_digest(model) != digest


def test_synchronize_batchnorm_reaches_nested_layers():
    inner = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(2, 1),
                              keras.layers.BatchNormalization()])
    model = keras.Sequential([keras.Input((4, 4, 3)), inner, keras.layers.BatchNormalization()])
    # `_flatten_layers` (private Keras) lists nested layers: pinned here.
    assert len(batchnorm_layers(model)) == 2
    assert synchronize_batchnorm(model) == 2
    assert all(layer.synchronized for layer in batchnorm_layers(model))
    model(np.zeros((2, 4, 4, 3), np.float32), training=True)  # read when called: still works


# --------------------------------------------------------------------------- Keras internals


def _tiny_trainer(strategy: tf.distribute.Strategy) -> tuple[Trainer, tf.data.Dataset]:
    with strategy.scope():
        classifier = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        trainer = Trainer(classifier)
        trainer.compile(optimizer="sgd", loss="categorical_crossentropy", metrics=["accuracy"],
                        jit_compile=False)
    rng = np.random.default_rng(0)
    batches = tf.data.Dataset.from_tensor_slices(
        (rng.normal(size=(32, 4)).astype("float32"),
         keras.utils.to_categorical(np.arange(32) % 3, 3))).batch(8)
    return trainer, batches


def test_keras_private_symbolic_build_is_still_called(monkeypatch):
    # Trainer overrides Keras's private `_maybe_symbolic_build` (see its comment): if Keras
    # stopped calling it, or renamed it, the override would silently do nothing and
    # MultiWorkerMirroredStrategy would break again.
    calls = []
    original = Trainer._maybe_symbolic_build

    def spy(self, iterator=None, data_batch=None):
        calls.append(iterator is not None)
        return original(self, iterator=iterator, data_batch=data_batch)

    monkeypatch.setattr(Trainer, "_maybe_symbolic_build", spy)
    trainer, batches = _tiny_trainer(tf.distribute.MirroredStrategy(["/cpu:0"]))
    history = trainer.fit(batches.repeat(), validation_data=batches, steps_per_epoch=2,
                          epochs=1, verbose=0, shuffle=False)
    logs = trainer.evaluate(batches, verbose=0, return_dict=True)
    assert calls[:2] == [True, True]  # fit(), evaluate(): with the data's iterator
    assert np.isfinite(history.history["val_loss"]).all() and np.isfinite(logs["loss"])


def test_own_step_functions_log_the_same_as_keras_on_one_device():
    trainer, batches = _tiny_trainer(tf.distribute.get_strategy())
    reference = keras.models.clone_model(trainer.classifier)
    reference.set_weights(trainer.classifier.get_weights())
    reference.compile(optimizer="sgd", loss="categorical_crossentropy", metrics=["accuracy"],
                      jit_compile=False)
    ours = trainer.fit(batches.repeat(), validation_data=batches, steps_per_epoch=3, epochs=2,
                       verbose=0, shuffle=False).history
    keras_own = reference.fit(batches.repeat(), validation_data=batches, steps_per_epoch=3,
                              epochs=2, verbose=0, shuffle=False).history
    for name in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(ours[name], keras_own[name], rtol=1e-5)


def test_every_worker_restores_the_chief_backup(tmp_path):
    chief_dir, own_dir = tmp_path / "backup", tmp_path / "tmp_worker_1" / "backup"
    trainer, batches = _tiny_trainer(tf.distribute.get_strategy())

    class Stop(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):  # the chief backs up epochs 0 and 1
        trainer.fit(batches.repeat(), steps_per_epoch=2, epochs=4, verbose=0, shuffle=False,
                    callbacks=[WorkerBackupAndRestore(chief_dir, chief_dir), Stop()])
    worker_trainer, _ = _tiny_trainer(tf.distribute.get_strategy())
    epochs = []
    worker_trainer.fit(batches.repeat(), steps_per_epoch=2, epochs=4, verbose=0, shuffle=False,
                       callbacks=[WorkerBackupAndRestore(own_dir, chief_dir),
                                  keras.callbacks.LambdaCallback(
                                      on_epoch_begin=lambda epoch, logs: epochs.append(epoch))])
    assert epochs == [2, 3]  # resumed where the chief's backup was
    assert not own_dir.exists()  # its own copy deleted at the end
    assert (chief_dir / "training_metadata.json").is_file()  # the chief's left alone


# --------------------------------------------------------------------------- the launcher


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_launcher_streams_the_chief_and_prefixes_the_others_errors():
    workers = launch.start_workers(_python("""
        import json, os, sys
        task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        print(f"out {task}", flush=True)
        print(f"err {task}", file=sys.stderr, flush=True)
    """), 3)
    lines, errors = [], []
    threads = launch.stream_output(workers, lines.append, errors.append)
    assert launch.wait_for_workers(workers, lines.append) == 0
    for thread in threads:
        thread.join(timeout=10)
    assert lines == ["out 0"]
    assert sorted(errors) == ["err 0", "worker 1: err 1", "worker 2: err 2"]


def test_launcher_stops_every_worker_when_one_fails():
    # Worker 1 fails; worker 0 ignores SIGTERM (as TensorFlow's preemption handler does)
    # and is killed after the grace period; worker 2 stops at SIGTERM.
    started = time.monotonic()
    workers = launch.start_workers(_python("""
        import json, os, signal, sys, time
        task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        if task == 0:
            signal.signal(signal.SIGTERM, lambda *args: None)
        if task == 1:
            time.sleep(0.5)
            sys.exit(3)
        time.sleep(120)
    """), 3, outputs=[(subprocess.DEVNULL, subprocess.DEVNULL)] * 3)
    messages = []
    assert launch.wait_for_workers(workers, messages.append, grace=1.0) == 3
    assert [worker.poll() is not None for worker in workers] == [True, True, True]
    assert messages == ["worker 1 exited with status 3: stopping the others"]
    assert time.monotonic() - started < 60


def test_local_workers_train_with_the_multiworker_strategy_only():
    recipe = load_recipe("quickstart")
    with pytest.raises(ConfigError, match="drop --set train.strategy=mirrored"):
        launch.launch_local_workers(recipe, "quickstart", ["train.strategy=mirrored"], None, 2)
    with pytest.raises(ConfigError, match="between 3 replicas"):
        launch.launch_local_workers(recipe, "quickstart", [], None, 3)  # batch 64
    command = launch.worker_command("quickstart", ["data.batch_size=32"], Path("runs/a"))
    assert command[-6:] == ["--set", "data.batch_size=32", "--set", "train.strategy=multiworker",
                            "--out", "runs/a"]


# --------------------------------------------------------------------------- real workers

def _wait(workers: list[subprocess.Popen], timeout: float = WORKER_TIMEOUT) -> list[int]:
    try:
        return [worker.wait(timeout=max(timeout, 1)) for worker in workers]
    finally:
        launch.stop_workers(workers, grace=1.0)


def _outputs(folder: Path, count: int) -> list[tuple]:
    folder.mkdir(parents=True, exist_ok=True)
    return [(open(folder / f"worker{index}.out", "w"), open(folder / f"worker{index}.err", "w"))
            for index in range(count)]


def _failure(folder: Path) -> str:
    return "\n".join(f"{path.name}: {path.read_text()[-2000:]}"
                     for path in sorted(folder.glob("worker*.err")))


def _recorded_epochs(run_dir: Path) -> int:
    try:
        return len(json.loads((run_dir / BACKUP_DIR / PROGRESS_FILE).read_text())["epochs"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_two_workers_killed_and_restarted_finish_one_run(tmp_path):
    # One scenario for the slow part (each launch costs two TensorFlow start-ups and
    # traces): a worker killed mid-run, both started again, and the finished run checked.
    # The range test's rate and early stopping are decisions both workers must share.
    # On a pack of real digit images in four training shards: each worker reads its own.
    digits = write_digit_folder(tmp_path / "digits", per_class=180, classes=10)
    pack_source(DataConfig(source=f"folder:{digits}"), tmp_path / "pack", shard_bytes=200_000,
                log=lambda line: None)
    run_dir = tmp_path / "runs" / "two"
    # A range test of 30 steps (of 100 by default): each is a step of the cluster.
    settings = [*TINY, "train.learning_rate=auto", "train.lr_find_steps=30",
                "train.early_stopping_patience=5", f"data.source=tfrecord:{tmp_path / 'pack'}"]
    command = launch.worker_command("quickstart", [
        *settings, f"export.base_dir={tmp_path / 'saved_models'}"], run_dir)
    first = launch.start_workers(command, 2, outputs=_outputs(tmp_path / "first", 2))
    deadline = time.monotonic() + WORKER_TIMEOUT
    while _recorded_epochs(run_dir) < 1 and time.monotonic() < deadline:
        assert first[0].poll() is None, _failure(tmp_path / "first")
        time.sleep(0.2)
    time.sleep(1.0)  # into the second epoch
    first[1].kill()
    codes = _wait(first, timeout=120)  # the chief notices in seconds and stops
    assert codes[1] == -9 and codes[0] != 0
    assert "a worker of the cluster stopped" in (tmp_path / "first" / "worker0.err").read_text()
    assert not (run_dir / RUN_INFO_FILE).exists()
    assert 1 <= _recorded_epochs(run_dir) < 3

    # The same command again on every worker (new ports): it resumes and finishes.
    second = launch.start_workers(command, 2, outputs=_outputs(tmp_path / "second", 2))
    assert _wait(second) == [0, 0], _failure(tmp_path / "second")
    record = json.loads((run_dir / RUN_INFO_FILE).read_text())
    assert record["resumed"] and len(record["history"]["loss"]) == 3
    assert "resumed an interrupted run" in (tmp_path / "second" / "worker0.out").read_text()
    assert record["strategy"] == "MultiWorkerMirroredStrategy x 2 replicas"
    assert record["workers"] == 2
    assert record["input_sharding"] == {"train": "FILE", "validation": "DATA",
                                        "deterministic": False, "replica_batch_size": 16}
    assert not record["jit_compile"] and "CPU" in record["jit_compile_reason"]
    assert 5 <= record["phases"][0]["learning_rate_search"]["steps"] <= 30  # kept on resume
    # It learned: one process given the same global batch (32) and settings measured
    # 0.693, 0.684 and 0.662 with seeds 0, 1 and 2 (this run: seed 0).
    assert record["metrics"]["accuracy"] >= ACCURACY_FLOOR, record["metrics"]
    # The same weights, bit for bit, on both workers and in the export.
    worker_line = (tmp_path / "second" / "worker1.out").read_text()
    assert f"weights digest {record['weights_digest']}" in worker_line
    from kcls.load import load_classifier

    export_dir = tmp_path / "saved_models" / "quickstart" / "1"
    assert weights_digest(load_classifier(export_dir).classifier) == record["weights_digest"]
    # One run directory, one export; the other worker's copies are gone.
    assert sorted(path.name for path in (tmp_path / "runs").iterdir()) == ["two"]
    assert [path.name for path in (tmp_path / "saved_models" / "quickstart").iterdir()] == ["1"]
    assert (run_dir / WEIGHTS_FILE).is_file()
    assert not list(run_dir.glob("tmp_*")) and not (run_dir / BACKUP_DIR).exists()
