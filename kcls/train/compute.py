"""Where and in which precision training runs: tf.distribute strategy and dtype policy.

Create the strategy first: connecting to a TPU and configuring multi-worker
collectives must happen before TensorFlow runs anything else (even listing the logical
devices: `initialize_devices` brings TensorFlow up in that order), and `auto` precision
looks at the devices the strategy brought up.

Example:

>>> strategy = make_strategy("auto")
>>> precision = resolve_precision("auto")  # "float32" on a CPU
>>> with strategy.scope():
...     classifier = build_classifier(model_config, num_classes, 32, precision)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import tensorflow as tf

from kcls.config import ConfigError, JitCompile, Precision, Strategy, require_choice
from kcls.train.cluster import is_multiworker, tf_config

# Training images/s with XLA over without, float32, the whole backbone trained, measured
# by benchmarks/train_step.py on this project's 2-core x86 CPU (the best of the runs):
# `train.jit_compile=auto` uses XLA on a CPU only where this is above 1.
XLA_CPU_SPEEDUP = {
    "efficientnetv2_b0": 0.41,  # 64x64, batch 32, BatchNorm frozen
    "resnet_v2_tiny": 0.77,  # 32x32, batch 64, BatchNorm trained: 0.54-0.77 (frozen: 0.50)
    "compact_resnet": 0.72,  # 32x32, batch 128, BatchNorm trained: 0.56-0.72 (frozen: 0.32-0.50)
}
# XLA compiles the gradient all-reduce into the step, and has no CPU collectives (TF 2.21:
# "Collectives are not yet implemented for CPU devices when compiling with XLA").
XLA_MULTIWORKER_CPU_REASON = ("MultiWorkerMirroredStrategy on CPUs: XLA cannot compile "
                              "collectives for CPU devices")
# One MultiWorkerMirroredStrategy per process and TF_CONFIG: collectives are configured
# once, at start-up, and later calls must get the same strategy back.
_MULTIWORKER_STRATEGIES: dict[str, tf.distribute.Strategy] = {}


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
        ConfigError: `multiworker` without a usable `TF_CONFIG`.
    """
    require_choice(name, Strategy, "train.strategy")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "multiworker":
        key = json.dumps(tf_config(), sort_keys=True)
        if key not in _MULTIWORKER_STRATEGIES:
            # Waits until every worker of TF_CONFIG has started (forever if one never does).
            _MULTIWORKER_STRATEGIES[key] = tf.distribute.MultiWorkerMirroredStrategy()
        return _MULTIWORKER_STRATEGIES[key]
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


def initialize_devices(strategy_name: Strategy = "auto") -> None:
    """Brings TensorFlow's devices up for `train.strategy=strategy_name`.

    Under `multiworker` that is creating the strategy (`make_strategy`, which later calls
    return): its collectives must be configured before TensorFlow runs anything, and
    listing the logical devices first would raise "Collective ops must be configured at
    program startup". Any other strategy is created later, from the devices listed here.
    """
    if strategy_name == "multiworker":
        make_strategy("multiworker")
    else:
        tf.config.list_logical_devices()


def describe_strategy(strategy: tf.distribute.Strategy) -> str:
    """E.g. `MirroredStrategy x 2 replicas`, for logs and run.json."""
    # MultiWorkerMirroredStrategy is an alias of a class named CollectiveAllReduceStrategy.
    name = ("MultiWorkerMirroredStrategy" if is_multiworker(strategy)
            else type(strategy).__name__.lstrip("_"))
    return f"{name} x {strategy.num_replicas_in_sync} replicas"


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


def resolve_jit_compile(setting: JitCompile, backbone: str,
                        strategy: tf.distribute.Strategy | None = None) -> tuple[bool, str]:
    """Whether the training step compiles with XLA, and why, for `train.jit_compile`.

    `auto` uses XLA on TPUs (which run only compiled programs) and GPUs (where it fuses
    the step's many small ops), and on CPUs only for the backbones `XLA_CPU_SPEEDUP`
    measured faster with it: XLA's CPU convolutions are slower than oneDNN's. A backbone
    that was not measured trains without XLA on a CPU. Under MultiWorkerMirroredStrategy
    on CPUs there is no XLA at all: the step holds the workers' collectives, which XLA
    cannot compile for CPU devices.

    Args:
        setting: `True`, `False` or `"auto"`.
        backbone: the `model.backbone` name.
        strategy: the training strategy; None for the current one.

    Returns:
        `(use_xla, reason)`, the reason one line for `run.json`.

    Raises:
        ConfigError: `true` under MultiWorkerMirroredStrategy on CPUs.
    """
    require_choice(setting, JitCompile, "train.jit_compile")
    accelerated = bool(tf.config.list_logical_devices("TPU")
                       or tf.config.list_physical_devices("GPU"))
    if (setting is not False and not accelerated
            and is_multiworker(strategy or tf.distribute.get_strategy())):
        if setting is True:
            raise ConfigError(f"train.jit_compile=true cannot train under "
                              f"{XLA_MULTIWORKER_CPU_REASON}: use train.jit_compile=auto or "
                              "false.")
        return False, f"auto: {XLA_MULTIWORKER_CPU_REASON}"
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
    """A short description of the devices TensorFlow sees, for logs and run.json:
    `CPU (2 cores)`, `CPU (8 cores), 2 GPU`.

    TensorFlow shows all the cores of a machine as one logical CPU device; the cores
    this process may run on (`cpu_cores`) are what a reader wants to know.
    """
    devices = [d.device_type for d in tf.config.list_logical_devices()]
    counts = {kind: devices.count(kind) for kind in dict.fromkeys(devices)}
    cores = cpu_cores()
    return ", ".join(
        (f"CPU ({cores} core{'s' if cores != 1 else ''})" if kind == "CPU" and count == 1
         else f"{count} {kind}") for kind, count in counts.items())


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity: a container's or `taskset`'s
    share), else all the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _configured_tpu() -> str | None:
    """The TPU address to connect to, or None: `TPU_NAME`, or `local` on a TPU VM."""
    if os.environ.get("TPU_NAME"):
        return os.environ["TPU_NAME"]
    if Path("/dev/accel0").exists():
        return "local"
    return None
