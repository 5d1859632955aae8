"""Training on several workers: who this process is, where it writes, what workers share.

Under `train.strategy=multiworker` every worker (a process, on its own machine or not)
runs the same program from the same `TF_CONFIG`; `tf.distribute.MultiWorkerMirroredStrategy`
keeps their variables identical by all-reducing the gradients. kcls adds the rest:

- `Worker`: this process's task, whether it is the chief (the `chief` task, or worker 0
  of a cluster without one), and how many training processes there are;
- `Worker.write_path`: the chief writes the run directory's real paths; every other
  worker writes the copies that the training callbacks make (backups, checkpoints,
  TensorBoard logs) into its own scratch folder `<run_dir>/tmp_<type>_<index>/`, which
  it deletes when training ends. Files only the chief needs (progress, reports, the
  export) are not written by the others at all;
- the decisions that must come out the same on every worker, or the workers wait on
  each other forever in their next collective: `broadcast_from_chief` (a time budget's
  epoch plan, a learning rate found by the range test) and `all_reduce_sum` (BatchNorm
  statistics re-estimated on each worker's share of the batches), both collectives that
  every worker must call at the same point of the program;
- how the input is split between workers (`shard_policy`, `distributable`);
- `WorkerBackupAndRestore`, Keras's backup callback with every worker restoring the
  chief's backup;
- `weights_digest`, which lets a run check that its workers ended with the same weights.

Example:

>>> worker = Worker.from_cluster("worker", 1, {"worker": ["a:1", "b:2"]})
>>> worker.is_chief, worker.count, worker.write_path(Path("run/logs"), Path("run"))
(False, 2, PosixPath('run/tmp_worker_1/logs'))
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kcls.config import ConfigError
from kcls.layout import WORKER_SCRATCH_DIR

TRAINING_TASK_TYPES = ("chief", "worker")
# Sources whose training input is split by file: each worker reads its own files (a
# pack with at least as many training shards as workers; see `shard_policy`). Every
# other source is split by element (tf.data's DATA policy): each worker reads everything
# and keeps its share of every global batch, which needs the same element order on
# every worker.
FILE_SHARDED_SOURCES = ("tfrecord",)


class WorkerLostError(RuntimeError):
    """Training stopped because another worker of the cluster stopped (or cannot be reached)."""


def lost_worker_error(error: Exception) -> WorkerLostError:
    """The one-line `WorkerLostError` for TensorFlow's error when a collective was aborted."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return WorkerLostError(
        f"Training stopped: a worker of the cluster stopped or cannot be reached "
        f"({type(error).__name__}: {first_line[:160]}). Start every worker again with the same "
        "command and run directory: training resumes from the last epoch's backup.")


@dataclass(frozen=True)
class Worker:
    """One training process of a cluster (a one-process run is a cluster of one chief).

    Attributes:
        task_type: `chief` or `worker`, as `TF_CONFIG` names the task.
        task_id: int, the task's index among its type.
        count: int, the training processes of the cluster (chief and workers).
        is_chief: whether this process writes the run directory and evaluates.
    """

    task_type: str = "chief"
    task_id: int = 0
    count: int = 1
    is_chief: bool = True

    @classmethod
    def from_cluster(cls, task_type: str, task_id: int,
                     cluster: dict[str, list[str]]) -> Worker:
        """The worker `task_type`/`task_id` of `cluster` (a `TF_CONFIG` `cluster` dict).

        Raises:
            ConfigError: a task type kcls does not train with (`evaluator`, `ps`).
        """
        if task_type not in TRAINING_TASK_TYPES:
            raise ConfigError(
                f"TF_CONFIG names task type {task_type!r}: kcls trains with 'chief' and "
                "'worker' tasks only (MultiWorkerMirroredStrategy); remove the others.")
        count = sum(len(cluster.get(kind, [])) for kind in TRAINING_TASK_TYPES)
        is_chief = task_type == "chief" or ("chief" not in cluster and int(task_id) == 0)
        return cls(task_type, int(task_id), count, is_chief)

    @property
    def name(self) -> str:
        """E.g. `worker 1 of 2`, for logs."""
        return f"{self.task_type} {self.task_id} of {self.count}"

    def scratch_dir(self, run_dir: Path) -> Path:
        """This worker's folder for the copies it writes (never used by the chief)."""
        return Path(run_dir) / WORKER_SCRATCH_DIR.format(task_type=self.task_type,
                                                         task_id=self.task_id)

    def write_path(self, path: Path, run_dir: Path) -> Path:
        """Where this worker writes the run directory's `path`: `path` itself on the chief,
        the same relative path in `scratch_dir(run_dir)` on the others."""
        if self.is_chief:
            return Path(path)
        return self.scratch_dir(run_dir) / Path(path).relative_to(run_dir)


def tf_config() -> dict[str, Any]:
    """The parsed `TF_CONFIG` environment variable.

    Raises:
        ConfigError: it is missing or not JSON with `cluster` and `task`.
    """
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise ConfigError(
            "train.strategy=multiworker needs the TF_CONFIG environment variable describing "
            "the cluster (see tf.distribute.MultiWorkerMirroredStrategy, or run "
            "`kcls recipe run NAME --workers N` on one machine); use train.strategy=mirrored "
            "for the devices of one machine.")
    try:
        config = json.loads(text)
        config["cluster"], config["task"]["type"], config["task"]["index"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"TF_CONFIG={text[:80]!r} is not JSON with 'cluster' and 'task' "
                          "{'type', 'index'}: see docs/distributed.md.") from None
    return config


