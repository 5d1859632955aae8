"""`kcls monitor`: has what a deployed model sees drifted from what it was tested on?

Compares recent production data with the reference profile every export carries
(`assets/reference.json`, `kcls.monitoring.profile`):

- `data`: a folder of recent images (any layout, no labels needed), run through the
  export's own `predict_images` signature, which also returns the penultimate-layer
  embedding: predicted-class, confidence and embedding tests;
- `predictions`: a JSON-lines log of served predictions (`kcls.monitoring.prediction_log`, written
  by `kcls predict --server ... --log FILE`): predicted-class and confidence tests.

The statistics and the decision rule are `kcls.monitoring.drift.compare`'s. `monitor` writes
`monitor.json` (every statistic and p-value, the decision), `monitor.md` and three plots
(reference vs current: predicted classes, confidence, the first two embedding principal
components) into the output folder (file names: `kcls.layout`), and returns the result;
`verdict_line` is the one line `kcls monitor` prints. The CLI exits with
`DRIFT_EXIT_CODE` when drift is flagged, so a cron job or CI step can act on it.

Example:

>>> result = monitor("saved_models/quickstart", data="incoming/")  # doctest: +SKIP
>>> result["drift"], result["tests"]["embedding"]["p_value"]  # doctest: +SKIP
(False, 0.54)
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from kcls.data.folder import (
    IMAGE_EXTENSIONS,
    list_image_files,
    printable_path,
    skipped_files_line,
)
from kcls.figures import plt, save_figure
from kcls.files import check_output_dir, write_json, write_text
from kcls.layout import (
    METADATA_FILE,
    MONITOR_CLASSES_PLOT,
    MONITOR_CONFIDENCE_PLOT,
    MONITOR_DIR,
    MONITOR_EMBEDDING_PLOT,
    MONITOR_FILE,
    MONITOR_REPORT_FILE,
    REFERENCE_FILE,
    is_run_dir,
    model_output_dir,
    resolve_export_dir,
)
from kcls.load import load_saved_model, read_export_metadata, read_reference
from kcls.monitoring.drift import ALPHA, PERMUTATIONS, compare, small_reference_warning
from kcls.monitoring.prediction_log import read_predictions, skipped_lines_line
from kcls.tasks import Task, get_task

DRIFT_EXIT_CODE = 3  # click uses 1 (errors) and 2 (usage errors)
MIN_EXAMPLES = 10
BATCH_SIZE = 32
IMAGES_SIGNATURE = "predict_images"


class MonitorError(ValueError):
    """A monitoring request that cannot be carried out; the message says what to do."""


class MissingReferenceError(FileNotFoundError):
    """An export without a reference profile (exported before kcls wrote one)."""


def load_reference(model_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """The export version directory of `model_dir` and its reference profile.

    Raises:
        FileNotFoundError: `model_dir` is not an export (`kcls.layout.resolve_export_dir`).
        MissingReferenceError: the export has no `assets/reference.json`; the message
            names the command that exports one.
        MonitorError: `model_dir` is a run directory or a multi-label export.
        DamagedFileError: `kcls.json` or the profile cannot be read.
    """
    if is_run_dir(model_dir):
        raise MonitorError(f"{str(model_dir)!r} is a run directory; monitor its export "
                           "(saved_models/NAME), or export it first with `kcls export "
                           f"{model_dir}`.")
    export_dir = resolve_export_dir(model_dir)
    reference_file = export_dir / REFERENCE_FILE
    task = _export_task(export_dir)
    if task is not None and not task.supports_monitoring:
        raise MonitorError(
            f"The export {str(export_dir)!r} is a {task.description} model "
            f"(model.task={task.name}); `kcls monitor` compares single-label predictions and "
            "cannot monitor it yet.")
    if not reference_file.is_file():
        raise MissingReferenceError(
            f"The export {str(export_dir)!r} has no reference profile ({REFERENCE_FILE}; "
            "exported by an older kcls). Export the run again with `kcls export RUN_DIR`, "
            "which computes it on the recipe's held-out images, then monitor the new version.")
    return export_dir, read_reference(reference_file)


def _export_task(export_dir: Path) -> Task | None:
    """The task an export's `kcls.json` names, or None for an export without one."""
    if not (export_dir / METADATA_FILE).is_file():
        return None
    metadata = read_export_metadata(export_dir)
    return get_task(metadata.get("task") or metadata["recipe"]["model"]["task"])


