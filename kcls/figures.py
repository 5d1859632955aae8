"""Matplotlib for files only: the Agg backend (no display on servers and CI) and one
way to save a figure (a PNG, written atomically through `kcls.files.atomic_path`).

Example:

>>> figure, axis = plt.subplots()  # doctest: +SKIP
>>> save_figure(figure, run_dir / "training_curves.png")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from kcls.files import atomic_path  # noqa: E402

DPI = 100


def save_figure(figure: plt.Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Saves `figure` as a PNG at `path` atomically, closes it and returns `path`."""
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=dpi, format="png")
    plt.close(figure)
    return Path(path)


__all__ = ["plt", "save_figure"]
