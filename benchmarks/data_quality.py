"""Recall and false positives of `kcls data check`'s duplicate search, and its time.

    python benchmarks/data_quality.py [--source ../shared/data/cifar10_train_10k]
        [--images 2000] [--per-kind 50] [--work DIR] [--timing-images 10000]

Copies `--images` images of the source folder (the same number per class, chosen with
a seed) into a temporary folder of split folders (`train/` 80%, `test/` 20%) and injects
`--per-kind` copies of training images of each kind:

- `exact`: the same bytes under another name, same class;
- `reencoded`: decoded and saved as JPEG at quality 50;
- `resized`: half upscaled to 2x, half downscaled to 3/4 of the side (JPEG, quality 90);
- `flipped`: mirrored (JPEG, quality 95);
- `other_class`: re-saved (JPEG, quality 85) into another class folder: a conflicting label;
- `across_split`: re-saved (JPEG, quality 85) into `test/`, same class: a leak.

It runs the check once (`kcls.data.check.check_source`), then groups the hashes again
at each threshold, and prints, per threshold, the recall of each kind (an injected
pair is found when both images are in one group that has the kind's flag: exact bytes,
across classes, across splits) and the false pairs (pairs of two original images within
the threshold: CIFAR-10's own near-duplicates are among them), and the seconds per
10,000 images of the hashing and of the search on `--timing-images` images.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from kcls.config import DataConfig  # noqa: E402
from kcls.data.check import check_source  # noqa: E402
from kcls.data.duplicates import (  # noqa: E402
    NEAR_DUPLICATE_DISTANCE,
    duplicate_groups,
    label_keys,
    near_pairs,
)
from kcls.data.image_hashes import hash_files  # noqa: E402

KINDS = ("exact", "reencoded", "resized", "flipped", "other_class", "across_split")
THRESHOLDS = (0, 2, 4, 6, 8, 10, 12)


def jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def injected_bytes(kind: str, data: bytes, number: int) -> bytes:
    """The copy of an image (its encoded `data`) for one kind of injection."""
    if kind == "exact":
        return data
    image = Image.open(io.BytesIO(data))
    if kind == "reencoded":
        return jpeg(image, 50)
    if kind == "resized":
        side = image.width * 2 if number % 2 else image.width * 3 // 4
        return jpeg(image.resize((side, side), Image.Resampling.BICUBIC), 90)
    if kind == "flipped":
        return jpeg(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), 95)
    return jpeg(image, 85)  # other_class, across_split


def build_folder(source: Path, root: Path, images: int, per_kind: int, seed: int
                 ) -> list[tuple[str, str, str]]:
    """Writes the split folder with the injected copies; returns `(original, copy, kind)`."""
    rng = np.random.default_rng(seed)
    classes = sorted(path.name for path in source.iterdir() if path.is_dir())
    per_class = images // len(classes)
    train_files = []
    for name in classes:
        files = sorted((source / name).iterdir())
        chosen = [files[index] for index in sorted(rng.choice(len(files), per_class, False))]
        cut = int(0.8 * per_class)
        for split, part in (("train", chosen[:cut]), ("test", chosen[cut:])):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for path in part:
                shutil.copyfile(path, root / split / name / path.name)
                if split == "train":
                    train_files.append(root / split / name / path.name)
    originals = rng.choice(len(train_files), per_kind * len(KINDS), replace=False)
    injected = []
    for number, index in enumerate(originals):
        kind, original = KINDS[number // per_kind], train_files[index]
        name = original.parent.name
        if kind == "other_class":
            name = classes[(classes.index(name) + 1 + number % (len(classes) - 1))
                           % len(classes)]
        split = "test" if kind == "across_split" else "train"
        copy = root / split / name / f"copy-{kind}-{number:04d}.jpg"
        copy.write_bytes(injected_bytes(kind, original.read_bytes(), number))
        injected.append((str(original), str(copy), kind))
    return injected


def found(group, kind: str) -> bool:
    """Whether a group holding an injected pair of `kind` has the flag that kind needs."""
    return {"exact": group.exact, "other_class": group.across_classes,
            "across_split": group.across_splits}.get(kind, True)


def sweep(check, injected: list[tuple[str, str, str]]) -> list[dict]:
    """Recall per kind and false pairs at each of `THRESHOLDS`."""
    images, hashes = check.images, check.hashes
    position = {path: index for index, path in enumerate(images.files)}
    copies = {position[copy] for _, copy, _ in injected}
    keys = label_keys(images.labels)
    rows = []
    for threshold in THRESHOLDS:
        groups = duplicate_groups(hashes.digests, hashes.perceptual, hashes.flipped, keys,
                                  images.splits, hashes.readable, threshold)
        group_of = {index: group for group in groups for index in group.members}
        row = {"threshold": threshold}
        for kind in KINDS:
            pairs = [(position[a], position[b]) for a, b, k in injected if k == kind]
            row[kind] = np.mean([a in group_of and group_of[a] is group_of.get(b)
                                 and found(group_of[a], kind) for a, b in pairs])
        pairs = near_pairs(hashes.perceptual, hashes.flipped, threshold)
        false = [(a, b) for a, b, _ in pairs if a not in copies and b not in copies]
        row["false_pairs"] = len(false)
        row["false_across_classes"] = sum(keys[a] != keys[b] for a, b in false)
        row["false_across_splits"] = sum(images.splits[a] != images.splits[b]
                                         for a, b in false)
        rows.append(row)
    return rows


def timing(source: Path, count: int) -> tuple[float, float]:
    """Seconds per 10,000 images of hashing and of the all-pairs search, on `count` images."""
    paths = sorted(str(path) for path in source.glob("*/*") if path.is_file())[:count]
    started = time.perf_counter()
    hashes = hash_files(paths, [])
    hashed = time.perf_counter() - started
    started = time.perf_counter()
    near_pairs(hashes.perceptual, hashes.flipped)
    searched = time.perf_counter() - started
    scale = 10_000 / len(paths)
    return hashed * scale, searched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=Path("../shared/data/cifar10_train_10k"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--per-kind", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-images", type=int, default=10_000)
    parser.add_argument("--work", type=Path, help="folder for the copy (default: a temporary one)")
    arguments = parser.parse_args()
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; load: "
          + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory() as temporary:
        root = (arguments.work or Path(temporary)) / "injected"
        shutil.rmtree(root, ignore_errors=True)
        injected = build_folder(arguments.source, root, arguments.images, arguments.per_kind,
                                arguments.seed)
        check = check_source(DataConfig(source=f"folder:{root}"))
        print(f"{len(check.images.files)} images ({arguments.images} originals, "
              f"{len(injected)} copies), check {check.seconds:.2f} s at distance "
              f"{NEAR_DUPLICATE_DISTANCE}")
        print("| distance | " + " | ".join(KINDS) + " | false pairs | of them across "
              "classes | across splits |")
        print("| ---: |" + " ---: |" * (len(KINDS) + 3))
        for row in sweep(check, injected):
            print(f"| {row['threshold']} | " + " | ".join(f"{row[kind]:.2f}" for kind in KINDS)
                  + f" | {row['false_pairs']} | {row['false_across_classes']} | "
                  f"{row['false_across_splits']} |")
    hashed, searched = timing(arguments.source, arguments.timing_images)
    print(f"hashing {hashed:.2f} s per 10,000 images; all-pairs search of "
          f"{arguments.timing_images:,} images {searched:.2f} s")


if __name__ == "__main__":
    main()
