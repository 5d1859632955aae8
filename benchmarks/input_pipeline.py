"""Host-side cost of kcls's tf.data pipeline: per augmentation policy, and vs a naive loader.

    python benchmarks/input_pipeline.py policies [--images 1000] [--epochs 3]
    python benchmarks/input_pipeline.py loader [--images 2000] [--epochs 5]

Both generate a folder of photo-like JPEGs (smooth colour fields with texture, 320x240,
2 classes) in a temporary directory and read it at 128x128 in batches of 64.

`policies`: for each augmentation policy, what the tf.data pipeline alone delivers on
this CPU (images/second, and host CPU seconds per 1,000 images, all threads of the
process), before and after issue 16, over the epochs after the first (decoded images
come from the in-memory cache, as in any multi-epoch run):

- before: the host stack kcls ran in the tf.data pipeline until then, because XLA cannot
  compile it: `keras.layers.RandAugment(num_ops=2, factor=0.3)` for `randaugment`, plus
  Keras MixUp or CutMix per batch for `strong` (flips and shifts ran in the compiled
  step, so `light` put nothing on the host);
- after: `kcls.data.pipeline.train_pipeline` as it is (decode, resize, cache, batch,
  prefetch; no augmentation).

It also times the policy on the device side, `kcls.data.augment.build_augmentation` run
as the training function runs it (a `tf.function`, one seed per batch), here on the CPU
as the device: the work a GPU takes over. Target: after >= 3x before for `randaugment`.

Generates a folder of JPEG photos-like images (smooth colour fields with texture, 320x240,
2 classes) in a temporary directory, then reads it for `--epochs` epochs at 128x128 in
batches of 64 with the same augmentation (random flip + translation), two ways, in the
same run:

- baseline: what a hand-written loader does — a Python generator that opens, decodes
  and resizes each file with Pillow, one at a time, augments each image, no parallelism,
  no cache, no prefetch;
- kcls: `kcls.data.sources.load_splits` + `kcls.data.pipeline.train_pipeline` (parallel
  decode and resize, in-memory cache of decoded images, batched augmentation, prefetch).

`loader` prints images/second for both, for the first (cold) epoch and over all epochs,
and their ratios. Target: kcls at least 3x the baseline over a multi-epoch run on 2 CPU
cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from kcls.config import DataConfig  # noqa: E402
from kcls.data.augment import build_augmentation  # noqa: E402
from kcls.data.pipeline import train_pipeline  # noqa: E402
from kcls.data.sources import load_splits  # noqa: E402

IMAGE_SIZE, BATCH_SIZE = 128, 64


def make_folder(root: Path, count: int) -> None:
    """Writes `count` 320x240 JPEGs split over two class folders."""
    rng = np.random.default_rng(0)
    for index in range(count):
        coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((320, 240), Image.BICUBIC), np.float32)
        texture = rng.normal(0, 12, field.shape)
        pixels = np.clip(field + texture, 0, 255).astype(np.uint8)
        folder = root / ("a" if index % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index:05d}.jpg", quality=90)


def baseline_batches(root: Path) -> tf.data.Dataset:
    """The naive loader: Pillow in a Python generator, sequential, unbatched work per image."""
    paths = sorted(root.rglob("*.jpg"))
    class_names = sorted(p.name for p in root.iterdir())
    # The same augmentation as kcls's `light` policy, the way hand-written code does it.
    augment = tf.keras.Sequential([tf.keras.layers.RandomFlip("horizontal", seed=0),
                                   tf.keras.layers.RandomTranslation(0.125, 0.125, "reflect",
                                                                     seed=1)])

    def generate():
        order = np.random.default_rng(0).permutation(len(paths))
        for index in order:
            path = paths[index]
            with Image.open(path) as image:
                resized = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            yield np.asarray(resized, np.float32), class_names.index(path.parent.name)

    dataset = tf.data.Dataset.from_generator(
        generate, output_signature=(tf.TensorSpec([IMAGE_SIZE, IMAGE_SIZE, 3], tf.float32),
                                    tf.TensorSpec([], tf.int64)))

    return dataset.map(lambda image, label: (augment(image, training=True), label)).batch(
        BATCH_SIZE)


def kcls_batches(root: Path, policy: str = "light"
                 ) -> tuple[tf.data.Dataset, int, tf.keras.layers.Layer | None]:
    """kcls's pipeline, its steps per epoch, and the augmentation the training step runs."""
    config = DataConfig(source=f"folder:{root}", image_size=IMAGE_SIZE, batch_size=BATCH_SIZE,
                        validation_fraction=0.0, test_fraction=0.01, augment=policy)
    splits = load_splits(config)
    batches = train_pipeline(splits.train, len(splits.class_names), config)
    return batches, splits.sizes["train"] // BATCH_SIZE, build_augmentation(policy, seed=0)


