"""`kcls lr-find`: the learning-rate range test of one phase of a recipe.

Example:

>>> search = find_recipe_learning_rate(load_recipe("finetune"), "unfrozen")  # doctest: +SKIP
>>> search.suggestion  # doctest: +SKIP
0.00042
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from kcls.config import ConfigError, Recipe
from kcls.data.sources import Splits
from kcls.files import check_output_dir, write_json
from kcls.layout import LR_FIND_FILE, LR_FIND_PLOT
from kcls.train.lr_find import LearningRateSearch, plot_learning_rate_search
from kcls.train.phases import find_phase_learning_rate
from kcls.train.schedule import plan_phases
from kcls.workflows.prepare import prepare


def find_recipe_learning_rate(recipe: Recipe, phase: str | None = None,
                              out_dir: str | Path = ".", steps: int | None = None,
                              overwrite: bool = False, log: Callable[[str], None] = print,
                              verbose: int | str = 0,
                              splits: Splits | None = None) -> LearningRateSearch:
    """The learning-rate range test of one phase of `recipe`, on its data and model.

    `kcls lr-find` calls it. The model is the recipe's (pretrained weights, new head)
    frozen or unfrozen as `phase` trains it, prepared as a run prepares it
    (`kcls.workflows.prepare`: the same training split, optimizer, layer decay, loss,
    augmentation and batches); its weights are left unchanged. Writes
    `<out_dir>/lr_find.png` (loss against rate, the suggestion marked) and
    `<out_dir>/lr_find.json` (the curve and the suggestion). Under
    `train.learning_rate=auto` a run does this itself before each phase, the unfrozen
    phase's test then starting from the head the frozen phase trained.

    Args:
        recipe: Recipe, the resolved configuration.
        phase: `frozen` or `unfrozen`; None: the recipe's first phase.
        out_dir: folder for the plot and the JSON.
        steps: int, the most steps the test takes (one batch each); None: the recipe's
            `train.lr_find_steps`.
        overwrite: replace an existing plot and JSON in `out_dir`.
        log: receives one-line progress messages.
        verbose: `fit()` verbosity.
        splits: data to use instead of `recipe.data.source`.

    Returns:
        LearningRateSearch: the curve and `suggestion`, the phase's peak rate.

    Raises:
        ConfigError: an unknown or empty phase, files in the way, data, backbone or
            weights that cannot be found, or train.strategy=multiworker.
        OutputFolderError: `out_dir` cannot be written (checked before the test runs).
    """
    if recipe.train.strategy == "multiworker":
        raise ConfigError("kcls lr-find runs in one process: use --set train.strategy=auto "
                          "(a run with train.learning_rate=auto tests rates on its workers).")
    phases = {planned.name: planned for planned in plan_phases(recipe.train)}
    phase = phase or next(iter(phases))
    if phase not in phases:
        raise ConfigError(f"The recipe {recipe.name!r} has no {phase!r} phase (it trains "
                          f"{', '.join(phases)}): pick one of those, or give the phase epochs "
                          f"with --set train.{phase}_epochs=N.")
    out_dir = check_output_dir(out_dir)  # before the range test, not after it
    plot, curve = out_dir / LR_FIND_PLOT, out_dir / LR_FIND_FILE
    existing = [str(path) for path in (plot, curve) if path.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{', '.join(existing)} already exist: pass --overwrite to replace "
                          "them, or another --out folder.")
    prepared = prepare(recipe, splits)
    if steps is None:
        steps = recipe.train.lr_find_steps
    log(f"learning-rate range test | recipe {recipe.name} | {phase} phase | at most {steps} "
        f"steps of batch {recipe.data.batch_size} | {prepared.precision} | train "
        f"{prepared.splits.sizes['train']}")
    search = find_phase_learning_rate(
        prepared.classifier, prepared.train_batches, prepared.train_config, phases[phase],
        prepared.device_augmentation, prepared.strategy, steps=steps, verbose=verbose,
        objective=prepared.objective())
    plot_learning_rate_search(search, plot,
                              title=f"{recipe.name}: learning-rate range test, {phase} phase")
    write_json(curve, {"recipe": recipe.name, "phase": phase, **asdict(search)}, indent=1)
    return search
