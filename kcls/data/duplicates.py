"""Exact and near duplicates among images, from their hashes (`kcls.data.image_hashes`).

Two images are *exact* duplicates when their bytes are equal (same content digest) and
*near* duplicates when their perceptual hashes, or one's and the other's mirror image's,
differ in at most `NEAR_DUPLICATE_DISTANCE` of 64 bits. Pairs are joined into groups
(connected components). A group is then, by where its members are:

- `within_class`: all members have the same label;
- `across_classes`: members with different labels (a conflicting label: one copy is
  mislabelled, or the classes overlap);
- `across_splits` (a leak): members in different splits (train, validation, test), so a
  held-out image was, in some form, trained on, and its score is inflated.

The search compares every image with every other (bit counts of XORs, in blocks of
`BLOCK_ROWS` rows): 10,000 images in about a second, quadratic beyond
(docs/data_quality.md).

Example:

>>> hashes = np.array([0b1111, 0b1110, 1 << 40], np.uint64)
>>> near_pairs(hashes, hashes, threshold=2).tolist()
[[0, 1, 1]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from kcls.data.image_hashes import hamming, hash_files

# Bits (of 64) in which a near duplicate's pHash may differ, chosen by measurement
# (`benchmarks/data_quality.py`, docs/data_quality.md): on 2,000 CIFAR-10 images with 300
# injected copies, 4 found every copy (JPEG at quality 50: 0.94 at 2), against 1 pair of
# originals (a real CIFAR duplicate) at 4, 7 at 8 and 59 at 12; on the 10,000 images the
# pairs at 4 bits are mostly real near-duplicates, those at 8 mostly distinct objects on
# a plain sky. pHash distances are even (32 of the 64 bits are above the median).
NEAR_DUPLICATE_DISTANCE = 4
BLOCK_ROWS = 512


def near_pairs(hashes: np.ndarray, flipped: np.ndarray, threshold: int = NEAR_DUPLICATE_DISTANCE,
               rows: np.ndarray | None = None, valid: np.ndarray | None = None) -> np.ndarray:
    """Pairs of images whose hashes (or mirror hashes) differ in at most `threshold` bits.

    Args:
        hashes: uint64 `(N,)` pHashes; flipped: uint64 `(N,)` pHashes of the mirrors.
        threshold: the largest Hamming distance of a near duplicate.
        rows: int indices of the images to compare with all others (default: all);
            fewer rows make a cheaper search (a leak check compares the held-out images).
        valid: bool `(N,)`, images to consider (default: all).

    Returns:
        int64 `(P, 3)`: `(i, j, distance)` with `i < j`, each pair once, sorted.
    """
    count = len(hashes)
    rows = np.arange(count) if rows is None else np.asarray(rows, np.int64)
    valid = np.ones(count, bool) if valid is None else np.asarray(valid, bool)
    rows = rows[valid[rows]]
    found = []
    for start in range(0, len(rows), BLOCK_ROWS):
        block = rows[start:start + BLOCK_ROWS]
        distance = np.minimum(hamming(hashes[block, None], hashes[None]),
                              np.minimum(hamming(flipped[block, None], hashes[None]),
                                         hamming(hashes[block, None], flipped[None])))
        distance[:, ~valid] = 255
        distance[np.arange(len(block)), block] = 255  # an image and itself
        first, second = np.nonzero(distance <= threshold)
        found.append(np.stack([block[first], second, distance[first, second]], axis=1))
    pairs = np.concatenate(found) if found else np.zeros((0, 3), np.int64)
    pairs = pairs.astype(np.int64)
    pairs[:, :2] = np.sort(pairs[:, :2], axis=1)
    return np.unique(pairs, axis=0).reshape(-1, 3)


def exact_pairs(digests: Sequence[str]) -> np.ndarray:
    """`(i, j, 0)` pairs of equal non-empty digests, each member with the group's first:
    int64 `(P, 3)`."""
    first: dict[str, int] = {}
    pairs = []
    for index, digest in enumerate(digests):
        if not digest:
            continue
        if digest in first:
            pairs.append((first[digest], index, 0))
        else:
            first[digest] = index
    return np.asarray(pairs, np.int64).reshape(-1, 3)


def connected_groups(count: int, pairs: np.ndarray) -> list[list[int]]:
    """The connected components (of two or more) of the graph of `pairs` `(P, >=2)` over
    `count` nodes: sorted member lists, in the order of their first members."""
    parent = np.arange(count)

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for first, second in pairs[:, :2]:
        a, b = root(int(first)), root(int(second))
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for node in np.unique(pairs[:, :2]) if len(pairs) else []:
        members.setdefault(root(int(node)), []).append(int(node))
    return [sorted(group) for _, group in sorted(members.items())]


@dataclass
class DuplicateGroup:
    """Images that are copies of each other.

    Attributes:
        members: indices of the images, sorted.
        exact: whether all members have the same bytes.
        distance: the largest Hamming distance of the pairs that joined the group (0
            for exact copies; a chain of near pairs can join members further apart).
        across_classes: members with different labels.
        splits: the splits of the members, sorted (`across_splits` when two or more).
    """

    members: list[int]
    exact: bool
    distance: int
    across_classes: bool
    splits: list[str]

    @property
    def across_splits(self) -> bool:
        return len(self.splits) > 1

    @property
    def kinds(self) -> list[str]:
        """`within_class` or `across_classes`, and `across_splits` for a leak."""
        return (["across_classes" if self.across_classes else "within_class"]
                + (["across_splits"] if self.across_splits else []))


def duplicate_groups(digests: Sequence[str], hashes: np.ndarray, flipped: np.ndarray,
                     label_keys: Sequence[object], splits: Sequence[str],
                     readable: np.ndarray | None = None,
                     threshold: int = NEAR_DUPLICATE_DISTANCE,
                     rows: np.ndarray | None = None) -> list[DuplicateGroup]:
    """The groups of exact and near duplicates among N images.

    Args:
        digests: N content digests; hashes, flipped: uint64 `(N,)` (`ImageHashes`).
        label_keys: N hashable labels (a class index, or a tuple of them for label sets).
        splits: N split names.
        readable: bool `(N,)`, images that decoded (default: all).
        threshold: see `near_pairs`.
        rows: compare only these images with the others (`near_pairs`); exact copies
            are found among all.
    """
    pairs = np.concatenate([exact_pairs(digests),
                            near_pairs(hashes, flipped, threshold, rows, readable)])
    components = connected_groups(len(digests), pairs)
    group_of = {index: number for number, members in enumerate(components)
                for index in members}
    widest = [0] * len(components)
    for first, _, bits in pairs:
        number = group_of[int(first)]
        widest[number] = max(widest[number], int(bits))
    groups = []
    for members, bits in zip(components, widest):
        groups.append(DuplicateGroup(
            members, exact=len({digests[index] for index in members}) == 1,
            distance=bits,
            across_classes=len({label_keys[index] for index in members}) > 1,
            splits=sorted({splits[index] for index in members})))
    return groups


def leaked_training_copies(groups: list[DuplicateGroup], splits: Sequence[str]) -> list[int]:
    """The training members of the groups that also hold validation or test images: the
    copies `data.drop_leaks=true` removes from training, sorted."""
    return sorted(index for group in groups if group.across_splits
                  for index in group.members if splits[index] == "train")


def leak_groups(paths: Sequence[str], labels: np.ndarray, splits: Sequence[str]
                ) -> list[DuplicateGroup]:
    """The groups of exact and near copies across splits among image files: every file
    hashed once (`hash_files`; one that does not decode is left out here and named by
    the pipeline when it reads it), the held-out ones compared with all.

    Args:
        paths: N image files; labels: int64 `(N,)` or multi-hot `(N, C)`; splits: N
            split names.
    """
    hashes = hash_files(list(paths))
    held_out = np.flatnonzero(np.asarray(splits, dtype=object) != "train")
    return [group for group in duplicate_groups(
        hashes.digests, hashes.perceptual, hashes.flipped, label_keys(labels), splits,
        hashes.readable, rows=held_out) if group.across_splits]


def split_names(indices: Mapping[str, np.ndarray], count: int) -> list[str]:
    """The split of each of `count` examples from the split's indices (`FileSplits.indices`)."""
    names = np.empty(count, dtype=object)
    for split, chosen in indices.items():
        names[chosen] = split
    return names.tolist()


def label_keys(labels: np.ndarray) -> list[object]:
    """A hashable label per image: the class index, or the tuple of a multi-hot row's
    classes."""
    if labels.ndim == 1:
        return labels.tolist()
    return [tuple(np.flatnonzero(row).tolist()) for row in labels]
