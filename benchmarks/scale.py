"""Time to the first training step and input throughput at 10k and 100k images.

    python benchmarks/scale.py [--sizes 10000,100000] [--repeats 1] [--work DIR]
                               [--before COMMIT]

For each size, four ways of feeding the same JPEG folder (CIFAR-10 classes, 32x32):

- `folder, before`: kcls as it was before the header scan (commit `--before`, default
  65f8d0a), extracted with `git archive` into a temporary folder and imported from there:
  its scan decodes every image with TensorFlow (with an empty decode-check cache, and
  again with the cache the first run left: `warm cache`), and its training pipeline
  fills a full shuffle buffer (10,000) before the first batch;
- `folder, after`: this tree's kcls (names and headers, a four-batch first buffer);
- `pack`: this tree's kcls on a `kcls data pack` of the folder (`data.source=tfrecord:`);
  the time to pack is printed apart;
- `reference`: `keras.utils.image_dataset_from_directory` (32x32, batches of 64).

Each way runs in a child process of its own, which also runs the reference (machines
are noisy: every ratio divides two figures measured seconds apart in one process);
`--repeats N` runs each child N times and keeps the run with the best ratio of first
steps (the figures of one run stay together).
Figures, per child, after TensorFlow is imported:

- first step: seconds from the library's preparation (`kcls.data.sources.load_splits`,
  then `kcls.data.pipeline.train_pipeline`; the reference: `image_dataset_from_directory`)
  to the first training batch in hand: what a run waits for before its first step,
  without building the model;
- images/s: one full pass over the training split (kcls) or the whole folder (the
  reference) decoding, resizing to 32x32 and batching (batches of 64, no cache, no
  model, no augmentation): the input pipeline's throughput.

The 10k folder is `../shared/data/cifar10_train_10k` (10,000 real CIFAR-10 JPEGs); the
100k folder is written to `--work` (default: a temporary folder) from it: each image ten
times, mirrored or not and re-encoded at JPEG quality 95 to 75. Every file is read once
before the first measurement, so all ways read from the page cache. Prints the CPU
model and flags beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / ".." / "shared" / "data" / "cifar10_train_10k"
IMAGE_SIZE, BATCH_SIZE = 32, 64
QUALITIES = (95, 90, 85, 80, 75)


def make_copies(source: Path, target: Path, copies: int) -> Path:
    """`target/<class>/<name>_<k>.jpg` for k < `copies`: mirrored when k is odd, re-encoded
    at `QUALITIES[k // 2]`; returns `target` (kept if it already holds them all)."""
    from PIL import Image, ImageOps

    files = sorted(source.glob("*/*.jpg"))
    if target.is_dir() and sum(1 for _ in target.glob("*/*.jpg")) == len(files) * copies:
        return target
    shutil.rmtree(target, ignore_errors=True)
    for path in files:
        (target / path.parent.name).mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            image = image.convert("RGB")
            for copy in range(copies):
                variant = ImageOps.mirror(image) if copy % 2 else image
                variant.save(target / path.parent.name / f"{path.stem}_{copy}.jpg",
                             quality=QUALITIES[copy // 2 % len(QUALITIES)])
    return target


def read_every_file(root: Path) -> None:
    """Reads every file once, so every way sees the same (warm) page cache."""
    for path in root.rglob("*"):
        if path.is_file():
            path.read_bytes()


def extract_commit(commit: str, folder: Path) -> Path:
    """The `kcls` package of `commit`, extracted into `folder` (importable from there)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "kcls"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def child(way: str, source: str, root: str) -> dict:
    """Runs in a child process: the figures of `way` and of the reference."""
    import tensorflow as tf

    tf.config.list_logical_devices()
    figures = {"way": way, "kcls": __import__("kcls").__file__}
    if way == "reference":
        figures.update(reference(root))
        return figures
    figures.update(kcls_figures(source))
    figures.update({f"reference_{key}": value for key, value in reference(root).items()})
    return figures


def kcls_figures(source: str) -> dict:
    """First step and images/s of kcls's training split from `source`."""
    import tensorflow as tf

    from kcls.config import DataConfig
    from kcls.data.pipeline import eval_pipeline, train_pipeline
    from kcls.data.sources import load_splits

    config = DataConfig(source=source, image_size=IMAGE_SIZE, batch_size=BATCH_SIZE)
    started = time.perf_counter()
    splits = load_splits(config)
    batches = train_pipeline(splits.train, len(splits.class_names), config,
                             source_fingerprint=splits.fingerprint)
    next(iter(batches))
    first_step = time.perf_counter() - started
    uncached = DataConfig(source=source, image_size=IMAGE_SIZE, batch_size=BATCH_SIZE,
                          cache="none")
    one_pass = eval_pipeline(splits.train, len(splits.class_names), uncached, "train")
    started, images = time.perf_counter(), 0
    for batch, _ in one_pass:
        images += int(tf.shape(batch)[0])
    return {"first_step_seconds": first_step,
            "images_per_second": images / (time.perf_counter() - started),
            "images": images, "train": splits.sizes["train"], "skipped": len(splits.skipped)}


