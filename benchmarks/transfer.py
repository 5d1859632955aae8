"""Fine-tuning real ImageNet weights: does kcls's frozen -> unfrozen schedule beat the alternatives?

    python benchmarks/transfer.py                          # both datasets, all rows
    python benchmarks/transfer.py --datasets hymenoptera   # ~15 minutes
    python benchmarks/transfer.py --rows d --set train.unfrozen_lr_factor=0.1
    python benchmarks/transfer.py --rows d --same-budget \
        --backbones efficientnet_lite0,efficientnet_lite1,efficientnet_lite2
    python benchmarks/transfer.py --rows d --set train.time_budget=150 \
        --backbones efficientnet_lite0,efficientnet_lite1,efficientnet_lite2
    python benchmarks/transfer.py --inference-only \
        --backbones efficientnet_lite0,efficientnet_lite1,efficientnet_lite2

Every row starts from the same backbone (EfficientNet-Lite0 unless `--backbones` lists
others; ImageNet weights converted from the pip-shipped checkpoints, or random for row
a), trains on the same images for the same total number of epochs and is scored on the
same held-out images:

- a: from scratch: random init, the whole network (BatchNorm training) every epoch.
- b: frozen backbone, the head only, every epoch.
- c: the whole network from the first step (at the unfrozen phase's learning rate and
     BatchNorm policy).
- d: kcls's `finetune` recipe as it ships: frozen, then unfrozen.
- e: a hand-written keras.io-style script (the "fine-tuning with EfficientNet" example):
     plain Keras and `Model.fit`, in-model augmentation (rotation, translation, flip,
     contrast), a head of BatchNorm + dropout + softmax trained at Adam 1e-2 on the frozen
     backbone, then the top 20 layers unfrozen (BatchNorm kept frozen) at Adam 1e-5.

- f-l: the learning-rate tools (docs/transfer.md, "Learning rates"): the whole network
     from the first step at Keras's default 1e-3 (f), at the range test's rate (g), with
     layer decay 0.65/0.75/0.85 and the head at the recipe's head rate (h/i/j); the
     recipe with layer decay 0.75 in phase 2 (k) and with `train.learning_rate=auto` (l).

Rows a-d and f-l run through `kcls.workflows.run.run_recipe` with the recipe's data pipeline and
augmentation, differing only in the settings named above; `--set` changes the recipe
for all of them. Datasets:

- hymenoptera: ../shared/data/hymenoptera, its own split: 245 train, 153 val photos of
  ants and bees; the recipe's image size (224).
- cifar10: ../shared/data/cifar10_train_10k, stratified 80/20 split with seed 0 (8,000
  train, 2,000 test: the split kcls makes with data.test_fraction=0.2), at 128 px and
  1 + 5 epochs.

The backbone axis (`--backbones A,B,...`) repeats every row with each backbone (the
recipe's image size and schedule unchanged). `--same-budget` adds, for every backbone
after the first, a run with `train.time_budget` set to the seconds the first backbone's
run took: the accuracy a larger network reaches in the smaller one's time.
`--set train.time_budget=600` gives every backbone (and row) the same budget instead:
accuracy at equal wall-clock time, each run planning its own epochs.
`--inference-only` trains nothing: it times every backbone's classifier at each dataset's
image size in interleaved rounds in one process (ratios to the first backbone).

Prints one row per (dataset, backbone, row): test accuracy, wall-clock seconds (training
and the final evaluation) and CPU seconds of the process (user + system, all
threads), epochs trained, inference milliseconds per image (the Keras
classifier on random images at the recipe's size, warm, median of repeated calls, at
batch 1 and per image of a batch of 32), backbone parameters and the 1-minute load
average at the run's start and end, then the table in Markdown. The first line names
the CPU, its core count and flags. Measured results are in docs/transfer.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kcls.config import DataConfig, Recipe, apply_overrides, parse_duration  # noqa: E402
from kcls.data.folder import decode_image_file, scan_folder  # noqa: E402
from kcls.data.pipeline import prepare_image  # noqa: E402
from kcls.data.sources import Splits, split_indices  # noqa: E402
from kcls.layout import RUN_INFO_FILE  # noqa: E402
from kcls.models.backbones import build_backbone  # noqa: E402
from kcls.models.classifier import build_classifier  # noqa: E402
from kcls.recipes import load_recipe  # noqa: E402
from kcls.train.compute import cpu_flags  # noqa: E402
from kcls.workflows.run import run_recipe  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
ROWS = {
    "a": "from scratch",
    "b": "frozen backbone, head only",
    "c": "whole network from the first step",
    "d": "kcls finetune: frozen -> unfrozen",
    "e": "keras.io-style hand-written",
    "f": "whole network, Keras's default rate 1e-3",
    "g": "whole network, rate from the LR finder",
    "h": "whole network, layer decay 0.65",
    "i": "whole network, layer decay 0.75",
    "j": "whole network, layer decay 0.85",
    "k": "frozen -> unfrozen, layer decay 0.75 in phase 2",
    "l": "frozen -> unfrozen, rates from the LR finder",
}
# Rows h-j: one phase, the head at the recipe's head rate, backbone block k from the top
# at that rate times decay**k (BEiT/timm-style fine-tuning).
LAYER_DECAY = {"h": 0.65, "i": 0.75, "j": 0.85}
# Per dataset: recipe overrides applied before the command line's --set.
# CIFAR-10 is 33x larger than hymenoptera: 128 px and 1 + 5 epochs keep a row near 12
# minutes on 2 CPU cores (measured as good as 2 + 8 epochs: 0.8845 vs 0.8850).
DATASET_OVERRIDES = {
    "hymenoptera": [],
    "cifar10": ["data.image_size=128", "train.frozen_epochs=1", "train.unfrozen_epochs=5"],
}
KERAS_IO_TOP_LAYERS = 20
INFERENCE_REPEATS = 20  # timed calls per batch size, after one warm-up call
INFERENCE_ROUNDS = 5  # `--inference-only`: interleaved rounds over the backbones


@dataclass
class Measured:
    """One table row: a (dataset, backbone, row, budget) over its seeds."""

    dataset: str
    backbone: str
    row: str
    budget: float | None = None
    accuracies: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    milliseconds: tuple[float, float] = (float("nan"), float("nan"))
    parameters: int = 0
    loads: list[tuple[float, float]] = field(default_factory=list)


def folder_examples(paths: list[str], labels: np.ndarray) -> tf.data.Dataset:
    """Decoded `(uint8 [H, W, 3], int64)` examples of image files, in the given order."""
    return tf.data.Dataset.from_tensor_slices((paths, labels)).map(
        decode_image_file, num_parallel_calls=tf.data.AUTOTUNE)


def load_dataset(name: str) -> Splits:
    """The benchmark's train and test examples of dataset `name` (no validation split)."""
    if name == "hymenoptera":
        train, test = (scan_folder(DATA / "hymenoptera" / split) for split in ("train", "val"))
        assert train.class_names == test.class_names
        return Splits(folder_examples(train.paths, train.labels), None,
                      folder_examples(test.paths, test.labels), train.class_names,
                      {"train": len(train.paths), "validation": 0, "test": len(test.paths)},
                      train_labels=train.labels)
    files = scan_folder(DATA / "cifar10_train_10k")
    train, _, test = split_indices(files.labels, DataConfig(
        test_fraction=0.2, validation_fraction=0.0, seed=0))
    paths = np.asarray(files.paths)
    # Shuffled once, seeded: the folder lists files class by class, and 8,000 examples
    # fit the recipe's shuffle buffer, but not every buffer a user might set.
    train = np.random.default_rng(0).permutation(train)
    return Splits(folder_examples(list(paths[train]), files.labels[train]), None,
                  folder_examples(list(paths[test]), files.labels[test]), files.class_names,
                  {"train": len(train), "validation": 0, "test": len(test)},
                  train_labels=files.labels[train])


