"""The `kcls` command line: parses arguments, calls the library, prints results.

    kcls [--debug] recipe list
    kcls recipe show NAME [--set key=value ...]
    kcls recipe run NAME [--set key=value ...] [--out DIR] [--workers N]
    kcls predict MODEL IMAGE_OR_FOLDER_OR_GLOB... [--top-k K] [--output FILE.csv|FILE.jsonl]
    kcls predict --server http://HOST:8501 --model NAME IMAGE...   (TF Serving REST)
    kcls predict --grpc HOST:8500 --model NAME IMAGE...            (TF Serving gRPC)
    kcls predict --server URL --model NAME --log FILE.jsonl IMAGE...  (and log the answers)
    kcls export RUN_DIR [--base-dir DIR] [--model-name NAME] [--format saved_model|onnx]
    kcls explain MODEL_DIR IMAGE... [--out DIR]
    kcls evaluate MODEL_DIR [--data SOURCE] [--out DIR] [--flip-tta] [--slice-by COLUMN|path:N]
    kcls optimize RUN_OR_MODEL --method ptq-int8 [--io-type int8] [--per-tensor] [--out DIR]
    kcls monitor MODEL_DIR (--data FOLDER | --predictions FILE.jsonl) [--out DIR] [--alpha A]
    kcls pretrain FOLDER [--backbone NAME] [--knn LABELLED_FOLDER] [--set pretrain.KEY=VALUE]
    kcls lr-find RECIPE [--set key=value ...] [--phase frozen|unfrozen] [--out DIR]
    kcls tune RECIPE --budget 2h [--space finetune|FILE.py] [--trial-budget 10m] [--out DIR]
    kcls data pack SOURCE OUT_DIR [--recipe NAME] [--set data.KEY=VALUE] [--shard-size 128MB]
    kcls data check SOURCE [--recipe NAME] [--set data.KEY=VALUE] [--out DIR]
    kcls data label-issues SOURCE [--recipe NAME] [--set KEY=VALUE] [--folds K] [--out DIR]
"""

from __future__ import annotations

import os
import shlex
import sys
import warnings
from pathlib import Path

# TensorFlow's C++ start-up chatter (CUDA probing, CPU feature notes) is noise on a
# command line; set TF_CPP_MIN_LOG_LEVEL=0 to see it. Must precede importing TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402

from kcls.config import Recipe, apply_overrides, to_json  # noqa: E402
from kcls.recipes import list_recipes, load_recipe  # noqa: E402

SET_HELP = "Override a config value, e.g. --set train.frozen_epochs=3 (repeatable)."
MODEL_DIR = click.argument("model_dir",
                           type=click.Path(exists=True, file_okay=False, path_type=Path))
# kcls's own errors by module, and how each ends a command: as a usage error (exit 2) or
# a failure (exit 1). Looked up in `sys.modules`: an error's module is loaded if it raised
# one, and `kcls recipe list` never pays for importing TensorFlow.
USER_ERRORS = (
    ("kcls.config", "ConfigError", click.UsageError),
    ("kcls.files", "OutputFolderError", click.UsageError),
    ("kcls.layout", "CacheDirError", click.UsageError),
    ("kcls.monitoring.monitor", "MonitorError", click.UsageError),
    ("kcls.serving.client", "MissingServingApiError", click.UsageError),
    ("kcls.optimize.convert", "OptimizeError", click.ClickException),
    ("kcls.serving.predict", "PredictionError", click.ClickException),
    ("kcls.load", "DamagedFileError", click.ClickException),
    ("kcls.serving.onnx", "MissingOnnxError", click.UsageError),
    ("kcls.data.label_issues", "MissingCleanlabError", click.UsageError),
    ("kcls.serving.onnx", "OnnxError", click.ClickException),
    ("kcls.workflows.predict", "PredictInputError", click.UsageError),
    ("kcls.monitoring.prediction_log", "PredictionLogError", click.ClickException),
    ("kcls.serving.client", "ServingError", click.ClickException),
    ("kcls.evaluation.explain", "ImageError", click.ClickException),
    ("kcls.train.cluster", "WorkerLostError", click.ClickException),
    ("builtins", "FileNotFoundError", click.ClickException),
)


class Commands(click.Group):
    """The command group that turns kcls's errors into one line naming the problem and
    the fix, for every command; `kcls --debug` shows the traceback instead."""

    def invoke(self, context: click.Context):
        try:
            return super().invoke(context)
        except click.ClickException:
            raise
        except Exception as error:
            message = user_error(error)
            if message is None or _debug():
                raise
            raise message from None


