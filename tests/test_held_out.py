"""Issue 29, defects 7, 9 and 10: the test images a run held out stay its test images,
the reference profile uses every held-out image, and one served model keeps one class set."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from kcls.cli import main
from kcls.config import ConfigError, DataConfig, Recipe, apply_overrides, default_model_name
from kcls.data.sources import load_splits, recorded_test_examples
from kcls.files import write_json
from kcls.layout import (
    CONFIDENT_MISTAKES_FILE,
    METADATA_FILE,
    RUN_INFO_FILE,
    RUN_REFERENCE_FILE,
)
from kcls.recipes import load_recipe

TINY = ["train.frozen_epochs=1", "train.unfrozen_epochs=0", "train.steps_per_epoch=1",
        "train.jit_compile=false", "data.image_size=16", "data.batch_size=8",
        "data.test_fraction=0.25", "data.validation_fraction=0.2"]


def add_images(root: Path, count: int, start: int = 0) -> Path:
    """`count` PNGs per class (red and blue, with noise) under `root/{red,blue}/`."""
    rng = np.random.default_rng(start)
    for channel, name in ((0, "red"), (2, "blue")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(start, start + count):
            image = rng.integers(0, 90, (16, 16, 3)).astype(np.uint8)
            image[..., channel] = 200
            Image.fromarray(image).save(root / name / f"{index:03d}.png")
    return root


def invoke(*args: object):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def test_a_folder_split_records_its_test_files_and_reads_them_back_after_growth(tmp_path):
    root = add_images(tmp_path / "photos", 8)
    config = DataConfig(source=f"folder:{root}", test_fraction=0.25, validation_fraction=0.2)
    first = load_splits(config)
    assert len(first.test_files) == first.sizes["test"] == 4
    assert all(Path(path).is_relative_to(root) for path in first.test_files)
    add_images(root, 8, start=8)  # the folder doubles
    grown = load_splits(config)
    assert set(grown.test_files) != set(first.test_files)  # what the old code scored
    held_out = recorded_test_examples(config, first.class_names, first.test_files)
    labels = [int(label) for _, label in held_out.examples.as_numpy_iterator()]
    assert held_out.files == first.test_files and held_out.skipped == []
    assert labels == [first.class_names.index(Path(path).parent.name)
                      for path in first.test_files]
    Path(first.test_files[0]).unlink()  # a recorded file that is gone is named, not replaced
    held_out = recorded_test_examples(config, first.class_names, first.test_files)
    assert held_out.files == first.test_files[1:]
    (gone,) = held_out.skipped
    assert gone.startswith(first.test_files[0]) and "no longer" in gone


def test_evaluate_scores_the_test_files_the_run_recorded(untrained_models, tmp_path):
    run_dir, _, _ = untrained_models
    root = add_images(tmp_path / "photos", 10)
    recorded = sorted(str(path) for path in root.glob("*/00[012].png"))
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = json.loads((run / "config.json").read_text())
    config["data"]["source"] = f"folder:{root}"
    write_json(run / "config.json", config)
    info = json.loads((run / RUN_INFO_FILE).read_text())
    write_json(run / RUN_INFO_FILE, {**info, "class_names": ["blue", "red"],
                                     "test_files": recorded})
    result = invoke("evaluate", run, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    assert "examples 6 " in result.output  # not the 4 of 20 a new split would hold out
    with open(tmp_path / "report" / CONFIDENT_MISTAKES_FILE) as file:
        mistakes = list(csv.DictReader(file))
    assert {row["file"] for row in mistakes} <= set(recorded)
    assert all(row["true"] == Path(row["file"]).parent.name for row in mistakes)
    # A run of an older kcls (no test_files): evaluated, with a warning.
    write_json(run / RUN_INFO_FILE, {**info, "class_names": ["blue", "red"]})
    older = invoke("evaluate", run)
    assert older.exit_code == 0 and "recorded no test files" in older.output


def test_a_folder_recipe_is_served_under_its_folder_name():
    recipe = load_recipe("finetune")
    assert apply_overrides(recipe, ["data.source=folder:../data/hymenoptera/train"]
                           ).model_name == "hymenoptera-train"
    assert apply_overrides(recipe, ["data.source=folder:/srv/birds/"]).model_name == "birds"
    assert apply_overrides(recipe, ["data.source=folder:/srv/birds",
                                    "export.model_name=zoo"]).model_name == "zoo"
    assert load_recipe("quickstart").model_name == "quickstart"
    for source in ("folder:.", "folder:/x/.hidden", "folder:a b/c\td"):
        name = default_model_name("finetune", source)
        Recipe(name=name)  # a name a run directory and a model folder can have


def test_an_export_with_other_classes_than_the_latest_version_is_refused(untrained_models,
                                                                        tmp_path):
    from kcls.load import load_export
    from kcls.serving.export import export_saved_model

    _, export_dir, _ = untrained_models
    loaded = load_export(export_dir)
    base = tmp_path / "saved_models"
    export_saved_model(loaded.classifier, loaded.recipe, loaded.class_names, base_dir=base)
    with pytest.raises(ConfigError, match=r"tiny/1 serves the classes cat, dog; this model has "
                                          r"ant, bee.*export.model_name"):
        export_saved_model(loaded.classifier, loaded.recipe, ["ant", "bee"], base_dir=base)
    assert sorted(path.name for path in (base / "tiny").iterdir()) == ["1"]
    again = export_saved_model(loaded.classifier, loaded.recipe, loaded.class_names,
                               base_dir=base)
    assert again == base / "tiny" / "2"


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A tiny run of the quickstart recipe on a 2 x 10 image folder, exported."""
    from kcls.workflows.run import run_recipe

    root = tmp_path_factory.mktemp("folder_run")
    photos = add_images(root / "colours" / "train", 10)
    recipe = apply_overrides(load_recipe("quickstart"), [
        *TINY, f"data.source=folder:{photos}", f"export.base_dir={root / 'saved_models'}"])
    lines: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_recipe(recipe, root / "run", log=lines.append, verbose=0)
    return root, photos, recipe, result, lines