def row_recipe(recipe: Recipe, row: str) -> Recipe:
    """The recipe of kcls row `row` (a-d, f-l): the finetune recipe with that row's changes."""
    train = recipe.train
    epochs = train.frozen_epochs + train.unfrozen_epochs
    unfrozen_rate = train.learning_rate * train.unfrozen_lr_factor
    if row == "a":
        return apply_overrides(recipe, [
            "model.weights=none", "train.frozen_epochs=0", f"train.unfrozen_epochs={epochs}",
            "train.unfrozen_lr_factor=1.0", "train.train_batchnorm=true"])
    if row == "b":
        return apply_overrides(recipe, [f"train.frozen_epochs={epochs}",
                                        "train.unfrozen_epochs=0"])
    if row == "c":
        return apply_overrides(recipe, [
            "train.frozen_epochs=0", f"train.unfrozen_epochs={epochs}",
            f"train.learning_rate={unfrozen_rate}", "train.unfrozen_lr_factor=1.0"])
    whole_network = ["train.frozen_epochs=0", f"train.unfrozen_epochs={epochs}",
                     "train.unfrozen_lr_factor=1.0"]
    if row == "f":
        return apply_overrides(recipe, whole_network + ["train.learning_rate=1e-3"])
    if row == "g":
        return apply_overrides(recipe, whole_network + ["train.learning_rate=auto"])
    if row in LAYER_DECAY:
        return apply_overrides(recipe, whole_network + [f"train.layer_decay={LAYER_DECAY[row]}"])
    if row == "k":
        return apply_overrides(recipe, ["train.layer_decay=0.75"])
    if row == "l":
        return apply_overrides(recipe, ["train.learning_rate=auto"])
    return recipe