def user_error(error: Exception) -> click.ClickException | None:
    """The one-line click error for one of kcls's `USER_ERRORS`, or None for any other."""
    for module, name, kind in USER_ERRORS:
        error_type = getattr(sys.modules.get(module), name, None)
        if error_type is not None and isinstance(error, error_type):
            return kind(str(error))
    return None


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kcls")
@click.option("--debug", is_flag=True,
              help="Show the full traceback of errors (e.g. a broken recipe file) instead "
                   "of a one-line message.")
@click.pass_context
def main(context: click.Context, debug: bool) -> None:
    """kcls: image-classification recipes for Keras/TensorFlow."""
    context.obj = {"debug": debug}
    warnings.showwarning = _show_warning


@main.group()
def recipe() -> None:
    """List, inspect and run recipes."""


@recipe.command("list")
def recipe_list() -> None:
    """Every recipe with a one-line description."""
    recipes = list_recipes()
    width = max(len(info.name) for info in recipes)
    for info in recipes:
        click.echo(f"{info.name:<{width}}  {info.description}")


@recipe.command("show")
@click.argument("name")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def recipe_show(name: str, overrides: tuple[str, ...]) -> None:
    """Print the resolved configuration of recipe NAME as JSON."""
    click.echo(to_json(_resolve(name, overrides)))


@recipe.command("run")
@click.argument("name")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--out", "run_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory for logs and reports (default: a new runs/NAME/TIMESTAMP). "
                   "An interrupted run there resumes; a finished one is never overwritten. "
                   "Required with train.strategy=multiworker: the same folder on every worker.")
@click.option("--workers", type=click.IntRange(min=1),
              help="Train on N local worker processes (train.strategy=multiworker, TF_CONFIG "
                   "on free 127.0.0.1 ports), streaming the chief's output; all stop if one "
                   "fails. See docs/distributed.md.")
@click.option("--resume", is_flag=True,
              help="Resume the latest unfinished run of NAME under runs/NAME/ with the same "
                   "settings and data (without it, such a run is named, not resumed).")
def recipe_run(name: str, overrides: tuple[str, ...], run_dir: Path | None,
               workers: int | None, resume: bool) -> None:
    """Train, evaluate and export recipe NAME (a name or a path to a recipe .py file)."""
    if resume and (run_dir is not None or workers):
        raise click.UsageError("--resume finds the run to resume under runs/NAME/; with "
                               "--out DIR (or --workers, which needs --out), DIR resumes: "
                               "pass one of them.")
    resolved = _resolve(name, overrides)
    if workers:
        from kcls.workflows.launch import launch_local_workers

        sys.exit(launch_local_workers(resolved, name, overrides, run_dir, workers, _debug(),
                                      log=click.echo, error_log=_echo_error))
    start_tensorflow(resolved.train.strategy)
    from kcls.workflows.run import run_recipe

    # A log file or a CI console gets every frame of a progress bar: one line per epoch.
    verbose = "auto" if sys.stdout.isatty() else 2
    command = shlex.join(["kcls", "recipe", "run", name,
                          *(part for override in overrides for part in ("--set", override))])
    result = run_recipe(resolved, run_dir, log=click.echo, verbose=verbose, resume=resume,
                        command=command)
    click.echo(result.summary_line("test" if resolved.evaluate.test else "validation"))


@main.group()
def data() -> None:
    """Prepare and check data: pack a folder or a manifest into sharded TFRecords, find
    duplicates and leaks, list likely label errors."""


@data.command("pack")
@click.argument("source")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--recipe", "recipe_name", metavar="NAME",
              help="Split like this recipe's data section (seed, fractions) and read a "
                   "manifest's labels for its model.task; default: kcls's defaults (20% test, "
                   "10% of the rest validation, seed 0, single-label).")
@click.option("--set", "overrides", multiple=True, metavar="data.KEY=VALUE",
              help="Override a data setting, e.g. --set data.test_fraction=0.1, or "
                   "model.task=multilabel for a path,labels manifest (repeatable).")
@click.option("--shard-size", default="128MB", show_default=True,
              help="About how much a shard holds (KB, MB, GB).")
@click.option("--replace", is_flag=True,
              help="Replace a pack of other files or settings in OUT_DIR (never other files).")
def data_pack(source: str, out_dir: Path, recipe_name: str | None, overrides: tuple[str, ...],
              shard_size: str, replace: bool) -> None:
    """Pack SOURCE (folder:PATH or manifest:PATH.csv) into TFRecord shards in OUT_DIR.

    The splits are made once, here, and frozen in the pack; train on it with
    --set data.source=tfrecord:OUT_DIR. Packing an unchanged source again does nothing.
    """
    recipe = _data_recipe(source, recipe_name, overrides, "pack")
    config = recipe.data
    start_tensorflow()
    from kcls.data.folder import skipped_files_line
    from kcls.data.pack import pack_source, parse_size

    result = pack_source(config, out_dir, parse_size(shard_size), replace, log=click.echo,
                         label_format=recipe.label_format)
    if result.skipped:
        click.echo(skipped_files_line(result.skipped))
    if result.written:
        click.echo(f"packed {config.source} into {out_dir}: " + ", ".join(
            f"{name} {result.examples[name]:,} ({result.shards[name]} shards)"
            for name in result.examples)
            + f"; train on it with --set data.source=tfrecord:{out_dir}")