def image_files(source: str | Path) -> list[Path]:
    """The image files under a folder (`PATH` or `folder:PATH`), recursively, sorted.

    Raises:
        MonitorError: not a folder, or no image file in it.
    """
    root = Path(str(source).removeprefix("folder:")).expanduser()
    if not root.is_dir():
        raise MonitorError(f"--data {str(source)!r} is not a folder; pass a folder of recent "
                           "images, e.g. --data incoming/.")
    files = list_image_files(root)
    if not files:
        raise MonitorError(f"--data {str(source)!r} holds no image file "
                           f"({', '.join(IMAGE_EXTENSIONS)}).")
    return files


def image_outputs(export_dir: str | Path, paths: list[Path], batch_size: int = BATCH_SIZE
                  ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Runs the export's `predict_images` signature over image files.

    Images are decoded on the host and batched by shape (the signature resizes inside,
    as it does for TF Serving clients).

    Returns:
        `(probabilities float32 [N, C], embeddings float32 [N, D], skipped)`: `skipped`
        names the files that did not decode (not counted in N).

    Raises:
        MonitorError: an export without the embedding output (re-export it).
    """
    loaded, signature = load_saved_model(export_dir, IMAGES_SIGNATURE)  # keep `loaded` alive
    if "embedding" not in signature.structured_outputs:
        raise MonitorError(f"The export {str(export_dir)!r} does not output embeddings; "
                           "export the run again with `kcls export RUN_DIR`.")
    by_shape: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = defaultdict(list)
    skipped = []
    for position, path in enumerate(paths):
        try:
            image = tf.io.decode_image(path.read_bytes(), channels=3, dtype=tf.uint8,
                                       expand_animations=False).numpy()
        except (OSError, tf.errors.OpError):
            skipped.append(printable_path(path))
            continue
        by_shape[image.shape].append((position, image))
    outputs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for group in by_shape.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            served = signature(images=tf.constant(np.stack([image for _, image in chunk])))
            for (position, _), probabilities, embedding in zip(
                    chunk, served["probabilities"].numpy(), served["embedding"].numpy()):
                outputs[position] = (probabilities, embedding)
    order = sorted(outputs)
    if not order:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), skipped
    return (np.stack([outputs[i][0] for i in order]), np.stack([outputs[i][1] for i in order]),
            skipped)


def monitor(model_dir: str | Path, data: str | Path | None = None,
            predictions: str | Path | None = None, out_dir: str | Path | None = None,
            alpha: float = ALPHA, permutations: int = PERMUTATIONS, overwrite: bool = False,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Compares recent data (`data` images or logged `predictions`) with the reference.

    Args:
        model_dir: an export (version or model folder: latest version).
        data: a folder of recent images (`PATH` or `folder:PATH`).
        predictions: a JSON-lines prediction log (`kcls.monitoring.prediction_log`). Exactly one of
            `data` and `predictions`.
        out_dir: where the report goes; default
            `<base_dir>/<model>/monitor/<version>/<UTC time>/` (`kcls.layout.model_output_dir`).
        alpha: family-wise false-alarm rate of the decision (`kcls.monitoring.drift.compare`).
        permutations: relabellings of the embedding MMD test.
        overwrite: replace the report of an earlier `monitor` call in `out_dir`.
        log: receives a line naming the image files that did not decode, if any.

    Returns:
        The `kcls.monitoring.drift.compare` result plus `model_dir` (the export version), `source`,
        `reference_examples`, `reference_warning` (a reference too small for `alpha`,
        `kcls.monitoring.drift.small_reference_warning`, or None), `skipped` (image
        files that did not decode),
        `skipped_lines` (unusable log lines) and `out_dir`; also written to `monitor.json`.

    Raises:
        FileNotFoundError, MissingReferenceError: no export, or one without a profile.
        MonitorError: bad arguments or data (the message names the fix).
        OutputFolderError: `out_dir` cannot be written (checked before any image is read).
        PredictionLogError: a prediction log without a usable line.
    """
    if (data is None) == (predictions is None):
        raise MonitorError("Pass exactly one of --data FOLDER (recent images) and "
                           "--predictions FILE.jsonl (logged TF Serving responses).")
    if not 0.0 < alpha < 1.0:
        raise MonitorError(f"--alpha {alpha} must be in (0, 1), e.g. 0.05.")
    export_dir, profile = load_reference(model_dir)
    out_dir = check_output_dir(out_dir or model_output_dir(
        export_dir, MONITOR_DIR, time.strftime("%Y%m%d-%H%M%S", time.gmtime())))
    if (out_dir / MONITOR_FILE).exists() and not overwrite:
        raise MonitorError(f"{out_dir / MONITOR_FILE} exists; pass another --out folder or "
                           "--overwrite to replace it.")
    class_names = profile["class_names"]
    embeddings, skipped, skipped_lines = None, [], []
    if data is not None:
        paths = image_files(data)
        probabilities, embeddings, skipped = image_outputs(export_dir, paths)
        if skipped:
            log(skipped_files_line(skipped))
        classes = probabilities.argmax(axis=1) if len(probabilities) else np.zeros(0, int)
        confidences = probabilities.max(axis=1) if len(probabilities) else np.zeros(0)
        source = f"folder:{Path(str(data).removeprefix('folder:'))}"
    else:
        classes, confidences = read_predictions(predictions, class_names, skipped_lines)
        if skipped_lines:
            log(skipped_lines_line(predictions, skipped_lines))
        source = f"predictions:{predictions}"
    if len(classes) < MIN_EXAMPLES:
        raise MonitorError(f"{source} has {len(classes)} usable predictions; the tests need "
                           f"at least {MIN_EXAMPLES} (a few hundred detect small shifts).")
    result = compare(profile, classes, confidences, embeddings, alpha, permutations)
    warning = small_reference_warning(profile["examples"], alpha)
    if warning:
        log(f"warning: {warning}")
    result.update(model_dir=str(export_dir), source=source, reference_warning=warning,
                  reference_examples=profile["examples"], skipped=skipped,
                  skipped_lines=skipped_lines, out_dir=str(out_dir))
    result["verdict"] = verdict_line(result)
    write_monitor_report(out_dir, result, profile)
    return result


def verdict_line(result: dict[str, Any]) -> str:
    """One line: drift or not, the sample sizes, the tests that flagged it (or the
    smallest p-value). `result`: a `monitor` result (`reference_examples` set)."""
    p_values = {name: test["p_value"] for name, test in result["tests"].items()}
    sizes = (f"{result['examples']} current predictions vs {result['reference_examples']} "
             "reference held-out images")
    if result["drift"]:
        flagged = ", ".join(f"{name} p={p_values[name]:.2g}" for name in result["flagged"])
        return (f"DRIFT: {sizes}; flagged by {flagged} "
                f"(threshold {result['threshold']:.3g})")
    smallest = min(p_values, key=p_values.get)
    return (f"no drift: {sizes}; smallest p {p_values[smallest]:.2g} ({smallest}; "
            f"threshold {result['threshold']:.3g})")


def write_monitor_report(out_dir: str | Path, result: dict[str, Any],
                         profile: dict[str, Any]) -> list[Path]:
    """Writes `monitor.json`, `monitor.md` and the plots into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [plot_classes(result, profile, out_dir / MONITOR_CLASSES_PLOT),
             plot_confidence(result, profile, out_dir / MONITOR_CONFIDENCE_PLOT)]
    if "projected" in result["current"] and "embedding" in profile:
        plots.append(plot_embedding(result, profile, out_dir / MONITOR_EMBEDDING_PLOT))
    report = write_text(out_dir / MONITOR_REPORT_FILE,
                        markdown_monitor_report(result, [path.name for path in plots]))
    written = write_json(out_dir / MONITOR_FILE, result)
    return [written, report, *plots]


def markdown_monitor_report(result: dict[str, Any], plots: list[str]) -> str:
    """The verdict, one table row per test and the plots, as Markdown."""
    lines = ["# Drift monitoring", "", f"**{result['verdict']}**", "",
             *([f"Warning: {result['reference_warning']}", ""]
               if result.get("reference_warning") else []),
             f"Model `{result['model_dir']}`, current data `{result['source']}`. "
             f"Decision: {result['decision']}, alpha {result['alpha']}.", "",
             "| test | statistic | p-value | drift |", "| --- | --- | --- | --- |"]
    describe = {
        "predicted_class": lambda t: f"chi2 {t['chi2']:.2f} (dof {t['dof']}), PSI {t['psi']:.3f}",
        "confidence": lambda t: (f"KS {t['ks']:.3f} (mean {t['reference_mean']:.3f} -> "
                                 f"{t['current_mean']:.3f})"),
        "embedding": lambda t: f"MMD² {t['mmd2']:.4f} (RBF, bandwidth {t['bandwidth']:.3g})",
    }
    for name, test in result["tests"].items():
        lines.append(f"| {name} | {describe[name](test)} | {test['p_value']:.3g} | "
                     f"{'**yes**' if test['drift'] else 'no'} |")
    if result.get("skipped"):
        lines += ["", f"Skipped {len(result['skipped'])} files that did not decode."]
    if result.get("skipped_lines"):
        lines += ["", f"Skipped {len(result['skipped_lines'])} unusable log lines:", ""]
        lines += [f"- {entry}" for entry in result["skipped_lines"][:20]]
    lines += ["", "## Reference vs current", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def plot_classes(result: dict[str, Any], profile: dict[str, Any], path: Path) -> Path:
    """Predicted-class shares, reference vs current, side by side."""
    names = profile["class_names"]
    positions = np.arange(len(names))
    figure, axis = plt.subplots(figsize=(max(5.0, 0.5 * len(names) + 2), 4))
    axis.bar(positions - 0.2, profile["predicted_distribution"], 0.4, label="reference")
    axis.bar(positions + 0.2, result["current"]["predicted_distribution"], 0.4, label="current")
    axis.set_xticks(positions, names, rotation=45 if len(names) > 8 else 0, ha="right")
    test = result["tests"]["predicted_class"]
    axis.set_title(f"predicted classes (PSI {test['psi']:.3f}, p {test['p_value']:.2g})")
    axis.set_ylabel("share of predictions")
    axis.legend()
    return save_figure(figure, path)


def plot_confidence(result: dict[str, Any], profile: dict[str, Any], path: Path) -> Path:
    """Top-1 confidence histograms (densities), reference vs current."""
    edges = np.asarray(profile["confidence_histogram"]["edges"])
    figure, axis = plt.subplots(figsize=(6, 4))
    for counts, label in ((profile["confidence_histogram"]["counts"], "reference"),
                          (result["current"]["confidence_histogram"], "current")):
        counts = np.asarray(counts, np.float64)
        axis.stairs(counts / max(counts.sum(), 1.0), edges, label=label, linewidth=2)
    test = result["tests"]["confidence"]
    axis.set_title(f"top-1 confidence (KS {test['ks']:.3f}, p {test['p_value']:.2g})")
    axis.set_xlabel("confidence")
    axis.set_ylabel("share of predictions")
    axis.legend(loc="upper left")
    return save_figure(figure, path)


def plot_embedding(result: dict[str, Any], profile: dict[str, Any], path: Path) -> Path:
    """The first two principal components of the embeddings, reference vs current."""
    reference = np.asarray(profile["embedding"]["projected"])
    current = np.asarray(result["current"]["projected"])
    figure, axis = plt.subplots(figsize=(5, 5))
    for points, label in ((reference, "reference"), (current, "current")):
        if points.shape[1] >= 2:
            axis.scatter(points[:, 0], points[:, 1], s=6, alpha=0.5, label=label)
    test = result["tests"]["embedding"]
    axis.set_title(f"embedding PC1/PC2 (MMD p {test['p_value']:.2g})")
    axis.legend()
    return save_figure(figure, path)
