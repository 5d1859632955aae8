"""Where and in which precision training runs: tf.distribute strategy and dtype policy.

Create the strategy first: connecting to a TPU and configuring multi-worker
collectives must happen before TensorFlow runs anything else, and `auto` precision
looks at the devices the strategy brought up.

Example:

>>> strategy = make_strategy("auto")
>>> precision = resolve_precision("auto")  # "float32" on a CPU
>>> with strategy.scope():
...     classifier = build_classifier(model_config, num_classes, 32, precision)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import tensorflow as tf

from kcls.config import ConfigError, JitCompile, Precision, Strategy, require_choice

# Training images/s with XLA over without, float32, the whole backbone trained, measured
# by benchmarks/train_step.py on this project's 2-core x86 CPU (the best of the runs):
# `train.jit_compile=auto` uses XLA on a CPU only where this is above 1.
XLA_CPU_SPEEDUP = {
    "efficientnetv2_b0": 0.41,  # 64x64, batch 32, BatchNorm frozen
    "resnet_v2_tiny": 0.77,  # 32x32, batch 64, BatchNorm trained: 0.54-0.77 (frozen: 0.50)
    "compact_resnet": 0.72,  # 32x32, batch 128, BatchNorm trained: 0.56-0.72 (frozen: 0.32-0.50)
}


def make_strategy(name: Strategy = "auto") -> tf.distribute.Strategy:
    """The `tf.distribute` strategy for `train.strategy`.

    Args:
        name: `auto`: TPUStrategy when a TPU is configured (environment variable
            `TPU_NAME`, or a TPU VM's `/dev/accel0`), MirroredStrategy over all GPUs when
            there are several, else the default (single-device) strategy. `mirrored`:
            MirroredStrategy over all local GPUs, or over all logical CPU devices when
            there is no GPU. `multiworker`: MultiWorkerMirroredStrategy configured by the
            `TF_CONFIG` environment variable. `default`: the default strategy.

    Returns:
        A strategy; build the classifier and compile inside `strategy.scope()`. Batch
        sizes are global: each of the `strategy.num_replicas_in_sync` replicas gets an
        equal share of every batch.

    Raises:
        ConfigError: `multiworker` without `TF_CONFIG`.
    """
    require_choice(name, Strategy, "train.strategy")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "multiworker":
        if not os.environ.get("TF_CONFIG"):
            raise ConfigError(
                "train.strategy=multiworker needs the TF_CONFIG environment variable describing "
                "the cluster (see tf.distribute.MultiWorkerMirroredStrategy); use "
                "train.strategy=mirrored for the devices of one machine.")
        return tf.distribute.MultiWorkerMirroredStrategy()
    tpu = _configured_tpu() if name == "auto" else None
    if tpu is not None:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    gpus = [device.name for device in tf.config.list_logical_devices("GPU")]
    if name == "mirrored":
        # MirroredStrategy() alone would pick only CPU:0 on a machine without GPUs.
        devices = gpus or [device.name for device in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy(gpus)
    return tf.distribute.get_strategy()


def describe_strategy(strategy: tf.distribute.Strategy) -> str:
    """E.g. `MirroredStrategy x 2 replicas`, for logs and run.json."""
    return f"{type(strategy).__name__.lstrip('_')} x {strategy.num_replicas_in_sync} replicas"


def resolve_precision(precision: Precision) -> str:
    """The Keras dtype policy for `precision`.

    `auto` picks `mixed_bfloat16` on TPUs and on GPUs with compute capability 8.0+
    (Ampere and newer), `mixed_float16` on older GPUs (7.0+; `fit_phases` adds loss
    scaling), and `float32` on CPUs and anything else. Call it after `make_strategy`:
    TPUs are only listed once the strategy has initialised them.
    """
    require_choice(precision, Precision, "train.precision")
    if precision != "auto":
        return precision
    if tf.config.list_logical_devices("TPU"):
        return "mixed_bfloat16"
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        major, _ = tf.config.experimental.get_device_details(gpus[0]).get(
            "compute_capability", (0, 0))
        if major >= 8:
            return "mixed_bfloat16"
        if major >= 7:
            return "mixed_float16"
    return "float32"


def resolve_jit_compile(setting: JitCompile, backbone: str) -> tuple[bool, str]:
    """Whether the training step compiles with XLA, and why, for `train.jit_compile`.

    `auto` uses XLA on TPUs (which run only compiled programs) and GPUs (where it fuses
    the step's many small ops), and on CPUs only for the backbones `XLA_CPU_SPEEDUP`
    measured faster with it: XLA's CPU convolutions are slower than oneDNN's. A backbone
    that was not measured trains without XLA on a CPU.

    Args:
        setting: `True`, `False` or `"auto"`.
        backbone: the `model.backbone` name.

    Returns:
        `(use_xla, reason)`, the reason one line for `run.json`.
    """
    require_choice(setting, JitCompile, "train.jit_compile")
    if isinstance(setting, bool):
        return setting, f"train.jit_compile={str(setting).lower()}"
    if tf.config.list_logical_devices("TPU"):
        return True, "auto: TPU"
    if tf.config.list_physical_devices("GPU"):
        return True, "auto: GPU"
    speedup = XLA_CPU_SPEEDUP.get(backbone)
    if speedup is None:
        return False, f"auto: CPU, {backbone} not measured with XLA on a CPU"
    return speedup > 1.0, (f"auto: CPU, {backbone} trained at {speedup:.2f}x the speed with "
                           "XLA (benchmarks/train_step.py, 2-core x86 CPU)")


def describe_devices() -> str:
    """A short description of the accelerators TensorFlow sees, for logs and run.json."""
    devices = [d.device_type for d in tf.config.list_logical_devices()]
    counts = {kind: devices.count(kind) for kind in dict.fromkeys(devices)}
    return ", ".join(f"{count} {kind}" for kind, count in counts.items())


def _configured_tpu() -> str | None:
    """The TPU address to connect to, or None: `TPU_NAME`, or `local` on a TPU VM."""
    if os.environ.get("TPU_NAME"):
        return os.environ["TPU_NAME"]
    if Path("/dev/accel0").exists():
        return "local"
    return None