@data.command("check")
@click.argument("source")
@click.option("--recipe", "recipe_name", metavar="NAME",
              help="Split like this recipe's data section (seed, fractions) and read a "
                   "manifest's labels for its model.task; default: kcls's defaults.")
@click.option("--set", "overrides", multiple=True, metavar="data.KEY=VALUE",
              help="Override a data setting, e.g. --set data.seed=1 (repeatable).")
@click.option("--out", "out_dir", default=".", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder for data_check.json, data_check.md and duplicate_groups.png.")
def data_check(source: str, recipe_name: str | None, overrides: tuple[str, ...],
               out_dir: Path) -> None:
    """Check SOURCE (folder:PATH, manifest:PATH.csv or tfrecord:DIR): images per class and
    split, sizes and modes, unreadable files, exact and near duplicates within a class,
    across classes and across the splits (leaks)."""
    from kcls.files import check_output_dir

    recipe = _data_recipe(source, recipe_name, overrides, "check")
    check_output_dir(out_dir)
    start_tensorflow()
    from kcls.data.check import check_source
    from kcls.data.check_report import summary_line, write_data_check

    check = check_source(recipe.data, recipe.label_format)
    written = write_data_check(check, out_dir)
    click.echo(summary_line(check))
    click.echo("report: " + ", ".join(str(path) for path in written))


@data.command("label-issues")
@click.argument("source")
@click.option("--recipe", "recipe_name", default="finetune", show_default=True, metavar="NAME",
              help="The recipe whose pretrained backbone embeds the images (model.backbone, "
                   "model.weights, data.image_size, data.resize) and whose data section "
                   "splits the source.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a setting, e.g. --set data.image_size=96 (repeatable).")
@click.option("--folds", default=5, show_default=True, type=click.IntRange(min=2),
              help="Cross-validation folds of the out-of-fold probabilities.")
@click.option("--out", "out_dir", default=".", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder for label_issues.csv, label_issues.json and label_issues.png.")
def data_label_issues(source: str, recipe_name: str, overrides: tuple[str, ...], folds: int,
                      out_dir: Path) -> None:
    """Likely label errors in the training split of SOURCE (folder:PATH or
    manifest:PATH.csv): out-of-fold probabilities of a logistic regression on pretrained
    embeddings, through cleanlab's find_label_issues (pip install "kcls[quality]")."""
    recipe = apply_overrides(load_recipe(recipe_name), [f"data.source={source}", *overrides])
    start_tensorflow()
    from kcls.workflows.label_issues import find_label_issues_of_source

    result = find_label_issues_of_source(recipe, out_dir, folds, log=click.echo)
    click.echo(f"{len(result.issues.indices):,} of {len(result.files):,} training images "
               f"flagged as likely label errors (out-of-fold accuracy "
               f"{result.issues.out_of_fold_accuracy(result.labels):.3f}; "
               f"{result.seconds['total']:.0f} s)")
    click.echo("report: " + ", ".join(str(path) for path in result.written))


def _data_recipe(source: str, recipe_name: str | None, overrides: tuple[str, ...],
                 command: str) -> Recipe:
    """The recipe whose data section a `kcls data` command reads: `--recipe` or kcls's
    defaults, with `data.source=SOURCE` and the `data.` (and `model.task=`) overrides."""
    other = [override for override in overrides
             if not override.strip().startswith(("data.", "model.task="))]
    if other:
        raise click.UsageError(f"kcls data {command} takes data.KEY=VALUE overrides only "
                               f"(and model.task=TASK, which says how a manifest's labels "
                               f"are read), not {', '.join(other)}.")
    recipe = load_recipe(recipe_name) if recipe_name else Recipe(name=command)
    return apply_overrides(recipe, [f"data.source={source}", *overrides])


@main.command("lr-find")
@click.argument("name", metavar="RECIPE")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--phase", type=click.Choice(["frozen", "unfrozen"]),
              help="The phase to test: its trainable layers and optimizer (default: the "
                   "recipe's first phase). 'unfrozen' starts from the new, untrained head; "
                   "train.learning_rate=auto tests it after the frozen phase instead.")
@click.option("--steps", type=click.IntRange(min=5),
              help="The most training steps of the test (it stops when the loss diverges; "
                   "default: the recipe's train.lr_find_steps, 100 unless set).")
@click.option("--out", "out_dir", default=".", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder for lr_find.png and lr_find.json.")
@click.option("--overwrite", is_flag=True, help="Replace lr_find.png and lr_find.json there.")
def lr_find(name: str, overrides: tuple[str, ...], phase: str | None, steps: int | None,
            out_dir: Path, overwrite: bool) -> None:
    """The learning-rate range test of RECIPE: which peak learning rate to train at.

    Trains the recipe's model on its data for at most --steps steps while the learning
    rate grows from 1e-7 to 10, then restores the weights. Suggests the rate at the
    lowest smoothed loss divided by 10 (fastai's lr_min rule); use it with
    --set train.learning_rate=RATE, or let train.learning_rate=auto run the test
    before each phase.
    """
    resolved = _resolve(name, overrides)
    start_tensorflow()
    from kcls.layout import LR_FIND_PLOT
    from kcls.workflows.lr_find import find_recipe_learning_rate

    search = find_recipe_learning_rate(resolved, phase, out_dir, steps, overwrite,
                                       log=click.echo)
    click.echo(f"{len(search.losses)} steps from {search.learning_rates[0]:.1e} to "
               f"{search.learning_rates[-1]:.1e}" + (" (stopped: the loss diverged)"
                                                      if search.diverged else ""))
    steepest = (f", steepest descent at {search.steepest_rate:.2e}"
                if search.steepest_rate is not None else "")
    click.echo(f"lowest smoothed loss at {search.minimum_rate:.2e}{steepest}")
    for note in search.notes:
        click.echo(f"warning: {note}", err=True)
    click.echo(f"suggested learning rate ({search.rule}): {search.suggestion:.2e}; plot "
               f"{out_dir / LR_FIND_PLOT}")


@main.command()
@click.argument("name", metavar="RECIPE")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--budget", required=True,
              help="Wall-clock budget of the whole search, e.g. 40m, 2h (trials and the end).")
@click.option("--space", default="finetune", show_default=True,
              help="What to vary: a preset (finetune, scratch) or a .py file with get_space().")
@click.option("--trial-budget", default="auto", show_default=True,
              help="Each trial's train.time_budget, e.g. 4m; auto: an eighth of --budget; "
                   "none: the recipe's epochs as configured.")
@click.option("--trials", "max_trials", type=click.IntRange(min=1),
              help="Stop after this many trials (default: when the budget is spent).")
@click.option("--seed", default=0, show_default=True, help="Seed of the sampler.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Search directory (default: a new runs/tune/NAME/TIMESTAMP). A search "
                   "there resumes: finished trials are kept, never run again.")
def tune(name: str, overrides: tuple[str, ...], budget: str, space: str, trial_budget: str,
         max_trials: int | None, seed: int, out_dir: Path | None) -> None:
    """Search the settings of RECIPE that score best on its validation split, within --budget.

    Every trial is a normal run (its own time budget, no test evaluation, no export),
    pruned when its validation loss per epoch falls behind the other trials'. At the end
    the best trial's model is evaluated once on the test split, and its recipe is
    written as best_recipe.py (run it with `kcls recipe run PATH/best_recipe.py`), with
    tune_report.md: the trial table, parameter importance and the curves.
    """
    resolved = _resolve(name, overrides)
    start_tensorflow()
    from kcls.workflows.tune import tune_recipe

    result = tune_recipe(resolved, budget, space,
                         None if trial_budget.lower() == "none" else trial_budget, max_trials,
                         out_dir, seed, log=click.echo)
    trials = ", ".join(f"{count} {state}" for state, count in result.trials.items())
    click.echo(f"done: best trial {result.best_trial} (validation loss "
               f"{result.validation_loss:.4f}; {trials}); test accuracy "
               f"{result.test_metrics.get('accuracy', float('nan')):.4f}; recipe "
               f"{result.best_recipe_file}")


@main.command()
@click.argument("paths", nargs=-1, required=True, metavar="[MODEL] IMAGE...")
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(min=1),
              help="How many classes to print per image.")