def run_kcls_row(recipe: Recipe, splits: Splits, work_dir: Path
                 ) -> tuple[float, float, int, keras.Model]:
    """Test accuracy, seconds, epochs trained and the classifier of one kcls run, no export."""
    recipe = dataclasses.replace(
        recipe, export=dataclasses.replace(recipe.export, enabled=False))
    started = time.time()
    result = run_recipe(recipe, run_dir=work_dir, splits=splits, verbose=2,
                        log=lambda line: print("   ", line, flush=True))
    seconds = time.time() - started
    phases = json.loads((result.run_dir / RUN_INFO_FILE).read_text())["phases"]
    print("    peak learning rates: " + ", ".join(
        f"{phase['name']} {phase['learning_rate']:.2e}" for phase in phases), flush=True)
    return (float(result.metrics["accuracy"]), seconds,
            sum(phase["epochs"] for phase in phases), result.classifier)


def inference_milliseconds(classifier: keras.Model, image_size: int) -> tuple[float, float]:
    """Milliseconds per image of `classifier` at batch 1 and at batch 32 (per image).

    Random float32 images `[B, S, S, 3]` in [0, 255], one compiled forward pass
    (`training=False`), warmed up once, the median of `INFERENCE_REPEATS` calls.
    """
    forward = tf.function(lambda images: classifier(images, training=False))
    milliseconds = []
    for batch_size in (1, 32):
        images = tf.random.uniform((batch_size, image_size, image_size, 3), 0.0, 255.0)
        forward(images).numpy()
        times = []
        for _ in range(INFERENCE_REPEATS):
            started = time.perf_counter()
            forward(images).numpy()
            times.append(time.perf_counter() - started)
        milliseconds.append(1000.0 * float(np.median(times)) / batch_size)
    return milliseconds[0], milliseconds[1]


def compare_inference(backbones: list[str], recipe: Recipe, dataset: str,
                      rounds: int = INFERENCE_ROUNDS) -> None:
    """Prints each backbone's inference milliseconds per image at batch 1 and 32 and its
    ratio to the first backbone's: the classifiers (ImageNet backbone, new head) timed in
    `rounds` interleaved rounds in this process, so that load from other jobs falls on
    every backbone alike; the median of the rounds."""
    size = recipe.data.image_size
    classes = 10 if dataset == "cifar10" else 2
    classifiers = {backbone: build_classifier(dataclasses.replace(
        recipe.model, backbone=backbone), classes, size) for backbone in backbones}
    times: dict[str, list[tuple[float, float]]] = {backbone: [] for backbone in backbones}
    for _ in range(rounds):
        for backbone, classifier in classifiers.items():
            times[backbone].append(inference_milliseconds(classifier, size))
    print(f"\n{dataset} at {size} px, median of {rounds} interleaved rounds, load average "
          f"{_load_averages()}\n\n| backbone | ms/image, batch 1 | ms/image, batch 32 | "
          f"batch 1 vs {backbones[0]} | batch 32 vs {backbones[0]} |\n"
          "| --- | ---: | ---: | ---: | ---: |")
    first = np.median(times[backbones[0]], axis=0)
    for backbone in backbones:
        batch_1, batch_32 = np.median(times[backbone], axis=0)
        print(f"| {backbone} | {batch_1:.1f} | {batch_32:.1f} | {batch_1 / first[0]:.2f}x | "
              f"{batch_32 / first[1]:.2f}x |", flush=True)


