"""Where kcls puts things: the run directory, the export and the optimized models.

Every file name kcls writes and reads back is named here, once; the writers
(`kcls.workflows`, `kcls.train.phases`, `kcls.train.progress`, `kcls.evaluation.report`,
`kcls.serving.export`, `kcls.optimize`) and the readers (`kcls.load`,
`kcls.serving.predict`) import it. This module imports nothing from kcls and nothing
heavy, so every layer, the TF-MOT child process included, can use it.

A run directory (`kcls recipe run`, default `runs/<recipe>/<timestamp>[-N]/`, created
and locked by `kcls.workflows.run_directory`):

    config.json          the resolved recipe (`RUN_CONFIG_FILE`)
    run.lock             pid and host of the run using the directory, while it runs
                         (`RUN_LOCK_FILE`)
    run.json             versions, devices, choices, history, metrics, timings (`RUN_INFO_FILE`)
    state.json           the stages done, for resuming after a kill (`RUN_STATE_FILE`)
    model.weights.h5     the trained classifier's Keras weights (`WEIGHTS_FILE`)
    best.weights.h5      the weights of the best validation epoch (`BEST_WEIGHTS_FILE`)
    metrics.json, report.md, *.png    the evaluation report (`METRICS_FILE`, ...)
    confident_mistakes.csv  the wrong test predictions with their files
                         (`CONFIDENT_MISTAKES_FILE`)
    reference.json       the reference profile of the test split (`RUN_REFERENCE_FILE`)
    lr_find_<phase>.png  the learning-rate range test of each phase, with
                         train.learning_rate=auto (`LR_FIND_PHASE_PLOT`)
    samples/             a few held-out test images as PNG (`SAMPLES_DIR`)
    logs/                TensorBoard logs (`LOGS_DIR`)
    backup/              resume state while training (`BACKUP_DIR`, `PROGRESS_FILE`)
    tmp_<type>_<index>/  under train.strategy=multiworker, the copies a worker other
                         than the chief writes while training, deleted when training
                         ends (`WORKER_SCRATCH_DIR`)
    tracking.json        with track.mlflow: the MLflow run id, reopened when the run
                         resumes (`TRACKING_FILE`)
    optimized/<method>/  `kcls optimize` output (`OPTIMIZED_DIR`)
    explanations/        `kcls explain` overlays (`EXPLANATIONS_DIR`)

A pretraining run directory (`kcls pretrain`, default `runs/pretrain/<timestamp>[-N]/`)
holds `pretrain_config.json`, `backbone.weights.h5` (for `model.weights=PATH`),
`pretrain_curves.png`, `run.json` and, while it runs, `run.lock`.

An export, `<base_dir>/<model>/<version>/` (`kcls.serving.export`), is a SavedModel
(`saved_model.pb`, `variables/`) plus `assets/labels.txt`, `assets/reference.json` (the
reference profile `kcls monitor` compares production data with, `REFERENCE_FILE`),
`kcls.json` (recipe, classes, metrics, calibration temperature, versions),
`model.weights.h5` and, with `export.onnx`, `model.onnx` (`kcls.serving.onnx`);
`<base_dir>/models.config` lists the models for TF Serving, and
`<base_dir>/<model>/optimized/<version>/<method>/` holds `kcls optimize` output (TF
Serving ignores folders whose names are not numbers).

`kcls monitor` writes `monitor.json`, `monitor.md` and three plots into
`<base_dir>/<model>/monitor/<version>/<UTC time>/` (`MONITOR_DIR`) or its `--out`
folder; `kcls explain` its overlays into `<run_dir>/explanations/` or
`<base_dir>/<model>/explanations/<version>/` (`EXPLANATIONS_DIR`) or its `--out`
folder (`model_output_dir`).

`kcls optimize` writes `model.tflite`, `float32.tflite`, `optimize.json` and
`optimize.md`; `prune` and `qat` also `saved_model/` and `result.json` (the TF-MOT child).

A search (`kcls tune`, default `runs/tune/<recipe>/<timestamp>[-N]/`, locked like a run
directory) holds

    study.db             the Optuna study (SQLite): every trial, resumable (`TUNE_STUDY_FILE`)
    trials/trial-NNN/    one run directory per trial, run with evaluate.test=false
                         (`TUNE_TRIALS_DIR`)
    best_recipe.py       the best trial's recipe as a recipe page (`BEST_RECIPE_FILE`)
    best_test/           the best trial's test-split report: metrics.json, report.md, plots
                         (`TUNE_TEST_DIR`)
    tune_report.md, tune_curves.png, tune.json   trial table, importance, curves, summary
                         (`TUNE_REPORT_FILE`, `TUNE_CURVES_PLOT`, `TUNE_SUMMARY_FILE`)

The user cache (`cache_root()`) holds converted ImageNet weights
(`kcls.models.pretrained`).

A pack (`kcls data pack SOURCE OUT_DIR`, `kcls.data.pack`; read as
`data.source=tfrecord:OUT_DIR`, `kcls.data.tfrecord`) holds `pack.json`
(`PACK_MANIFEST_FILE`: splits, class names, counts, skipped files, the source's
fingerprint) and the shards `<split>-NNNNN-of-NNNNN.tfrecord` (`PACK_SHARD_NAME`).

`kcls data check SOURCE --out DIR` writes `data_check.json`, `data_check.md` and
`duplicate_groups.png` (`DATA_CHECK_FILE`, ...); `kcls data label-issues` writes
`label_issues.csv`, `label_issues.json` and `label_issues.png` (`LABEL_ISSUES_FILE`, ...).

Example:

>>> resolve_export_dir("saved_models/quickstart")  # doctest: +SKIP
PosixPath('saved_models/quickstart/3')
"""