@click.option("--output", "output_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the predictions to FILE.csv or FILE.jsonl (path, top-k labels and "
                   "probabilities, known) instead of printing them.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Images per model call.")
@click.option("--server", metavar="URL",
              help="Ask a TF Serving REST API instead of loading MODEL, "
                   "e.g. http://localhost:8501 (needs --model).")
@click.option("--grpc", "grpc_target", metavar="HOST:PORT",
              help="Ask a TF Serving gRPC API instead, e.g. localhost:8500 (needs --model "
                   "and pip install tensorflow-serving-api).")
@click.option("--model", "model_name", metavar="NAME",
              help="Name the model is served under (with --server or --grpc).")
@click.option("--model-version", type=click.IntRange(min=1),
              help="Served version to ask (with --server or --grpc; default: the latest).")
@click.option("--log", "log_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Append each served answer as a JSON line to this file (with --server "
                   "or --grpc), the log `kcls monitor --predictions` reads.")
def predict(paths: tuple[str, ...], top_k: int, output_file: Path | None, batch_size: int,
            server: str | None, grpc_target: str | None, model_name: str | None,
            model_version: int | None, log_file: Path | None) -> None:
    """Classify images with an export, locally or through TF Serving.

    Locally, the first argument is MODEL: an export (saved_models/quickstart, its latest
    version, or a version folder), a .onnx file (kcls export --format onnx) or a .tflite
    file (kcls optimize). Then image files, folders (searched recursively) and globs
    ('photos/**/*.jpg'), classified in batches; files that cannot be read are listed at
    the end (the exit status is 1 only when no image could be classified). A model with
    a rejection rule says `unknown` for images unlike its classes. With --server or
    --grpc every argument is an image file.
    """
    remote = server or grpc_target
    _check_predict_options(paths, server, grpc_target, model_name, model_version, log_file,
                           output_file)
    if remote:
        images = tuple(Path(path) for path in paths)
        _predict_remote(images, top_k, server, grpc_target, model_name, model_version, log_file)
        return
    start_tensorflow()
    from kcls.workflows.predict import predict_images, write_predictions

    run = predict_images(paths[0], paths[1:], top_k, batch_size, _progress_reporter(batch_size))
    if output_file:
        write_predictions(output_file, run, top_k)
    else:
        for prediction in run.predictions:
            click.echo(prediction.line())
    _echo_prediction_summary(run, output_file)
    if not run.predictions:
        sys.exit(1)


