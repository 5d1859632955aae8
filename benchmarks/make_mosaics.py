"""Builds the multi-label mosaic set from CIFAR-10 images: 2x2 mosaics labelled with the
classes they contain.

    python benchmarks/make_mosaics.py /tmp/mosaics
    python benchmarks/make_mosaics.py /tmp/mosaics --source ../shared/data/cifar10_train_10k \
        --seed 0 --limit 2000
    kcls recipe run mosaic_multilabel --set data.source=manifest:/tmp/mosaics/manifest.csv

The source images (`SOURCE/<class>/<image>`, 32x32) are split into train, validation
and test (70/10/20, seeded) *before* mosaicking, so that no source image appears in two
splits. Within each split the images are shuffled and taken four at a time: each
mosaic (64x64 PNG) tiles four images and is labelled with the set of their classes
(1 to 4 labels; 3.4 on average with 10 classes). Every source image is used once:
10,000 images make 2,500 mosaics (1,750 train, 250 validation, 500 test).

Writes `OUT/<split>/<index>.png`, `OUT/manifest.csv` (`path,labels,split`, see
`kcls.data.manifest`) and `OUT/labels.txt` (the class names). Refuses to write into a
folder that already holds a manifest.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np
from PIL import Image

SPLIT_FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}
TILES = 4
DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_train_10k"


def make_mosaics(source: str | Path, out: str | Path, seed: int = 0,
                 limit: int | None = None) -> Path:
    """Writes the mosaic set of `source` into `out` and returns the manifest's path.

    Args:
        source: folder of `<class>/<image>` 32x32 images.
        out: folder to write into (created; must not hold a manifest yet).
        seed: seeds the split and the tiling.
        limit: use only this many source images (a seeded random subset), for tests.
    """
    source, out = Path(source), Path(out)
    manifest = out / "manifest.csv"
    if manifest.exists():
        raise FileExistsError(f"{manifest} exists; pass an empty folder.")
    class_names = sorted(folder.name for folder in source.iterdir() if folder.is_dir())
    files = [(path, label) for label, name in enumerate(class_names)
             for path in sorted((source / name).iterdir()) if path.is_file()]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(files))[:limit]
    rows = []
    start = 0
    for split, fraction in SPLIT_FRACTIONS.items():
        count = int(round(fraction * len(order)))
        pool = order[start:start + count]  # this split's images only
        start += count
        (out / split).mkdir(parents=True, exist_ok=True)
        for index in range(len(pool) // TILES):
            tiles = [files[i] for i in pool[index * TILES:(index + 1) * TILES]]
            images = [np.asarray(Image.open(path).convert("RGB").resize((32, 32)))
                      for path, _ in tiles]
            mosaic = np.concatenate([np.concatenate(images[:2], axis=1),
                                     np.concatenate(images[2:], axis=1)], axis=0)
            name = f"{split}/{index:05d}.png"
            Image.fromarray(mosaic).save(out / name)
            labels = sorted({class_names[label] for _, label in tiles})
            rows.append({"path": name, "labels": ";".join(labels), "split": split})
    (out / "labels.txt").write_text("\n".join(class_names) + "\n")
    temporary = out / f".manifest.csv.tmp-{os.getpid()}"
    with open(temporary, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["path", "labels", "split"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, manifest)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write the mosaics and manifest.csv into")
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None)
    arguments = parser.parse_args()
    manifest = make_mosaics(arguments.source, arguments.out, arguments.seed, arguments.limit)
    print(f"wrote {manifest}")


if __name__ == "__main__":
    main()