def host_stack_before(policy: str) -> keras.Sequential | None:
    """The layers kcls ran in the tf.data pipeline for `policy` before issue 16."""
    layers: list[keras.Layer] = []
    if policy in ("randaugment", "strong"):
        layers.append(keras.layers.RandAugment(value_range=(0, 255), num_ops=2, factor=0.3,
                                               seed=2))
    if policy == "strong":
        layers.append(MixUpOrCutMixBefore(0.5, 0.5, seed=3))
    return keras.Sequential(layers) if layers else None


class MixUpOrCutMixBefore(keras.layers.Layer):
    """The per-batch MixUp-or-CutMix choice kcls ran in tf.data before issue 16."""

    def __init__(self, mixup: float, cutmix: float, seed: int) -> None:
        super().__init__()
        self.mixup_probability, self.cutmix_probability = mixup, cutmix
        self.mixup = keras.layers.MixUp(alpha=0.2, seed=seed)
        self.cutmix = keras.layers.CutMix(factor=1.0, seed=seed + 1)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, data, training=True):
        draw = keras.random.uniform((), seed=self.seed_generator)
        return tf.cond(
            draw < self.mixup_probability, lambda: self.mixup(data, training=True),
            lambda: tf.cond(draw < self.mixup_probability + self.cutmix_probability,
                            lambda: self.cutmix(data, training=True), lambda: data))


def host_cost(batches: tf.data.Dataset, steps: int, epochs: int) -> tuple[float, float]:
    """(images/s, host CPU s per 1,000 images) over epochs 2..`epochs` of `batches`."""
    iterator = iter(batches)
    for _ in range(steps):  # the first epoch decodes and fills the cache
        next(iterator)
    images = steps * (epochs - 1) * BATCH_SIZE
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps * (epochs - 1)):
        next(iterator)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return images / wall, cpu / images * 1000


