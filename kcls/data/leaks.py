"""The leak check of a run: held-out images with a copy in another split, found before
training (`data.check_leaks`), and dropped from training with `data.drop_leaks=true`.

A validation or test image whose exact or near copy (`kcls.data.duplicates`: the same
bytes, or a perceptual hash of it or its mirror within `NEAR_DUPLICATE_DISTANCE` bits)
is in the training split scores as if it were seen: the reported accuracy is inflated.
`load_checked_splits` lists a `folder:` or `manifest:` source as `load_splits` does,
hashes every image once (`kcls.data.image_hashes`, ~2.5 s per 10,000 small JPEGs on a
2-core CPU; docs/data_quality.md), compares the held-out images with all others, and
returns the splits with a `LeakCheck` that the run logs as a warning, records in
run.json (`data_leaks`) and lists in report.md. With `drop_leaks` the training copies
leave the training split (the held-out images stay, so the test split is the same with
and without it), and the source's fingerprint changes with them; `file_splits` drops
them the same way for every other command that reads the training split.

Example:

>>> splits, leaks = load_checked_splits(DataConfig(source="folder:photos"))  # doctest: +SKIP
>>> leaks.warning()  # doctest: +SKIP
'3 validation/test image(s) have a copy in the training split ...'
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from kcls.config import DataConfig, LabelFormat
from kcls.data.check import file_images
from kcls.data.duplicates import DuplicateGroup, leak_groups
from kcls.data.sources import (
    FileSplits,
    Splits,
    decoded_splits,
    drop_leaked,
    file_splits,
    has_files,
    load_splits,
)

RECORDED_GROUPS = 1000  # groups run.json names (all are counted)
# `data.check_leaks=auto` checks at run start up to this many images (about 10 s on a
# 2-core CPU); above it hashing and comparing would cost the first training step its
# seconds (100,000 images: about two minutes), so the run names `kcls data check`.
LEAK_CHECK_MAX_IMAGES = 20_000
NAMED_IN_WARNING = 3


@dataclass
class LeakCheck:
    """The groups of copies across splits of a run's data.

    Attributes:
        groups: one list per group of `{"file", "split", "label"}` members, with the
            group's `exact` flag and `distance` (`DuplicateGroup`): `{"exact", "distance",
            "members"}`.
        held_out: validation and test images with a copy in the training split.
        dropped: the training files removed by `data.drop_leaks=true` (else empty).
        seconds: wall-clock time of the check.
        skipped: why the check was not made (`data.check_leaks=auto` on a large source),
            or None when it was.
    """

    groups: list[dict[str, Any]] = field(default_factory=list)
    held_out: int = 0
    dropped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str | None = None

    def record(self) -> dict[str, Any]:
        """What run.json records (`data_leaks`)."""
        return {"groups": len(self.groups), "held_out_with_training_copy": self.held_out,
                "exact": sum(group["exact"] for group in self.groups),
                "dropped_from_training": self.dropped, "seconds": round(self.seconds, 2),
                "leaks": self.groups[:RECORDED_GROUPS], "skipped": self.skipped}

    def warning(self) -> str | None:
        """One line naming the leaks and the fix (or why none were looked for), or None
        without any."""
        if self.skipped:
            return self.skipped
        if not self.groups:
            return None
        named = "; ".join(" = ".join(f"{member['file']} ({member['split']})"
                                     for member in group["members"])
                          for group in self.groups[:NAMED_IN_WARNING])
        more = (f" and {len(self.groups) - NAMED_IN_WARNING} more"
                if len(self.groups) > NAMED_IN_WARNING else "")
        action = (f"data.drop_leaks=true removed {len(self.dropped)} training copies"
                  if self.dropped else
                  "their scores are inflated; data.drop_leaks=true removes the training "
                  "copies")
        return (f"{len(self.groups)} group(s) of copies across splits, "
                f"{self.held_out} validation/test image(s) with a copy in the training "
                f"split ({named}{more}; all in run.json's data_leaks): {action}.")

    def report_section(self) -> list[str]:
        """Markdown lines for report.md (none without leaks)."""
        if not self.groups:
            return []
        lines = ["", f"## Data leaks ({len(self.groups)} groups)", "",
                 f"{self.held_out} validation/test image(s) have an exact or near copy in the "
                 "training split" + (f"; data.drop_leaks=true removed {len(self.dropped)} "
                                     "training copies." if self.dropped else
                                     ": their scores are inflated (data.drop_leaks=true "
                                     "removes the training copies)."), ""]
        for group in self.groups[:RECORDED_GROUPS]:
            kind = "exact" if group["exact"] else f"near ({group['distance']} bits)"
            lines.append(f"- {kind}: " + ", ".join(
                f"`{member['file']}` ({member['split']}, {member['label']})"
                for member in group["members"]))
        return lines


def load_checked_splits(config: DataConfig, label_format: LabelFormat = "class_index"
                        ) -> tuple[Splits, LeakCheck | None]:
    """`load_splits(config)` with the leak check of the module docstring for sources of
    files when `config.check_leaks` (else `(splits, None)`; with `auto`, a source of over
    `LEAK_CHECK_MAX_IMAGES` gets a `LeakCheck` saying why it was skipped); with
    `config.drop_leaks` the training copies of leaked images are left out of the
    training split (always checked)."""
    if not (config.check_leaks and has_files(config)):
        return load_splits(config, label_format), None
    files = file_splits(dataclasses.replace(config, drop_leaks=False), label_format)
    if config.check_leaks == "auto" and not config.drop_leaks \
            and len(files.paths) > LEAK_CHECK_MAX_IMAGES:
        return decoded_splits(files), LeakCheck(skipped=(
            f"no leak check at the start of this run: {len(files.paths):,} images is above "
            f"the {LEAK_CHECK_MAX_IMAGES:,} data.check_leaks=auto checks; run `kcls data "
            f"check {config.source}` once, or set data.check_leaks=true to check every run"))
    groups, leaks = find_leaks(files)
    if config.drop_leaks:  # as `file_splits` drops them, without a second check
        files, leaks.dropped = drop_leaked(files, groups)
    return decoded_splits(files), leaks


def find_leaks(files: FileSplits) -> tuple[list[DuplicateGroup], LeakCheck]:
    """The groups of copies across the splits of `files` (`leak_groups`: the validation
    and test images compared with all images) and their `LeakCheck`."""
    started = time.perf_counter()
    images = file_images(files)
    groups = leak_groups(images.files, images.labels, images.splits)
    recorded = [{"exact": group.exact, "distance": group.distance,
                 "members": [images.describe(index) for index in group.members]}
                for group in groups]
    copied = sum(1 for group in groups if "train" in group.splits
                 for index in group.members if images.splits[index] != "train")
    return groups, LeakCheck(recorded, copied, seconds=time.perf_counter() - started)
