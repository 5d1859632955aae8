"""How often `kcls monitor` raises false alarms, and how many images it needs to flag a shift.

    python benchmarks/monitor_drift.py saved_models/quickstart \
        --domain ../shared/data/cifar10_train_10k/airplane
    python benchmarks/monitor_drift.py saved_models/cifar10_fast \
        --domain ../shared/data/hymenoptera

The export's recipe names its test split (same seed, never a training image). It is cut
in two halves (seeded, stratified): the *reference* half gets a reference profile
(`kcls.monitoring.drift.build_profile` on the export's own `predict_images` outputs, as
`kcls recipe run` builds one on the whole split), and the *pool* half stands in for
fresh production images from the same distribution. Scenarios, each sampled `--draws`
times per sample size without replacement from its pool and tested with
`kcls.monitoring.drift.compare` (the decision `kcls monitor` prints; images, so three tests):

- `iid`: pool images as they are: every flag is a false alarm;
- `prior`: pool images of two classes only (the first two of the recipe's classes);
- `blur` (Gaussian, sigma 1 px at the model's input size; `blur2` 2 px), `dark` (pixels
  x 0.4), `jpeg10` (JPEG quality 10), `noise` (Gaussian, sigma 25 of 255; `noise50`
  50): every pool image corrupted;
- `domain`: images of another data set (`--domain FOLDER`, read recursively).

Prints two Markdown tables, for images (`kcls monitor --data`: three tests) and for the
same draws' predictions alone (`--predictions`: class and confidence tests): the pool's
accuracy and mean top-1 confidence (how much the shift hurts the model), the share of
draws flagged per scenario and sample size, and the smallest sample size flagged in at
least 90% of draws. Outputs are computed once per
image; only the statistics run per draw.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from kcls.config import from_dict  # noqa: E402
from kcls.data.sources import load_splits  # noqa: E402
from kcls.layout import METADATA_FILE, resolve_export_dir  # noqa: E402
from kcls.monitoring.drift import build_profile, compare  # noqa: E402
from kcls.monitoring.monitor import image_files, image_outputs  # noqa: E402

SIZES = (10, 20, 50, 100, 200, 500)
DETECTED = 0.9  # "flags it": at least this share of draws


def corruptions(image_size: int) -> dict:
    """Name -> function of a uint8 image; `blur` and `noise` also at twice the severity."""
    def jpeg(image: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=10)
        return np.asarray(Image.open(buffer).convert("RGB"))

    def blur(pixels: float):
        def apply(image: np.ndarray) -> np.ndarray:
            # `pixels` at the model's input size, whatever the stored image size.
            sigma = pixels * max(image.shape[:2]) / image_size
            return gaussian_filter(image.astype(np.float32), (sigma, sigma, 0)).round(
                ).astype(np.uint8)
        return apply

    def noise(sigma: float):
        return lambda image: np.clip(image + rng.normal(0, sigma, image.shape), 0, 255
                                     ).astype(np.uint8)

    rng = np.random.default_rng(0)
    return {"blur": blur(1.0), "blur2": blur(2.0),
            "dark": lambda image: (image * 0.4).astype(np.uint8), "jpeg10": jpeg,
            "noise": noise(25.0), "noise50": noise(50.0)}


def served(signature, images: list[np.ndarray], batch_size: int = 64):
    """(probabilities, embeddings) of uint8 images of one shape, through predict_images."""
    probabilities, embeddings = [], []
    for start in range(0, len(images), batch_size):
        outputs = signature(images=tf.constant(np.stack(images[start:start + batch_size])))
        probabilities.append(outputs["probabilities"].numpy())
        embeddings.append(outputs["embedding"].numpy())
    return np.concatenate(probabilities), np.concatenate(embeddings)


def by_shape(signature, images: list[np.ndarray]):
    """`served` for images of several shapes, in their order."""
    shapes = {}
    for index, image in enumerate(images):
        shapes.setdefault(image.shape, []).append(index)
    probabilities = embeddings = None
    for indices in shapes.values():
        batch = served(signature, [images[i] for i in indices])
        if probabilities is None:
            probabilities = np.zeros((len(images), batch[0].shape[1]), np.float32)
            embeddings = np.zeros((len(images), batch[1].shape[1]), np.float32)
        probabilities[indices], embeddings[indices] = batch
    return probabilities, embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an export (version or model folder)")
    parser.add_argument("--domain", required=True, help="a folder of other-domain images")
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--iid-draws", type=int, default=50)
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.time()
    export_dir = resolve_export_dir(args.model)
    metadata = json.loads((export_dir / METADATA_FILE).read_text())
    recipe = from_dict(metadata["recipe"])
    class_names = metadata["class_names"]
    signature = tf.saved_model.load(str(export_dir)).signatures["predict_images"]
    splits = load_splits(recipe.data)
    examples = list(splits.test.as_numpy_iterator())
    images = [image for image, _ in examples]
    labels = np.array([label for _, label in examples])
    reference_index, pool_index = train_test_split(
        np.arange(len(labels)), test_size=0.5, random_state=args.seed, stratify=labels)
    probabilities, embeddings = by_shape(signature, images)
    profile = build_profile(probabilities[reference_index], embeddings[reference_index],
                            labels[reference_index], class_names)
    pools = {"iid": (probabilities[pool_index], embeddings[pool_index])}
    pool_labels = {"iid": labels[pool_index]}
    two = pool_index[labels[pool_index] < 2]
    pools["prior"] = (probabilities[two], embeddings[two])
    pool_labels["prior"] = labels[two]
    for name, corrupt in corruptions(recipe.data.image_size).items():
        pools[name] = by_shape(signature, [corrupt(images[i]) for i in pool_index])
        pool_labels[name] = labels[pool_index]
    domain_files = image_files(args.domain)
    outputs = image_outputs(export_dir, domain_files)
    pools["domain"] = outputs[:2]
    print(f"{export_dir}: reference {len(reference_index)} test images, pool "
          f"{len(pool_index)}; domain {len(pools['domain'][0])} images from {args.domain}; "
          f"outputs in {time.time() - started:.0f} s", file=sys.stderr)

    rng = np.random.default_rng(args.seed)
    rows = []
    for name, (pool_probabilities, pool_embeddings) in pools.items():
        draws = args.iid_draws if name == "iid" else args.draws
        # Per sample size: share flagged with images (three tests) and from the
        # predictions alone (`--predictions`: class and confidence tests, same draws).
        rates, logged_rates, per_test = {}, {}, {}
        for size in SIZES:
            if size > len(pool_probabilities):
                continue
            flagged, logged, tests = 0, 0, {}
            for _ in range(draws):
                chosen = rng.choice(len(pool_probabilities), size, replace=False)
                classes = pool_probabilities[chosen].argmax(1)
                confidences = pool_probabilities[chosen].max(1)
                result = compare(profile, classes, confidences, pool_embeddings[chosen],
                                 permutations=args.permutations,
                                 seed=int(rng.integers(1 << 31)))
                flagged += result["drift"]
                logged += compare(profile, classes, confidences)["drift"]
                for test in result["flagged"]:
                    tests[test] = tests.get(test, 0) + 1
            rates[size], logged_rates[size] = flagged / draws, logged / draws
            per_test[size] = {test: count / draws for test, count in tests.items()}
        accuracy = (f"{np.mean(pool_probabilities.argmax(1) == pool_labels[name]):.3f}"
                    if name in pool_labels else "-")
        confidence = f"{pool_probabilities.max(1).mean():.3f}"
        rows.append((name, draws, len(pool_probabilities), rates, logged_rates, accuracy,
                     confidence))
        print(f"{name}: {rates} logged {logged_rates} {per_test}", file=sys.stderr)

    for title, column in (("images (`--data`: three tests)", 3),
                          ("predictions only (`--predictions`: two tests)", 4)):
        print(f"\n{title}\n")
        print("| scenario | pool | accuracy | mean confidence | draws | "
              + " | ".join(f"n={size}" for size in SIZES)
              + f" | smallest n flagged in >= {DETECTED:.0%} |")
        print("| --- " * (len(SIZES) + 6) + "|")
        for row in rows:
            name, draws, pool, rates, accuracy, confidence = (
                row[0], row[1], row[2], row[column], row[5], row[6])
            cells = [f"{rates[size]:.2f}" if size in rates else "-" for size in SIZES]
            smallest = next((size for size, rate in rates.items() if rate >= DETECTED), "-")
            print(f"| {name} | {pool} | {accuracy} | {confidence} | {draws} | "
                  + " | ".join(cells) + f" | {smallest} |")
    print(f"\n{time.time() - started:.0f} s in all; permutations {args.permutations}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