def worker_from_environment(strategy_name: str) -> Worker:
    """This process's `Worker` for `train.strategy` before the strategy exists: from
    `TF_CONFIG` under `multiworker`, else the chief of a cluster of one."""
    if strategy_name != "multiworker":
        return Worker()
    config = tf_config()
    return Worker.from_cluster(config["task"]["type"], config["task"]["index"],
                               config["cluster"])


def is_multiworker(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` spans processes (MultiWorkerMirroredStrategy)."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def worker_of(strategy: tf.distribute.Strategy) -> Worker:
    """This process's `Worker` under `strategy` (the chief of one for one-process strategies)."""
    if not is_multiworker(strategy):
        return Worker()
    resolver = strategy.cluster_resolver
    return Worker.from_cluster(resolver.task_type, resolver.task_id,
                               resolver.cluster_spec().as_dict())


def all_reduce_sum(strategy: tf.distribute.Strategy,
                   arrays: list[np.ndarray]) -> list[np.ndarray]:
    """The element-wise sums of `arrays` over the workers (as they are on one process).

    A collective: under MultiWorkerMirroredStrategy every worker must call it, at the
    same point of the program, with arrays of the same shapes. One all-reduce of the
    concatenation, whatever the number of arrays.

    Args:
        strategy: the training strategy.
        arrays: list of float arrays (any shapes).

    Returns:
        list of float64 arrays of the same shapes.
    """
    arrays = [np.asarray(array, np.float64) for array in arrays]
    if not is_multiworker(strategy) or not arrays:
        return arrays
    flat = tf.constant(np.concatenate([array.ravel() for array in arrays]))
    per_replica = strategy.experimental_distribute_values_from_function(lambda context: flat)
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()
    # One process may hold several replicas: each contributed the same local values.
    total = total / strategy.num_replicas_in_sync * worker_of(strategy).count
    sizes = np.cumsum([array.size for array in arrays])[:-1]
    return [part.reshape(array.shape) for part, array in zip(np.split(total, sizes), arrays)]


def broadcast_from_chief(strategy: tf.distribute.Strategy, value: float) -> float:
    """The chief's `value`, on every worker: a decision made once (a collective, see
    `all_reduce_sum`)."""
    worker = worker_of(strategy)
    if worker.count == 1:
        return value
    (shared,) = all_reduce_sum(strategy, [np.array([value if worker.is_chief else 0.0])])
    return float(shared[0])


def barrier(strategy: tf.distribute.Strategy) -> None:
    """Returns once every worker has called it (a collective, see `all_reduce_sum`)."""
    all_reduce_sum(strategy, [np.zeros(1)])


def shard_policy(source: str, workers: int = 1) -> tf.data.experimental.AutoShardPolicy:
    """How the training input of `data.source` is split between `workers` (see
    `FILE_SHARDED_SOURCES`): by file for a pack with a training shard or more per
    worker, by element otherwise (tf.data's FILE policy fails when a worker would get no
    file, as a pack smaller than one shard, 128 MB by default, would give it).

    Raises:
        ConfigError: a `tfrecord:` source that is not a readable pack.
    """
    kind, _, argument = source.partition(":")
    policy = tf.data.experimental.AutoShardPolicy
    if kind not in FILE_SHARDED_SOURCES:
        return policy.DATA
    from kcls.data.tfrecord import read_pack

    shards = len(read_pack(argument).split("train")["shards"])
    return policy.FILE if shards >= workers else policy.DATA


def worker_cache(cache: str, worker: Worker) -> str:
    """`data.cache` for this worker: a file prefix gets the worker's name appended (two
    tf.data caches writing one file fail), `memory` and `none` stay as they are."""
    if cache in ("memory", "none") or worker.count == 1:
        return cache
    return f"{cache}.{worker.task_type}-{worker.task_id}"


def distributable(dataset: tf.data.Dataset,
                  policy: tf.data.experimental.AutoShardPolicy) -> tf.data.Dataset:
    """`dataset` split between workers by `policy` when a strategy distributes it."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = policy
    return dataset.with_options(options)


def weights_digest(model: keras.Model) -> str:
    """A short digest of every weight of `model` (shapes and float32 bytes, in the model's
    weight order): equal on two workers, or for a model and one rebuilt from its saved
    weights, exactly when their weights are bit for bit the same."""
    digest = hashlib.md5()
    for variable in model.weights:
        value = np.ascontiguousarray(variable.numpy(), np.float32)
        digest.update(str(value.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:16]


class WorkerBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras's `BackupAndRestore` for one of several workers: every worker restores the
    chief's backup.

    Keras 3's callback knows nothing of workers: each would back up to, restore from and
    finally delete the same folder. Here the chief backs up to `backup_dir` as usual;
    any other worker first copies the chief's backup (`chief_backup_dir`, on storage all
    workers share) into its own `backup_dir` (in its scratch folder), restores from that,
    backs up there and deletes it at the end. The chief cannot write its next backup
    while a worker copies: that needs the worker's training steps.

    Args:
        backup_dir: where this worker backs up (`Worker.write_path` of the chief's).
        chief_backup_dir: where the chief backs up.
    """

    def __init__(self, backup_dir: Path, chief_backup_dir: Path) -> None:
        super().__init__(str(backup_dir))
        self.chief_backup_dir = Path(chief_backup_dir)

    def on_train_begin(self, logs=None):
        own = Path(self.backup_dir)
        if own != self.chief_backup_dir:
            shutil.rmtree(own, ignore_errors=True)
            if self.chief_backup_dir.is_dir():
                shutil.copytree(self.chief_backup_dir, own)
        super().on_train_begin(logs)