@pytest.mark.slow
def test_a_run_records_its_test_files_and_evaluate_keeps_scoring_them(folder_run):
    root, photos, recipe, result, _ = folder_run
    run_info = json.loads((result.run_dir / RUN_INFO_FILE).read_text())
    metadata = json.loads((result.export_dir / METADATA_FILE).read_text())
    assert len(run_info["test_files"]) == result.metrics["examples"] == 5
    assert metadata["test_files"] == run_info["test_files"]
    add_images(photos, 10, start=10)  # the folder doubles after the run
    for model in (result.run_dir, result.export_dir):
        evaluated = invoke("evaluate", model, "--out", root / f"report-{model.name}")
        assert evaluated.exit_code == 0, evaluated.output
        assert "examples 5 " in evaluated.output, evaluated.output
    mistakes = (result.run_dir / CONFIDENT_MISTAKES_FILE).read_text().splitlines()
    assert mistakes[0] == "rank,file,true,predicted,confidence"
    assert all(line.split(",")[1] in run_info["test_files"] for line in mistakes[1:])


@pytest.mark.slow
def test_the_reference_profile_uses_every_held_out_image_and_warns_when_small(folder_run):
    _, _, _, result, lines = folder_run
    reference = json.loads((result.run_dir / RUN_REFERENCE_FILE).read_text())
    run_info = json.loads((result.run_dir / RUN_INFO_FILE).read_text())
    assert reference["split"] == "validation+test"
    assert reference["examples"] == 5 + 3  # test and validation, not the test split alone
    assert run_info["metrics"]["examples"] == 5
    assert any(line.startswith("warning: the reference profile holds 8 held-out images")
               for line in lines)
    assert result.export_dir.parent.name == "colours-train"  # named after the data folder


@pytest.mark.slow
def test_another_data_set_into_the_same_served_model_is_refused_before_training(
        folder_run, tmp_path):
    from kcls.workflows.run import run_recipe

    root, _, recipe, result, _ = folder_run
    other = add_images(tmp_path / "other", 10)
    for name in ("red", "blue"):
        (other / name).rename(other / f"dark-{name}")
    # The same model name (as two `finetune` runs had): refused, and nothing trained.
    clash = apply_overrides(recipe, [f"data.source=folder:{other}",
                                     f"export.model_name={result.export_dir.parent.name}"])
    with pytest.raises(ConfigError, match="serves the classes blue, red; this model has "
                                          "dark-blue, dark-red"):
        run_recipe(clash, tmp_path / "run", log=lambda line: None, verbose=0)
    assert not (tmp_path / "run").exists()
    exported = invoke("export", result.run_dir, "--model-name", "colours-copy")
    assert exported.exit_code == 0, exported.output
    assert (root / "saved_models" / "colours-copy" / "1" / METADATA_FILE).is_file()
