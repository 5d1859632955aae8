"""Issue 25, item 2: single-label CSV manifests (`path,label[,split]`), read as the
recipe's `model.task` says, on real files and real TensorFlow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from kcls.cli import main
from kcls.config import ConfigError, DataConfig, apply_overrides
from kcls.data.manifest import read_manifest
from kcls.data.pack import pack_source
from kcls.data.sources import file_splits, load_splits, recorded_test_examples
from kcls.layout import PACK_MANIFEST_FILE
from kcls.recipes import load_recipe

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def write_images(folder: Path, count: int) -> list[str]:
    """`count` tiny PNGs (noise) under `folder/images/`; their paths relative to `folder`."""
    rng = np.random.default_rng(count)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).save(
            folder / "images" / f"{index:03d}.png")
        names.append(f"images/{index:03d}.png")
    return names


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def cat_owl_manifest(folder: Path, names: list[str]) -> Path:
    """`folder/photos.csv` labelling `names` cat, owl, cat, ... (`path,label`)."""
    return write_csv(folder / "photos.csv", "path,label", [
        f"{name},{'owl' if index % 2 else 'cat'}" for index, name in enumerate(names)])


def test_a_path_label_csv_with_a_split_column_gives_class_index_labels(tmp_path):
    names = write_images(tmp_path, 12)
    splits_of = ["train"] * 8 + ["validation"] * 2 + ["test"] * 2
    manifest = write_csv(tmp_path / "photos.csv", "path,label,split", [
        f"{name},{'owl' if index % 2 else 'cat'},{split}"
        for index, (name, split) in enumerate(zip(names, splits_of))])
    splits = load_splits(DataConfig(source=f"manifest:{manifest}"))  # model.task=multiclass
    assert splits.class_names == ["cat", "owl"]
    assert splits.sizes == {"train": 8, "validation": 2, "test": 2}
    assert splits.train.element_spec[1].shape.as_list() == []  # an int64 class index
    labels = [int(label) for _, label in splits.test.as_numpy_iterator()]
    assert labels == [0, 1]
    assert splits.test_files == [str(tmp_path / name) for name in names[10:]]
    assert splits.train_labels.dtype == np.int64 and splits.train_labels.ndim == 1


def test_without_a_split_column_the_splits_are_stratified_and_seeded(tmp_path):
    names = write_images(tmp_path, 20)
    manifest = cat_owl_manifest(tmp_path, names)
    config = DataConfig(source=f"manifest:{manifest}", test_fraction=0.2,
                        validation_fraction=0.25)
    files = file_splits(config)
    assert np.bincount(files.labels[files.indices["test"]]).tolist() == [2, 2]
    assert np.bincount(files.labels[files.indices["validation"]]).tolist() == [2, 2]
    again = file_splits(config)
    assert all(np.array_equal(files.indices[name], again.indices[name]) for name in files.indices)


def test_unusable_rows_are_skipped_counted_and_named_as_in_multi_label_manifests(tmp_path):
    names = write_images(tmp_path, 6)
    (tmp_path / "labels.txt").write_text("cat\nowl\n")
    manifest = write_csv(tmp_path / "photos.csv", "path,label", [
        f"{names[0]},cat", f"{names[1]},owl", f"{names[2]},cat", f"{names[3]},owl",
        f"{names[4]},eel",          # not in labels.txt
        f"{names[5]},",             # empty label
        f"{names[0]},owl",          # a repeated path
        "images/gone.png,cat",      # a missing file
    ])
    with pytest.warns(UserWarning, match=r"skipped 4 row\(s\): 1 unknown labels, 1 empty "
                                         r"labels, 1 duplicate rows, 1 missing or undecodable"):
        files = read_manifest(manifest, "class_index")
    assert files.class_names == ["cat", "owl"]
    assert files.targets.tolist() == [0, 1, 0, 1]
    assert files.skipped == [
        f"row 6 ({names[4]}): unknown label(s) eel (not in labels.txt)",
        f"row 7 ({names[5]}): empty label", f"row 8 ({names[0]}): duplicate of row 2",
        "row 9 (images/gone.png): missing, unreadable or undecodable image"]


def test_the_task_decides_the_column_and_the_other_one_is_a_one_line_error(tmp_path):
    names = write_images(tmp_path, 4)
    single = write_csv(tmp_path / "single.csv", "path,label",
                       [f"{name},{'cat' if index % 2 else 'owl'}" for index, name in
                        enumerate(names)])
    multi = write_csv(tmp_path / "multi.csv", "path,labels",
                      [f"{name},cat;owl" for name in names])
    with pytest.raises(ConfigError) as error:
        read_manifest(single, "multi_hot")
    assert str(error.value).count("\n") == 0
    assert "has a 'label' column, but model.task=multilabel reads the column 'labels'" in str(
        error.value) and "model.task=multiclass" in str(error.value)
    with pytest.raises(ConfigError, match="has a 'labels' column, but model.task=multiclass "
                                          "reads the column 'label'.*model.task=multilabel"):
        read_manifest(multi, "class_index")
    with pytest.raises(ConfigError, match=r"columns path,label \(one class per image"):
        read_manifest(write_csv(tmp_path / "bad.csv", "file,class", ["a.png,cat"]),
                      "class_index")
    assert read_manifest(multi, "multi_hot").targets.shape == (4, 2)
    # A ';' is part of a single label: nothing is guessed from the file.
    semicolon = write_csv(tmp_path / "semicolon.csv", "path,label",
                          [f"{names[0]},cat;owl", f"{names[1]},cat"])
    assert read_manifest(semicolon, "class_index").class_names == ["cat", "cat;owl"]


def test_a_recipe_reads_the_manifest_its_task_names(tmp_path):
    recipe = load_recipe("quickstart")
    assert recipe.label_format == "class_index"
    multilabel = apply_overrides(recipe, ["model.task=multilabel"])
    assert multilabel.label_format == "multi_hot"
    names = write_images(tmp_path, 10)
    manifest = write_csv(tmp_path / "multi.csv", "path,labels",
                         [f"{name},{'cat;owl' if index % 2 else 'cat'}"
                          for index, name in enumerate(names)])
    data = DataConfig(source=f"manifest:{manifest}", test_fraction=0.2)
    splits = load_splits(data, multilabel.label_format)
    assert splits.train.element_spec[1].shape.as_list() == [2]
    with pytest.raises(ConfigError, match="reads the column 'label'"):
        load_splits(data, recipe.label_format)


def test_recorded_test_files_of_a_single_label_manifest_are_read_back(tmp_path):
    names = write_images(tmp_path, 10)
    manifest = cat_owl_manifest(tmp_path, names)
    config = DataConfig(source=f"manifest:{manifest}", test_fraction=0.2,
                        validation_fraction=0.0)
    splits = load_splits(config)
    held_out = recorded_test_examples(config, ["cat", "owl"], splits.test_files, "class_index")
    assert held_out.files == splits.test_files
    assert [int(label) for _, label in held_out.examples.as_numpy_iterator()] == [
        int(label) for _, label in splits.test.as_numpy_iterator()]


def test_a_single_label_manifest_packs_with_class_indices_and_the_cli_reads_the_task(
        tmp_path):
    names = write_images(tmp_path, 12)
    manifest = cat_owl_manifest(tmp_path, names)
    config = DataConfig(source=f"manifest:{manifest}", test_fraction=0.25,
                        validation_fraction=0.0)
    result = pack_source(config, tmp_path / "pack", log=lambda line: None)
    assert result.examples == load_splits(config).sizes
    assert json.loads((tmp_path / "pack" / PACK_MANIFEST_FILE).read_text())[
        "label_format"] == "class_index"
    refused = CliRunner().invoke(main, ["data", "pack", f"manifest:{manifest}",
                                        str(tmp_path / "other"), "--set",
                                        "model.task=multilabel"])
    assert refused.exit_code != 0
    assert "model.task=multilabel reads the column 'labels'" in refused.output


@pytest.mark.skipif(not (SHARED_DATA / "hymenoptera" / "val").is_dir(),
                    reason="../shared/data/hymenoptera is not present (only in the kcls workspace)")
def test_a_csv_of_real_hymenoptera_photos_trains_with_their_labels(tmp_path):
    root = (SHARED_DATA / "hymenoptera" / "val").resolve()
    photos = sorted(root.glob("*/*.jpg"))
    manifest = write_csv(tmp_path / "hymenoptera.csv", "path,label",
                         [f"{path},{path.parent.name}" for path in photos])
    files = file_splits(DataConfig(source=f"manifest:{manifest}"))
    assert files.class_names == ["ants", "bees"]
    assert len(files.paths) + len(files.skipped) == len(photos)
    assert all(Path(path).parent.name == files.class_names[label]
               for path, label in zip(files.paths, files.labels))