def run_keras_io_row(recipe: Recipe, splits: Splits) -> tuple[float, float, int, keras.Model]:
    """The keras.io "fine-tuning with EfficientNet" recipe, written plainly, same weights:
    test accuracy, seconds, epochs and the model."""
    size, classes = recipe.data.image_size, len(splits.class_names)
    batch_size = recipe.data.batch_size
    keras.utils.set_random_seed(recipe.train.seed)
    started = time.time()

    def resized(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return prepare_image(image, size, recipe.data.resize), tf.one_hot(label, classes)

    train = (splits.train.map(resized, num_parallel_calls=tf.data.AUTOTUNE).cache()
             .shuffle(10_000, seed=0).batch(batch_size).prefetch(tf.data.AUTOTUNE))
    test = (splits.test.map(resized, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))

    augmentation = keras.Sequential([
        keras.layers.RandomRotation(factor=0.15),
        keras.layers.RandomTranslation(height_factor=0.1, width_factor=0.1),
        keras.layers.RandomFlip(),
        keras.layers.RandomContrast(factor=0.1, value_range=(0, 255)),
    ], name="img_augmentation")
    inputs = keras.Input((size, size, 3))
    backbone = build_backbone(recipe.model.backbone, size, "imagenet")
    backbone.trainable = False
    x = backbone(augmentation(inputs))
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(0.2, name="top_dropout")(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="pred")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-2),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    model.fit(train, epochs=recipe.train.frozen_epochs, verbose=2)

    backbone.trainable = True
    for layer in backbone.layers[:-KERAS_IO_TOP_LAYERS]:
        layer.trainable = False
    for layer in backbone.layers[-KERAS_IO_TOP_LAYERS:]:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-5),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    model.fit(train, epochs=recipe.train.unfrozen_epochs, verbose=2)
    _, accuracy = model.evaluate(test, verbose=0)
    return (float(accuracy), time.time() - started,
            recipe.train.frozen_epochs + recipe.train.unfrozen_epochs, model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="hymenoptera,cifar10")
    parser.add_argument("--rows", default="".join(ROWS))
    parser.add_argument("--backbones", default="efficientnet_lite0",
                        help="comma-separated model.backbone values, each run for every row")
    parser.add_argument("--same-budget", action="store_true",
                        help="also run the later backbones in the first one's measured time")
    parser.add_argument("--inference-only", action="store_true",
                        help="no training: each backbone's inference time at each dataset's "
                             "image size, the backbones interleaved in one process")
    parser.add_argument("--seeds", type=int, default=1,
                        help="runs per row with train.seed 0, 1, ...; the table shows the mean")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="the first train.seed (add seeds to rows measured before)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="override for the finetune recipe (all rows), e.g. data.batch_size=64")
    arguments = parser.parse_args()
    print(f"{_cpu_model()}, {os.cpu_count()} cores, flags: {_cpu_flags()}; "
          f"TensorFlow {tf.__version__}, Keras {keras.__version__}", flush=True)
    if arguments.inference_only:
        for dataset in arguments.datasets.split(","):
            recipe = apply_overrides(load_recipe("finetune"),
                                     DATASET_OVERRIDES[dataset] + arguments.overrides)
            compare_inference(arguments.backbones.split(","), recipe, dataset)
        return
    results: list[Measured] = []
    with tempfile.TemporaryDirectory() as work:
        for dataset in arguments.datasets.split(","):
            splits = load_dataset(dataset)
            recipe = apply_overrides(load_recipe("finetune"),
                                     DATASET_OVERRIDES[dataset] + arguments.overrides)
            epochs = recipe.train.frozen_epochs + recipe.train.unfrozen_epochs
            print(f"== {dataset}: train {splits.sizes['train']}, test {splits.sizes['test']}, "
                  f"{recipe.data.image_size} px, {epochs} epochs", flush=True)
            for row in arguments.rows:
                results += measure_backbones(dataset, row, recipe, splits, arguments,
                                             Path(work))
    print_table(results)


def measure_backbones(dataset: str, row: str, recipe: Recipe, splits: Splits,
                      arguments: argparse.Namespace, work: Path) -> list[Measured]:
    """Every backbone of `--backbones` on one (dataset, row), plus the same-budget runs."""
    backbones = arguments.backbones.split(",")
    plain = [Measured(dataset, backbone, row) for backbone in backbones]
    budgeted = [Measured(dataset, backbone, row) for backbone in backbones[1:]
                if arguments.same_budget and row != "e"]
    for seed in range(arguments.first_seed, arguments.first_seed + arguments.seeds):
        for measured in plain:
            measure(measured, apply_overrides(recipe, [
                f"model.backbone={measured.backbone}", f"train.seed={seed}"]), splits, work)
        for measured in budgeted:
            measured.budget = plain[0].seconds[-1]
            measure(measured, apply_overrides(recipe, [
                f"model.backbone={measured.backbone}", f"train.seed={seed}",
                f"train.time_budget={measured.budget:.0f}"]), splits, work)
    return plain + budgeted


