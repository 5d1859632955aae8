"""Where and in which precision training runs: tf.distribute strategy and dtype policy.

Create the strategy first: connecting to a TPU and configuring multi-worker
collectives must happen before TensorFlow runs anything else (even listing the logical
devices: `initialize_devices` brings TensorFlow up in that order), and `auto` precision
looks at the devices the strategy brought up.

Example:

>>> strategy = make_strategy("auto")
>>> precision, reason = resolve_precision("auto", "compact_resnet")  # doctest: +SKIP
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
    "compact_resnet_whitened": 0.50,  # the same, BatchNorm trained
}
# Training images/s in mixed_bfloat16 over float32 (XLA off, the whole backbone trained),
# measured by benchmarks/train_step.py on this project's 2-core Xeon, which has AVX512-BF16
# and AMX-BF16: `train.precision=auto` trains in mixed_bfloat16 on such a CPU only where
# this is above 1.
BF16_CPU_SPEEDUP = {
    "compact_resnet": 1.17,  # 32x32, batch 128, BatchNorm trained
    "compact_resnet_whitened": 1.46,  # the same
    "efficientnet_lite0": 0.40,  # 160x160, batch 32, BatchNorm frozen (depthwise convolutions)
}
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
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


def resolve_precision(precision: Precision, backbone: str) -> tuple[str, str]:
    """The Keras dtype policy for `train.precision`, and why.

    `auto` picks `mixed_bfloat16` on TPUs and on GPUs with compute capability 8.0+
    (Ampere and newer), `mixed_float16` on older GPUs (7.0+; `fit_phases` adds loss
    scaling). On a CPU it picks `mixed_bfloat16` only where the CPU has bfloat16 matrix
    instructions (`BF16_CPU_FLAGS`: AVX512-BF16 or AMX-BF16; without them bfloat16 is
    emulated, 0.30x float32's speed) and `BF16_CPU_SPEEDUP` measured the backbone faster
    in it; else `float32`. Call it after `make_strategy`: TPUs are only listed once the
    strategy has initialised them.

    Args:
        precision: `auto` or a Keras dtype policy name.
        backbone: the `model.backbone` name.

    Returns:
        `(policy, reason)`, the reason one line for `run.json`.
    """
    require_choice(precision, Precision, "train.precision")
    if precision != "auto":
        return precision, f"train.precision={precision}"
    if tf.config.list_logical_devices("TPU"):
        return "mixed_bfloat16", "auto: TPU"
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        major, minor = tf.config.experimental.get_device_details(gpus[0]).get(
            "compute_capability", (0, 0))
        if major >= 8:
            return "mixed_bfloat16", f"auto: GPU with compute capability {major}.{minor}"
        if major >= 7:
            return "mixed_float16", f"auto: GPU with compute capability {major}.{minor}"
        return "float32", f"auto: GPU with compute capability {major}.{minor} (below 7.0)"
    return cpu_precision(cpu_flags(), backbone)


def cpu_precision(flags: set[str], backbone: str) -> tuple[str, str]:
    """`train.precision=auto` on a CPU with instruction-set `flags` (`cpu_flags()`):
    `(policy, reason)`, `mixed_bfloat16` only with a `BF16_CPU_FLAGS` flag and a
    `BF16_CPU_SPEEDUP` above 1 for `backbone`."""
    bfloat16_flags = sorted(BF16_CPU_FLAGS & flags)
    if not bfloat16_flags:
        return "float32", "auto: CPU without AVX512-BF16 or AMX-BF16 (bfloat16 is emulated)"
    cpu = f"auto: CPU ({', '.join(bfloat16_flags)})"
    speedup = BF16_CPU_SPEEDUP.get(backbone)
    if speedup is None:
        return "float32", f"{cpu}, {backbone} not measured in bfloat16"
    return ("mixed_bfloat16" if speedup > 1.0 else "float32",
            f"{cpu}, {backbone} trained at {speedup:.2f}x the speed in mixed_bfloat16 "
            "(benchmarks/train_step.py)")


def cpu_flags() -> set[str]:
    """The instruction-set flags of this machine's CPU (`/proc/cpuinfo`), empty where
    that file does not exist (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


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