from __future__ import annotations

import os
from pathlib import Path

# Run directory.
RUNS_DIR = "runs"
RUN_CONFIG_FILE = "config.json"
RUN_INFO_FILE = "run.json"
# What a run has done so far: the source fingerprint at its start, the training result
# once trained, the export once exported (`kcls.workflows.run_state`).
RUN_STATE_FILE = "state.json"
RUN_LOCK_FILE = "run.lock"
WEIGHTS_FILE = "model.weights.h5"  # in run directories and in exports
BEST_WEIGHTS_FILE = "best.weights.h5"
SAMPLES_DIR = "samples"
LOGS_DIR = "logs"
BACKUP_DIR = "backup"
PROGRESS_FILE = "progress.json"
WORKER_SCRATCH_DIR = "tmp_{task_type}_{task_id}"  # .format(task_type="worker", task_id=1)
TRACKING_FILE = "tracking.json"

# A search (`kcls tune`).
TUNE_RUNS_DIR = "runs/tune"
TUNE_STUDY_FILE = "study.db"
TUNE_TRIALS_DIR = "trials"
BEST_RECIPE_FILE = "best_recipe.py"
TUNE_TEST_DIR = "best_test"
TUNE_REPORT_FILE = "tune_report.md"
TUNE_CURVES_PLOT = "tune_curves.png"
TUNE_SUMMARY_FILE = "tune.json"
# Evaluation reports (run directories, `kcls evaluate --out`).
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
TRAINING_CURVES_PLOT = "training_curves.png"
CONFUSION_MATRIX_PLOT = "confusion_matrix.png"
RELIABILITY_PLOT = "reliability.png"
CONFIDENT_MISTAKES_PLOT = "confident_mistakes.png"
# Every wrong test prediction, most confident first, with its file (sources of files).
CONFIDENT_MISTAKES_FILE = "confident_mistakes.csv"
PLOT_FILES = (TRAINING_CURVES_PLOT, CONFUSION_MATRIX_PLOT, RELIABILITY_PLOT,
              CONFIDENT_MISTAKES_PLOT)
