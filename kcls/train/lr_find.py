"""The learning-rate range test (Smith 2017, fastai's `lr_find`): which peak rate to train at.

The model trains for at most `steps` optimizer steps while the learning rate grows
exponentially from `min_rate` to `max_rate`; each step's loss is recorded, and the test
stops early once the loss diverges (its running average exceeds `DIVERGENCE` times the
lowest running average so far, or a loss is not finite). The weights are restored
afterwards (every model variable, BatchNorm statistics included), so the test leaves the
model as it found it.

The suggestion follows fastai's `lr_min` rule, **minimum / 10**: the rate at which the
smoothed loss is lowest, divided by 10. At the minimum the loss is about to blow up;
a tenth of it still descends fast and leaves a margin for the schedule's peak. The
smoothing is a centred moving average (no lag, so the minimum sits at the rate where it
happened), and the minimum is taken noise-aware: the highest rate, before the loss
climbs away, whose smoothed loss is within the noise of the lowest (on a curve that is
flat until it diverges, the lowest point is wherever the noise dipped). The steepest
descent of the smoothed curve is reported too, as a second opinion. Rates are peak
rates for kcls's warm-up + cosine schedule.

Example:

>>> result = find_learning_rate(model, batches, lambda rate: keras.optimizers.AdamW(rate),
...                             loss="categorical_crossentropy")  # doctest: +SKIP
>>> result.suggestion  # doctest: +SKIP
0.0021
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from scipy.ndimage import uniform_filter1d

MIN_RATE = 1e-7
MAX_RATE = 10.0
STEPS = 100
# Stop when the running (bias-corrected exponential) average of the loss exceeds this
# multiple of its lowest value: fastai's criterion.
DIVERGENCE = 4.0
RUNNING_AVERAGE_MOMENTUM = 0.9
# Width of the centred moving average the suggestion is read from, as a share of the steps.
SMOOTHING_FRACTION = 0.1
SUGGESTION_RULE = "minimum/10"


@dataclass
class LearningRateSearch:
    """The outcome of one range test.

    Attributes:
        learning_rates: the rate of each step taken, increasing.
        losses: the training loss of each step (one batch, float).
        smoothed_losses: `losses` after a centred moving average.
        suggestion: the suggested peak learning rate (`rule`).
        rule: how `suggestion` was chosen (`minimum/10`).
        minimum_rate: the rate at the lowest smoothed loss.
        steepest_rate: the rate of the steepest descent of the smoothed loss, before its
            minimum (None when the loss never fell).
        diverged: whether the test stopped early because the loss diverged.
    """

    learning_rates: list[float]
    losses: list[float]
    smoothed_losses: list[float]
    suggestion: float
    rule: str
    minimum_rate: float
    steepest_rate: float | None
    diverged: bool
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The suggestion and how it was found, without the curve (for run.json)."""
        return {key: value for key, value in asdict(self).items()
                if key not in ("learning_rates", "losses", "smoothed_losses")} | {
            "steps": len(self.losses)}


class ExponentialRamp(keras.optimizers.schedules.LearningRateSchedule):
    """`start * (stop / start) ** (step / (steps - 1))`: from `start` at step 0 to `stop`.

    Args:
        start: float, the first step's rate.
        stop: float, the rate of step `steps - 1`.
        steps: int, the number of steps of the ramp.
    """

    def __init__(self, start: float, stop: float, steps: int) -> None:
        self.start, self.stop, self.steps = float(start), float(stop), int(steps)

    def __call__(self, step):
        fraction = keras.ops.cast(step, "float32") / max(self.steps - 1, 1)
        return self.start * keras.ops.power(self.stop / self.start, fraction)

    def rate(self, step: int) -> float:
        """The rate of `step`, in Python."""
        return self.start * (self.stop / self.start) ** (step / max(self.steps - 1, 1))

    def get_config(self) -> dict[str, Any]:
        return {"start": self.start, "stop": self.stop, "steps": self.steps}


