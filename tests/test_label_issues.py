"""Issue 25, item 4: `kcls data label-issues`: out-of-fold probabilities through cleanlab's
`find_label_issues`, on real CIFAR-10 images from ../shared/data."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kcls.cli import main, user_error
from kcls.config import ConfigError, apply_overrides
from kcls.data.label_issues import (
    MissingCleanlabError,
    out_of_fold_probabilities,
    rank_label_issues,
)
from kcls.layout import LABEL_ISSUES_FILE, LABEL_ISSUES_PLOT, LABEL_ISSUES_SUMMARY_FILE
from kcls.recipes import load_recipe

CIFAR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10_train_10k"
needs_cifar = pytest.mark.skipif(not CIFAR.is_dir(), reason=f"{CIFAR} is absent (the shared "
                                 "CIFAR-10 folder of this machine)")
needs_cleanlab = pytest.mark.skipif(importlib.util.find_spec("cleanlab") is None,
                                    reason='cleanlab is not installed (pip install '
                                    '"kcls[quality]")')


@needs_cleanlab
def test_flipped_labels_of_separable_embeddings_are_flagged_first():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    embeddings = rng.normal(scale=0.5, size=(120, 8)) + 4.0 * np.eye(3, 8)[labels]
    given = labels.copy()
    flipped = np.array([3, 50, 97])
    given[flipped] = (labels[flipped] + 1) % 3
    probabilities = out_of_fold_probabilities(embeddings, given, 3, folds=4)
    assert probabilities.shape == (120, 3)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    issues = rank_label_issues(given, probabilities)
    # cleanlab flags what it is confident about (2 of the 3 here), most suspect first;
    # the scores rank all three flipped labels lowest.
    assert len(issues.indices) >= 2 and set(issues.indices) <= set(flipped)
    assert sorted(np.argsort(issues.scores)[:3].tolist()) == flipped.tolist()
    assert issues.suggested[flipped].tolist() == labels[flipped].tolist()


def test_without_cleanlab_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cleanlab", None)
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    with pytest.raises(MissingCleanlabError, match=r'pip install "kcls\[quality\]"'):
        rank_label_issues(np.zeros(4, np.int64), np.full((4, 2), 0.5, np.float32))
    assert user_error(MissingCleanlabError("x")).exit_code == 2


def write_folder(root: Path, per_class: int, classes=("airplane", "frog"), skip: int = 0
                 ) -> Path:
    for name in classes:
        (root / name).mkdir(parents=True)
        for path in sorted((CIFAR / name).iterdir())[skip:skip + per_class]:
            shutil.copyfile(path, root / name / path.name)
    return root


@needs_cifar
def test_bad_inputs_are_refused_before_anything_is_embedded(tmp_path):
    root = write_folder(tmp_path / "tiny", 6)
    runner = CliRunner()
    result = runner.invoke(main, ["data", "label-issues", f"folder:{root}", "--set",
                                  "data.validation_fraction=0", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "at least 5 training images" in result.output
    result = runner.invoke(main, ["data", "label-issues", f"folder:{root}", "--recipe",
                                  "quickstart", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "model.weights=None" in result.output
    from kcls.workflows.label_issues import find_label_issues_of_source

    recipe = apply_overrides(load_recipe("finetune"), [f"data.source=folder:{root}",
                                                       "model.task=multilabel"])
    with pytest.raises(ConfigError, match="single labels"):
        find_label_issues_of_source(recipe, tmp_path / "out")


@pytest.mark.slow
@needs_cifar
@needs_cleanlab
def test_the_cli_flags_moved_images_and_writes_csv_json_and_png(tmp_path):
    root = tmp_path / "cifar"
    write_folder(root / "train", 16)
    write_folder(root / "test", 2, skip=16)
    moved = root / "train" / "frog" / "moved-airplane.jpg"
    next((root / "train" / "airplane").iterdir()).rename(moved)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "data", "label-issues", f"folder:{root}", "--set", "data.image_size=64",
        "--set", "data.validation_fraction=0", "--folds", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / LABEL_ISSUES_FILE).open()))
    assert rows and list(rows[0]) == ["path", "given_label", "suggested_label", "score"]
    summary = json.loads((out / LABEL_ISSUES_SUMMARY_FILE).read_text())
    assert summary["images"] == 32 and summary["folds"] == 3
    row = next(row for row in rows if row["path"] == str(moved))
    assert row["given_label"] == "frog" and row["suggested_label"] == "airplane"
    assert (out / LABEL_ISSUES_PLOT).is_file()
