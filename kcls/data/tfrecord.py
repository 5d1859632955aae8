"""Packs: a folder's or a manifest's images as sharded TFRecords, with their splits frozen.

`kcls data pack SOURCE OUT_DIR` (`kcls.data.pack`) writes a pack;
`data.source=tfrecord:OUT_DIR` reads it (`read_pack`, `split_examples`; the splits are
made in `kcls.data.sources`). A pack is a folder

    pack.json                          the manifest (`kcls.layout.PACK_MANIFEST_FILE`)
    train-00000-of-00004.tfrecord      the shards of each split (`PACK_SHARD_NAME`)
    ...
    validation-00000-of-00001.tfrecord
    test-00000-of-00001.tfrecord

Each record is a `tf.train.Example` with the features

- `image_bytes`: the image file's bytes as they are (JPEG, PNG, GIF or BMP), decoded
  when read by the decoder folders use (`kcls.data.folder.decode_image`), so training,
  evaluation and the SavedModel's serving signature see the same pixels;
- `label`: int64 class index, or float32 `[C]` multi-hot labels for a multi-label
  manifest (`label_format` in the manifest: `class_index` or `multi_hot`);
- `file_name`: the source file's path (UTF-8), by which failures are named.

A split's examples are in its order (the training split in the seeded random order the
source's `DataConfig` made), cut into blocks of `block_records` records dealt round
robin to the split's shards: reading the shards round robin, a block at a time, gives
the examples back in that order, so a pack trains on the batches its source folder
would. `pack.json` records the source, its fingerprint, the split settings, the class
names, per split the examples, shards (file, records, bytes) and examples per class, the
training labels (so class weights need no pass over the images) and the files skipped
at pack time.

Reading: the shards are listed with `tf.data.Dataset.list_files` and read in parallel
(`interleave`), parsed a block at a time and decoded in parallel. The pipelines shard by
file across workers (`AutoShardPolicy.FILE`): under `MultiWorkerMirroredStrategy` each
worker reads its own shards, so a split needs at least as many shards as workers
(`kcls data pack --shard-size`). Nothing is dropped silently: a record that does not
decode is named by its file name, and a damaged shard (a record whose checksum fails,
a cut file) is named with the number of records lost, in `Splits.skipped`.

Example:

>>> pack = read_pack("packs/flowers")  # doctest: +SKIP
>>> train = split_examples(pack, "train", failed=[])  # (uint8 image, label) examples
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from kcls.config import ConfigError
from kcls.data.folder import decode_batches, graph_only
from kcls.layout import PACK_MANIFEST_FILE, PACK_SHARD_NAME, PACK_SHARD_PATTERN

PACK_FORMAT = "kcls-tfrecord-pack"
PACK_VERSION = 1
SPLIT_NAMES = ("train", "validation", "test")
LABEL_FORMATS = ("class_index", "multi_hot")
# Shards read at once: a split with more shards is read this many at a time, round robin
# within each group (the examples' order then differs from the pack's, still random).
MAX_OPEN_SHARDS = 16


@dataclass(frozen=True)
class Pack:
    """A pack's manifest, checked.

    Attributes:
        folder: Path of the pack.
        manifest: the parsed `pack.json` (see the module docstring).
    """

    folder: Path
    manifest: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def multi_label(self) -> bool:
        return self.manifest["label_format"] == "multi_hot"

    def split(self, name: str) -> dict[str, Any]:
        """The manifest's record of split `name`: `examples`, `shards`, `class_counts`."""
        return self.manifest["splits"][name]

    def shard_paths(self, name: str) -> list[Path]:
        shards = self.split(name)["shards"]
        return [self.folder / shard["file"] for shard in shards]

    def train_labels(self) -> np.ndarray:
        """int64 `(train,)` class indices, or float32 `(train, C)` multi-hot labels."""
        labels = self.manifest["train_labels"]
        if not self.multi_label:
            return np.asarray(labels, np.int64)
        multi_hot = np.zeros((len(labels), len(self.class_names)), np.float32)
        for row, classes in enumerate(labels):
            multi_hot[row, classes] = 1.0
        return multi_hot


def read_pack(folder: str | Path) -> Pack:
    """Reads and checks the pack in `folder`.

    Raises:
        ConfigError: no pack there, a damaged or unknown manifest, or missing shards
            (the message names the fix: pack the source again).
    """
    folder = Path(folder)
    manifest_path = folder / PACK_MANIFEST_FILE
    fix = "make one with `kcls data pack folder:PATH OUT_DIR` (or manifest:PATH.csv)"
    if not manifest_path.is_file():
        raise ConfigError(f"data.source=tfrecord:{folder}: {str(folder)!r} holds no "
                          f"{PACK_MANIFEST_FILE}, so it is not a kcls pack; {fix}.")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        known = (manifest["format"] == PACK_FORMAT and manifest["version"] == PACK_VERSION
                 and manifest["label_format"] in LABEL_FORMATS
                 and all(name in manifest["splits"] for name in SPLIT_NAMES))
    except (OSError, ValueError, KeyError, TypeError):
        known = False
    if not known:
        raise ConfigError(f"data.source=tfrecord:{folder}: {str(manifest_path)!r} is damaged "
                          f"or not a version-{PACK_VERSION} kcls pack manifest; pack the "
                          f"source again (`kcls data pack SOURCE {folder} --replace`).")
    pack = Pack(folder, manifest)
    missing = [str(path) for name in SPLIT_NAMES for path in pack.shard_paths(name)
               if not path.is_file()]
    if missing:
        raise ConfigError(
            f"data.source=tfrecord:{folder}: {len(missing)} shard(s) of the pack are missing "
            f"({', '.join(missing[:3])}); copy the whole folder, or pack the source again "
            f"(`kcls data pack {manifest['source']} {folder} --replace`).")
    return pack


