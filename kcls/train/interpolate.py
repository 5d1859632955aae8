"""Weight-space interpolation between two points of one fine-tuning run (WiSE-FT).

Wortsman et al. 2022 ("Robust fine-tuning of zero-shot models") average the weights of
the model before fine-tuning and after it: `(1 - alpha) * start + alpha * end`. The two
lie in one basin of the loss, so the average is a model of its own, often more accurate
than either, and it costs nothing at inference. kcls's starting point is the end of the
frozen phase: the pretrained backbone with the head trained on it (a linear probe).

Example:

>>> start = snapshot_weights(classifier)  # doctest: +SKIP
>>> ...  # fine-tune
>>> interpolate_weights(classifier, start, alpha=0.5)  # doctest: +SKIP
"""

from __future__ import annotations

import keras
import numpy as np


def snapshot_weights(model: keras.Model) -> list[np.ndarray]:
    """A copy of every variable of `model` (trainable or not), in `model.weights` order."""
    return [np.array(variable.numpy(), copy=True) for variable in model.weights]


def interpolate_weights(model: keras.Model, start: list[np.ndarray], alpha: float) -> None:
    """Sets each floating-point variable of `model` to `(1 - alpha) * start + alpha * now`.

    Integer variables (e.g. a dropout layer's seed state) keep their current value.

    Args:
        model: the model, holding the end weights.
        start: `snapshot_weights(model)` taken at the starting point.
        alpha: float in [0, 1]: 0 gives the start, 1 leaves the end weights.
    """
    if len(start) != len(model.weights):
        raise ValueError(f"The snapshot holds {len(start)} variables, the model "
                         f"{len(model.weights)}: take it with snapshot_weights(model).")
    for variable, begin in zip(model.weights, start):
        if np.issubdtype(begin.dtype, np.floating):
            end = variable.numpy()
            variable.assign(((1.0 - alpha) * begin + alpha * end).astype(end.dtype))
