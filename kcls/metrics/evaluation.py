"""`Evaluation`: test metrics together with the predictions they were computed from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Evaluation:
    """Test metrics and the predictions they were computed from.

    Attributes:
        metrics: dict of the task's metrics (`Task.evaluate`).
        probabilities: float32 `[N, C]` served probabilities (after calibration; without
            test-time augmentation).
        labels: the truth: int64 `[N]` classes (single-label) or float32 `[N, C]`
            multi-hot targets (multi-label).
        skipped: list[str] of the data's files that did not reach the model (unreadable
            or undecodable images; see `kcls.data.folder`), not counted in `N`.
        uncalibrated_probabilities: float32 `[N, C]` before temperature scaling, or None.
        files: list[str] of the image file of each of the N examples, in order, when the
            data is made of files (folders, manifests), else None.
    """

    metrics: dict[str, Any]
    probabilities: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    skipped: list[str] = field(default_factory=list)
    uncalibrated_probabilities: np.ndarray | None = field(default=None, repr=False)
    files: list[str] | None = field(default=None, repr=False)
