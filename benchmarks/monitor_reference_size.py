"""How the false-alarm rate of `kcls monitor` depends on the size of the reference profile.

    python benchmarks/monitor_reference_size.py saved_models/finetune \
        ../shared/data/hymenoptera --current 50

Every image under the folders (read recursively) goes once through the export's own
`predict_images` signature. Then, for each reference size N and each of `--draws` draws,
the images are shuffled (seeded), the first N build a reference profile
(`kcls.monitoring.drift.build_profile`, as a run builds one on its held-out images) and
the next `--current` stand in for fresh production images of the same distribution:
every DRIFT verdict of `kcls.monitoring.drift.compare` on them is a false alarm. Prints a
Markdown table: the share of draws flagged at each N, for images (`kcls monitor --data`:
three tests) and for predictions only (`--predictions`: class and confidence tests),
and which test flagged them. The run's `kcls.monitoring.drift.MIN_REFERENCE_EXAMPLES`
is the smallest N whose rates stay within alpha on the models measured
(docs/monitoring.md).
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from kcls.layout import resolve_export_dir  # noqa: E402
from kcls.load import read_export_metadata  # noqa: E402
from kcls.monitoring.drift import ALPHA, build_profile, compare  # noqa: E402
from kcls.monitoring.monitor import image_files, image_outputs  # noqa: E402

SIZES = (20, 36, 50, 100, 150, 200, 300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an export (version or model folder)")
    parser.add_argument("folders", nargs="+", help="folders of in-distribution images")
    parser.add_argument("--current", type=int, default=50, help="current images per draw")
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    arguments = parser.parse_args()
    started = time.time()
    export_dir = resolve_export_dir(arguments.model)
    class_names = read_export_metadata(export_dir)["class_names"]
    paths = [path for folder in arguments.folders for path in image_files(Path(folder))]
    probabilities, embeddings, skipped = image_outputs(export_dir, paths)
    total = len(probabilities)
    print(f"model {export_dir}; {total} images ({len(skipped)} skipped), embedding "
          f"dimension {embeddings.shape[1]}; current sample {arguments.current}, "
          f"{arguments.draws} draws per size, alpha {ALPHA}")
    print("\n| reference images | images: false alarms | predictions only: false alarms "
          "| tests that flagged (images) |\n| ---: | ---: | ---: | --- |")
    for size in [size for size in arguments.sizes if size + arguments.current <= total]:
        flagged, flagged_predictions, tests = 0, 0, Counter()
        for draw in range(arguments.draws):
            order = np.random.default_rng(draw).permutation(total)
            reference = order[:size]
            current = order[size:size + arguments.current]
            profile = build_profile(probabilities[reference], embeddings[reference], None,
                                    class_names)
            classes, confidences = (probabilities[current].argmax(1),
                                    probabilities[current].max(1))
            images = compare(profile, classes, confidences, embeddings[current],
                             permutations=arguments.permutations, seed=draw)
            predictions = compare(profile, classes, confidences, seed=draw)
            flagged += images["drift"]
            flagged_predictions += predictions["drift"]
            tests.update(images["flagged"])
        print(f"| {size} | {flagged / arguments.draws:.2f} | "
              f"{flagged_predictions / arguments.draws:.2f} | "
              f"{', '.join(f'{name} {count}' for name, count in tests.most_common()) or '-'} |")
    print(f"\n{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