def _check_predict_options(paths: tuple[str, ...], server: str | None, grpc_target: str | None,
                           model_name: str | None, model_version: int | None,
                           log_file: Path | None, output_file: Path | None) -> None:
    """Usage errors of `kcls predict`'s option combinations."""
    remote = server or grpc_target
    if server and grpc_target:
        raise click.UsageError("Use either --server (REST) or --grpc, not both.")
    if remote and not model_name:
        raise click.UsageError("--model NAME is required with --server/--grpc: the name the "
                               "model is served under, e.g. --model quickstart.")
    if not remote and (model_name or model_version):
        raise click.UsageError("--model and --model-version only apply with --server or --grpc; "
                               "locally, pass the export folder as MODEL.")
    if not remote and log_file:
        raise click.UsageError("--log records served answers: use it with --server or --grpc.")
    if remote and output_file:
        raise click.UsageError("--output applies to local models; with --server or --grpc use "
                               "--log FILE.jsonl.")
    if not remote and len(paths) < 2:
        raise click.UsageError("Expected MODEL and at least one IMAGE "
                               "(or --server/--grpc with --model).")
    if not remote and not Path(paths[0]).exists():
        raise click.UsageError(f"MODEL {paths[0]!r} does not exist.")
    for path in paths if remote else ():
        if not Path(path).is_file():
            raise click.UsageError(f"{path!r} is not an image file (with --server or --grpc, "
                                   "pass image files).")


def _progress_reporter(batch_size: int):
    """A progress bar on a terminal (stderr), a line per tenth of the images in a log;
    nothing for images that fit in one batch."""
    bar = None
    logged = 0

    def update(done: int, total: int) -> None:
        nonlocal bar, logged
        if total <= batch_size:
            return
        if not sys.stderr.isatty():
            if done == total or done * 10 // total > logged:
                logged = done * 10 // total
                click.echo(f"predicted {done}/{total} images", err=True)
            return
        if bar is None:
            bar = click.progressbar(length=total, label="predicting", file=sys.stderr)
        bar.update(done - bar.pos)
        if done == total:
            bar.render_finish()
    return update


def _echo_prediction_summary(run, output_file: Path | None) -> None:
    unknown = sum(prediction.known is False for prediction in run.predictions)
    click.echo(f"{len(run.predictions)} images in {run.seconds:.1f} s "
               f"({run.images_per_second:.1f} images/s)"
               + (f", {unknown} unknown" if unknown else "")
               + (f"; predictions in {output_file}" if output_file else ""), err=True)
    if run.not_images:
        click.echo(f"ignored {len(run.not_images)} file(s) that are not images by their "
                   f"name: {', '.join(run.not_images[:5])}"
                   + (" ..." if len(run.not_images) > 5 else ""), err=True)
    if run.unreadable:
        click.echo(f"{len(run.unreadable)} file(s) could not be read or decoded, skipped:",
                   err=True)
        for line in run.unreadable:
            click.echo(f"  {line}", err=True)