def reference(root: str) -> dict:
    """First batch and images/s of `keras.utils.image_dataset_from_directory`."""
    import keras
    import tensorflow as tf

    started = time.perf_counter()
    dataset = keras.utils.image_dataset_from_directory(
        root, image_size=(IMAGE_SIZE, IMAGE_SIZE), batch_size=BATCH_SIZE, seed=0, verbose=False)
    next(iter(dataset))
    first_step = time.perf_counter() - started
    started, images = time.perf_counter(), 0
    for batch, _ in dataset.prefetch(tf.data.AUTOTUNE):
        images += int(tf.shape(batch)[0])
    return {"first_step_seconds": first_step,
            "images_per_second": images / (time.perf_counter() - started), "images": images}


def run_child(way: str, source: str, root: Path, python_path: Path, cache: Path) -> dict:
    """`child(way, ...)` in a fresh process importing kcls from `python_path`."""
    environment = {**os.environ, "PYTHONPATH": str(python_path), "KCLS_CACHE_DIR": str(cache),
                   "TF_CPP_MIN_LOG_LEVEL": "3"}
    output = subprocess.run([sys.executable, __file__, "--child", way, "--source", source,
                             "--root", str(root)], env=environment, check=True,
                            capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def pack(root: Path, out_dir: Path) -> float:
    """Packs `root` into `out_dir` with this tree's kcls; returns the seconds it took."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kcls.cli", "data", "pack", f"folder:{root}",
                    str(out_dir)], env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True,
                   capture_output=True)
    return time.perf_counter() - started


def measure(size: int, root: Path, work: Path, before: Path, repeats: int) -> list[dict]:
    """Every way at one size (see the module docstring), each in its own processes."""
    read_every_file(root)
    cache = work / f"cache-{size}"

    def best(way: str, source: str, python_path: Path, empty_cache: bool = False) -> dict:
        runs = []
        for _ in range(repeats):
            if empty_cache:
                shutil.rmtree(cache, ignore_errors=True)
            runs.append(run_child(way, source, root, python_path, cache))
        return min(runs, key=lambda run: run["first_step_seconds"]
                   / run["reference_first_step_seconds"])

    rows = [best("folder, before (empty cache)", f"folder:{root}", before, empty_cache=True),
            best("folder, before (warm cache)", f"folder:{root}", before),
            best("folder, after", f"folder:{root}", ROOT)]
    out_dir = work / f"pack-{size}"
    shutil.rmtree(out_dir, ignore_errors=True)
    seconds = pack(root, out_dir)
    read_every_file(out_dir)
    rows.append(best("pack", f"tfrecord:{out_dir}", ROOT))
    rows[-1]["pack_seconds"] = seconds
    rows[-1]["pack_bytes"] = sum(path.stat().st_size for path in out_dir.iterdir())
    return [{**row, "size": size} for row in rows]


def machine() -> str:
    """The CPU model, core count and the instruction-set flags that matter to TensorFlow."""
    model, flags = platform.processor() or "unknown CPU", []
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines()
                     if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in info.splitlines()
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    wanted = [flag for flag in flags if flag.startswith(("avx", "fma", "sse4", "amx"))]
    return (f"{model}, {os.cpu_count()} cores, flags {' '.join(wanted)}, load average "
            f"{' '.join(f'{value:.1f}' for value in os.getloadavg())}")


def print_table(rows: list[dict]) -> None:
    print("| images | way | first step s | reference s | ratio | images/s | reference "
          "images/s | ratio |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        first, reference_first = row["first_step_seconds"], row["reference_first_step_seconds"]
        rate, reference_rate = row["images_per_second"], row["reference_images_per_second"]
        print(f"| {row['size']:,} | {row['way']} | {first:.2f} | {reference_first:.2f} | "
              f"{first / reference_first:.1f}x | {rate:,.0f} | {reference_rate:,.0f} | "
              f"{rate / reference_rate:.2f}x |")
    for row in rows:
        if "pack_seconds" in row:
            print(f"packing {row['size']:,} images: {row['pack_seconds']:.1f} s, "
                  f"{row['pack_bytes'] / 2**20:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--before", default="65f8d0a")
    parser.add_argument("--child")
    parser.add_argument("--source")
    parser.add_argument("--root")
    arguments = parser.parse_args()
    if arguments.child:
        print(json.dumps(child(arguments.child, arguments.source, arguments.root)))
        return
    if not CIFAR.is_dir():
        sys.exit(f"{CIFAR} is not present (only in the kcls workspace).")
    with tempfile.TemporaryDirectory(prefix="kcls-scale-") as temporary:
        work = arguments.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        before = extract_commit(arguments.before, Path(temporary) / "before")
        print(f"machine: {machine()}")
        rows = []
        for size in (int(size) for size in arguments.sizes.split(",")):
            root = CIFAR if size == 10_000 else make_copies(CIFAR, work / f"folder-{size}",
                                                            size // 10_000)
            rows += measure(size, root.resolve(), work, before, arguments.repeats)
        print(f"machine after: {machine()}")
        print_table(rows)


if __name__ == "__main__":
    main()