RUN_REFERENCE_FILE = "reference.json"
PR_CURVES_PLOT = "pr_curves.png"  # multi-label runs (`kcls.metrics.multilabel`)
# Metrics per slice (`kcls evaluate --slice-by`, `kcls.evaluation.slices`).
SLICES_FILE = "slices.json"
SLICES_PLOT = "slices.png"
# The learning-rate range test: `kcls lr-find` writes LR_FIND_PLOT and LR_FIND_FILE (the
# curve); a run with train.learning_rate=auto writes one plot per phase into its run
# directory (`LR_FIND_PHASE_PLOT.format(phase="frozen")`).
LR_FIND_PLOT = "lr_find.png"
LR_FIND_FILE = "lr_find.json"
LR_FIND_PHASE_PLOT = "lr_find_{phase}.png"
# Data checks (`kcls data check`, `kcls data label-issues`).
DATA_CHECK_FILE = "data_check.json"
DATA_CHECK_REPORT_FILE = "data_check.md"
DUPLICATE_GROUPS_PLOT = "duplicate_groups.png"
LABEL_ISSUES_FILE = "label_issues.csv"
LABEL_ISSUES_SUMMARY_FILE = "label_issues.json"
LABEL_ISSUES_PLOT = "label_issues.png"
# Exports.
SAVED_MODEL_FILE = "saved_model.pb"
LABELS_FILE = "assets/labels.txt"
# Beside a data manifest (`kcls.data.manifest`): the class names, one per line.
MANIFEST_LABELS_FILE = "labels.txt"
REFERENCE_FILE = "assets/reference.json"
METADATA_FILE = "kcls.json"
ONNX_FILE = "model.onnx"  # with export.onnx (`kcls export --format onnx`), in the version
MODELS_CONFIG_FILE = "models.config"
# Grad-CAM overlays (`kcls explain`, default folder: `model_output_dir`).
EXPLANATIONS_DIR = "explanations"
# Drift monitoring (`kcls monitor`, default folder: `model_output_dir`).
MONITOR_DIR = "monitor"
MONITOR_FILE = "monitor.json"
MONITOR_REPORT_FILE = "monitor.md"
MONITOR_CLASSES_PLOT = "monitor_classes.png"
MONITOR_CONFIDENCE_PLOT = "monitor_confidence.png"
MONITOR_EMBEDDING_PLOT = "monitor_embedding.png"
# Optimized models.
OPTIMIZED_DIR = "optimized"
TFLITE_FILE = "model.tflite"
FLOAT32_TFLITE_FILE = "float32.tflite"
OPTIMIZE_REPORT_FILE = "optimize.json"
OPTIMIZE_TABLE_FILE = "optimize.md"
MOT_SAVED_MODEL_DIR = "saved_model"
MOT_RESULT_FILE = "result.json"
# Pretraining run directory (`kcls pretrain`, `kcls.workflows.pretrain`): besides RUN_INFO_FILE
# and RUN_LOCK_FILE, the pretraining settings, the backbone weights for
# `model.weights=PATH`, and the loss / kNN accuracy curves.
PRETRAIN_CONFIG_FILE = "pretrain_config.json"
BACKBONE_WEIGHTS_FILE = "backbone.weights.h5"
PRETRAIN_CURVES_PLOT = "pretrain_curves.png"
# User cache.
CACHE_ENVIRONMENT_VARIABLE = "KCLS_CACHE_DIR"
# Packs of TFRecord shards (`kcls data pack`).
PACK_MANIFEST_FILE = "pack.json"
PACK_SHARD_NAME = "{split}-{index:05d}-of-{count:05d}.tfrecord"
PACK_SHARD_PATTERN = "{split}-*-of-{count:05d}.tfrecord"


class CacheDirError(NotADirectoryError):
    """The user cache (`cache_root`) is, or is inside, a file: the message names the fix."""


