"""Search spaces: which recipe keys `kcls tune` varies, and over what.

A space maps recipe keys (the `--set` keys, `train.learning_rate`) to a range: a
`FloatRange` (optionally on a log scale), an `IntRange` or a `Choice` of values. It is
data, like a recipe: `kcls tune RECIPE --space NAME` takes a preset of `PRESETS`, and
`--space my_space.py` a module whose `get_space()` returns such a dict:

    from kcls.tuning.space import Choice, FloatRange

    def get_space():
        return {"train.learning_rate": FloatRange(1e-4, 1e-2, log=True),
                "data.augment": Choice(("light", "strong")),
                "data.mixup": FloatRange(0.0, 0.5)}   # the strength of `strong`

Sampled floats are rounded to three significant digits before a trial uses them, so
the recipe a trial ran is the one its table row and the best recipe file show.

Example:

>>> space = load_space("finetune", Recipe(name="demo"))
>>> sorted(space)[:2]
['data.augment', 'data.image_size']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from kcls.config import ConfigError, Recipe, apply_overrides, valid_keys
from kcls.recipes import load_recipe_module


@dataclass(frozen=True)
class FloatRange:
    """Floats from `low` to `high` (inclusive), uniformly or, with `log`, log-uniformly."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        if self.low >= self.high or (self.log and self.low <= 0):
            raise ConfigError(f"FloatRange({self.low}, {self.high}, log={self.log}) is empty or "
                              "has a log scale through 0: give low < high (and low > 0 on a "
                              "log scale).")


@dataclass(frozen=True)
class IntRange:
    """Integers from `low` to `high`, both included."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ConfigError(f"IntRange({self.low}, {self.high}) is empty: give low < high.")


@dataclass(frozen=True)
class Choice:
    """One of `options` (strings, numbers, booleans or None), unordered."""

    options: tuple[Any, ...]

    def __post_init__(self) -> None:
        if len(self.options) < 2:
            raise ConfigError(f"Choice({self.options!r}) offers no choice: give two or more "
                              "options.")


Range = Union[FloatRange, IntRange, Choice]

# The settings that matter when fine-tuning a pretrained backbone (docs/tuning.md).
# Under a per-trial time budget the two phases' epochs only set their shares of the
# time, so `train.frozen_epochs` (against the recipe's unfrozen epochs) is the split.
FINETUNE = {
    "train.learning_rate": FloatRange(1e-3, 1e-2, log=True),
    "train.unfrozen_lr_factor": FloatRange(0.03, 0.3, log=True),
    "train.layer_decay": Choice((1.0, 0.85, 0.7)),
    "train.frozen_epochs": IntRange(0, 4),
    "data.augment": Choice(("none", "light", "randaugment", "strong")),
    "data.image_size": Choice((128, 160, 224)),
}
# Training from random initialisation (quickstart, cifar10_fast): no phase split.
SCRATCH = {
    "train.learning_rate": FloatRange(3e-4, 3e-2, log=True),
    "train.weight_decay": FloatRange(1e-5, 1e-3, log=True),
    "data.augment": Choice(("none", "light", "randaugment", "strong")),
    "model.backbone": Choice(("resnet_v2_tiny", "compact_resnet")),
}
PRESETS: dict[str, dict[str, Range]] = {"finetune": FINETUNE, "scratch": SCRATCH}


def load_space(name_or_path: str, recipe: Recipe) -> dict[str, Range]:
    """The space `name_or_path` (a preset name or a `.py` file with `get_space()`),
    checked against `recipe`: every key exists and every bound and option is a value the
    recipe accepts.

    Raises:
        ConfigError: an unknown preset, a file without `get_space()`, an unknown key, or
            a bound or option the recipe refuses (the message names it and the fix).
    """
    if name_or_path.endswith(".py"):
        get_space = getattr(load_recipe_module(name_or_path), "get_space", None)
        if not callable(get_space):
            raise ConfigError(f"{name_or_path} has no get_space() function returning a dict "
                              "of recipe keys to FloatRange, IntRange or Choice.")
        space = get_space()
    elif name_or_path in PRESETS:
        space = PRESETS[name_or_path]
    else:
        raise ConfigError(f"Unknown search space {name_or_path!r}: use a preset "
                          f"({', '.join(PRESETS)}) or a path to a .py file with get_space().")
    check_space(space, recipe, name_or_path)
    return dict(space)


def check_space(space: dict[str, Range], recipe: Recipe, name: str) -> None:
    """Raises ConfigError unless every key of `space` is a recipe key and every bound
    and option of it makes a valid recipe."""
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"The search space {name!r} is empty or not a dict of recipe keys "
                          "to FloatRange, IntRange or Choice.")
    keys = valid_keys(recipe)
    for key, value_range in space.items():
        if key not in keys:
            raise ConfigError(f"The search space {name!r} names {key!r}, which is no recipe "
                              f"key. Valid keys: {', '.join(keys)}.")
        if not isinstance(value_range, (FloatRange, IntRange, Choice)):
            raise ConfigError(f"{key!r} in the search space {name!r} is {value_range!r}: "
                              "expected a FloatRange, IntRange or Choice.")
        for value in extremes(value_range):
            try:
                apply_overrides(recipe, overrides({key: value}))
            except ConfigError as error:
                raise ConfigError(f"The search space {name!r} offers {key}={value!r}, which "
                                  f"the recipe refuses: {error}") from None


def extremes(value_range: Range) -> tuple[Any, ...]:
    """The values that bound a range: its two ends, or every option of a choice."""
    if isinstance(value_range, Choice):
        return value_range.options
    return (value_range.low, value_range.high)


def distributions(space: dict[str, Range]) -> dict[str, Any]:
    """The space as Optuna distributions, `{key: optuna.distributions.*}`."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    converted = {}
    for key, value_range in space.items():
        if isinstance(value_range, FloatRange):
            converted[key] = FloatDistribution(value_range.low, value_range.high,
                                               log=value_range.log)
        elif isinstance(value_range, IntRange):
            converted[key] = IntDistribution(value_range.low, value_range.high)
        else:
            converted[key] = CategoricalDistribution(value_range.options)
    return converted


def rounded(params: dict[str, Any]) -> dict[str, Any]:
    """`params` with floats rounded to three significant digits (what trials use)."""
    return {key: float(f"{value:.3g}") if isinstance(value, float) else value
            for key, value in params.items()}


def overrides(params: dict[str, Any]) -> list[str]:
    """`{"train.learning_rate": 0.003, "train.layer_decay": None}` as `--set` strings."""
    def text(value: Any) -> str:
        if value is None:
            return "none"
        return str(value).lower() if isinstance(value, bool) else str(value)

    return [f"{key}={text(value)}" for key, value in params.items()]


def describe(space: dict[str, Range]) -> str:
    """One line per key: `train.learning_rate: 0.001 to 0.01 (log)`."""
    lines = []
    for key, value_range in space.items():
        if isinstance(value_range, Choice):
            lines.append(f"{key}: one of {', '.join(map(repr, value_range.options))}")
        else:
            scale = " (log)" if getattr(value_range, "log", False) else ""
            lines.append(f"{key}: {value_range.low} to {value_range.high}{scale}")
    return "\n".join(lines)


__all__ = ["PRESETS", "Choice", "FloatRange", "IntRange", "Range", "describe",
           "distributions", "load_space", "overrides", "rounded"]
