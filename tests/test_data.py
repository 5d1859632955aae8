"""Data sources and tf.data pipelines on real files and real bundled data."""

import dataclasses
import functools
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import write_truncated_jpeg
from PIL import Image

from kcls.config import ConfigError, DataConfig
from kcls.data.folder import scan_folder
from kcls.data.pipeline import eval_pipeline, prepare_image, train_pipeline
from kcls.data.sources import load_splits, splits_from_arrays

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _save(path: Path, array: np.ndarray, mode: str, format: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path, format=format)


@pytest.fixture
def quirky_folder(tmp_path: Path) -> Path:
    """Two classes with a corrupt JPEG, RGBA PNG, grayscale JPEG, GIF, BMP and a text file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    rgb = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    _save(root / "cat" / "photo 1.jpg", rgb, "RGB")
    _save(root / "cat" / "alpha.png", rng.integers(0, 255, (12, 12, 4), dtype=np.uint8), "RGBA")
    _save(root / "cat" / "gray.JPEG", rng.integers(0, 255, (16, 16), dtype=np.uint8), "L")
    _save(root / "dog" / "anim.gif", rng.integers(0, 255, (10, 10), dtype=np.uint8), "L", "GIF")
    _save(root / "dog" / "bitmap.bmp", rgb, "RGB")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated garbage")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_folder_yields_rgb_examples_and_reports_the_corrupt_file(quirky_folder: Path):
    files = scan_folder(quirky_folder)
    assert files.class_names == ["cat", "dog"]
    assert len(files.paths) == 5
    assert [Path(p).name for p in files.skipped] == ["broken.jpg"]

    config = DataConfig(source=f"folder:{quirky_folder}", test_fraction=0.4,
                        validation_fraction=0.0)
    splits = load_splits(config)
    examples = list(splits.train.concatenate(splits.test).as_numpy_iterator())
    assert len(examples) == 5
    assert all(image.dtype == np.uint8 and image.shape[-1] == 3 for image, _ in examples)
    assert sorted(int(label) for _, label in examples) == [0, 0, 0, 1, 1]
    assert [Path(p).name for p in splits.skipped] == ["broken.jpg"]


def test_empty_root_and_empty_class_are_clear_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no class sub-folders"):
        scan_folder(tmp_path)
    _save(tmp_path / "a" / "x.png", np.zeros((4, 4, 3), np.uint8), "RGB")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("no images")
    with pytest.raises(ConfigError, match="b contain no readable image"):
        scan_folder(tmp_path)


@pytest.mark.skipif(not (SHARED_DATA / "hymenoptera").is_dir(),
                    reason="../shared/data/hymenoptera is not present (only in the kcls workspace)")
def test_real_hymenoptera_photos_with_quirks_load():
    files = scan_folder(SHARED_DATA / "hymenoptera" / "train")
    assert files.class_names == ["ants", "bees"]
    assert len(files.paths) + len(files.skipped) == 245
    assert any(" " in Path(p).name for p in files.paths)
    splits = load_splits(DataConfig(source=f"folder:{SHARED_DATA / 'hymenoptera' / 'train'}"))
    images = [image for image, _ in splits.test.as_numpy_iterator()]
    assert len(images) == splits.sizes["test"]  # every file that passed the scan decodes
    assert all(image.ndim == 3 and image.shape[-1] == 3 for image in images)


def test_digits_split_is_stratified_and_reproducible():
    config = DataConfig(source="sklearn:digits", seed=3)
    first, second = load_splits(config), load_splits(config)
    labels = np.array([label for _, label in first.test.as_numpy_iterator()])
    assert np.array_equal(labels, [label for _, label in second.test.as_numpy_iterator()])
    assert first.sizes == {"train": 1293, "validation": 144, "test": 360}
    counts = np.bincount(labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # ~180 per class * 0.2


def test_array_source_rejects_wrong_dtype():
    with pytest.raises(ConfigError, match="uint8"):
        splits_from_arrays(np.zeros((4, 8, 8, 3), np.float32), np.zeros(4), ["a"], DataConfig())


def test_resize_modes_keep_or_ignore_the_aspect_ratio():
    # A 20x40 image: left half black, right half white.
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 20:] = 255
    stretched = prepare_image(image, 10, "resize").numpy()
    cropped = prepare_image(image, 10, "center_crop").numpy()
    padded = prepare_image(image, 10, "pad").numpy()
    assert stretched.shape == cropped.shape == padded.shape == (10, 10, 3)
    assert stretched.dtype == np.float32
    # Stretching keeps both halves; the centre crop keeps the middle (both halves, 5 px each).
    assert stretched[:, 0].max() < 10 and stretched[:, -1].min() > 245
    assert cropped[:, 0].max() < 10 and cropped[:, -1].min() > 245
    # Padding keeps the whole image in rows 2.5..7.5: the top and bottom rows are black.
    assert padded[0].max() == 0 and padded[-1].max() == 0 and padded[5, -1].min() > 245


def test_batched_prepare_matches_per_image_prepare():
    images = np.random.default_rng(1).integers(0, 255, (3, 17, 23, 3), dtype=np.uint8)
    for mode in ("resize", "center_crop", "pad"):
        batched = prepare_image(images, 12, mode).numpy()
        single = np.stack([prepare_image(image, 12, mode).numpy() for image in images])
        np.testing.assert_allclose(batched, single, atol=1e-4)


def test_train_batches_have_a_static_shape_and_one_hot_labels():
    splits = load_splits(DataConfig(source="sklearn:digits"))
    config = DataConfig(batch_size=32, image_size=24)
    batches = train_pipeline(splits.train, 10, config)
    assert batches.element_spec[0].shape.as_list() == [32, 24, 24, 3]
    images, labels = next(iter(batches))
    assert images.dtype == tf.float32 and float(tf.reduce_max(images)) <= 255.0
    np.testing.assert_array_equal(labels.numpy().sum(axis=1), 1.0)


def test_a_folder_larger_than_the_shuffle_buffer_trains_on_mixed_batches(tmp_path: Path):
    # Folders are listed class by class: 6 classes x 40 files, a shuffle buffer of 8.
    for label in range(6):
        for index in range(40):
            _save(tmp_path / f"class{label}" / f"{index:02d}.png",
                  np.full((8, 8, 3), 40 * label, np.uint8), "RGB")
    config = DataConfig(source=f"folder:{tmp_path}", image_size=16, batch_size=16,
                        shuffle_buffer=8, augment="none")
    splits = load_splits(config)
    assert splits.sizes["train"] > 10 * config.shuffle_buffer
    for _, labels in train_pipeline(splits.train, 6, config).take(3).as_numpy_iterator():
        assert len(np.unique(labels.argmax(axis=1))) >= 4


def test_eval_pipeline_is_unaugmented_ordered_and_complete():
    splits = load_splits(DataConfig(source="sklearn:digits"))
    config = DataConfig(batch_size=64, augment="strong")
    batches = eval_pipeline(splits.test, 10, config)
    first = np.concatenate([images for images, _ in batches.as_numpy_iterator()])
    second = np.concatenate([images for images, _ in batches.as_numpy_iterator()])
    assert first.shape[0] == 360
    np.testing.assert_array_equal(first, second)


def test_same_seed_gives_the_same_first_batches_when_deterministic():
    splits = load_splits(DataConfig(source="sklearn:digits"))

    def first_batches(seed: int) -> list[np.ndarray]:
        config = DataConfig(batch_size=16, augment="strong", deterministic=True, seed=seed)
        tf.keras.utils.set_random_seed(seed)
        batches = train_pipeline(splits.train, 10, config)
        return [array for images, labels in batches.take(3).as_numpy_iterator()
                for array in (images, labels)]

    run_a, run_b, other_seed = first_batches(7), first_batches(7), first_batches(8)
    for a, b in zip(run_a, run_b):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(run_a[0], other_seed[0])



def _tiny_tfds_builder(data_dir: Path):
    import tensorflow_datasets as tfds

    class KclsTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(8, 8, 3)),
                    "label": tfds.features.ClassLabel(names=["left", "right"])}),
                supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(40, 0), "test": self._generate_examples(10, 1)}

        def _generate_examples(self, count, seed):
            rng = np.random.default_rng(seed)
            for index in range(count):
                yield index, {"image": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
                              "label": index % 2}

    builder = KclsTinyImages(data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder


def test_tfds_source_reads_a_prepared_dataset_and_carves_validation(tmp_path: Path):
    _tiny_tfds_builder(tmp_path)
    config = DataConfig(source="tfds:kcls_tiny_images", data_dir=str(tmp_path),
                        validation_fraction=0.25)
    splits = load_splits(config)
    assert splits.class_names == ["left", "right"]
    assert splits.sizes == {"train": 30, "validation": 10, "test": 10}
    train = list(splits.train.as_numpy_iterator())
    validation = list(splits.validation.as_numpy_iterator())
    assert len(train) == 30 and len(validation) == 10
    assert train[0][0].shape == (8, 8, 3) and train[0][0].dtype == np.uint8
    seen = {image.tobytes() for image, _ in train}
    assert not any(image.tobytes() in seen for image, _ in validation)

    sliced = load_splits(DataConfig(source="tfds:kcls_tiny_images", data_dir=str(tmp_path),
                                    train_split="train[:50%]", validation_fraction=0.2))
    assert sliced.sizes["train"] == 16 and sliced.sizes["validation"] == 4
    with pytest.raises(ConfigError, match="no split 'dev'"):
        load_splits(DataConfig(source="tfds:kcls_tiny_images", data_dir=str(tmp_path),
                               test_split="dev"))


@pytest.mark.slow
def test_runs_with_different_seeds_never_share_an_on_disk_cache(tmp_path: Path):
    from kcls.config import apply_overrides
    from kcls.recipes import load_recipe
    from kcls.workflows.run import run_recipe

    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()

    def run(seed: int) -> set[str]:
        """The cache files a one-step run with data.seed=`seed` leaves behind."""
        before = set(path.name for path in cache_dir.iterdir())
        recipe = apply_overrides(load_recipe("quickstart"), [
            "train.frozen_epochs=1", "train.unfrozen_epochs=0", "train.steps_per_epoch=1",
            "train.jit_compile=false", "data.batch_size=8", "data.image_size=16",
            f"data.cache={cache_dir / 'digits'}", f"data.seed={seed}", "export.enabled=false"])
        runs = len(list(tmp_path.glob("run*")))  # a finished run dir is never reused
        run_recipe(recipe, tmp_path / f"run{runs}", log=lambda message: None, verbose=0)
        return set(path.name for path in cache_dir.iterdir()) - before

    first, second = run(0), run(1)
    # Each run caches its own train, validation and test examples: the seed changes the
    # split, so replaying the first run's files would put its test images in training.
    assert any(".train" in name for name in first) and any(".test" in name for name in first)
    assert any(".train" in name for name in second) and any(".test" in name for name in second)
    assert not first & second
    assert run(0) == set(), "the same data and seed reuse their cache"

    splits = load_splits(DataConfig())
    with pytest.raises(ValueError, match="source_fingerprint=splits.fingerprint"):
        eval_pipeline(splits.test, 10, DataConfig(cache=str(cache_dir / "unkeyed")), "test")


def test_undecodable_names_bombs_and_truncated_files_are_skipped_and_named(damaged_folder):
    files = scan_folder(damaged_folder)
    assert len(files.paths) == 12
    names = sorted(Path(path).name for path in files.skipped)
    # The non-UTF-8 byte is shown escaped, so the name can be printed and written to JSON.
    assert names == ["bomb.png", "caf\\xe9.png", "half.jpg"]
    json.dumps(files.skipped).encode("utf-8")

    splits = load_splits(DataConfig(source=f"folder:{damaged_folder}", test_fraction=0.25,
                                    validation_fraction=0.0))
    assert sorted(Path(path).name for path in splits.skipped) == names
    assert splits.sizes == {"train": 9, "validation": 0, "test": 3}
    # Every example the sizes promise reaches the model.
    assert len(list(splits.train.as_numpy_iterator())) == 9
    assert len(list(splits.test.as_numpy_iterator())) == 3


def test_a_file_damaged_after_the_scan_is_counted_not_dropped_silently(damaged_folder):
    config = DataConfig(source=f"folder:{damaged_folder}", test_fraction=0.25,
                        validation_fraction=0.0)
    splits = load_splits(config)
    victim = damaged_folder / "ants" / "0.jpg"
    write_truncated_jpeg(victim, np.random.default_rng(2))  # e.g. rewritten during a run
    examples = len(list(splits.train.concatenate(splits.test).as_numpy_iterator()))
    assert examples == 11
    assert str(victim) in splits.skipped and len(splits.skipped) == 4
    # A second pass does not count it twice.
    list(splits.train.as_numpy_iterator())
    assert len(splits.skipped) == 4


@pytest.mark.skipif(not (SHARED_DATA / "hymenoptera").is_dir(),
                    reason="../shared/data/hymenoptera is not present (only in the kcls workspace)")
def test_a_real_photo_cut_in_half_is_skipped_and_named(tmp_path: Path):
    source = SHARED_DATA / "hymenoptera" / "val"
    root = tmp_path / "photos"
    for name in ("ants", "bees"):
        (root / name).mkdir(parents=True)
        for photo in sorted((source / name).glob("*.jpg"))[:4]:
            shutil.copy(photo, root / name / photo.name)
    photo = sorted((root / "bees").glob("*.jpg"))[0]
    photo.write_bytes(photo.read_bytes()[: photo.stat().st_size // 2])
    files = scan_folder(root)
    assert files.skipped == [str(photo)]
    assert len(files.paths) == 7


def test_fewer_than_two_classes_is_refused_before_training(tmp_path: Path):
    for index in range(12):
        _save(tmp_path / "only" / "cats" / f"{index}.png", np.zeros((4, 4, 3), np.uint8), "RGB")
    with pytest.raises(ConfigError, match=r"1 class folder \(cats\).*at least two"):
        scan_folder(tmp_path / "only")
    with pytest.raises(ConfigError, match="at least two classes"):
        splits_from_arrays(np.zeros((12, 4, 4, 3), np.uint8), np.zeros(12), ["cats"],
                           DataConfig())
    with pytest.raises(ConfigError, match="at least two classes"):  # two names, one used
        splits_from_arrays(np.zeros((12, 4, 4, 3), np.uint8), np.zeros(12), ["a", "b"],
                           DataConfig())


def test_a_class_too_small_to_split_is_a_config_error_naming_it():
    labels = np.array([0] * 10 + [1])
    with pytest.raises(ConfigError,
                       match=r"test_fraction=0.2.*rare 1 \(smallest: rare;.*add images"):
        splits_from_arrays(np.zeros((11, 4, 4, 3), np.uint8), labels, ["common", "rare"],
                           DataConfig())


def test_a_class_missing_from_a_split_is_warned_about():
    labels = np.array([0] * 30 + [1] * 3)
    with pytest.warns(UserWarning, match=r"rare.*0 validation"):
        splits = splits_from_arrays(np.zeros((33, 4, 4, 3), np.uint8), labels,
                                    ["common", "rare"], DataConfig())
    assert splits.sizes == {"train": 23, "validation": 3, "test": 7}


@pytest.mark.parametrize("name", ["two\nlines", "tab\there", "caf\udce9", "line\u2028sep",
                                  " padded"])
def test_a_class_folder_name_that_would_break_labels_txt_is_refused(tmp_path: Path, name):
    for folder in ("good", name):
        for index in range(5):
            path = os.path.join(os.fsencode(tmp_path / folder), f"{index}.png".encode())
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path, format="PNG")
    shown = repr(os.fsencode(name).decode("utf-8", "backslashreplace"))
    with pytest.raises(ConfigError, match=re.escape(shown[1:-1]) + "'.*rename"):
        scan_folder(tmp_path)


def test_hidden_class_folders_are_named_in_a_warning(tmp_path: Path):
    for folder in ("cats", "dogs", ".thumbnails", ".git"):
        _save(tmp_path / folder / "0.png", np.zeros((4, 4, 3), np.uint8), "RGB")
    with pytest.warns(UserWarning, match=r"ignored 2 hidden folder\(s\): \.git, \.thumbnails"):
        files = scan_folder(tmp_path)
    assert files.class_names == ["cats", "dogs"]


def test_decode_files_keeps_the_order_and_names_what_fails(tmp_path: Path):
    from kcls.data.folder import decode_files

    paths = []
    for index in range(12):
        paths.append(str(tmp_path / f"{index}.png"))
        _save(Path(paths[-1]), np.full((index + 1, 3, 3), index, np.uint8), "RGB")
    write_truncated_jpeg(tmp_path / "5.png", np.random.default_rng(0))
    failed: list[str] = []
    examples = list(decode_files(paths, np.arange(12), failed).as_numpy_iterator())
    assert [int(label) for _, label in examples] == [i for i in range(12) if i != 5]
    assert [image.shape[0] for image, _ in examples] == [i + 1 for i in range(12) if i != 5]
    assert failed == [paths[5]]


def test_a_second_scan_decodes_only_new_or_changed_files(damaged_folder: Path):
    from kcls.data.folder import decode_check_cache

    first = scan_folder(damaged_folder)
    cache = decode_check_cache(damaged_folder)
    recorded = json.loads(cache.read_text())["decoded"]
    assert sorted(recorded) == sorted(first.paths)  # only files that decoded
    # A cached file rewritten since (another size and time) is decoded again.
    victim = damaged_folder / "ants" / "3.jpg"
    write_truncated_jpeg(victim, np.random.default_rng(3))
    second = scan_folder(damaged_folder)
    assert str(victim) in second.skipped and len(second.paths) == 11
    assert str(victim) not in json.loads(cache.read_text())["decoded"]


@functools.cache
def _register_local_tfds_builders() -> None:
    """Two TFDS builders, registered by name as TFDS registers every builder class:
    `kcls_local_photos` prepares from PNG files in TFDS's manual download folder
    (`<data_dir>/downloads/manual/<split>/<class>/*.png`); `kcls_remote_photos` needs the
    network to prepare (a plain `requests` download, which the test's socket guard
    refuses as an offline machine would)."""
    import requests
    import tensorflow_datasets as tfds

    class KclsLocalPhotos(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        MANUAL_DOWNLOAD_INSTRUCTIONS = "Put train/<class>/*.png and test/<class>/*.png here."

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=["ants", "bees"])}),
                supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(dl_manager.manual_dir / split)
                    for split in ("train", "test")}

        def _generate_examples(self, folder):
            for path in sorted(folder.glob("*/*.png")):
                yield f"{path.parent.name}/{path.name}", {"image": path,
                                                          "label": path.parent.name}

    class KclsRemotePhotos(KclsLocalPhotos):
        def _split_generators(self, dl_manager):
            requests.get("https://example.com/kcls_remote_photos.zip", timeout=5)
            raise AssertionError("unreachable: the download above needs the network")


def test_tfds_data_is_downloaded_and_prepared_on_first_use(tmp_path: Path):
    _register_local_tfds_builders()
    data = DataConfig(source="tfds:kcls_local_photos", data_dir=str(tmp_path),
                      validation_fraction=0.0)
    with pytest.raises(ConfigError, match="'kcls_local_photos' is not prepared .* "
                                          "data.download=never.*data.data_dir=DIR"):
        load_splits(dataclasses.replace(data, download="never"))
    with pytest.raises(ConfigError, match="needs files downloaded by hand: put them into "
                                          f"'{tmp_path / 'downloads' / 'manual'}'"):
        load_splits(data)

    rng = np.random.default_rng(0)
    written = {}
    for split, count in (("train", 6), ("test", 2)):
        for label, name in enumerate(["ants", "bees"]):
            folder = tmp_path / "downloads" / "manual" / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 255, (6 + index, 9, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
                written[pixels.tobytes()] = (split, label)
    splits = load_splits(data)  # data.download=auto: TFDS prepares it, then kcls reads it
    assert splits.class_names == ["ants", "bees"]
    assert splits.sizes == {"train": 12, "validation": 0, "test": 4}
    for split, examples in (("train", splits.train), ("test", splits.test)):
        for image, label in examples.as_numpy_iterator():
            assert written[image.tobytes()] == (split, label)
    # Prepared once: the next run reads it, even with data.download=never.
    assert load_splits(dataclasses.replace(data, download="never")).sizes["test"] == 4


def test_a_tfds_download_without_network_names_the_dataset_and_the_way_around(tmp_path):
    _register_local_tfds_builders()
    with pytest.raises(ConfigError, match=r"Could not download TFDS dataset "
                       r"'kcls_remote_photos' into .*ConnectionError.*no internet\?.*"
                       r"tfds build kcls_remote_photos --data_dir DIR.*data.source=folder:"):
        load_splits(DataConfig(source="tfds:kcls_remote_photos", data_dir=str(tmp_path)))
    # Nothing half-prepared is left to be mistaken for the dataset.
    import tensorflow_datasets as tfds

    assert not tfds.builder("kcls_remote_photos", data_dir=str(tmp_path)).is_prepared()
