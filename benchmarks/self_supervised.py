"""Self-supervised pretraining on unlabelled images, then the two-phase fine-tune on 1,000 labels.

(Not `ssl.py`: run as a script, its folder comes first on `sys.path` and a file of that
name would shadow the standard library module `ssl`, which TensorFlow imports.)

    python benchmarks/self_supervised.py                 # 30 minutes of pretraining, ~45 in all
    python benchmarks/self_supervised.py --budget 3m --epochs 10   # a quick look
    python benchmarks/self_supervised.py --weights PATH  # reuse pretrained weights

Data: ../shared/data/cifar10_train_10k (10,000 real CIFAR-10 training images),
split 80/20 stratified with seed 0 (the split kcls makes with `data.test_fraction=0.2`).
The 8,000 training images are pretrained on without their labels; 100 of them per class
(seeded) are the labelled set; every leg is scored on the 2,000 held-out images.

Legs (same 1,000 labels, same fine-tune epochs, augmentation, optimizer and batch):
- pretrained, fine-tuned: `kcls pretrain` (SimCLR) for `--budget`, then kcls's
  two-phase fine-tune from the pretrained backbone (`model.weights=PATH`);
- pretrained, linear probe: the same epochs with the backbone frozen throughout;
- from scratch: the same epochs from random initialisation, in one phase at the
  full learning rate (freezing a random backbone would only waste epochs).

The kNN accuracy printed per pretraining epoch classifies the 2,000 held-out images by
the votes of the 1,000 labelled ones: a progress signal only, nothing is selected on it.
Figures measured on a shared 2-core CPU: docs/pretraining.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kcls.config import (  # noqa: E402
    DataConfig,
    EvaluateConfig,
    ExportConfig,
    ModelConfig,
    PretrainConfig,
    Recipe,
    TrainConfig,
)
from kcls.data.folder import decode_files, scan_folder  # noqa: E402
from kcls.data.sources import Splits, split_indices  # noqa: E402
from kcls.workflows.pretrain import PretrainData, pretrain  # noqa: E402
from kcls.workflows.run import run_recipe  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10_train_10k"
SEED = 0
LABELS_PER_CLASS = 100


def load(root: Path) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, np.ndarray]:
    """All images (uint8 [N, 32, 32, 3]), labels, class names, train and test indices."""
    files = scan_folder(root)
    images = np.stack([image for image, _ in decode_files(files.paths, files.labels)
                       .as_numpy_iterator()])
    train, _, test = split_indices(files.labels, DataConfig(
        test_fraction=0.2, validation_fraction=0.0, seed=SEED))
    return images, files.labels, files.class_names, train, test


def labelled_subset(labels: np.ndarray, train: np.ndarray) -> np.ndarray:
    """`LABELS_PER_CLASS` training indices per class, chosen with the seed."""
    shuffled = np.random.default_rng(SEED).permutation(train)
    return np.sort(np.concatenate([shuffled[labels[shuffled] == label][:LABELS_PER_CLASS]
                                   for label in np.unique(labels)]))


def fine_tune(name: str, images: np.ndarray, labels: np.ndarray, class_names: list[str],
              labelled: np.ndarray, test: np.ndarray, backbone: str, weights: str | None,
              frozen_epochs: int, unfrozen_epochs: int, out: Path,
              train_batchnorm: bool | None = None) -> dict:
    def examples(indices: np.ndarray) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices((images[indices], labels[indices]))

    splits = Splits(examples(labelled), None, examples(test), class_names,
                    {"train": len(labelled), "validation": 0, "test": len(test)},
                    train_labels=labels[labelled])
    recipe = Recipe(
        name=name,
        data=DataConfig(image_size=32, validation_fraction=0.0, batch_size=64,
                        augment="light", seed=SEED),
        model=ModelConfig(backbone=backbone, weights=weights, dropout=0.0),
        train=TrainConfig(frozen_epochs=frozen_epochs, unfrozen_epochs=unfrozen_epochs,
                          learning_rate=2e-3,
                          unfrozen_lr_factor=0.5 if weights else 1.0,
                          weight_decay=5e-4, label_smoothing=0.1,
                          train_batchnorm=train_batchnorm, seed=SEED),
        evaluate=EvaluateConfig(mistakes=0),
        export=ExportConfig(enabled=False))
    started = time.monotonic()
    result = run_recipe(recipe, out / name, log=lambda line: None, verbose=0, splits=splits)
    return {"accuracy": result.metrics["accuracy"], "seconds": time.monotonic() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--backbone", default="resnet_v2_tiny")
    parser.add_argument("--budget", default="30m", help="pretraining wall-clock budget")
    parser.add_argument("--batch-size", type=int, default=128, help="pretraining batch")
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="pretraining peak")
    parser.add_argument("--epochs", type=int, default=40, help="fine-tune epochs of every leg")
    parser.add_argument("--frozen-epochs", type=int, default=5,
                        help="of --epochs, those with the backbone frozen (pretrained leg)")
    parser.add_argument("--weights", help="pretrained backbone weights: skip pretraining")
    parser.add_argument("--train-batchnorm", action="store_true",
                        help="let BatchNorm train in the pretrained leg's unfrozen phase "
                             "(default: inference mode, kcls's choice for pretrained weights)")
    parser.add_argument("--legs", default="scratch,probe,finetune",
                        help="comma-separated legs to run (scratch, probe, finetune)")
    parser.add_argument("--pretrain-only", action="store_true")
    parser.add_argument("--out", type=Path, help="keep the run directories here")
    arguments = parser.parse_args()
    if not arguments.data.is_dir():
        print(f"No data at {arguments.data}: pass --data PATH (an image folder of CIFAR-10 "
              "classes).", file=sys.stderr)
        return 2
    images, labels, class_names, train, test = load(arguments.data)
    labelled = labelled_subset(labels, train)
    print(f"{len(train)} unlabelled training images, {len(labelled)} labelled, "
          f"{len(test)} test; backbone {arguments.backbone}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        out = arguments.out or Path(scratch)
        weights = arguments.weights
        pretrain_seconds = 0.0
        knn = None
        if weights is None:
            def examples(indices: np.ndarray) -> tf.data.Dataset:
                return tf.data.Dataset.from_tensor_slices((images[indices], labels[indices]))

            data = PretrainData(tf.data.Dataset.from_tensor_slices(images[train]), len(train),
                                knn_memory=examples(labelled), knn_query=examples(test))
            config = PretrainConfig(source=f"folder:{arguments.data}",
                                    backbone=arguments.backbone,
                                    batch_size=arguments.batch_size,
                                    learning_rate=arguments.learning_rate,
                                    time_budget=arguments.budget, seed=SEED)
            started = time.monotonic()
            result = pretrain(config, out / "pretrain", verbose=2, data=data)
            pretrain_seconds = time.monotonic() - started
            weights = str(result.weights_path)
            knn = result.history["knn_accuracy"][-1]
            print(f"pretrained {len(result.history['loss'])} epochs in {pretrain_seconds:.0f} s,"
                  f" kNN accuracy {knn:.4f}", flush=True)
        if arguments.pretrain_only:
            return 0
        epochs, frozen = arguments.epochs, arguments.frozen_epochs
        common = (images, labels, class_names, labelled, test, arguments.backbone)
        runs = {
            "scratch": ("from scratch", lambda: fine_tune(
                "scratch", *common, None, 0, epochs, out)),
            "probe": ("pretrained, linear probe", lambda: fine_tune(
                "probe", *common, weights, epochs, 0, out)),
            "finetune": ("pretrained, fine-tuned", lambda: fine_tune(
                "finetune", *common, weights, frozen, epochs - frozen, out,
                True if arguments.train_batchnorm else None)),
        }
        legs = {runs[key][0]: runs[key][1]() for key in arguments.legs.split(",")}
        for name, leg in legs.items():
            print(f"{name}: test accuracy {leg['accuracy']:.4f} ({leg['seconds']:.0f} s)",
                  flush=True)
    print(f"\n| {arguments.backbone}, {len(labelled)} labels, {epochs} fine-tune epochs "
          "| test accuracy (2,000 images) | seconds |\n|---|---|---|")
    for name, leg in legs.items():
        print(f"| {name} | {leg['accuracy']:.4f} | {leg['seconds']:.0f} |")
    if knn is not None:
        print(f"| (pretraining: {arguments.budget} budget, kNN accuracy {knn:.4f}) | | "
              f"{pretrain_seconds:.0f} |")
    if {"pretrained, fine-tuned", "from scratch"} <= set(legs):
        gain = legs["pretrained, fine-tuned"]["accuracy"] - legs["from scratch"]["accuracy"]
        print(f"\npretrained fine-tune vs from scratch: {100 * gain:+.1f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