def split_examples(pack: Pack, split: str, failed: list[str]) -> tf.data.Dataset:
    """The decoded examples of one split of `pack`, in the pack's order.

    Args:
        pack: a Pack (`read_pack`).
        split: `train`, `validation` or `test`.
        failed: list[str] to append unreadable shards and undecodable records to.

    Returns:
        Unbatched `(uint8 image [H, W, 3], label)` examples, sharded by file across
        workers under a multi-worker strategy.
    """
    shards = pack.split(split)["shards"]
    block = int(pack.manifest["settings"]["block_records"])
    pattern = pack.folder / PACK_SHARD_PATTERN.format(split=split, count=len(shards))
    files = tf.data.Dataset.list_files(str(pattern), shuffle=False)
    read = _shard_reader(tf.constant([int(shard["records"]) for shard in shards], tf.int64),
                         block, failed)
    blocks = files.interleave(read, cycle_length=min(len(shards), MAX_OPEN_SHARDS),
                              block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True)  # the pack's order (module docstring)
    parse = block_parser(pack)
    parsed = blocks.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    examples = decode_batches(parsed, failed, read_files=False, chunk_size=block)
    options = tf.data.Options()
    # Workers split the shards between them; the default (AUTO) would fall back to every
    # worker reading every record and keeping its share.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.FILE
    return examples.with_options(options)


def _shard_reader(expected: tf.Tensor, block: int, failed: list[str]):
    """`path -> blocks of serialized records`; a shard that ends before its `expected`
    records (a failed checksum stops a TFRecord reader) is named in `failed`."""
    lock = threading.Lock()

    def record_loss(path: tf.Tensor, read: tf.Tensor, wanted: tf.Tensor) -> bool:
        name = path.numpy().decode("utf-8", "backslashreplace")
        lost = int(wanted) - int(read)
        entry = (f"{name}: {lost} of {int(wanted)} records unreadable (a damaged shard; "
                 "pack the source again)")
        with lock:
            if entry not in failed:
                failed.append(entry)
        return False

    @graph_only
    def read(path: tf.Tensor) -> tf.data.Dataset:
        # `<split>-NNNNN-of-NNNNN.tfrecord`: the index, whichever shards this worker reads.
        index = tf.strings.to_number(tf.strings.regex_replace(
            path, r"^.*-(\d+)-of-\d+\.tfrecord$", r"\1"), tf.int32)
        records = tf.data.TFRecordDataset(path).ignore_errors().batch(block)
        end = tf.data.Dataset.from_tensors(tf.zeros([0], tf.string))  # no block is empty

        @graph_only
        def tally(read_so_far: tf.Tensor, records: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            count = read_so_far + tf.size(records, tf.int64)
            short = tf.equal(tf.size(records), 0) & (count < expected[index])
            checked = tf.cond(short, lambda: tf.py_function(
                record_loss, [path, count, expected[index]], tf.bool), lambda: tf.constant(False))
            with tf.control_dependencies([checked]):
                return count, tf.identity(records)

        return records.concatenate(end).scan(tf.constant(0, tf.int64), tally).filter(
            graph_only(lambda records: tf.size(records) > 0))

    return read


def block_parser(pack: Pack):
    """`serialized string [K] -> (image_bytes [K], labels [K] or [K, C], file_names [K])`."""
    label = (tf.io.FixedLenFeature([len(pack.class_names)], tf.float32) if pack.multi_label
             else tf.io.FixedLenFeature([], tf.int64))
    features = {"image_bytes": tf.io.FixedLenFeature([], tf.string), "label": label,
                "file_name": tf.io.FixedLenFeature([], tf.string)}

    @graph_only
    def parse(records: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        parsed = tf.io.parse_example(records, features)
        return parsed["image_bytes"], parsed["label"], parsed["file_name"]

    return parse


def serialize_example(encoded: bytes, label: int | np.ndarray, file_name: str) -> bytes:
    """One record of a pack (see the module docstring): `label` an int class index or a
    float `[C]` multi-hot vector."""
    label_feature = (tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))
                     if np.ndim(label) == 0 else
                     tf.train.Feature(float_list=tf.train.FloatList(value=list(label))))
    return tf.train.Example(features=tf.train.Features(feature={
        "image_bytes": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
        "label": label_feature,
        "file_name": tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[file_name.encode("utf-8")])),
    })).SerializeToString()


def shard_name(split: str, index: int, count: int) -> str:
    """`train-00003-of-00008.tfrecord`."""
    return PACK_SHARD_NAME.format(split=split, index=index, count=count)
