"""Precision and recall of `kcls data label-issues` against labels flipped at random.

    python benchmarks/label_issues.py [--source ../shared/data/cifar10_train_10k]
        [--images 10000] [--flip 0.05] [--image-size 96] [--folds 5] [--seed 0]

Copies `--images` images of the source folder (the same number per class) into a
temporary folder, moves `--flip` of them, chosen at random, into another class folder
(a random other class: a wrong label), runs the label-issue search of the `finetune`
recipe (EfficientNet-Lite0 ImageNet embeddings at `--image-size`) on it, and prints,
for the training split it scores, the precision and recall of the flagged set, the
precision of the top-k (k = the flipped images in the split) and the times.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from kcls.config import apply_overrides  # noqa: E402
from kcls.recipes import load_recipe  # noqa: E402


def flipped_copy(source: Path, root: Path, images: int, flip: float, seed: int) -> set[str]:
    """Writes the copy with `flip` of the labels changed; returns the moved files."""
    rng = np.random.default_rng(seed)
    classes = sorted(path.name for path in source.iterdir() if path.is_dir())
    files = []
    for name in classes:
        (root / name).mkdir(parents=True)
        for path in sorted((source / name).iterdir())[:images // len(classes)]:
            shutil.copyfile(path, root / name / path.name)
            files.append(root / name / path.name)
    moved = set()
    for index in rng.choice(len(files), int(round(flip * len(files))), replace=False):
        path = files[index]
        others = [name for name in classes if name != path.parent.name]
        name = f"flipped-{path.parent.name}-{path.name}"
        target = root / others[rng.integers(len(others))] / name
        path.rename(target)
        moved.add(str(target))
    return moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=Path("../shared/data/cifar10_train_10k"))
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--flip", type=float, default=0.05)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    from kcls.cli import start_tensorflow

    start_tensorflow()
    from kcls.workflows.label_issues import find_label_issues_of_source

    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; load: "
          + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary) / "flipped"
        moved = flipped_copy(arguments.source, root, arguments.images, arguments.flip,
                             arguments.seed)
        recipe = apply_overrides(load_recipe("finetune"), [
            f"data.source=folder:{root}", f"data.image_size={arguments.image_size}",
            f"data.seed={arguments.seed}"])
        result = find_label_issues_of_source(recipe, Path(temporary) / "out", arguments.folds,
                                             log=print)
    files = result.files
    flipped = {index for index, path in enumerate(files) if path in moved}
    flagged = result.issues.indices.tolist()
    hits = len(flipped & set(flagged))
    top = len(flipped & set(flagged[:len(flipped)]))
    print(f"| images scored | flipped among them | flagged | precision | recall | "
          f"precision of the top {len(flipped)} | out-of-fold accuracy | embedding s | "
          "cross-validation + cleanlab s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {len(files):,} | {len(flipped)} | {len(flagged)} | {hits / max(len(flagged), 1):.3f} "
          f"| {hits / max(len(flipped), 1):.3f} | {top / max(len(flipped), 1):.3f} | "
          f"{result.issues.out_of_fold_accuracy(result.labels):.3f} | "
          f"{result.seconds['embedding']:.0f} | {result.seconds['cross_validation']:.0f} |")


if __name__ == "__main__":
    main()
