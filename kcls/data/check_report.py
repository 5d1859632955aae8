"""The files of `kcls data check`: `data_check.json`, `data_check.md` and a PNG of the
duplicate groups (written atomically, `kcls.files`, `kcls.figures`).

Example:

>>> paths = write_data_check(check_source(config), "checks/flowers")  # doctest: +SKIP
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from kcls.data.check import DataCheck, encoded_images
from kcls.files import write_json, write_text
from kcls.layout import DATA_CHECK_FILE, DATA_CHECK_REPORT_FILE, DUPLICATE_GROUPS_PLOT

PLOTTED_GROUPS = 12  # rows of the PNG
PLOTTED_MEMBERS = 6  # columns
LISTED_GROUPS = 50  # groups named in data_check.md (data_check.json names all)
PREVIEW_SIDE = 96  # pixels of a thumbnail in the PNG


def write_data_check(check: DataCheck, out_dir: str | Path) -> list[Path]:
    """Writes the check's JSON, Markdown and PNG (no PNG without duplicates) into
    `out_dir` and returns their paths."""
    out_dir = Path(out_dir)
    written = [write_json(out_dir / DATA_CHECK_FILE, check.to_dict())]
    plot = plot_duplicate_groups(check, out_dir / DUPLICATE_GROUPS_PLOT)
    written.append(write_text(out_dir / DATA_CHECK_REPORT_FILE,
                              markdown(check, plot.name if plot else None)))
    return written + ([plot] if plot else [])


def summary_line(check: DataCheck) -> str:
    """One line: images, unreadable files, duplicate groups by kind, time."""
    counts = check.group_counts()
    return (f"{len(check.images.files):,} images ({int(check.hashes.readable.sum()):,} "
            f"readable, {len(check.images.skipped)} unreadable), "
            f"{counts['groups']} duplicate group(s): {counts['exact']} exact, "
            f"{counts['near']} near; {counts['within_class']} within a class, "
            f"{counts['across_classes']} across classes, {counts['across_splits']} across "
            f"splits (leaks); {check.seconds:.1f} s")


def markdown(check: DataCheck, plot: str | None) -> str:
    """`data_check.md`: counts, images, unreadable files, duplicate groups."""
    images = check.images
    lines = [f"# Data check of `{check.source}`", "", summary_line(check) + ".", "",
             "## Images per class and split", "",
             "| class | " + " | ".join(check.counts()) + " |",
             "| --- |" + " ---: |" * len(check.counts())]
    counts = check.counts()
    for name in images.class_names:
        lines.append(f"| {name} | " + " | ".join(str(counts[split][name]) for split in counts)
                     + " |")
    summary = check.image_summary()
    lines += ["", "## Images", "",
              f"- width {_spread(summary['width'])}, height {_spread(summary['height'])} "
              "pixels",
              f"- {summary['distinct_sizes']} distinct sizes; most common: "
              + ", ".join(f"{size} ({count})" for size, count in
                          summary["common_sizes"].items()),
              "- modes: " + ", ".join(f"{mode} {count}" for mode, count in
                                      summary["modes"].items()),
              "- formats: " + ", ".join(f"{name} {count}" for name, count in
                                        summary["formats"].items())]
    if images.skipped:
        lines += ["", f"## Unreadable files ({len(images.skipped)})", ""]
        lines += [f"- `{name}`" for name in images.skipped]
    lines += _group_lines(check, plot)
    return "\n".join(lines) + "\n"


def _spread(values: dict[str, int]) -> str:
    """`32-500 (median 375)`, or `none` without readable images."""
    if not values:
        return "none"
    return f"{values['min']}-{values['max']} (median {values['median']})"


def _group_lines(check: DataCheck, plot: str | None) -> list[str]:
    counts = check.group_counts()
    lines = ["", f"## Duplicate groups ({counts['groups']})", "",
             f"Exact: the same bytes. Near: perceptual hashes (of the image or its mirror) "
             f"at most {check.threshold} of 64 bits apart. Across splits: a leak (a "
             "held-out image also trains); across classes: conflicting labels.", ""]
    if not check.groups:
        return lines + ["None found."]
    for number, group in enumerate(check.groups[:LISTED_GROUPS], start=1):
        kind = "exact" if group.exact else f"near (distance {group.distance})"
        members = ", ".join(f"`{entry['file']}` ({entry['split']}, {entry['label']})"
                            for entry in map(check.member, group.members))
        lines.append(f"{number}. {kind}, {', '.join(group.kinds)}: {members}")
    if len(check.groups) > LISTED_GROUPS:
        lines.append(f"... and {len(check.groups) - LISTED_GROUPS} more in "
                     f"{DATA_CHECK_FILE}.")
    return lines + ([] if plot is None else ["", f"![duplicate groups]({plot})"])


def plot_duplicate_groups(check: DataCheck, path: Path) -> Path | None:
    """A grid of the first `PLOTTED_GROUPS` groups, one per row, leaks and conflicting
    labels first, each image titled with its split and label; None without groups."""
    groups = sorted(check.groups, key=lambda group: (not group.across_splits,
                                                     not group.across_classes))
    groups = groups[:PLOTTED_GROUPS]
    if not groups:
        return None
    from kcls.figures import plt, save_figure

    shown = [group.members[:PLOTTED_MEMBERS] for group in groups]
    encoded = encoded_images(check, {index for members in shown for index in members})
    columns = max(len(members) for members in shown)
    figure, axes = plt.subplots(len(groups), columns, squeeze=False,
                                figsize=(1.8 * columns, 2.0 * len(groups)))
    for row, (group, members) in enumerate(zip(groups, shown)):
        for column, axis in enumerate(axes[row]):
            axis.axis("off")
            if column >= len(members):
                continue
            entry = check.member(members[column])
            axis.imshow(_preview(encoded.get(members[column])))
            title = f"{entry['split']}\n{entry['label']}"[:40]
            if column == 0:
                title = f"#{row + 1} {'exact' if group.exact else 'near'}\n{title}"
            axis.set_title(title, fontsize=7,
                           color="red" if group.across_splits or group.across_classes
                           else "black")
    return save_figure(figure, path)


def _preview(data: bytes | None) -> np.ndarray:
    """uint8 `[PREVIEW_SIDE, PREVIEW_SIDE, 3]` of encoded bytes (gray when unreadable)."""
    try:
        image = Image.open(io.BytesIO(data or b"")).convert("RGB")
        return np.asarray(image.resize((PREVIEW_SIDE, PREVIEW_SIDE)))
    except (OSError, ValueError):
        return np.full((PREVIEW_SIDE, PREVIEW_SIDE, 3), 128, np.uint8)
