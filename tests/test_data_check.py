"""Issue 25, item 3: `kcls data check` and the leak check of runs, on real CIFAR-10 and
hymenoptera images from ../shared/data (a few dozen of them)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from kcls.cli import main
from kcls.config import ConfigError, DataConfig
from kcls.data import leaks as leak_check
from kcls.data.check import check_source
from kcls.data.check_report import write_data_check
from kcls.data.duplicates import NEAR_DUPLICATE_DISTANCE
from kcls.data.image_hashes import hamming, hash_files, perceptual_hashes
from kcls.data.leaks import load_checked_splits
from kcls.data.sources import file_splits, load_splits
from kcls.layout import DATA_CHECK_FILE, DATA_CHECK_REPORT_FILE, DUPLICATE_GROUPS_PLOT

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CIFAR = SHARED_DATA / "cifar10_train_10k"
HYMENOPTERA = SHARED_DATA / "hymenoptera"
needs_cifar = pytest.mark.skipif(not CIFAR.is_dir(), reason=f"{CIFAR} is absent (the shared "
                                 "CIFAR-10 folder of this machine)")
CLASSES = ("airplane", "cat", "ship")


def cifar_split_root(root: Path, train: int = 8, test: int = 3) -> Path:
    """`root/train/<class>/` and `root/test/<class>/` with real CIFAR-10 JPEGs (different
    images in each)."""
    for name in CLASSES:
        files = sorted((CIFAR / name).iterdir())[:train + test]
        for split, part in (("train", files[:train]), ("test", files[train:])):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for path in part:
                shutil.copyfile(path, root / split / name / path.name)
    return root


def jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def inject(root: Path) -> dict[str, Path]:
    """One copy of a training image of each kind; returns the copies by kind."""
    original = sorted((root / "train" / "cat").iterdir())
    image = Image.open(original[0])
    copies = {
        "exact": (root / "train/cat/exact.jpg", original[0].read_bytes()),
        "reencoded": (root / "train/cat/reencoded.jpg", jpeg(Image.open(original[1]), 50)),
        "resized": (root / "train/cat/resized.jpg",
                    jpeg(Image.open(original[2]).resize((64, 64)), 90)),
        "flipped": (root / "train/cat/flipped.jpg",
                    jpeg(Image.open(original[3]).transpose(Image.Transpose.FLIP_LEFT_RIGHT), 95)),
        "other_class": (root / "train/ship/moved.jpg", jpeg(Image.open(original[4]), 85)),
        "across_split": (root / "test/cat/leaked.jpg", jpeg(Image.open(original[5]), 85)),
    }
    del image
    for path, data in copies.values():
        path.write_bytes(data)
    return {kind: path for kind, (path, _) in copies.items()}


def group_with(check, path: Path):
    index = check.images.files.index(str(path))
    return next(group for group in check.groups if index in group.members)


def test_the_flipped_hash_is_the_hash_of_the_mirror_image():
    rng = np.random.default_rng(0)
    thumbnails = rng.uniform(0, 255, (5, 32, 32)).astype(np.float32)
    hashes, flipped = perceptual_hashes(thumbnails)
    mirrored, mirrored_flipped = perceptual_hashes(thumbnails[:, :, ::-1])
    assert np.array_equal(flipped, mirrored) and np.array_equal(hashes, mirrored_flipped)
    assert (hamming(hashes[:, None], hashes[None]) % 2 == 0).all()  # 32 bits above the median


@needs_cifar
def test_each_kind_of_duplicate_is_found_and_the_originals_are_not(tmp_path):
    root = cifar_split_root(tmp_path / "cifar")
    copies = inject(root)
    check = check_source(DataConfig(source=f"folder:{root}"))
    assert len(check.groups) == len(copies)  # one per copy: no pair of originals
    for kind, path in copies.items():
        group = group_with(check, path)
        assert len(group.members) == 2, kind
        assert group.exact == (kind == "exact"), kind
        assert group.across_classes == (kind == "other_class"), kind
        assert group.across_splits == (kind == "across_split"), kind
        assert group.distance <= NEAR_DUPLICATE_DISTANCE
    counts = check.counts()  # validation: carved off train/
    assert {name: counts["train"][name] + counts["validation"][name] for name in CLASSES} == {
        "airplane": 8, "cat": 12, "ship": 9}
    assert counts["test"] == {"airplane": 3, "cat": 4, "ship": 3}
    assert check.image_summary()["modes"] == {"RGB": 39}


@needs_cifar
def test_the_cli_writes_json_markdown_and_the_groups_png(tmp_path):
    root = cifar_split_root(tmp_path / "cifar", train=6, test=2)
    inject(root)
    out = tmp_path / "check"
    result = CliRunner().invoke(main, ["data", "check", f"folder:{root}", "--out", str(out),
                                       "--set", "data.validation_fraction=0"])
    assert result.exit_code == 0, result.output
    assert "6 duplicate group(s): 1 exact, 5 near" in result.output
    assert "1 across splits (leaks)" in result.output
    report = json.loads((out / DATA_CHECK_FILE).read_text())
    assert report["duplicates"]["across_classes"] == 1
    leak = next(group for group in report["groups"] if "across_splits" in group["kinds"])
    assert {member["split"] for member in leak["members"]} == {"train", "test"}
    assert "## Duplicate groups (6)" in (out / DATA_CHECK_REPORT_FILE).read_text()
    assert Image.open(out / DUPLICATE_GROUPS_PLOT).size[0] > 100
    assert not list(out.glob(".tmp-*"))  # written atomically


@needs_cifar
def test_a_folder_of_nothing_but_duplicates_is_one_group(tmp_path):
    picture = sorted((CIFAR / "cat").iterdir())[0]
    image = Image.open(picture)
    for name in ("cat", "dog"):
        (tmp_path / "same" / name).mkdir(parents=True)
        for index in range(5):
            target = tmp_path / "same" / name / f"{index}.png"
            (image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if index % 2 else image).save(
                target)
    check = check_source(DataConfig(source=f"folder:{tmp_path / 'same'}",
                                    test_fraction=0.2, validation_fraction=0.0))
    (group,) = check.groups
    assert len(group.members) == 10 and group.across_classes and group.across_splits
    written = write_data_check(check, tmp_path / "out")
    assert [path.name for path in written] == [DATA_CHECK_FILE, DATA_CHECK_REPORT_FILE,
                                               DUPLICATE_GROUPS_PLOT]


def test_unreadable_files_are_named_from_the_scan_and_the_decode(damaged_folder):
    check = check_source(DataConfig(source=f"folder:{damaged_folder}", test_fraction=0.25,
                                    validation_fraction=0.0))
    unreadable = check.to_dict()["unreadable"]
    assert any("caf\\xe9.png" in name for name in unreadable)  # the name, from the scan
    assert any("bomb.png" in name for name in unreadable)  # the header, from the scan
    assert any("half.jpg" in name and "does not decode" in name for name in unreadable)
    assert check.to_dict()["readable"] == 12
    assert sum(sum(row.values()) for row in check.counts().values()) == 12


def test_a_split_folder_missing_a_class_is_a_one_line_error(tmp_path):
    for split, classes in (("train", ("ants", "bees")), ("val", ("ants",))):
        for name in classes:
            (tmp_path / "root" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "root" / split / name / "0.png")
    result = CliRunner().invoke(main, ["data", "check", f"folder:{tmp_path / 'root'}",
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "val/ lacks bees" in result.output and "Traceback" not in result.output


def test_sources_without_files_and_other_overrides_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="reads image files"):
        check_source(DataConfig(source="sklearn:digits"))
    result = CliRunner().invoke(main, ["data", "check", "sklearn:digits",
                                       "--set", "train.epochs=1"])
    assert result.exit_code == 2 and "data.KEY=VALUE overrides only" in result.output


@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"{HYMENOPTERA} is absent")
def test_photos_sizes_modes_and_formats_on_hymenoptera(tmp_path):
    root = tmp_path / "hym"
    for split in ("train", "val"):
        for name in ("ants", "bees"):
            (root / split / name).mkdir(parents=True)
            for path in sorted((HYMENOPTERA / split / name).iterdir())[:6]:
                shutil.copyfile(path, root / split / name / path.name)
    shutil.copyfile(HYMENOPTERA / "train/ants/imageNotFound.gif",
                    root / "train/ants/imageNotFound.gif")
    summary = check_source(DataConfig(source=f"folder:{root}")).image_summary()
    assert summary["formats"]["JPEG"] == 24 and summary["formats"]["GIF"] == 1
    assert summary["distinct_sizes"] > 3 and summary["width"]["max"] >= 300
    assert set(summary["modes"]) >= {"RGB"}


@needs_cifar
def test_a_manifest_and_a_pack_are_checked_like_the_folder(tmp_path):
    from kcls.data.pack import pack_source

    root = cifar_split_root(tmp_path / "cifar", train=6, test=2)
    copies = inject(root)
    rows = ["path,label,split"] + [
        f"{path.relative_to(root)},{path.parent.name},"
        f"{'train' if path.parts[-3] == 'train' else 'test'}"
        for path in sorted(root.glob("*/*/*.jpg"))]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    manifest = check_source(DataConfig(source=f"manifest:{root / 'labels.csv'}"))
    config = DataConfig(source=f"folder:{root}", validation_fraction=0.0)
    folder = check_source(config)
    pack_source(config, tmp_path / "pack")
    pack = check_source(DataConfig(source=f"tfrecord:{tmp_path / 'pack'}"))
    for check in (manifest, folder, pack):
        assert check.group_counts() == folder.group_counts()
    assert len(folder.groups) == len(copies)
    assert write_data_check(pack, tmp_path / "out")[-1].name == DUPLICATE_GROUPS_PLOT


@needs_cifar
def test_drop_leaks_removes_the_training_copies_and_keeps_the_test_split(tmp_path):
    root = cifar_split_root(tmp_path / "cifar", train=6, test=2)
    original = sorted((root / "train" / "airplane").iterdir())[0]
    (root / "test/airplane/leaked.jpg").write_bytes(jpeg(Image.open(original), 85))
    config = DataConfig(source=f"folder:{root}", validation_fraction=0.0)
    plain = load_splits(config)
    kept, leaks = load_checked_splits(config)
    assert kept.fingerprint == plain.fingerprint and kept.sizes == plain.sizes
    assert leaks.held_out == 1 and "leaked.jpg" in leaks.warning()
    assert "drop_leaks=true removes" in leaks.warning()
    dropped, leaks = load_checked_splits(DataConfig(**{**config.__dict__, "drop_leaks": True}))
    assert leaks.dropped == [str(original)]
    assert dropped.sizes["train"] == plain.sizes["train"] - 1
    assert dropped.test_files == plain.test_files and dropped.fingerprint != plain.fingerprint
    assert leaks.record()["dropped_from_training"] == [str(original)]
    assert any("## Data leaks (1 groups)" in line for line in leaks.report_section())
    assert file_splits(config).indices["train"].size == plain.sizes["train"]
    # Every reader of the training split (kcls optimize, packs) drops the same copies.
    again = load_splits(DataConfig(**{**config.__dict__, "drop_leaks": True}))
    assert again.fingerprint == dropped.fingerprint and again.sizes == dropped.sizes


@needs_cifar
def test_auto_checks_at_run_start_only_up_to_a_size_and_says_how_to_check_more(
        tmp_path, monkeypatch):
    # Above the size the check would cost the run its first step in seconds (#30).
    root = cifar_split_root(tmp_path / "cifar", train=6, test=2)
    original = sorted((root / "train" / "airplane").iterdir())[0]
    (root / "test/airplane/leaked.jpg").write_bytes(jpeg(Image.open(original), 85))
    config = DataConfig(source=f"folder:{root}", validation_fraction=0.0)
    assert config.check_leaks == "auto"
    monkeypatch.setattr(leak_check, "LEAK_CHECK_MAX_IMAGES", 10)
    splits, skipped = load_checked_splits(config)
    assert splits.sizes == load_splits(config).sizes and not skipped.groups
    assert "kcls data check" in skipped.warning() and "data.check_leaks=true" in skipped.warning()
    assert skipped.record()["skipped"] and skipped.report_section() == []
    _, checked = load_checked_splits(DataConfig(**{**config.__dict__, "check_leaks": True}))
    assert checked.held_out == 1 and not checked.skipped
    _, dropped = load_checked_splits(DataConfig(**{**config.__dict__, "drop_leaks": True}))
    assert dropped.dropped == [str(original)]  # dropping leaks always looks for them


def test_drop_leaks_needs_the_leak_check():
    with pytest.raises(ConfigError, match="data.drop_leaks"):
        DataConfig(check_leaks=False, drop_leaks=True)


def test_hashing_names_files_that_do_not_decode(tmp_path):
    (tmp_path / "text.jpg").write_text("not an image")
    failed: list[str] = []
    hashes = hash_files([str(tmp_path / "text.jpg"), str(tmp_path / "missing.png")], failed)
    assert not hashes.readable.any() and len(failed) == 2


@pytest.mark.slow
@needs_cifar
def test_a_run_warns_about_leaks_and_names_them_in_run_json_and_the_report(
        tmp_path, tiny_recipe):
    from kcls.config import apply_overrides
    from kcls.workflows.run import run_recipe

    root = cifar_split_root(tmp_path / "cifar", train=6, test=2)
    original = sorted((root / "train" / "cat").iterdir())[0]
    shutil.copyfile(original, root / "test/cat/leaked.jpg")
    recipe = apply_overrides(tiny_recipe, [f"data.source=folder:{root}",
                                           "data.drop_leaks=true", "export.enabled=false",
                                           "data.validation_fraction=0"])
    lines: list[str] = []
    result = run_recipe(recipe, tmp_path / "run", log=lines.append, verbose=0)
    assert any(line.startswith("warning: 1 group(s) of copies across splits") and
               "removed 1 training copies" in line for line in lines)
    record = json.loads((result.run_dir / "run.json").read_text())["data_leaks"]
    assert record["dropped_from_training"] == [str(original)] and record["exact"] == 1
    assert "## Data leaks (1 groups)" in (result.run_dir / "report.md").read_text()
