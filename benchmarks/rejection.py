"""Which score rejects unknown images best: AUROC and FPR@95TPR per score and OOD set.

    python benchmarks/rejection.py RUN_DIR --ood NAME=PATH [--ood ...] [--in-distribution PATH]
        [--ood-limit 2000] [--coverage 0.95]
    python benchmarks/rejection.py --recipe NAME [--set KEY=VALUE ...] --out RUN_DIR --ood ...

With `--recipe`, the recipe (and its `--set` overrides: the data, image size, epochs) is
trained into `--out` first, unless `--out` already holds a finished run of it, which is
reused; the rows of docs/serving.md for a CIFAR-10 model and a hymenoptera model were
measured so.

For the run directory (a trained single-label model), the model's embeddings and logits
are computed on its training split (the statistics of the embedding scores), its
validation split (where the rejection threshold is chosen for `--coverage`), its
held-out in-distribution (ID) images (the recipe's test split, or every image of the
`--in-distribution` class folder) and each out-of-distribution (OOD) set: the images of
an `--ood` folder (searched recursively, at most `--ood-limit`, spread over its
sub-folders), and `corrupted`, the ID images with one of four severe corruptions each
(Gaussian noise of sigma 0.3 x 255, a Gaussian blur of sigma S/16, contrast cut to 10%,
pixelation to S/8), applied after resizing to the model input S.

Each score of `kcls.metrics.rejection` (higher = more like the training images) gets one
row per OOD set: AUROC of ID vs OOD, the OOD share kept at 95% ID kept (FPR@95TPR), and
with the threshold chosen on the validation split: the ID coverage reached on the
held-out images, the accuracy on the ID images kept and the share of OOD images still
kept. A last line gives a proxy
that needs no outside data: each score's AUROC of the validation images against their
corrupted copies, and the best of the scores a graph serves cheaply. The rows the serving docs
quote (docs/serving.md, "Rejecting unknown images") came from this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402

from kcls.cli import start_tensorflow  # noqa: E402
from kcls.config import apply_overrides  # noqa: E402
from kcls.data.folder import decode_files, list_image_files, scan_folder  # noqa: E402
from kcls.data.pipeline import eval_pipeline  # noqa: E402
from kcls.data.sources import load_splits  # noqa: E402
from kcls.layout import WEIGHTS_FILE  # noqa: E402
from kcls.load import load_run  # noqa: E402
from kcls.metrics import rejection  # noqa: E402
from kcls.models.classifier import embedding_model  # noqa: E402
from kcls.recipes import load_recipe  # noqa: E402
from kcls.workflows.run import run_recipe  # noqa: E402

KNN_NEIGHBOURS = 10
# The scores a served graph computes from the logits or a C x D constant (Mahalanobis
# needs a D x D matrix, k-NN the training embeddings): the candidates of the proxy.
SERVED_SCORES = ("max_probability", "energy", "max_logit", "nearest_mean_cosine")
CORRUPTIONS = ("noise", "blur", "contrast", "pixelate")


@dataclasses.dataclass
class Outputs:
    """A model's outputs on one set of images: embeddings `[N, D]`, logits `[N, C]`, labels
    int `[N]` (0 for unlabelled images) and the prepared images when kept."""

    embeddings: np.ndarray
    logits: np.ndarray
    labels: np.ndarray
    images: np.ndarray | None = None


def model_outputs(model, examples: tf.data.Dataset, num_classes: int, data,
                  keep_images: bool = False) -> Outputs:
    """Runs the embedding model over unbatched `(uint8 image, int label)` examples."""
    batches = eval_pipeline(examples, num_classes, dataclasses.replace(data, cache="none"))
    embeddings, logits, labels, images = [], [], [], []
    for batch_images, batch_labels in batches:
        embedding, logit = model.predict_on_batch(batch_images)
        embeddings.append(embedding)
        logits.append(logit)
        labels.append(np.argmax(batch_labels.numpy(), axis=-1))
        if keep_images:
            images.append(batch_images.numpy())
    return Outputs(np.concatenate(embeddings), np.concatenate(logits), np.concatenate(labels),
                   np.concatenate(images) if keep_images else None)


def image_outputs(model, images: np.ndarray, batch_size: int = 64) -> Outputs:
    """The embedding model on already prepared float images `[N, S, S, 3]`."""
    embeddings, logits = zip(*(model.predict_on_batch(images[start:start + batch_size])
                               for start in range(0, len(images), batch_size)))
    return Outputs(np.concatenate(embeddings), np.concatenate(logits),
                   np.zeros(len(images), np.int64))


def folder_examples(root: str, limit: int) -> tf.data.Dataset:
    """At most `limit` images of `root` (any depth), taken evenly over the sorted files."""
    paths = [str(path) for path in list_image_files(Path(root))]
    if len(paths) > limit:
        paths = [paths[index] for index in np.linspace(0, len(paths) - 1, limit).astype(int)]
    return decode_files(paths, np.zeros(len(paths), np.int64))


def corrupted(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """One severe corruption per image of float `[N, S, S, 3]` in [0, 255], in turn."""
    rng = np.random.default_rng(seed)
    size = images.shape[1]
    result = []
    for index, image in enumerate(images.astype(np.float64)):
        kind = CORRUPTIONS[index % len(CORRUPTIONS)]
        if kind == "noise":
            image = image + rng.normal(0.0, 0.3 * 255, image.shape)
        elif kind == "blur":
            image = gaussian_filter(image, sigma=(size / 16, size / 16, 0))
        elif kind == "contrast":
            image = image.mean() + 0.1 * (image - image.mean())
        else:
            block = max(size // 8, 1)
            small = image[::block, ::block]
            image = np.repeat(np.repeat(small, block, axis=0), block, axis=1)[:size, :size]
        result.append(np.clip(image, 0, 255))
    return np.stack(result).astype(np.float32)


def scores(train: Outputs, temperature: float, num_classes: int):
    """name -> function of `Outputs` giving its scores, with statistics of `train`."""
    means = rejection.class_means(train.embeddings, train.labels, num_classes)
    precision = rejection.shared_precision(train.embeddings, train.labels, means)
    return {
        "max_probability": lambda o: rejection.max_probability(o.logits, temperature),
        "energy": lambda o: rejection.energy(o.logits),
        "max_logit": lambda o: rejection.max_logit(o.logits),
        "mahalanobis": lambda o: rejection.mahalanobis(o.embeddings, means, precision),
        "nearest_mean_cosine": lambda o: rejection.nearest_mean_cosine(o.embeddings, means),
        f"knn_cosine (k={KNN_NEIGHBOURS})":
            lambda o: rejection.knn_cosine(o.embeddings, train.embeddings, KNN_NEIGHBOURS),
    }


@dataclasses.dataclass(frozen=True)
class Row:
    """One score on one OOD set: AUROC, FPR@95TPR, and at the validation threshold the
    share of held-out ID images kept, their accuracy and the share of OOD images kept."""

    ood_set: str
    score: str
    auroc: float
    false_positive_rate: float
    in_kept: float
    accuracy_kept: float
    out_kept: float

    def markdown(self) -> str:
        return (f"| {self.ood_set} | {self.score} | {self.auroc:.3f} | "
                f"{self.false_positive_rate:.3f} | {self.in_kept:.3f} | "
                f"{self.accuracy_kept:.3f} | {self.out_kept:.3f} |")


def score_rows(score_functions, validation: Outputs, held_out: Outputs,
               ood: dict[str, Outputs], coverage: float) -> list[Row]:
    """The rows of every score (name -> function of `Outputs`) and OOD set, the threshold
    of each score chosen on `validation` for `coverage`."""
    correct = np.argmax(held_out.logits, -1) == held_out.labels
    rows = []
    for name, score in score_functions.items():
        threshold = rejection.coverage_threshold(score(validation), coverage)
        in_scores = score(held_out)
        kept = in_scores >= threshold
        for ood_name, outputs in ood.items():
            out_scores = score(outputs)
            rows.append(Row(ood_name, name, rejection.auroc(in_scores, out_scores),
                            rejection.false_positive_rate(in_scores, out_scores),
                            float(np.mean(kept)),
                            float(np.mean(correct[kept])) if kept.any() else float("nan"),
                            float(np.mean(out_scores >= threshold))))
    return rows


def proxy_choice(score_functions, validation: Outputs, corrupted_validation: Outputs,
                 candidates=SERVED_SCORES) -> tuple[dict[str, float], str]:
    """AUROC of every score on the validation images against their corrupted copies, a
    proxy for unknown images that needs no outside data, and the best of `candidates`."""
    aurocs = {name: rejection.auroc(score(validation), score(corrupted_validation))
              for name, score in score_functions.items()}
    return aurocs, max(candidates, key=aurocs.__getitem__)


def train_if_needed(recipe_name: str, overrides: list[str], out: str) -> str:
    """`out` after training recipe `recipe_name` with `overrides` into it, unless it holds a
    finished run (its weights) already."""
    if (Path(out) / WEIGHTS_FILE).is_file():
        print(f"{out}: a finished run, reused (delete it to train again)")
        return out
    recipe = apply_overrides(load_recipe(recipe_name), overrides)
    start_tensorflow(recipe.train.strategy)  # as `kcls recipe run` does
    started = time.time()
    result = run_recipe(recipe, out, verbose=2)
    print(result.summary_line("test"))
    print(f"trained in {time.time() - started:.0f} s")
    return out


def benchmark_run(run_dir: str, ood_folders: dict[str, str], in_distribution: str | None,
                  ood_limit: int, coverage: float) -> None:
    """Prints the table of one run directory."""
    started = time.time()
    loaded = load_run(run_dir)
    recipe, class_names = loaded.recipe, loaded.class_names
    temperature = loaded.task.metadata()["temperature"] or 1.0
    model = embedding_model(loaded.classifier)
    splits = load_splits(recipe.data)
    if splits.validation is None:
        raise SystemExit(f"{run_dir}: its recipe has no validation split to choose the "
                         "threshold on; train with --set data.validation_fraction=0.1.")
    count = len(class_names)
    train = model_outputs(model, splits.train, count, recipe.data)
    validation = model_outputs(model, splits.validation, count, recipe.data, keep_images=True)
    if in_distribution:
        files = scan_folder(in_distribution)
        assert files.class_names == class_names, (files.class_names, class_names)
        examples, held_out_name = decode_files(files.paths, files.labels), in_distribution
    else:
        examples, held_out_name = splits.test, "the recipe's test split"
    held_out = model_outputs(model, examples, count, recipe.data, keep_images=True)
    ood = {name: model_outputs(model, folder_examples(path, ood_limit), count, recipe.data)
           for name, path in ood_folders.items()}
    ood["corrupted"] = image_outputs(model, corrupted(held_out.images))
    accuracy = float(np.mean(np.argmax(held_out.logits, -1) == held_out.labels))
    print(f"\n{run_dir}: {recipe.name}, {recipe.model.backbone} at {recipe.data.image_size} px, "
          f"T {temperature:.3f}; train {len(train.labels)}, validation {len(validation.labels)},"
          f" ID {len(held_out.labels)} ({held_out_name}, accuracy {accuracy:.3f}); OOD "
          + ", ".join(f"{name} {len(outputs.labels)}" for name, outputs in ood.items()))
    print(f"| OOD set | score | AUROC | FPR@95TPR | ID kept at the validation threshold "
          f"({coverage:.0%}) | accuracy of the ID kept | OOD kept there |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    score_functions = scores(train, temperature, count)
    for row in score_rows(score_functions, validation, held_out, ood, coverage):
        print(row.markdown())
    aurocs, chosen = proxy_choice(score_functions, validation,
                                  image_outputs(model, corrupted(validation.images, seed=1)))
    print("proxy (validation vs its corrupted copies) AUROC: "
          + ", ".join(f"{name} {value:.3f}" for name, value in aurocs.items())
          + f"; best served score: {chosen}")
    print(f"({time.time() - started:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", help="a finished run (or use --recipe)")
    parser.add_argument("--recipe", help="train this recipe into --out first")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        dest="overrides", help="an override of --recipe (repeatable)")
    parser.add_argument("--out", help="the run directory --recipe trains into (or reuses)")
    parser.add_argument("--ood", action="append", default=[], metavar="NAME=PATH",
                        help="a folder of OOD images (repeatable)")
    parser.add_argument("--in-distribution", metavar="PATH",
                        help="held-out ID class folder instead of the recipe's test split")
    parser.add_argument("--ood-limit", type=int, default=2000)
    parser.add_argument("--coverage", type=float, default=0.95)
    arguments = parser.parse_args()
    if (arguments.run_dir is None) == (arguments.recipe is None):
        parser.error("give RUN_DIR or --recipe NAME (with --out DIR), not both")
    if arguments.recipe is not None and arguments.out is None:
        parser.error("--recipe needs --out DIR, the run directory to train into")
    run_dir = arguments.run_dir or train_if_needed(arguments.recipe, arguments.overrides,
                                                   arguments.out)
    benchmark_run(run_dir, dict(item.split("=", 1) for item in arguments.ood),
                  arguments.in_distribution, arguments.ood_limit, arguments.coverage)


if __name__ == "__main__":
    main()
