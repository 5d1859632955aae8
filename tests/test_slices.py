"""Results per slice (`kcls evaluate --slice-by`): the bootstrap metrics on known cases,
slice values from manifests and paths, and the command on real hymenoptera photos with
a darkened site."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import f1_score

from kcls.cli import main
from kcls.config import ConfigError
from kcls.data.slices import MISSING_SLICE, column_values, path_values, slice_values
from kcls.metrics.calibration import expected_calibration_error
from kcls.metrics.slices import (
    resampled_ece,
    resampled_macro_f1,
    slice_metrics,
)

HYMENOPTERA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hymenoptera"
needs_photos = pytest.mark.skipif(
    not HYMENOPTERA.is_dir(),
    reason="../shared/data/hymenoptera is not present (only in the kcls workspace)")


def test_vectorised_resamples_match_scikit_learn_and_kcls_on_the_identity_resample():
    rng = np.random.default_rng(3)
    probabilities = rng.dirichlet(np.ones(5), 300)
    labels = rng.integers(0, 3, 300)  # classes 3 and 4 never true, sometimes predicted
    predictions = probabilities.argmax(axis=1)
    identity = np.arange(300)[None]
    assert resampled_macro_f1(labels, predictions, identity, 5)[0] == pytest.approx(
        f1_score(labels, predictions, average="macro", zero_division=0))
    assert resampled_ece(predictions == labels, probabilities.max(axis=1), identity)[0] == (
        pytest.approx(expected_calibration_error(probabilities, labels)))


def test_worst_slice_gap_and_intervals_on_a_known_case():
    labels = np.r_[np.zeros(60, int), np.zeros(60, int)]
    predictions = np.r_[np.zeros(57, int), np.ones(3, int), np.zeros(24, int), np.ones(36, int)]
    probabilities = np.eye(2)[predictions] * 0.8 + 0.1
    groups = ["good"] * 60 + ["poor"] * 60
    result = slice_metrics(probabilities, labels, groups, resamples=500, seed=1)
    assert [scores.name for scores in result.slices] == ["poor", "good"]  # worst first
    assert result.worst.accuracy.value == pytest.approx(0.4)
    assert result.worst.accuracy.low < 0.4 < result.worst.accuracy.high
    assert result.gap.value == pytest.approx(0.55) and result.gap_excludes_zero
    again = slice_metrics(probabilities, labels, groups, resamples=500, seed=1)
    assert again == result  # seeded
    same = slice_metrics(probabilities[:60], labels[:60], ["a", "b"] * 30, resamples=500)
    assert not same.gap_excludes_zero  # two halves of one slice: no clear gap


def test_slices_too_small_to_rank_are_listed_but_never_named_worst_or_best():
    labels = np.zeros(66, int)
    predictions = np.r_[np.zeros(27, int), np.ones(3, int), np.zeros(24, int), np.ones(6, int),
                        np.ones(6, int)]
    groups = ["a"] * 30 + ["b"] * 30 + ["tiny"] * 6
    result = slice_metrics(np.eye(2)[predictions], labels, groups, resamples=200)
    assert result.ranked == ["b", "a"] and result.worst.name == "b"
    assert result.slices[0].name == "tiny" and result.slices[0].accuracy.value == 0.0


def test_one_image_slices_and_bad_shapes():
    result = slice_metrics(np.array([[0.9, 0.1]]), np.array([0]), ["only"])
    assert result.worst == result.best and not result.gap_excludes_zero
    with pytest.raises(ValueError, match="groups"):
        slice_metrics(np.array([[0.9, 0.1]]), np.array([0]), ["a", "b"])


def test_path_slices_count_folders_from_the_root_or_from_the_file(tmp_path):
    files = [str(tmp_path / "north" / "cam1" / "a.png"), str(tmp_path / "b.png"),
             "/elsewhere/south/c.png"]
    assert path_values(files, tmp_path, 1) == ["north", MISSING_SLICE, "elsewhere"]
    assert path_values(files, tmp_path, -1) == ["cam1", MISSING_SLICE, "south"]
    assert path_values(files, tmp_path, 2) == ["cam1", MISSING_SLICE, "south"]
    with pytest.raises(ConfigError, match="non-zero integer"):
        slice_values("path:x", files, f"folder:{tmp_path}")


def test_column_slices_name_missing_cells_and_refuse_unknown_columns(tmp_path):
    manifest = tmp_path / "photos.csv"
    manifest.write_text("path,label,site\na.png,cat,north\nb.png,dog,\nc.png,dog\n")
    files = [str(tmp_path / name) for name in ("c.png", "a.png", "b.png")]
    assert column_values(files, manifest, "site") == [MISSING_SLICE, "north", MISSING_SLICE]
    with pytest.raises(ConfigError, match="its columns are label, site"):
        slice_values("device", files, f"manifest:{manifest}")
    with pytest.raises(ConfigError, match="needs a manifest source"):
        slice_values("site", files, f"folder:{tmp_path}")
    with pytest.raises(ConfigError, match="images read from files"):
        slice_values("site", None, "sklearn:digits")


def test_multi_label_models_refuse_slices_in_one_line():
    from kcls.evaluation.evaluate import check_slicing
    from kcls.tasks import get_task

    with pytest.raises(ConfigError, match="not supported for multi-label"):
        check_slicing(get_task("multilabel"), "site", ["a.png"], "manifest:m.csv")


def photo_manifest(root: Path, per_class: int = 6, dim: float = 1.0) -> Path:
    """A manifest over `per_class` hymenoptera val photos of each class (ants as `cat`,
    bees as `dog`, the fixture's classes) at 32 px: every other photo in site `dim`
    (darkened by the factor `dim`), the rest in `bright`, the last row without a site; one
    train row so the rest are the test split."""
    rows = ["path,label,split,site"]
    for source, label in (("ants", "cat"), ("bees", "dog")):
        for index, photo in enumerate(sorted((HYMENOPTERA / "val" / source).iterdir())[:per_class]):
            image = np.asarray(Image.open(photo).convert("RGB").resize((32, 32)), np.float32)
            site = "dim" if index % 2 else "bright"
            image = image * dim if site == "dim" else image
            Image.fromarray(image.astype(np.uint8)).save(root / f"{label}{index}.png")
            rows.append(f"{label}{index}.png,{label},{'train' if not rows[1:] else 'test'},{site}")
    rows[-1] = rows[-1].rsplit(",", 1)[0] + ","  # no site
    (root / "labels.txt").write_text("cat\ndog\n")
    (root / "photos.csv").write_text("\n".join(rows) + "\n")
    return root / "photos.csv"


@needs_photos
def test_kcls_evaluate_slice_by_site_writes_json_plot_and_report(untrained_models, tmp_path):
    manifest = photo_manifest(tmp_path)
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["evaluate", str(untrained_models[1]), "--data",
                                       f"manifest:{manifest}", "--slice-by", "site",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "slices by site: 3; worst" in result.output and "largest gap" in result.output
    sliced = json.loads((out / "slices.json").read_text())
    names = {scores["name"]: scores["images"] for scores in sliced["slices"]}
    assert names == {"bright": 5, "dim": 5, MISSING_SLICE: 1} and sliced["missing"] == 1
    assert sliced["resamples"] == 1000 and sliced["worst"]["name"] in names
    report = (out / "report.md").read_text()
    assert "## Slices by `site`" in report and "![slices.png](slices.png)" in report
    assert (out / "slices.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    by_folder = CliRunner().invoke(main, ["evaluate", str(untrained_models[1]), "--data",
                                          f"manifest:{manifest}", "--slice-by", "device"])
    assert by_folder.exit_code == 2
    assert "has no column 'device'; its columns are label, split, site" in by_folder.output
    assert "Traceback" not in by_folder.output


@needs_photos
@pytest.mark.slow
def test_a_darkened_site_is_named_the_worst_slice(tmp_path):
    """A tiny classifier fitted on the bright photos; the site darkened to 10% scores lower."""
    import keras
    import tensorflow as tf

    from kcls.config import ModelConfig, Recipe
    from kcls.evaluation.evaluate import evaluate_model
    from kcls.models.classifier import build_classifier
    from kcls.serving.export import export_saved_model

    manifest = photo_manifest(tmp_path, per_class=12, dim=0.1)
    keras.utils.set_random_seed(0)
    classifier = build_classifier(ModelConfig(backbone="resnet_v2_tiny", dropout=0.0), 2, 32)
    bright = [(np.asarray(Image.open(tmp_path / f"{label}{index}.png"), np.float32), label)
              for label in ("cat", "dog") for index in range(0, 12, 2)]
    images = tf.constant(np.stack([image for image, _ in bright]))
    targets = tf.one_hot([0 if label == "cat" else 1 for _, label in bright], 2)
    # BatchNorm frozen at its initial statistics: 60 steps would leave its moving averages
    # far from the batch statistics, and inference would disagree with training.
    frozen = [classifier]
    while frozen:
        layer = frozen.pop()
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
        frozen += list(getattr(layer, "layers", []))
    classifier.compile(keras.optimizers.Adam(3e-3), keras.losses.CategoricalCrossentropy(
        from_logits=True))
    classifier.fit(images, targets, epochs=30, batch_size=6, verbose=0)
    export_dir = export_saved_model(classifier, Recipe(name="sites"), ["cat", "dog"],
                                    base_dir=tmp_path / "models")
    lines = []
    evaluate_model(str(export_dir), f"manifest:{manifest}", str(tmp_path / "out"),
                   log=lines.append, slice_by="site")
    sliced = json.loads((tmp_path / "out" / "slices.json").read_text())
    accuracy = {scores["name"]: scores["accuracy"]["value"] for scores in sliced["slices"]}
    assert accuracy["dim"] < accuracy["bright"] and sliced["worst"]["name"] == "dim", accuracy
    assert any(line.startswith("slices by site") for line in lines)
