"""Training images/second with and without XLA, in float32 and mixed bfloat16.

    python benchmarks/train_step.py [--backbone efficientnetv2_b0] [--image-size 64]
                                    [--batch-size 32] [--steps 20] [--train-batchnorm]
                                    [--precisions float32,mixed_bfloat16] [--xla off,on]

Builds the classifier (random init) for each of `--precisions` (float32 and
`mixed_bfloat16`), each with `jit_compile` off and on, and times the phase-2 training
step kcls runs (the whole backbone trained, BatchNorm frozen unless `--train-batchnorm`,
AdamW with decay, label smoothing) on synthetic
batches held in memory, so the input pipeline is not what is measured. The first
`--steps` steps warm up (tracing, XLA compilation) and are not timed; the next `--steps`
are. Prints images/second per configuration and the ratios to float32 without XLA.

XLA compilation of EfficientNetV2-B0 takes about 1.5 minutes per configuration on a
2-core CPU, so a full run takes several minutes.

Measured on this project's 2-core x86 CPU (AVX2, no AVX512-BF16/AMX, no GPU), defaults
(EfficientNetV2-B0, 64x64, batch 32): float32 without XLA 62.5 images/s; float32 with
XLA 0.41x that; mixed_bfloat16 0.30x without XLA and 0.25x with. On such a CPU neither
XLA nor bfloat16 pays off for this network (XLA's CPU convolutions are slower than
oneDNN's, and bfloat16 is emulated), which is why `train.precision=auto` stays float32
on CPUs without AVX512-BF16/AMX-BF16, and why `train.jit_compile=auto` trains without XLA.

On a 2-core Xeon with AVX512-BF16 and AMX-BF16 (the project's machine since 2026-12),
XLA off, idle machine, mixed_bfloat16 over float32: `compact_resnet` (32x32, batch 128,
`--train-batchnorm`) 1,001 vs 855 images/s, 1.17x; `compact_resnet_whitened` (same)
1,101 vs 753, 1.46x; `efficientnet_lite0` (160x160, batch 32, `--xla off`) 25.0 vs 61.8,
0.40x. `train.precision=auto` uses these ratios
(`kcls.train.compute.BF16_CPU_SPEEDUP`): bfloat16 on such CPUs for the compact ResNets
only. XLA on that machine: 0.44x (`compact_resnet`) and 0.50x (whitened), float32.

The small from-scratch backbones lose with XLA on this CPU too (float32, `--train-batchnorm`,
`--precisions float32`, two runs each beside other work): `resnet_v2_tiny` (32x32, batch
64) 0.54-0.77x, `compact_resnet` (32x32, batch 128) 0.56-0.72x; with BatchNorm frozen
0.50x and 0.32-0.50x. `train.jit_compile=auto` therefore trains without XLA on CPUs
(`kcls.train.compute.XLA_CPU_SPEEDUP` holds these ratios).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kcls.config import ModelConfig, TrainConfig  # noqa: E402
from kcls.models.classifier import build_classifier  # noqa: E402
from kcls.train.schedule import (  # noqa: E402
    WarmupCosine,
    make_optimizer,
    plan_phases,
    set_backbone_trainable,
)
from kcls.train.trainer import Trainer  # noqa: E402

NUM_CLASSES = 10


def images_per_second(backbone: str, image_size: int, batch_size: int, steps: int,
                      precision: str, jit_compile: bool, train_batchnorm: bool = False) -> float:
    """Timed training throughput of one configuration (after `steps` warm-up steps)."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    classifier = build_classifier(ModelConfig(backbone=backbone), NUM_CLASSES, image_size,
                                  precision)
    config = TrainConfig(frozen_epochs=0, unfrozen_epochs=1, jit_compile=jit_compile)
    (phase,) = plan_phases(config)
    set_backbone_trainable(classifier, True, train_batchnorm=train_batchnorm)
    trainer = Trainer(classifier)
    trainer.compile(optimizer=make_optimizer(
                        WarmupCosine(phase.learning_rate, steps, 0.1), config),
                    loss=keras.losses.CategoricalCrossentropy(from_logits=True,
                                                              label_smoothing=0.1),
                    jit_compile=jit_compile)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch_size, image_size, image_size, 3)).astype("float32")
    labels = keras.utils.to_categorical(rng.integers(0, NUM_CLASSES, batch_size), NUM_CLASSES)
    batches = tf.data.Dataset.from_tensors((images, labels)).repeat()
    # The first call traces (and with XLA compiles) the step: not timed.
    trainer.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
    started = time.perf_counter()
    trainer.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
    return steps * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnetv2_b0")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--train-batchnorm", action="store_true",
                        help="BatchNorm trains too (from-scratch training)")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16",
                        help="comma-separated dtype policies to time")
    parser.add_argument("--xla", default="off,on",
                        help="comma-separated: time without XLA (off), with it (on), or both")
    arguments = parser.parse_args()

    print(f"{arguments.backbone} at {arguments.image_size}x{arguments.image_size}, batch "
          f"{arguments.batch_size}, {arguments.steps} timed steps, BatchNorm "
          f"{'trained' if arguments.train_batchnorm else 'frozen'}, "
          f"{os.cpu_count()} CPU cores, TensorFlow {tf.__version__}")
    results = {}
    precisions = arguments.precisions.split(",")
    xla_settings = [setting == "on" for setting in arguments.xla.split(",")]
    for precision in precisions:
        for jit_compile in xla_settings:
            started = time.perf_counter()
            results[precision, jit_compile] = images_per_second(
                arguments.backbone, arguments.image_size, arguments.batch_size,
                arguments.steps, precision, jit_compile, arguments.train_batchnorm)
            print(f"  {precision:<15} XLA {'on ' if jit_compile else 'off'}  "
                  f"{results[precision, jit_compile]:8.1f} images/s   "
                  f"(configuration took {time.perf_counter() - started:.0f} s)", flush=True)

    first = precisions[0], xla_settings[0]
    baseline = results[first]
    print(f"ratios to {first[0]} {'with' if first[1] else 'without'} XLA:")
    for (precision, jit_compile), speed in results.items():
        print(f"  {precision:<15} XLA {'on ' if jit_compile else 'off'}  {speed / baseline:5.2f}x")
    if len(xla_settings) == 2:
        print("XLA speed-up: " + ", ".join(
            f"{precision} {results[precision, True] / results[precision, False]:.2f}x"
            for precision in precisions))


if __name__ == "__main__":
    main()