def cache_root() -> Path:
    """`$KCLS_CACHE_DIR`, else `$XDG_CACHE_HOME/kcls`, else `~/.cache/kcls`.

    Raises:
        CacheDirError: that path, or a folder it would be made in, is a file.
    """
    if os.environ.get(CACHE_ENVIRONMENT_VARIABLE):
        root, how = Path(os.environ[CACHE_ENVIRONMENT_VARIABLE]).expanduser(), (
            f"{CACHE_ENVIRONMENT_VARIABLE}={os.environ[CACHE_ENVIRONMENT_VARIABLE]}")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root, how = Path(base).expanduser() / "kcls", "the default cache folder"
    blocking = next((path for path in (root, *root.parents)
                     if path.exists() or path.is_symlink()), None)
    if blocking is not None and not blocking.is_dir():
        raise CacheDirError(
            f"The kcls cache ({how}) cannot be a folder: {blocking} is a file. Point "
            f"{CACHE_ENVIRONMENT_VARIABLE} at a folder (it is created when missing), or "
            "unset it for ~/.cache/kcls.")
    return root


def is_run_dir(path: str | Path) -> bool:
    """Whether `path` is a run directory (finished or not) rather than an export."""
    path = Path(path)
    return (path / RUN_CONFIG_FILE).is_file() or (
        (path / WEIGHTS_FILE).is_file() and not (path / SAVED_MODEL_FILE).is_file())


def versions(model_dir: str | Path) -> list[int]:
    """The integer versions present under a model base directory, ascending."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def exported_versions(model_dir: str | Path) -> list[int]:
    """The versions under `model_dir` that hold a SavedModel, ascending."""
    return [version for version in versions(model_dir)
            if (Path(model_dir) / str(version) / SAVED_MODEL_FILE).is_file()]


class IncompleteExportError(FileNotFoundError):
    """A version folder without its SavedModel (an interrupted copy)."""


def resolve_export_dir(path: str | Path) -> Path:
    """A version directory, given either it or a model base directory (latest version wins).

    Raises:
        FileNotFoundError: `path` is neither.
        IncompleteExportError: the version `path` names (or the latest one) has no
            SavedModel: an interrupted copy, not a kcls export, which publishes versions
            atomically. The message names the folder and a complete version.
    """
    path = Path(path)
    if (path / SAVED_MODEL_FILE).is_file():
        return path
    if path.name.isdigit() and path.is_dir():
        version_dir, model_dir = path, path.parent
    else:
        available = versions(path)
        if not available:
            raise FileNotFoundError(
                f"{str(path)!r} is neither a SavedModel directory nor a model folder with "
                "numbered versions (e.g. saved_models/quickstart/1).")
        version_dir, model_dir = path / str(available[-1]), path
        if (version_dir / SAVED_MODEL_FILE).is_file():
            return version_dir
    complete = exported_versions(model_dir)
    fix = (f"pass a complete version, e.g. {model_dir / str(complete[-1])}, "
           if complete else "")
    raise IncompleteExportError(
        f"The export version {str(version_dir)!r} is incomplete: it has no {SAVED_MODEL_FILE} "
        f"(an interrupted copy?). Export again with `kcls export RUN_DIR`, {fix}or delete "
        "the folder.")


def model_output_dir(model_path: str | Path, folder: str, *names: str) -> Path:
    """Where a command writes what it makes of a model, by default: inside a run
    directory, `<run_dir>/<folder>/<names...>`; beside an export's versions,
    `<model>/<folder>/<version>/<names...>` (TF Serving ignores folders whose names are
    not numbers, and a published version is never written into).

    >>> model_output_dir("saved_models/quickstart/3", EXPLANATIONS_DIR)  # doctest: +SKIP
    PosixPath('saved_models/quickstart/explanations/3')
    """
    path = Path(model_path)
    if is_run_dir(path):
        return path.joinpath(folder, *names)
    export_dir = resolve_export_dir(path)
    return export_dir.parent.joinpath(folder, export_dir.name, *names)


def optimized_dir(model_path: str | Path, method: str) -> Path:
    """Where `kcls optimize` writes by default: `<run_dir>/optimized/<method>/`, or
    `<model>/optimized/<version>/<method>/` beside an export's versions."""
    return model_output_dir(model_path, OPTIMIZED_DIR, method)