def device_cost(augmentation: keras.Layer, batches: tf.data.Dataset, repeats: int = 10
                ) -> tuple[float, float]:
    """(ms per batch, CPU s per 1,000 images) of `augmentation` run as the training
    function runs it, on the default device."""
    @tf.function
    def augment(images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        seed = augmentation.seed_generator.next()
        return augmentation({"images": images, "labels": labels}, seed=seed)["images"]

    images, labels = next(iter(batches))
    augment(images, labels)  # trace
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        augment(images, labels).numpy()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return wall / repeats * 1000, cpu / (repeats * BATCH_SIZE) * 1000


def compare_policies(root: Path, epochs: int) -> None:
    print(f"{'policy':12}{'before img/s':>14}{'after img/s':>13}{'ratio':>8}"
          f"{'before CPU s/1k':>17}{'after CPU s/1k':>16}{'device ms/batch':>17}"
          f"{'device CPU s/1k':>17}")
    for policy in ("light", "randaugment", "strong"):
        batches, steps, augmentation = kcls_batches(root, policy)
        host_layers = host_stack_before(policy)
        before_batches = batches
        if host_layers is not None:
            def augment(images, labels, layers=host_layers):
                augmented = layers({"images": images, "labels": labels}, training=True)
                return augmented["images"], augmented["labels"]

            before_batches = batches.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
        before_rate, before_cpu = host_cost(before_batches, steps, epochs)
        after_rate, after_cpu = host_cost(batches, steps, epochs)
        device_ms, device_cpu = device_cost(augmentation, batches)
        print(f"{policy:12}{before_rate:14.0f}{after_rate:13.0f}{after_rate / before_rate:7.1f}x"
              f"{before_cpu:17.3f}{after_cpu:16.3f}{device_ms:17.1f}{device_cpu:17.3f}")


def throughput(batches_per_epoch: tf.data.Dataset, epochs: int, steps: int | None = None,
               consume=None) -> tuple[float, float]:
    """(images/s in epoch 1, images/s over all epochs), passing each batch to `consume`."""
    images, first_epoch_rate, started = 0, 0.0, time.perf_counter()
    iterator = iter(batches_per_epoch) if steps else None
    for epoch in range(epochs):
        epoch_images, epoch_start = 0, time.perf_counter()
        batches = (next(iterator) for _ in range(steps)) if steps else iter(batches_per_epoch)
        for images_batch, labels_batch in batches:
            if consume is not None:
                images_batch = consume(images_batch, labels_batch)
            epoch_images += int(images_batch.shape[0])
        images += epoch_images
        if epoch == 0:
            first_epoch_rate = epoch_images / (time.perf_counter() - epoch_start)
    return first_epoch_rate, images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("comparison", choices=["policies", "loader"])
    parser.add_argument("--images", type=int, default=None,
                        help="JPEGs to generate (default: 1000 for policies, 2000 for loader)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs to read (default: 3 for policies, 5 for loader)")
    args = parser.parse_args()
    policies = args.comparison == "policies"
    args.images = args.images or (1000 if policies else 2000)
    args.epochs = args.epochs or (3 if policies else 5)
    if policies and args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch only fills the cache.")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "images"
        make_folder(root, args.images)
        if policies:
            print(f"{args.images} JPEGs 320x240 -> {IMAGE_SIZE}x{IMAGE_SIZE}, batch {BATCH_SIZE}, "
                  f"epochs 2-{args.epochs} (cached), {os.cpu_count()} CPUs")
            compare_policies(root, args.epochs)
            return
        base_first, base_all = throughput(baseline_batches(root), args.epochs)
        setup_start = time.perf_counter()
        batches, steps, device_augment = kcls_batches(root)
        setup = time.perf_counter() - setup_start

        # kcls runs these layers in the training function, before the model step.
        @tf.function(jit_compile=True)
        def augment_in_step(images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
            return device_augment({"images": images, "labels": labels}, training=True)["images"]

        # Compile once on a dummy batch (not from `batches`: that would decode untimed).
        augment_in_step(tf.zeros([BATCH_SIZE, IMAGE_SIZE, IMAGE_SIZE, 3]),
                        tf.zeros([BATCH_SIZE, 2]))
        kcls_first, kcls_all = throughput(batches, args.epochs, steps, augment_in_step)
        # Charge the folder scan (one-off Pillow structure check) to kcls's first epoch.
        images_per_epoch = steps * BATCH_SIZE
        kcls_first = images_per_epoch / (images_per_epoch / kcls_first + setup)
        kcls_all = images_per_epoch * args.epochs / (
            images_per_epoch * args.epochs / kcls_all + setup)
    print(f"{args.images} JPEGs 320x240 -> {IMAGE_SIZE}x{IMAGE_SIZE}, batch {BATCH_SIZE}, "
          f"{args.epochs} epochs, {os.cpu_count()} CPUs (kcls scan {setup:.1f} s included)")
    print(f"{'':10}{'epoch 1 img/s':>16}{'all epochs img/s':>20}")
    print(f"{'baseline':10}{base_first:16.0f}{base_all:20.0f}")
    print(f"{'kcls':10}{kcls_first:16.0f}{kcls_all:20.0f}")
    print(f"ratio kcls/baseline: epoch 1 {kcls_first / base_first:.2f}x, "
          f"all epochs {kcls_all / base_all:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
