"""Time budgets: plan the schedule from the measured step time so a run ends on time.

`train.time_budget=8m` gives a run a wall-clock budget, measured from its first
training step (so it includes compiling the step) to the end of the export. Nothing
is cut off mid-schedule: each phase measures its step time in its first steps, sets
its epoch count from it, and its warm-up and cosine decay span exactly those epochs
(the schedule's length is a variable, so changing it recompiles nothing). After every
epoch the plan is checked against the clock and shortened (or lengthened) when the
measured epochs ran slower (or faster) than the estimate. EMA, the final evaluation
and the export are planned in: their time is reserved before the phases share the rest.

How the time is shared:

    budget = training (the phases, each its share) + reserve (evaluation + export)
    share of a phase = its configured epochs / the configured epochs of all phases

so `frozen_epochs=1, unfrozen_epochs=4` gives the frozen phase a fifth of the
training time: the configured epochs set the proportions, the budget the length.

A budget is a ceiling, not a target: a budgeted phase also stops when its validation
loss (the training loss without validation data) has not improved for `TimeBudget.patience`
epochs (`PLATEAU_PATIENCE` by default), keeping its best epoch's weights
(`kcls.train.phases`), and the remaining time goes to the next phase or is not spent. A
plan grows only when at least `PLAN_SLACK` more epochs fit (it shrinks at once when the
deadline needs it), so the epoch totals the progress lines show stay put instead of
drifting by an epoch or two at every re-plan. When a phase's share is shorter than its
first epoch, the planner says so (`BudgetPlanner`'s `log`): a phase trains at least one
epoch, and the run then takes longer than its budget.

A budgeted run is planned for one sitting: it keeps no resume backup (a restarted run
would start a new budget). Several workers (MultiWorkerMirroredStrategy) follow one plan,
the chief's, shared at every re-plan: workers that planned different epoch counts would
wait on each other forever. Durations are parsed by `kcls.config.parse_duration`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras

from kcls.train.schedule import WarmupCosine

# Timed steps after the first one (which traces and compiles) before the first plan.
CALIBRATION_STEPS = 5
# Upper bound on a budgeted phase's epochs, the `epochs` its fit() call gets.
MAX_EPOCHS = 100_000
# A forward pass costs about a third of a training step (forward + backward ~ 3 forwards);
# evaluation batches are larger and run without gradients, so this is on the safe side.
FORWARD_COST = 1.0 / 3.0
# Epochs without a better validation loss after which a budgeted phase stops (Keras
# EarlyStopping's rule): on 129 training images an 8-minute budget ran 83 epochs, its
# validation loss flat from epoch 37 (issue #29).
PLATEAU_PATIENCE = 10
# A plan grows only when this share more epochs (at least one) fit: re-plans after every
# epoch otherwise moved the total by one or two (22, 24, ...) on measurement noise.
PLAN_SLACK = 0.1


@dataclass
class TimeBudget:
    """A wall-clock budget for training plus what follows it.

    Attributes:
        seconds: the whole budget, from the first training step to the end of the run.
        evaluation_images: images predicted after training (test split, times 2 with
            flip TTA); their time is estimated from the training step time and reserved.
        fixed_seconds: time reserved after training that does not scale with images
            (saving weights, the report's plots, the SavedModel export).
        clock: seconds on a monotonic clock (`time.monotonic`).
        started: `clock()` at the first training step, set when training starts.
        plans: one record per phase: its plan and, once it ends, the actual epochs/seconds.
        patience: a phase stops after this many epochs without a better validation loss
            (the budget is a ceiling); `train.early_stopping_patience`, when set, wins.
    """

    seconds: float
    evaluation_images: int = 0
    fixed_seconds: float = 0.0
    clock: Callable[[], float] = time.monotonic
    started: float | None = None
    plans: list[dict[str, Any]] = field(default_factory=list)
    patience: int = PLATEAU_PATIENCE

    def reserve(self, seconds_per_image: float) -> float:
        """Seconds kept for evaluation and export, given the training time per image."""
        return self.evaluation_images * seconds_per_image * FORWARD_COST + self.fixed_seconds

    def elapsed(self) -> float:
        """Seconds since the first training step (0 before it)."""
        return 0.0 if self.started is None else self.clock() - self.started

    def summary(self) -> dict[str, Any]:
        """The plan of each phase next to what happened, for `run.json`."""
        return {"budget_seconds": self.seconds, "elapsed_seconds": round(self.elapsed(), 1),
                "reserved_after_training_seconds": self.plans[0].get(
                    "reserved_after_training_seconds") if self.plans else None,
                "plateau_patience": self.patience, "phases": self.plans}

    def overrun(self) -> str:
        """What made the run take longer than its budget, for the log ('' if it did not)."""
        over = self.elapsed() - self.seconds
        if over <= 0:
            return ""
        if all(plan.get("actual_epochs") == 1 for plan in self.plans):
            return ("over the budget, which is shorter than the least the run does (an epoch "
                    "per phase, the evaluation and the export)")
        # Between and after the phases: the evaluation, the export, and the little between.
        after = self.elapsed() - sum(plan.get("actual_seconds", 0.0) for plan in self.plans)
        reserved = self.plans[-1].get("reserved_after_training_seconds", 0.0)
        if after > reserved:
            return (f"{over:.0f} s over the budget: the evaluation and the export took "
                    f"{after:.0f} s, {reserved:.0f} s were reserved for them")
        return f"{over:.0f} s over the budget: the epochs ran slower than planned"


class BudgetPlanner(keras.callbacks.Callback):
    """Sets the epochs of one phase so that it ends by its share of the budget.

    Used as a callback of the phase's `fit(epochs=first_epoch + MAX_EPOCHS)`: it times
    the steps after the first, then sets `schedule.total_steps` to the planned epochs
    and stops training at the end of the last planned epoch. It re-plans after every
    epoch from the measured epoch times (training and validation).

    Args:
        budget: TimeBudget shared by the phases (its clock starts at the first step).
        schedule: the phase's learning-rate schedule.
        first_epoch: the epoch index the phase starts at.
        steps_per_epoch: training steps per epoch.
        batch_size: global batch size, to turn step time into time per image.
        share: this phase's fraction of the training time still to be spent, in (0, 1].
        name: phase name, for the plan record.
        agree: called with this process's planned epochs at every (re-)plan, returns the
            plan to follow: under several workers the chief's
            (`kcls.train.cluster.broadcast_from_chief`, a collective every worker makes at
            the same step). None: the process's own.
        log: receives the planner's messages (a share shorter than one epoch); None
            drops them.
    """

    def __init__(self, budget: TimeBudget, schedule: WarmupCosine, first_epoch: int,
                 steps_per_epoch: int, batch_size: int, share: float, name: str,
                 agree: Callable[[int], float] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.agree = agree or (lambda planned: planned)
        self.log = log or (lambda message: None)
        self.name = name
        self.budget = budget
        self.schedule = schedule
        self.first_epoch = first_epoch
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size
        self.share = share
        self.planned_epochs: int | None = None
        self.plan: dict[str, Any] = {"phase": name}
        budget.plans.append(self.plan)
        self._phase_start = self._phase_end_by = 0.0
        self._batch_start = self._epoch_start = self._test_start = 0.0
        self._steps = 0
        self._step_seconds_total = 0.0  # of every step but the phase's first
        self._epoch_seconds: list[float] = []
        self._validation_seconds: list[float] = []  # per validation batch, untraced
        self._validation_batches = 0

    def on_train_begin(self, logs=None):
        self._phase_start = self.budget.clock()
        if self.budget.started is None:
            self.budget.started = self._phase_start

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self.budget.clock()

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_start = self.budget.clock()

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        if self._steps > 1:  # the first step also traced and compiled
            self._step_seconds_total += self.budget.clock() - self._batch_start
        if self._steps == 1 + CALIBRATION_STEPS and self.planned_epochs is None:
            self._replan(epochs_done=0, steps_into_epoch=self._steps)

    def on_test_begin(self, logs=None):
        self._validation_batches = 0

    def on_test_batch_begin(self, batch, logs=None):
        self._test_start = self.budget.clock()

    def on_test_batch_end(self, batch, logs=None):
        self._validation_batches += 1
        if self._validation_seconds or self._validation_batches > 1:  # the first traced
            self._validation_seconds.append(self.budget.clock() - self._test_start)

    def on_epoch_end(self, epoch, logs=None):
        self._epoch_seconds.append(self.budget.clock() - self._epoch_start)
        done = epoch + 1 - self.first_epoch
        self._replan(epochs_done=done, steps_into_epoch=0)
        if done >= self.planned_epochs:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.plan["actual_epochs"] = len(self._epoch_seconds)
        self.plan["actual_seconds"] = round(self.budget.clock() - self._phase_start, 1)

    def _step_seconds(self) -> float:
        if self._steps > 1:
            return self._step_seconds_total / (self._steps - 1)
        return self._epoch_seconds[0] / self.steps_per_epoch

    def _full_epoch_seconds(self, step: float) -> float:
        """Wall time of one epoch: measured once an epoch without compiling has run."""
        if len(self._epoch_seconds) > 1:
            steady = self._epoch_seconds[1:]
            return sum(steady) / len(steady)
        validation = self._validation_batches * (
            sum(self._validation_seconds) / len(self._validation_seconds)
            if self._validation_seconds else step * FORWARD_COST)
        return self.steps_per_epoch * step + validation

    def _replan(self, epochs_done: int, steps_into_epoch: int) -> None:
        now = self.budget.clock()
        step = self._step_seconds()
        epoch_seconds = self._full_epoch_seconds(step)
        if self.planned_epochs is None:  # the first plan fixes this phase's deadline
            # The phase's share counts from its start, so every phase pays for compiling
            # its step out of its own share.
            reserve = self.budget.reserve(step / self.batch_size)
            training_left = (self.budget.seconds - (self._phase_start - self.budget.started)
                             - reserve)
            self._phase_end_by = self._phase_start + max(training_left, 0.0) * self.share
            self.plan.update(reserved_after_training_seconds=round(reserve, 1),
                             planned_seconds=round(self._phase_end_by - self._phase_start, 1))
        in_progress = 1 if steps_into_epoch else 0
        rest_of_epoch = in_progress * (epoch_seconds - steps_into_epoch * step)
        more = math.floor(max(self._phase_end_by - now - rest_of_epoch, 0.0) / epoch_seconds)
        fits = epochs_done + in_progress + more
        if self.planned_epochs is None and now + rest_of_epoch > self._phase_end_by:
            self.log(f"warning: the {self.name} phase's share of the time budget "
                     f"({self._phase_end_by - self._phase_start:.0f} s) is shorter than one of "
                     f"its epochs (~{epoch_seconds:.0f} s measured): it trains {max(fits, 1)} "
                     "epoch, the least a phase trains, and the run takes longer than its budget "
                     "(raise train.time_budget, or lower train.steps_per_epoch)")
        planned = int(self.agree(min(max(self._stable(fits), 1), MAX_EPOCHS)))
        if planned != self.planned_epochs:
            self.planned_epochs = planned
            self.schedule.total_steps.assign(float(planned * self.steps_per_epoch))
        self.plan.setdefault("first_planned_epochs", planned)
        self.plan.update(planned_epochs=planned, step_seconds=round(step, 4))

    def _stable(self, fits: int) -> int:
        """The epochs to plan when `fits` fit: fewer at once (the deadline), more only
        when at least `PLAN_SLACK` more (one epoch or more) fit than planned."""
        planned = self.planned_epochs
        if planned is None or fits < planned:
            return fits
        return fits if fits >= planned + max(1, math.ceil(PLAN_SLACK * planned)) else planned


class BudgetProgress(keras.callbacks.ProgbarLogger):
    """Keras' progress bar, headed by the epoch of the budgeted phase and its plan
    (`epoch_header`)."""

    def __init__(self, planner: BudgetPlanner) -> None:
        super().__init__()
        self.planner = planner

    def on_epoch_begin(self, epoch, logs=None):
        self._reset_progbar()
        self._maybe_init_progbar()
        if self.verbose:
            print(epoch_header(self.planner, epoch), flush=True)


def epoch_header(planner: BudgetPlanner, epoch: int) -> str:
    """The line above a budgeted epoch's progress: the epoch within its phase over the
    phase's plan, and the run's epoch counter (`unfrozen epoch 3/40 (run epoch 5)`).

    A phase's epochs are counted on their own: the run's total is not known before the
    later phases have timed their steps.
    """
    within = epoch + 1 - planner.first_epoch
    planned = planner.planned_epochs
    plan = (f"/{planned}" if planned is not None else
            f" (its epochs are planned after its first {CALIBRATION_STEPS + 1} steps)")
    return f"{planner.name} epoch {within}{plan} (run epoch {epoch + 1})"