@main.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--base-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Export base directory (default: the run's export.base_dir).")
@click.option("--model-name", metavar="NAME",
              help="Serve it under this name (default: the run's export.model_name, else its "
                   "image folder's or recipe's name).")
@click.option("--format", "export_format", type=click.Choice(["saved_model", "onnx"]),
              default="saved_model", show_default=True,
              help="onnx: also model.onnx in the version, checked by ONNX Runtime against "
                   'the SavedModel on the test split (pip install "kcls[onnx]").')
def export(run_dir: Path, base_dir: Path | None, model_name: str | None,
           export_format: str) -> None:
    """Export the next SavedModel version of the model trained in RUN_DIR."""
    start_tensorflow()
    from kcls.layout import MODELS_CONFIG_FILE
    from kcls.serving.onnx import onnx_line
    from kcls.workflows.export import export_run

    version_dir = export_run(run_dir, base_dir, model_name, onnx=export_format == "onnx",
                             log=click.echo)
    click.echo(f"exported float32 SavedModel to {version_dir}; TF Serving config "
               f"{version_dir.parent.parent / MODELS_CONFIG_FILE}")
    line = onnx_line(version_dir)
    if line:
        click.echo(line)


@main.command()
@MODEL_DIR
@click.option("--data", "data_source", metavar="SOURCE",
              help="folder:PATH (every image; the test split of a folder of train/, "
                   "val/, test/ folders), tfds:NAME, tfrecord:DIR or sklearn:digits "
                   "(test split). "
                   "Default: the test split the model's recipe held out.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for metrics.json, report.md and plots (default: print only).")
@click.option("--flip-tta", is_flag=True, help="Also report flip test-time augmentation.")
@click.option("--shift-tta", is_flag=True,
              help="Also report flip+shift test-time augmentation: six views, the image and "
                   "its mirror each shifted a pixel up-left and down-right (implies --flip-tta).")
@click.option("--slice-by", metavar="COLUMN|path:N",
              help="Also score slices of the images: by a manifest column (site) or by "
                   "the N-th folder of their path below the root (path:1; path:-1 the "
                   "file's folder): slices.json, slices.png, a report section.")
def evaluate(model_dir: Path, data_source: str | None, out_dir: Path | None,
             flip_tta: bool, shift_tta: bool, slice_by: str | None) -> None:
    """Evaluate an export or a run directory (MODEL_DIR) on held-out data."""
    start_tensorflow()
    from kcls.data.tta import measured_tta_name
    from kcls.evaluation.evaluate import evaluate_model

    metrics = evaluate_model(str(model_dir), data_source, out_dir, flip_tta,
                             log=click.echo, slice_by=slice_by, shift_tta=shift_tta).metrics
    summary = {key: metrics[key] for key in ("examples", "accuracy", "top5_accuracy", "nll",
                                             "ece", "mAP", "micro_f1", "macro_f1",
                                             "label_cardinality") if key in metrics}
    click.echo("  ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                         for key, value in summary.items()))
    if "tta" in metrics:
        click.echo(f"{measured_tta_name(metrics)} TTA accuracy "
                   f"{metrics['tta']['accuracy']:.4f}")
    for name, row in metrics.get("per_class", metrics.get("per_label", {})).items():
        click.echo(f"  {name}: precision {row['precision']:.3f} recall {row['recall']:.3f} "
                   f"f1 {row['f1']:.3f} support {row['support']}")
    if out_dir:
        click.echo(f"report: {out_dir / 'report.md'}")


@main.command()
@MODEL_DIR
@click.argument("images", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the overlays (default: RUN_DIR/explanations, or "
                   "saved_models/NAME/explanations/VERSION for an export).")
@click.option("--overwrite", is_flag=True,
              help="Replace existing overlays of the same name (default: a new name).")
def explain(model_dir: Path, images: tuple[Path, ...], out_dir: Path | None,
            overwrite: bool) -> None:
    """Write Grad-CAM overlays of the top-1 class for IMAGES (of every predicted label for a
    multi-label model).

    MODEL_DIR is an export (version or model folder) or a run directory.
    """
    start_tensorflow()
    from kcls.evaluation.explain import explain_model

    written = explain_model(model_dir, list(images), out_dir, overwrite)
    for image, (target, label, probability) in zip(images, written):
        click.echo(f"{image} -> {target}: {label} ({probability:.3f})")


@main.command()
@click.argument("model_path", metavar="RUN_OR_MODEL",
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--method", required=True,
              type=click.Choice(["ptq-dynamic", "ptq-float16", "ptq-int8", "prune", "qat"]),
              help="ptq-dynamic: int8 weights; ptq-float16: float16 weights; ptq-int8: full "
                   "integer, calibrated on training images; prune/qat: TF-MOT fine-tuning.")
@click.option("--io-type", type=click.Choice(["int8", "uint8", "float32"]),
              help="Input/output type of a ptq-int8 model (default int8).")
@click.option("--per-tensor", is_flag=True,
              help="ptq-int8: one weight scale per tensor instead of per output channel "
                   "(a smaller file; may cost accuracy, e.g. with depthwise convolutions).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (default RUN_DIR/optimized/METHOD, or "
                   "saved_models/NAME/optimized/VERSION/METHOD for an export).")
@click.option("--calibration-images", default=200, show_default=True,
              type=click.IntRange(min=1), help="Training images that calibrate ptq-int8.")
@click.option("--latency-runs", default=100, show_default=True, type=click.IntRange(min=1),
              help="Timed batch-1 interpreter runs per model (median reported).")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="TFLite interpreter threads.")
@click.option("--epochs", default=2, show_default=True, type=click.IntRange(min=1),
              help="prune/qat fine-tuning epochs over the training split.")
@click.option("--target-sparsity", default=0.5, show_default=True,
              type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
              help="prune: final share of zeros in every Conv/Dense kernel.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier optimize report in --out.")
def optimize(model_path: Path, method: str, io_type: str | None, per_tensor: bool,
             out_dir: Path | None, calibration_images: int, latency_runs: int, threads: int,
             epochs: int, target_sparsity: float, overwrite: bool) -> None:
    """Quantize a trained model (a run dir or an export) to TFLite and compare it with float32.

    Both models are evaluated on the recipe's held-out test split; optimize.json,
    optimize.md and the .tflite files go to the output folder.
    """
    if (io_type or per_tensor) and method != "ptq-int8":
        raise click.UsageError(
            f"--io-type and --per-tensor only apply to --method ptq-int8, not {method}.")
    start_tensorflow()
    from kcls.layout import OPTIMIZE_TABLE_FILE
    from kcls.optimize import optimize as optimize_model
    from kcls.optimize.tflite import deltas_line, metrics_line

    report = optimize_model(model_path, method, out_dir, io_type or "int8",
                            calibration_images, latency_runs, threads, epochs,
                            target_sparsity, per_channel=not per_tensor, overwrite=overwrite,
                            log=click.echo)
    for name, row in (("float32", report["float32"]), (method, report["optimized"])):
        click.echo(f"{name:<12} {row['size_bytes']:>10,} bytes ({row['zipped_bytes']:,} zipped)"
                   f"  {metrics_line(report, row)}  {row['latency_ms']:.3f} ms/image")
    ratios = report["ratios"]
    click.echo(f"{ratios['size']:.2f}x smaller, {ratios['speedup']:.2f}x faster, "
               f"{deltas_line(report)}; report {Path(report['out_dir']) / OPTIMIZE_TABLE_FILE}")


@main.command()
@MODEL_DIR
@click.option("--predictions", "predictions_file", metavar="FILE.jsonl",
              type=click.Path(dir_okay=False, path_type=Path),
              help="Logged served answers (kcls predict --server ... --log FILE.jsonl, or "
                   "TF Serving response bodies, one per line): class and confidence tests.")
@click.option("--data", "data_source", metavar="FOLDER",
              help="Or a folder of recent production images (any layout, no labels), run "
                   "through the export: class, confidence and embedding tests.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for monitor.json, monitor.md and plots (default: "
                   "saved_models/NAME/monitor/VERSION/UTCTIME, beside the export's versions).")
@click.option("--alpha", default=0.05, show_default=True, type=float,
              help="False-alarm rate on unchanged data (Bonferroni over the tests).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier report in --out.")
def monitor(model_dir: Path, data_source: str | None, predictions_file: Path | None,
            out_dir: Path | None, alpha: float, overwrite: bool) -> None:
    """Compare recent data with the reference profile of the export MODEL_DIR.

    Prints one verdict line and exits with status 3 when drift is flagged (0 when not,
    1 or 2 on errors), so cron jobs and CI can act on it.
    """
    start_tensorflow()
    from kcls.layout import MONITOR_REPORT_FILE
    from kcls.monitoring.monitor import DRIFT_EXIT_CODE
    from kcls.monitoring.monitor import monitor as monitor_data

    result = monitor_data(model_dir, data_source, predictions_file, out_dir, alpha,
                          overwrite=overwrite, log=click.echo)
    click.echo(result["verdict"])
    click.echo(f"report: {Path(result['out_dir']) / MONITOR_REPORT_FILE}")
    if result["drift"]:
        sys.exit(DRIFT_EXIT_CODE)


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--backbone", help="Backbone to pretrain (pretrain.backbone; default "
              "resnet_v2_tiny).")
@click.option("--weights", help="Start from: none, imagenet (domain-adaptive pretraining) or "
              "a .weights.h5 file (pretrain.weights).")
@click.option("--knn", "knn_folder", type=click.Path(path_type=Path),
              help="Labelled image folder (one sub-folder per class) for a kNN accuracy per "
                   "epoch (pretrain.knn_source).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a pretraining setting, e.g. --set pretrain.time_budget=30m "
                   "(repeatable; see docs/pretraining.md).")
@click.option("--out", "run_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory (default: a new runs/pretrain/TIMESTAMP).")
def pretrain(folder: Path, backbone: str | None, weights: str | None, knn_folder: Path | None,
             overrides: tuple[str, ...], run_dir: Path | None) -> None:
    """Self-supervised (SimCLR) pretraining of a backbone on the images in FOLDER.

    Labels are not needed: sub-folders are searched and their names ignored. Writes
    RUN_DIR/backbone.weights.h5; fine-tune from it with
    `kcls recipe run NAME --set model.backbone=NAME --set model.weights=PATH`.
    """
    from kcls.config import PretrainConfig, apply_pretrain_overrides

    options = [f"pretrain.source=folder:{folder}"]
    options += [f"pretrain.backbone={backbone}"] if backbone else []
    options += [f"pretrain.weights={weights}"] if weights else []
    options += [f"pretrain.knn_source=folder:{knn_folder}"] if knn_folder else []
    config = apply_pretrain_overrides(PretrainConfig(source=f"folder:{folder}"),
                                      options + list(overrides))
    start_tensorflow()
    from kcls.workflows.pretrain import pretrain as run_pretraining

    verbose = "auto" if sys.stdout.isatty() else 2
    result = run_pretraining(config, run_dir, log=click.echo, verbose=verbose)
    click.echo(f"done: backbone weights {result.weights_path}")


def _predict_remote(images: tuple[Path, ...], top_k: int, server: str | None,
                    grpc_target: str | None, model_name: str, version: int | None,
                    log_file: Path | None = None) -> None:
    from kcls.monitoring.prediction_log import append_predictions, prediction_record
    from kcls.serving import client as serving_client

    call = (serving_client.rest_predict if server else serving_client.grpc_predict)
    try:
        for path in images:
            (prediction,) = call(server or grpc_target, model_name, [path.read_bytes()],
                                 version=version)
            if log_file:
                append_predictions(log_file, [prediction_record(
                    str(path), prediction.labels, prediction.scores, prediction.classes,
                    prediction.probabilities, model_name, version)])
            _echo_ranked(path, prediction.top(top_k), prediction.known)
    except serving_client.ServingError as error:
        raise click.ClickException(f"{path}: {error}") from None
    except ValueError as error:  # an address or a request that cannot be made
        raise click.UsageError(str(error)) from None


def _echo_ranked(path: Path, ranked: list[tuple[str, float]], known: bool | None = None
                 ) -> None:
    # A multi-label model serves blank labels for those below their thresholds.
    click.echo(f"{path}: " + ("unknown; closest: " if known is False else "")
               + ("  ".join(f"{label} ({score:.3f})" for label, score in ranked if label)
                  or "(no label above its threshold)"))


def start_tensorflow(strategy: str = "auto") -> None:
    """Imports TensorFlow and initialises its devices without the C++ start-up logs.

    Some of those lines (CUDA probing, cuInit) are written before TensorFlow reads
    TF_CPP_MIN_LOG_LEVEL, so the native stderr is muted for the duration unless the
    user asked for logs with TF_CPP_MIN_LOG_LEVEL=0. Python errors still surface.
    `strategy` is `train.strategy`: under `multiworker` the strategy is created here,
    first (`kcls.train.compute.initialize_devices`).
    """
    from kcls.environment import native_logs_wanted, native_stderr_muted

    with native_stderr_muted(not native_logs_wanted()):
        from kcls.train.compute import initialize_devices

        initialize_devices(strategy)


def _echo_error(line: str) -> None:
    click.echo(line, err=True)


def _resolve(name: str, overrides: tuple[str, ...]):
    return apply_overrides(load_recipe(name), list(overrides))


_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_show_python_warning = warnings.showwarning


def _show_warning(message: Warning | str, category: type[Warning], filename: str,
                  lineno: int, file: object = None, line: str | None = None) -> None:
    """kcls's own warnings (hidden folders, classes too small for a split, ...) as one
    `warning: ...` line; the others as Python prints them."""
    if str(Path(filename).resolve()).startswith(_PACKAGE_DIR):
        click.echo(f"warning: {message}", err=True)
    else:
        _show_python_warning(message, category, filename, lineno, file, line)


def _debug() -> bool:
    """Whether `kcls --debug` asked for full tracebacks."""
    context = click.get_current_context(silent=True)
    root = context.find_root() if context else None
    return bool(root and (root.obj or {}).get("debug"))


if __name__ == "__main__":
    sys.exit(main())
