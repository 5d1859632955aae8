"""`kcls data pack` and `data.source=tfrecord:DIR` on real files and real TensorFlow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from conftest import write_digit_folder, write_truncated_jpeg
from PIL import Image

from kcls.cli import main
from kcls.config import ConfigError, DataConfig, apply_overrides
from kcls.data.pack import pack_source, parse_size
from kcls.data.sources import load_splits
from kcls.data.tfrecord import serialize_example
from kcls.layout import PACK_MANIFEST_FILE, RUN_INFO_FILE

ROOT = Path(__file__).resolve().parents[1]


def examples(dataset: tf.data.Dataset) -> list[tuple[np.ndarray, np.ndarray]]:
    return list(dataset.as_numpy_iterator())


def assert_same_examples(first: tf.data.Dataset, second: tf.data.Dataset) -> None:
    one, two = examples(first), examples(second)
    assert len(one) == len(two)
    for (image, label), (other_image, other_label) in zip(one, two):
        np.testing.assert_array_equal(image, other_image)
        np.testing.assert_array_equal(label, other_label)


def record_file_names(pack: Path, split: str) -> list[str]:
    names = []
    for shard in sorted(pack.glob(f"{split}-*.tfrecord")):
        for record in tf.data.TFRecordDataset(str(shard)).as_numpy_iterator():
            example = tf.train.Example.FromString(record)
            names.append(example.features.feature["file_name"].bytes_list.value[0].decode())
    return names


def test_a_pack_holds_every_image_label_file_name_and_split_of_its_folder(tmp_path):
    root = write_digit_folder(tmp_path / "digits", per_class=40)
    write_truncated_jpeg(root / "1" / "cut.jpg", np.random.default_rng(0))
    (root / "2" / "notes.jpg").write_text("not an image")
    config = DataConfig(source=f"folder:{root}", seed=3)
    lines: list[str] = []
    result = pack_source(config, tmp_path / "pack", shard_bytes=parse_size("8KB"),
                         log=lines.append)
    folder = load_splits(config)
    pack = load_splits(DataConfig(source=f"tfrecord:{tmp_path / 'pack'}"))

    assert result.written and result.shards["train"] > 1  # several shards: round robin
    assert sum(line.startswith("train: shard") for line in lines) == result.shards["train"]
    # The folder's splits, in its order, pixel for pixel; the file names in the records.
    for name in ("train", "validation", "test"):
        assert_same_examples(getattr(folder, name), getattr(pack, name))
    assert pack.sizes == {"train": 85, "validation": 10, "test": 25}  # 120 images, one cut
    assert folder.sizes == {"train": 86, "validation": 10, "test": 25}  # the cut one: read
    assert pack.class_names == folder.class_names == ["0", "1", "2"]
    np.testing.assert_array_equal(np.bincount(pack.train_labels), [29, 28, 28])
    assert pack.fingerprint and pack.fingerprint not in (folder.fingerprint, "")
    # Both files that did not make it are named: the scan's refusal and the decode failure.
    assert sorted(Path(name).name for name in result.skipped) == ["cut.jpg", "notes.jpg"]
    assert pack.skipped == result.skipped
    manifest = json.loads((tmp_path / "pack" / PACK_MANIFEST_FILE).read_text())
    assert manifest["settings"]["seed"] == 3 and manifest["label_format"] == "class_index"
    assert sum(shard["records"] for shard in manifest["splits"]["train"]["shards"]) == 85
    assert manifest["splits"]["test"]["class_counts"] == [8, 9, 8]


def test_every_record_names_its_file_and_the_splits_hold_every_file_once(tmp_path):
    root = write_digit_folder(tmp_path / "digits")
    pack_source(DataConfig(source=f"folder:{root}"), tmp_path / "pack",
                shard_bytes=parse_size("2KB"), log=lambda line: None)
    names = {split: record_file_names(tmp_path / "pack", split)
             for split in ("train", "validation", "test")}
    every = sorted(str(path) for path in root.rglob("*.*"))
    assert sorted(names["train"] + names["validation"] + names["test"]) == every
    assert len(set(names["test"]) & set(names["train"])) == 0


def test_a_multi_label_manifest_packs_with_multi_hot_labels(tmp_path):
    root = write_digit_folder(tmp_path / "images", per_class=10)
    rows = ["path,labels,split"]
    for index, path in enumerate(sorted(root.rglob("*.*"))):
        labels = f"{path.parent.name};odd" if index % 2 else path.parent.name
        rows.append(f"{path.relative_to(root)},{labels},{'test' if index % 4 == 0 else 'train'}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    config = DataConfig(source=f"manifest:{manifest}", validation_fraction=0.0)
    pack_source(config, tmp_path / "pack", log=lambda line: None, label_format="multi_hot")
    source, pack = load_splits(config, "multi_hot"), load_splits(
        DataConfig(source=f"tfrecord:{tmp_path / 'pack'}"))
    assert pack.class_names == source.class_names == ["0", "1", "2", "odd"]
    assert pack.sizes == source.sizes and pack.validation is None
    assert pack.train.element_spec[1].shape.as_list() == [4]
    assert_same_examples(source.train, pack.train)
    assert_same_examples(source.test, pack.test)
    np.testing.assert_array_equal(pack.train_labels, source.train_labels)
    assert json.loads((tmp_path / "pack" / PACK_MANIFEST_FILE).read_text())[
        "label_format"] == "multi_hot"


def test_packing_an_unchanged_source_again_does_nothing_and_a_changed_one_needs_replace(
        tmp_path):
    root = write_digit_folder(tmp_path / "digits")
    config, out = DataConfig(source=f"folder:{root}"), tmp_path / "pack"
    first = pack_source(config, out, log=lambda line: None)
    stamps = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    lines: list[str] = []
    again = pack_source(config, out, log=lines.append)
    assert not again.written and again.fingerprint == first.fingerprint
    assert lines == [f"{out} already holds this pack of {config.source} (the same files and "
                     "settings): nothing to do"]
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == stamps

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "0" / "new.png")
    with pytest.raises(ConfigError, match="other files or settings.*--replace"):
        pack_source(config, out, log=lambda line: None)
    with pytest.raises(ConfigError, match="--replace"):  # another seed: other splits
        pack_source(DataConfig(source=f"folder:{root}", seed=1), out, log=lambda line: None)
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == stamps
    replaced = pack_source(config, out, replace=True, log=lambda line: None)
    assert replaced.written and sum(replaced.examples.values()) == 37
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_a_folder_holding_anything_else_is_refused_untouched(tmp_path):
    root = write_digit_folder(tmp_path / "digits")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds something other than a kcls pack"):
        pack_source(DataConfig(source=f"folder:{root}"), out, log=lambda line: None)
    assert [path.name for path in out.iterdir()] == ["precious.txt"]
    with pytest.raises(ConfigError, match="packs folder:PATH or manifest:PATH.csv"):
        pack_source(DataConfig(source="sklearn:digits"), tmp_path / "pack")


def test_a_pack_interrupted_by_an_error_leaves_nothing_behind(tmp_path):
    root = write_digit_folder(tmp_path / "digits", per_class=30)

    def interrupt(line: str) -> None:
        raise KeyboardInterrupt(line)

    with pytest.raises(KeyboardInterrupt):
        pack_source(DataConfig(source=f"folder:{root}"), tmp_path / "pack",
                    shard_bytes=parse_size("2KB"), log=interrupt)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["digits"]


def test_a_killed_pack_leaves_out_dir_absent_and_the_next_pack_cleans_up(tmp_path):
    root = write_digit_folder(tmp_path / "digits", per_class=30)
    out = tmp_path / "pack"
    script = (
        "import sys, time\n"
        "from kcls.config import DataConfig\n"
        "from kcls.data.pack import pack_source\n"
        "def stall(line):\n"
        "    print(line, flush=True)\n"
        "    time.sleep(600)\n"
        f"pack_source(DataConfig(source={f'folder:{root}'!r}), {str(out)!r}, 2048, log=stall)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout.readline().startswith("train: shard 1 of")  # mid-pack
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not out.exists()
    leftovers = [path for path in tmp_path.iterdir() if path.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and leftovers[0].name.endswith("-pack")
    assert not (leftovers[0] / PACK_MANIFEST_FILE).exists()
    result = pack_source(DataConfig(source=f"folder:{root}"), out, log=lambda line: None)
    assert result.written and sum(result.examples.values()) == 90
    assert [path for path in tmp_path.iterdir() if path.name.startswith(".tmp-")] == []


def test_a_damaged_shard_and_an_undecodable_record_are_counted_not_fatal(tmp_path):
    root = write_digit_folder(tmp_path / "digits", per_class=40)
    out = tmp_path / "pack"
    pack_source(DataConfig(source=f"folder:{root}"), out, shard_bytes=parse_size("8KB"),
                log=lambda line: None)
    shards = sorted(out.glob("train-*.tfrecord"))
    # A flipped byte fails the record's checksum: the reader stops in that shard.
    damaged = bytearray(shards[0].read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    shards[0].write_bytes(bytes(damaged))
    # A record with a valid checksum whose image does not decode.
    records = list(tf.data.TFRecordDataset(str(shards[1])).as_numpy_iterator())
    first = tf.train.Example.FromString(records[0]).features.feature
    name = first["file_name"].bytes_list.value[0].decode()
    with tf.io.TFRecordWriter(str(shards[1])) as writer:
        writer.write(serialize_example(first["image_bytes"].bytes_list.value[0][:40],
                                       first["label"].int64_list.value[0], name))
        for record in records[1:]:
            writer.write(record)

    splits = load_splits(DataConfig(source=f"tfrecord:{out}"))
    read = len(examples(splits.train))
    lost = [entry for entry in splits.skipped if entry.startswith(str(shards[0]))]
    assert len(lost) == 1 and "records unreadable (a damaged shard" in lost[0]
    lost_count = int(lost[0].split(": ")[1].split(" of ")[0])
    assert name in splits.skipped
    assert read == splits.sizes["train"] - lost_count - 1
    examples(splits.train)  # a second pass names nothing twice
    assert len(splits.skipped) == 2


def test_pack_shards_are_split_between_workers_by_file_and_folders_by_example(tmp_path):
    # No public API shards a dataset as MultiWorkerMirroredStrategy does; this private
    # rewrite is the one it applies (tf.distribute's input_ops.auto_shard_dataset).
    from tensorflow.python.data.experimental.ops.distribute import _AutoShardDataset

    from kcls.data.pipeline import train_pipeline

    root = write_digit_folder(tmp_path / "digits", per_class=40)
    pack_source(DataConfig(source=f"folder:{root}"), tmp_path / "pack",
                shard_bytes=parse_size("8KB"), log=lambda line: None)
    pack = load_splits(DataConfig(source=f"tfrecord:{tmp_path / 'pack'}"))
    policy = tf.data.experimental.AutoShardPolicy.FILE
    assert pack.train.options().experimental_distribute.auto_shard_policy == policy
    batches = train_pipeline(pack.train, 3, DataConfig(batch_size=8))
    assert batches.options().experimental_distribute.auto_shard_policy == policy
    shares = [len(examples(_AutoShardDataset(pack.train, 2, worker))) for worker in (0, 1)]
    assert sum(shares) == pack.sizes["train"] and min(shares) > 0
    assert next(iter(_AutoShardDataset(batches, 2, 0)))[0].shape == (8, 32, 32, 3)
    folder = load_splits(DataConfig(source=f"folder:{root}"))
    first_half = examples(_AutoShardDataset(folder.train, 2, 0))  # AUTO falls back to DATA
    assert len(first_half) == (folder.sizes["train"] + 1) // 2


def test_a_source_that_is_not_a_pack_is_one_line_naming_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"holds no pack\.json.*kcls data pack"):
        load_splits(DataConfig(source=f"tfrecord:{tmp_path}"))
    root = write_digit_folder(tmp_path / "digits")
    pack_source(DataConfig(source=f"folder:{root}"), tmp_path / "pack", log=lambda line: None)
    next((tmp_path / "pack").glob("test-*.tfrecord")).unlink()
    with pytest.raises(ConfigError, match=r"1 shard\(s\) of the pack are missing.*--replace"):
        load_splits(DataConfig(source=f"tfrecord:{tmp_path / 'pack'}"))
    (tmp_path / "pack" / PACK_MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="damaged or not a version-1 kcls pack"):
        load_splits(DataConfig(source=f"tfrecord:{tmp_path / 'pack'}"))
    with pytest.raises(ConfigError, match="not a size"):
        parse_size("lots")


@pytest.mark.parametrize("arguments, message", [
    (["data", "pack", "tfds:mnist", "{out}"], "packs folder:PATH or manifest:PATH.csv"),
    (["data", "pack", "folder:{root}", "{out}", "--shard-size", "big"], "is not a size"),
    (["data", "pack", "folder:{root}", "{out}", "--set", "train.epochs=1"],
     "data.KEY=VALUE overrides only"),
    (["data", "pack", "folder:{root}", "{root}"], "something other than a kcls pack"),
    (["data", "pack", "folder:{root}/missing", "{out}"], "does not exist"),
    (["recipe", "run", "quickstart", "--set", "data.source=tfrecord:{out}"],
     "holds no pack.json"),
], ids=["tfds", "size", "override", "other-files", "missing", "not-a-pack"])
def test_cli_pack_errors_are_one_line(tmp_path, arguments, message):
    root = write_digit_folder(tmp_path / "digits", per_class=10)
    (tmp_path / "out").mkdir()
    formatted = [part.format(root=root, out=tmp_path / "out") for part in arguments]
    result = CliRunner().invoke(main, formatted)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output


def test_cli_pack_prints_the_splits_and_a_second_run_says_nothing_to_do(tmp_path):
    root = write_digit_folder(tmp_path / "digits")
    arguments = ["data", "pack", f"folder:{root}", str(tmp_path / "pack"), "--set",
                 "data.test_fraction=0.25", "--recipe", "quickstart"]
    first = CliRunner().invoke(main, arguments)
    assert first.exit_code == 0, first.output
    assert "train 24 (1 shards), validation 3 (1 shards), test 9 (1 shards)" in first.output
    assert f"--set data.source=tfrecord:{tmp_path / 'pack'}" in first.output
    second = CliRunner().invoke(main, arguments)
    assert second.exit_code == 0 and "nothing to do" in second.output


@pytest.mark.slow
def test_a_tiny_recipe_runs_on_a_pack_and_names_what_the_pack_skipped(tmp_path, tiny_recipe):
    from kcls.workflows.run import run_recipe

    root = write_digit_folder(tmp_path / "digits", per_class=12, classes=10)
    (root / "4" / "notes.png").write_text("not an image")
    pack_source(DataConfig(source=f"folder:{root}"), tmp_path / "pack", log=lambda line: None)
    recipe = apply_overrides(tiny_recipe, [f"data.source=tfrecord:{tmp_path / 'pack'}",
                                           "data.image_size=16", "export.enabled=false"])
    lines: list[str] = []
    result = run_recipe(recipe, tmp_path / "run", log=lines.append, verbose=0)
    info = json.loads((tmp_path / "run" / RUN_INFO_FILE).read_text())
    assert result.metrics["examples"] == 24 and info["class_names"] == [str(d) for d in range(10)]
    assert [Path(entry).name for entry in info["skipped_files"]] == ["notes.png"]
    assert any(line.startswith("skipped 1 file(s)") for line in lines)


@pytest.mark.slow
def test_a_recipe_trains_on_a_pack_as_on_its_folder(tmp_path, tiny_recipe):
    from kcls.workflows.run import run_recipe

    root = write_digit_folder(tmp_path / "digits", per_class=30, classes=10)
    write_truncated_jpeg(root / "3" / "cut.jpg", np.random.default_rng(0))
    pack_source(DataConfig(source=f"folder:{root}"), tmp_path / "pack", log=lambda line: None)
    settings = ["data.deterministic=true", "data.image_size=16", "train.steps_per_epoch=none",
                "train.frozen_epochs=0", "train.unfrozen_epochs=2", "export.enabled=false"]
    results = {}
    for source in (f"folder:{root}", f"tfrecord:{tmp_path / 'pack'}"):
        recipe = apply_overrides(tiny_recipe, [*settings, f"data.source={source}"])
        name = source.partition(":")[0]
        results[name] = run_recipe(recipe, tmp_path / name, log=lambda line: None, verbose=0)
    assert results["folder"].metrics["accuracy"] == results["tfrecord"].metrics["accuracy"]
    assert results["folder"].metrics["examples"] == results["tfrecord"].metrics["examples"]
    assert results["tfrecord"].metrics["accuracy"] > 0.3  # learnt something (chance: 0.1)
    for name in ("folder", "tfrecord"):
        info = json.loads((tmp_path / name / RUN_INFO_FILE).read_text())
        assert [Path(entry).name for entry in info["skipped_files"]] == ["cut.jpg"]