def measure(measured: Measured, recipe: Recipe, splits: Splits, work: Path) -> None:
    """Runs `recipe` as row `measured.row` and appends its accuracy, time and epochs."""
    seed = recipe.train.seed
    if measured.budget is None and recipe.train.time_budget:
        # `--set train.time_budget=...`: every backbone gets the same budget.
        measured.budget = parse_duration(recipe.train.time_budget)
    label = (f"{measured.dataset} {measured.backbone} {measured.row} ({ROWS[measured.row]})"
             + (f", budget {measured.budget:.0f} s" if measured.budget else ""))
    load_before, cpu_before = os.getloadavg()[0], _cpu_seconds()
    print(f"-- {label}, seed {seed}, load average {_load_averages()}", flush=True)
    if measured.row == "e":
        accuracy, seconds, epochs, classifier = run_keras_io_row(recipe, splits)
    else:
        accuracy, seconds, epochs, classifier = run_kcls_row(
            row_recipe(recipe, measured.row), splits,
            work / f"{measured.dataset}_{measured.backbone}_{measured.row}_{seed}"
            f"_{measured.budget or 0:.0f}")
    measured.cpu_seconds.append(_cpu_seconds() - cpu_before)
    measured.milliseconds = inference_milliseconds(classifier, recipe.data.image_size)
    measured.parameters = _backbone_parameters(classifier)
    keras.backend.clear_session()
    measured.accuracies.append(accuracy)
    measured.seconds.append(seconds)
    measured.epochs.append(epochs)
    measured.loads.append((load_before, os.getloadavg()[0]))
    print(f"{label} seed {seed}: accuracy {accuracy:.4f}, {seconds:.0f} s "
          f"({measured.cpu_seconds[-1]:.0f} CPU s), {epochs} epochs, "
          f"{measured.milliseconds[0]:.1f} ms/image at batch 1, "
          f"{measured.milliseconds[1]:.1f} at batch 32, "
          f"load average {_load_averages()}", flush=True)


def print_table(results: list[Measured]) -> None:
    """The Markdown table of every measured row."""
    print("\n| dataset | backbone | row | time budget | test top-1 (mean) | runs | seconds "
          "per run | CPU seconds per run | epochs | ms/image, batch 1 | ms/image, batch 32 "
          "| backbone parameters | 1-min load, start-end |\n"
          "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: "
          "| --- |")
    for measured in results:
        runs = ", ".join(f"{accuracy:.4f}" for accuracy in measured.accuracies)
        budget = f"{measured.budget:.0f} s" if measured.budget else "none"
        epochs = "-".join(sorted({str(epochs) for epochs in measured.epochs}))
        print(f"| {measured.dataset} | {measured.backbone} | {measured.row}: "
              f"{ROWS[measured.row]} | {budget} | {np.mean(measured.accuracies):.4f} | "
              f"{runs} | {np.mean(measured.seconds):.0f} | {np.mean(measured.cpu_seconds):.0f} | "
              f"{epochs} | "
              f"{measured.milliseconds[0]:.1f} | {measured.milliseconds[1]:.1f} | "
              f"{measured.parameters:,} | "
              + ", ".join(f"{start:.1f}-{end:.1f}" for start, end in measured.loads) + " |")


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads): what a run
    cost when other jobs share the CPU and its wall-clock seconds stretch."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load_averages() -> str:
    """The 1, 5 and 15-minute load averages: other jobs on the CPU slow every timing."""
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


def _backbone_parameters(classifier: keras.Model) -> int:
    """Parameters of the classifier's backbone: its largest nested model (the kcls layer
    `backbone`, or the keras.io row's backbone beside its augmentation)."""
    nested = [layer.count_params() for layer in classifier.layers
              if isinstance(layer, keras.Model)]
    return max(nested, default=classifier.count_params())


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> str:
    """The CPU features that decide TensorFlow's speed here (AVX512, VNNI, BF16, AMX)."""
    flags = cpu_flags()
    if not flags:
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return " ".join(flag for flag in wanted if flag in flags) or "none of avx2/avx512/amx"


if __name__ == "__main__":
    main()