class _LossRecorder(keras.callbacks.Callback):
    """Records each step's loss and stops training when the loss diverges."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []
        self.diverged = False
        self._average = 0.0
        self._best = math.inf

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {})["loss"])
        # The logged loss is the mean since the last reset: reset after every step so
        # that it is the loss of one batch.
        self.model.reset_metrics()
        self.losses.append(loss)
        self._average = (RUNNING_AVERAGE_MOMENTUM * self._average
                         + (1 - RUNNING_AVERAGE_MOMENTUM) * loss)
        average = self._average / (1 - RUNNING_AVERAGE_MOMENTUM ** len(self.losses))
        self._best = min(self._best, average)
        if not math.isfinite(loss) or average > DIVERGENCE * self._best:
            self.diverged = True
            self.model.stop_training = True


def find_learning_rate(model: keras.Model, batches: tf.data.Dataset,
                       make_optimizer: Callable[[keras.optimizers.schedules.LearningRateSchedule],
                                                keras.Optimizer],
                       loss: keras.losses.Loss | str, *, steps: int = STEPS,
                       min_rate: float = MIN_RATE, max_rate: float = MAX_RATE,
                       jit_compile: bool = False, verbose: int | str = 0) -> LearningRateSearch:
    """Runs the range test on `model` and restores its weights afterwards.

    Args:
        model: keras.Model to train (compiled here, with `loss` and the optimizer).
        batches: training batches, `(inputs, targets[, sample_weights])`; at least
            `steps` of them (an infinite dataset is fine).
        make_optimizer: the optimizer for a learning-rate schedule; the one the real
            training uses, so that the suggestion is for it.
        loss: the training loss.
        steps: int >= 5, the most steps the test takes (fewer when the loss diverges).
        min_rate: float, the first step's learning rate.
        max_rate: float, the last step's learning rate.
        jit_compile: compile the step with XLA.
        verbose: `fit()` verbosity.

    Returns:
        LearningRateSearch with the curve and the suggestion.

    Raises:
        ValueError: bad bounds or step count, or fewer than 5 steps ran (too few batches).
    """
    if not 0 < min_rate < max_rate:
        raise ValueError(f"The range test needs 0 < min_rate < max_rate, got {min_rate} and "
                         f"{max_rate}.")
    if steps < 5:
        raise ValueError(f"The range test needs at least 5 steps, got {steps}.")
    ramp = ExponentialRamp(min_rate, max_rate, steps)
    recorder = _LossRecorder()
    saved = [(variable, variable.numpy()) for variable in model.variables]
    try:
        model.compile(optimizer=make_optimizer(ramp), loss=loss, jit_compile=jit_compile)
        model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=verbose, shuffle=False,
                  callbacks=[recorder])
    finally:
        for variable, value in saved:
            variable.assign(value)
    if len(recorder.losses) < 5:
        raise ValueError(f"The range test ran {len(recorder.losses)} steps; it needs at least "
                         "5 batches of training data.")
    rates = [ramp.rate(step) for step in range(len(recorder.losses))]
    return suggest_learning_rate(rates, recorder.losses, recorder.diverged)


def suggest_learning_rate(learning_rates: list[float], losses: list[float],
                          diverged: bool = False) -> LearningRateSearch:
    """The `minimum/10` suggestion for a recorded range test (see the module docstring).

    Args:
        learning_rates: increasing rates, one per step.
        losses: the loss of each step (non-finite values count as divergence).
        diverged: whether the test stopped because the loss diverged.
    """
    rates = np.asarray(learning_rates, dtype="float64")
    raw = np.asarray(losses, dtype="float64")
    finite = np.isfinite(raw)
    # A non-finite loss ends the usable curve.
    usable = int(np.argmin(finite)) if not finite.all() else len(raw)
    usable = max(usable, 1)
    window = max(3, int(round(SMOOTHING_FRACTION * len(raw))) | 1)
    smoothed = np.full_like(raw, np.nan)
    smoothed[:usable] = uniform_filter1d(raw[:usable], size=min(window, usable), mode="nearest")
    lowest = _noise_aware_minimum(raw[:usable], smoothed[:usable], window)
    notes = []
    steepest = None
    if lowest > 0:
        slopes = np.gradient(smoothed[:lowest + 1], np.log(rates[:lowest + 1]))
        steepest = float(rates[int(np.argmin(slopes))])
    else:
        notes.append("the loss never fell: lower min_rate, or check the data and labels")
    if not diverged and lowest >= usable - max(window // 2, 1):
        notes.append("the loss was still falling at max_rate: raise max_rate or steps")
    return LearningRateSearch(
        learning_rates=rates.tolist(), losses=raw.tolist(),
        smoothed_losses=[float(value) for value in smoothed],
        suggestion=float(rates[lowest] / 10), rule=SUGGESTION_RULE,
        minimum_rate=float(rates[lowest]), steepest_rate=steepest, diverged=diverged,
        notes=notes)


def _noise_aware_minimum(raw: np.ndarray, smoothed: np.ndarray, window: int) -> int:
    """The index of the highest rate, before the loss climbs away, whose smoothed loss is
    within noise of the lowest.

    On a curve that stays flat until it diverges (a head that already fits, a noisy
    loss), the lowest point is wherever the noise dipped, possibly near the smallest
    rates; every point within noise of it is as good a minimum, and the highest of them
    is where the loss actually stops improving. The noise is the robust spread (median
    absolute deviation) of the losses around the smoothed curve before the minimum,
    divided by the square root of the smoothing window.
    """
    lowest = int(np.argmin(smoothed))
    before = slice(0, lowest + 1) if lowest >= 4 else slice(0, len(raw))
    residuals = raw[before] - smoothed[before]
    spread = 1.4826 * float(np.median(np.abs(residuals - np.median(residuals))))
    tolerance = 4.0 * spread / np.sqrt(window)
    rising = np.flatnonzero(smoothed[lowest:] > smoothed[lowest] + 4.0 * tolerance)
    end = lowest + int(rising[0]) if rising.size else len(smoothed)
    within = np.flatnonzero(smoothed[:end] <= smoothed[lowest] + tolerance)
    return int(within[-1])


def plot_learning_rate_search(search: LearningRateSearch, path: str | Path,
                              title: str = "") -> Path:
    """Writes the loss against the learning rate (log axis), the suggestion marked, as a PNG.

    Written atomically (`kcls.figures.save_figure`).
    """
    from kcls.figures import plt, save_figure  # matplotlib only when plotting

    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.plot(search.learning_rates, search.losses, color="0.75", linewidth=1,
              label="loss per step")
    axes.plot(search.learning_rates, search.smoothed_losses, color="C0", linewidth=2,
              label="smoothed")
    axes.axvline(search.minimum_rate, color="0.4", linestyle=":",
                 label=f"minimum {search.minimum_rate:.2g}")
    axes.axvline(search.suggestion, color="C3", linestyle="--",
                 label=f"suggestion ({search.rule}) {search.suggestion:.2g}")
    if search.steepest_rate is not None:
        axes.axvline(search.steepest_rate, color="C2", linestyle=":",
                     label=f"steepest descent {search.steepest_rate:.2g}")
    # Up to the minimum: a diverged tail would flatten the interesting part.
    rates = np.asarray(search.learning_rates)
    shown = rates <= search.minimum_rate
    curves = np.concatenate([np.asarray(search.smoothed_losses)[shown],
                             np.asarray(search.losses)[shown]])
    curves = curves[np.isfinite(curves)]
    if curves.size:
        low, high = np.percentile(curves, [1, 99])
        margin = 0.15 * (high - low) + 1e-3
        axes.set_ylim(low - margin, high + 2 * margin)
    axes.set_xscale("log")
    axes.set_xlabel("learning rate (peak)")
    axes.set_ylabel("training loss")
    axes.set_title(title or "learning-rate range test")
    axes.legend(fontsize=8)
    return save_figure(figure, path)
