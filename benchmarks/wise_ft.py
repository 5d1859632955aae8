"""WiSE-FT: how accuracy moves between the frozen phase's end and the fine-tuned weights.

    python benchmarks/wise_ft.py --dataset hymenoptera --seeds 3          # ~15 minutes
    python benchmarks/wise_ft.py --dataset hymenoptera --seeds 3 \
        --set train.frozen_epochs=5 --set train.unfrozen_epochs=5
    python benchmarks/wise_ft.py --dataset cifar10                        # ~40 minutes

Trains `benchmarks/transfer.py`'s row d (the `finetune` recipe as it ships, on the same
data) once per seed, keeping the weights each phase ended with, then scores on the test
images the models `A x fine-tuned + (1 - A) x frozen end` for A from 0 to 1
(`kcls.train.interpolate`): the curve that `train.wise_ft=A` picks one point of, at
the cost of one training instead of one per A. The results are in docs/transfer.md
("Weight interpolation").
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import keras
import numpy as np
import transfer  # benchmarks/transfer.py: its datasets and row d's recipe

from kcls.config import apply_overrides
from kcls.data.pipeline import eval_pipeline
from kcls.recipes import load_recipe
from kcls.train import phases
from kcls.train.interpolate import interpolate_weights, snapshot_weights

ALPHAS = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)


def train_keeping_phase_ends(recipe, splits, work: Path) -> tuple[keras.Model, list]:
    """Runs `recipe` as transfer.py runs a row (no export); returns its classifier and the
    weights each phase ended with."""
    ends: list[list[np.ndarray]] = []
    finish_phase = phases._finish_phase

    def finish_and_keep(run, phase, *args, **kwargs):
        record = finish_phase(run, phase, *args, **kwargs)
        ends.append(snapshot_weights(run.classifier))
        return record

    # The phases' end weights are not part of run_recipe's result: wrap the step that
    # finishes a phase for this benchmark's process only.
    phases._finish_phase = finish_and_keep
    try:
        *_, classifier = transfer.run_kcls_row(recipe, splits, work)
    finally:
        phases._finish_phase = finish_phase
    return classifier, ends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(transfer.DATASET_OVERRIDES),
                        default="hymenoptera")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="override for the finetune recipe, e.g. train.frozen_epochs=5")
    arguments = parser.parse_args()
    print(f"{transfer._cpu_model()}, flags: {transfer._cpu_flags()}", flush=True)
    splits = transfer.load_dataset(arguments.dataset)
    accuracies: dict[float, list[float]] = {alpha: [] for alpha in ALPHAS}
    for seed in range(arguments.seeds):
        recipe = apply_overrides(load_recipe("finetune"),
                                 transfer.DATASET_OVERRIDES[arguments.dataset]
                                 + arguments.overrides + [f"train.seed={seed}"])
        with tempfile.TemporaryDirectory() as work:
            classifier, ends = train_keeping_phase_ends(recipe, splits, Path(work) / "run")
        test = eval_pipeline(splits.test, len(splits.class_names), recipe.data)
        labels = np.concatenate([batch_labels.numpy().argmax(-1) for _, batch_labels in test])
        frozen_end, fine_tuned = ends[0], ends[-1]
        for alpha in ALPHAS:
            classifier.set_weights(fine_tuned)
            interpolate_weights(classifier, frozen_end, alpha)
            predicted = classifier.predict(test, verbose=0).argmax(-1)
            accuracies[alpha].append(float(np.mean(predicted == labels)))
            print(f"seed {seed}, A = {alpha}: {accuracies[alpha][-1]:.4f}", flush=True)
        keras.backend.clear_session()
    print("| A | " + " | ".join(f"seed {seed}" for seed in range(arguments.seeds)) + " | mean |")
    print("| ---: |" + " ---: |" * (arguments.seeds + 1))
    for alpha, values in accuracies.items():
        print(f"| {alpha} | " + " | ".join(f"{value:.4f}" for value in values)
              + f" | {np.mean(values):.4f} |")


if __name__ == "__main__":
    main()
