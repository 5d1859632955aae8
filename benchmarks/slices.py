"""Does `kcls evaluate --slice-by` find a site whose photos are darker?

    python benchmarks/slices.py MODEL [--photos ../shared/data/hymenoptera] [--dim 0.3]
        [--missing 3] [--out DIR]

Writes a manifest over the hymenoptera photos (`train/` rows as split `train`, `val/`
rows as the test split) with a synthetic `site` column: every other val photo of each
class darkened to `--dim` of its brightness (site `dim`, copies written beside the
manifest), the others site `bright`, and the first `--missing` photos of each class
without a site. Then evaluates MODEL (an export trained on `train/`, e.g. `kcls recipe
run finetune --set data.source=folder:../shared/data/hymenoptera/train`) on the test
split sliced by `site`, and prints the summary line and the seconds it took.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from kcls.evaluation.evaluate import evaluate_model  # noqa: E402


def write_manifest(photos: Path, out: Path, dim: float, missing: int) -> Path:
    """The manifest of the module docstring, in `out`; returns its path."""
    rows = ["path,label,split,site"]
    for label in sorted(folder.name for folder in (photos / "train").iterdir()):
        rows += [f"{path},{label},train," for path in sorted((photos / "train" / label).iterdir())]
        for index, path in enumerate(sorted((photos / "val" / label).iterdir())):
            if index < missing:
                rows.append(f"{path},{label},test,")
            elif index % 2:
                darker = out / label / f"{path.stem}.png"
                darker.parent.mkdir(parents=True, exist_ok=True)
                pixels = np.asarray(Image.open(path).convert("RGB"), np.float32) * dim
                Image.fromarray(pixels.astype(np.uint8)).save(darker)
                rows.append(f"{darker},{label},test,dim")
            else:
                rows.append(f"{path},{label},test,bright")
    (out / "manifest.csv").write_text("\n".join(rows) + "\n")
    return out / "manifest.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--photos", type=Path, default=Path("../shared/data/hymenoptera"))
    parser.add_argument("--dim", type=float, default=0.3)
    parser.add_argument("--missing", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    arguments = parser.parse_args()
    out = arguments.out or Path(tempfile.mkdtemp(prefix="kcls_slices_"))
    manifest = write_manifest(arguments.photos, out, arguments.dim, arguments.missing)
    start = time.perf_counter()
    evaluate_model(arguments.model, f"manifest:{manifest}", str(out / "report"),
                   slice_by="site")
    print(f"{time.perf_counter() - start:.1f} s; report {out / 'report' / 'report.md'}")


if __name__ == "__main__":
    main()
