"""Issue 25, item 1: a folder already split into `train/`, `val/` (`valid/`,
`validation/`) and `test/` is used as those splits, on real files and real TensorFlow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import add_images

from kcls.cli import main
from kcls.config import ConfigError, DataConfig
from kcls.data import sources
from kcls.data.folder import scan_folder
from kcls.data.pack import pack_source
from kcls.data.sources import file_splits, load_splits

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def split_root(root: Path, **counts: int) -> Path:
    """`root/<split>/<class>/` with `counts[split]` images per class."""
    for split, count in counts.items():
        add_images(root / split, count)
    return root


def split_of(path: str, root: Path) -> str:
    return Path(path).relative_to(root).parts[0]


def split_folders_of(files, root: Path) -> dict[str, set[str]]:
    return {name: {split_of(path, root) for path in files.paths[indices]}
            for name, indices in files.indices.items() if len(indices)}


def test_a_train_and_val_root_is_two_splits_not_two_classes(tmp_path):
    root = split_root(tmp_path / "birds", train=10, val=3)
    config = DataConfig(source=f"folder:{root}", test_fraction=0.2, validation_fraction=0.1)
    splits = load_splits(config)
    assert splits.class_names == ["cat", "dog"]
    assert splits.sizes == {"train": 16, "validation": 6, "test": 4}
    files = file_splits(config)
    # val/ validates; the test split is carved from train/ (stratified), never from val/.
    assert split_folders_of(files, root) == {"train": {"train"}, "validation": {"val"},
                                             "test": {"train"}}
    assert np.bincount(files.labels[files.indices["test"]]).tolist() == [2, 2]
    assert splits.test_files == files.paths[files.indices["test"]].tolist()
    again = file_splits(config)  # seeded: the same carve every time
    assert all(np.array_equal(again.indices[name], files.indices[name]) for name in files.indices)


@pytest.mark.parametrize("validation_name", ["valid", "validation"])
def test_given_test_and_validation_folders_are_used_as_they_are(tmp_path, validation_name):
    root = split_root(tmp_path / "flowers", **{"train": 6, validation_name: 2, "test": 3})
    files = file_splits(DataConfig(source=f"folder:{root}"))
    assert split_folders_of(files, root) == {"train": {"train"}, "validation": {validation_name},
                                             "test": {"test"}}
    assert [len(files.indices[name]) for name in ("train", "validation", "test")] == [12, 4, 6]
    assert sorted(files.paths[files.indices["test"]].tolist()) == sorted(
        str(path) for path in (root / "test").glob("*/*.png"))


def test_a_given_test_folder_never_trains_and_validation_is_carved_from_train(tmp_path):
    root = split_root(tmp_path / "cells", train=10, test=2)
    files = file_splits(DataConfig(source=f"folder:{root}", validation_fraction=0.2))
    assert split_folders_of(files, root) == {"train": {"train"}, "validation": {"train"},
                                             "test": {"test"}}
    assert len(files.indices["validation"]) == 4
    without = file_splits(DataConfig(source=f"folder:{root}", validation_fraction=0.0))
    assert len(without.indices["validation"]) == 0 and len(without.indices["train"]) == 20


def test_a_root_mixing_class_and_split_folders_is_refused_naming_them(tmp_path):
    root = split_root(tmp_path / "mixed", train=3)
    add_images(root, 2, classes=("owl",))
    with pytest.raises(ConfigError, match=r"mixes split folders \(train\) and other folders "
                                          r"\(owl\)") as error:
        scan_folder(root)
    assert "\n" not in str(error.value) and "move" in str(error.value)


def test_split_folders_with_different_classes_are_refused_naming_them(tmp_path):
    root = split_root(tmp_path / "uneven", train=3)
    add_images(root / "val", 2, classes=("cat",))
    add_images(root / "test", 2, classes=("cat", "dog", "eel"))
    with pytest.raises(ConfigError) as error:
        scan_folder(root)
    message = str(error.value)
    assert "\n" not in message
    assert "val/ lacks dog" in message and "test/ has eel" in message


def test_two_validation_folders_or_no_train_folder_are_refused(tmp_path):
    both = split_root(tmp_path / "both", train=2, val=2, valid=2)
    with pytest.raises(ConfigError, match="val and valid"):
        scan_folder(both)
    no_train = split_root(tmp_path / "no_train", val=2, test=2)
    with pytest.raises(ConfigError, match="no train folder"):
        scan_folder(no_train)


def test_skipped_files_of_every_split_folder_are_named_and_the_fingerprint_sees_splits(
        tmp_path):
    root = split_root(tmp_path / "pets", train=6, val=2)
    broken = root / "val" / "dog" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    files = file_splits(DataConfig(source=f"folder:{root}"))
    assert files.skipped == [str(broken)]
    assert len(files.indices["validation"]) == 4  # the broken file is not one of them
    flat = tmp_path / "flat"
    add_images(flat, 8)  # the same class folders without the split layout
    assert files.fingerprint != file_splits(DataConfig(source=f"folder:{flat}")).fingerprint
    (root / "val" / "cat" / "000.png").rename(root / "train" / "cat" / "100.png")
    assert file_splits(DataConfig(source=f"folder:{root}")).fingerprint != files.fingerprint


def test_evaluating_on_a_split_root_scores_its_test_folder(tmp_path):
    root = split_root(tmp_path / "given", train=4, val=2, test=3)
    held_out = sources.test_examples(DataConfig(), ["cat", "dog"], f"folder:{root}")
    assert sorted(held_out.files) == sorted(str(path) for path in (root / "test").glob("*/*"))
    labels = [int(label) for _, label in held_out.examples.as_numpy_iterator()]
    assert labels == [["cat", "dog"].index(Path(path).parent.name) for path in held_out.files]
    carved = split_root(tmp_path / "carved", train=5, val=2)
    held_out = sources.test_examples(DataConfig(test_fraction=0.2), ["cat", "dog"],
                                     f"folder:{carved}")
    assert len(held_out.files) == 2  # carved from train/, as training would
    assert {split_of(path, carved) for path in held_out.files} == {"train"}


def test_kcls_evaluate_on_a_split_root_says_it_scores_the_test_folder(untrained_models,
                                                                      tmp_path):
    run_dir, _, _ = untrained_models  # classes cat and dog
    root = split_root(tmp_path / "given", train=4, val=2, test=3)
    result = CliRunner().invoke(main, ["evaluate", str(run_dir), "--data", f"folder:{root}"])
    assert result.exit_code == 0, result.output
    assert f"scoring its test split, {root / 'test'}" in result.output
    assert "examples 6 " in result.output


def test_a_pack_of_a_split_root_keeps_its_splits(tmp_path):
    root = split_root(tmp_path / "given", train=4, val=2, test=3)
    result = pack_source(DataConfig(source=f"folder:{root}"), tmp_path / "pack",
                         log=lambda line: None)
    assert result.examples == {"train": 8, "validation": 4, "test": 6}
    packed = load_splits(DataConfig(source=f"tfrecord:{tmp_path / 'pack'}"))
    assert packed.class_names == ["cat", "dog"]
    assert packed.sizes == {"train": 8, "validation": 4, "test": 6}


@pytest.mark.skipif(not (SHARED_DATA / "hymenoptera" / "val").is_dir(),
                    reason="../shared/data/hymenoptera (train/ and val/) is not present "
                           "(only in the kcls workspace)")
def test_the_real_hymenoptera_root_trains_on_train_and_validates_on_val():
    root = (SHARED_DATA / "hymenoptera").resolve()
    files = file_splits(DataConfig(source=f"folder:{root}"))
    assert files.class_names == ["ants", "bees"]
    assert split_folders_of(files, root) == {"train": {"train"}, "validation": {"val"},
                                             "test": {"train"}}
    val_images = {str(path) for path in (root / "val").glob("*/*")}
    assert {str(path) for path in files.paths[files.indices["validation"]]} <= val_images
    assert len(files.indices["validation"]) + sum(
        path.startswith(str(root / "val")) for path in files.skipped) == len(val_images)
