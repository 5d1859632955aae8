"""The prediction log: served predictions as JSON lines, written by `kcls predict --log`
and read by `kcls monitor --predictions`.

One JSON object per line and per image:

    {"time": "2026-11-28T05:53:13Z", "model": "quickstart", "version": null,
     "image": "digit.png", "labels": ["7", "1"], "scores": [0.98, 0.01],
     "classes": [7, 1], "probabilities": [0.0, 0.01, ...]}

`read_predictions` also takes the body of a TF Serving REST `:predict` response per line
(`{"predictions": [{...}, ...]}`, row format, or `{"outputs": {...}}`, columnar), so
responses logged by other clients work too. A row needs `probabilities`, or the top-k
`scores` with `classes` or `labels`.

Example:

>>> append_predictions("predictions.jsonl", [record])  # doctest: +SKIP
>>> classes, confidences = read_predictions("predictions.jsonl", class_names)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


class PredictionLogError(ValueError):
    """A prediction log line that cannot be read; the message names the file and line."""


def prediction_record(image: str, labels: list[str], scores: list[float], classes: list[int],
                      probabilities: list[float], model: str,
                      version: int | None = None) -> dict[str, Any]:
    """One log line's object for one served image (UTC time stamp, model and outputs)."""
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": model,
            "version": version, "image": image, "labels": list(labels),
            "scores": [float(score) for score in scores],
            "classes": [int(index) for index in classes],
            "probabilities": [float(value) for value in probabilities]}


def append_predictions(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Appends one JSON line per record to `path` (created if missing).

    Each line is written with one `write` call on a file opened for appending, so lines
    from concurrent writers do not interleave on local file systems.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
            file.flush()
            os.fsync(file.fileno())


def read_predictions(path: str | Path, class_names: list[str],
                     skipped: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The top-1 classes and confidences of every usable prediction in a log.

    A line that cannot be used (not UTF-8, not JSON, no usable prediction, a label the
    model does not have, probabilities that are NaN or outside [0, 1]) is skipped as a
    whole and named in `skipped` (`line N: reason`); blank lines are ignored.

    Args:
        path: a JSON-lines file (see the module docstring).
        class_names: the model's classes, to map `labels` to indices.
        skipped: list[str] that receives one entry per skipped line.

    Returns:
        `(classes int64 [N], confidences float64 [N])`.

    Raises:
        FileNotFoundError: no file at `path`.
        PredictionLogError: no usable prediction in the file (the message names the
            first bad lines).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No prediction log at {str(path)!r}; write one with "
                                "`kcls predict --server URL --model NAME --log FILE IMAGE...`.")
    index = {name: position for position, name in enumerate(class_names)}
    skipped = [] if skipped is None else skipped
    predictions: list[tuple[int, float]] = []
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            if not raw.strip():
                continue
            try:
                predictions += [_top1(row, index)
                                for row in _rows(json.loads(raw.decode("utf-8")))]
            except UnicodeDecodeError:
                skipped.append(f"line {number}: not UTF-8 text")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as error:
                skipped.append(f"line {number}: {_describe(error)}")
    if not predictions:
        raise PredictionLogError(
            f"{path}: no usable prediction ({'; '.join(skipped[:3]) or 'no lines'}"
            f"{'; ...' if len(skipped) > 3 else ''}); log served answers with `kcls predict "
            "--server URL --model NAME --log FILE IMAGE...`.")
    classes, confidences = zip(*predictions)
    return np.asarray(classes, np.int64), np.asarray(confidences, np.float64)


def skipped_lines_line(path: str | Path, skipped: list[str], shown: int = 3) -> str:
    """One line counting and naming (the first `shown` of) the unusable lines of a log.

    >>> skipped_lines_line("a.jsonl", ["line 2: not UTF-8 text"])
    'skipped 1 unusable line(s) of a.jsonl: line 2: not UTF-8 text'
    """
    return (f"skipped {len(skipped)} unusable line(s) of {path}: " + "; ".join(skipped[:shown])
            + (f"; ... (all {len(skipped)} in monitor.json)" if len(skipped) > shown else ""))


def _rows(entry: Any) -> list[Mapping[str, Any]]:
    """The per-image rows of one log line: a record, or a TF Serving response body."""
    if not isinstance(entry, dict):
        raise ValueError("expected a JSON object")
    if "predictions" in entry:
        return list(entry["predictions"])
    if "outputs" in entry:  # columnar: one list per output name
        outputs = entry["outputs"]
        if not isinstance(outputs, dict) or not outputs:
            raise ValueError("empty outputs")
        size = len(next(iter(outputs.values())))
        return [{name: values[i] for name, values in outputs.items()} for i in range(size)]
    return [entry]


def _top1(row: Mapping[str, Any], index: dict[str, int]) -> tuple[int, float]:
    if not isinstance(row, dict):
        raise ValueError("a prediction must be a JSON object")
    if row.get("probabilities"):
        probabilities = np.asarray(row["probabilities"], np.float64)
        if probabilities.shape != (len(index),):
            raise ValueError(f"{len(probabilities)} probabilities for {len(index)} classes")
        _check_probability(probabilities, "probabilities")
        return int(probabilities.argmax()), float(probabilities.max())
    confidence = float(row["scores"][0])
    _check_probability(np.asarray([confidence]), "scores")
    if row.get("classes") is not None and len(row["classes"]):
        top_class = int(row["classes"][0])
        if not 0 <= top_class < len(index):
            raise ValueError(f"class {top_class} outside the model's {len(index)} classes")
        return top_class, confidence
    label = row["labels"][0]
    if label not in index:
        raise ValueError(f"label {label!r} is not one of the model's classes")
    return index[label], confidence


def _check_probability(values: np.ndarray, name: str) -> None:
    """Refuses NaN, infinite or out-of-range probabilities (JSON allows NaN)."""
    if not np.all(np.isfinite(values)) or values.min() < -1e-6 or values.max() > 1 + 1e-6:
        raise ValueError(f"{name} that are not probabilities in [0, 1] (NaN or out of range)")


def _describe(error: Exception) -> str:
    if isinstance(error, KeyError):
        return f"missing {error}; need probabilities, or scores with classes or labels"
    return str(error).splitlines()[0][:200]
