"""ONNX export: the resize by matrix products is `prepare_image`'s; a trained run's ONNX
model matches its SavedModel in ONNX Runtime (slow); disagreeing models are refused and
missing packages named in one line."""

import json
import sys

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from kcls.cli import main
from kcls.data.pipeline import prepare_image, prepare_images_by_products
from kcls.serving import onnx as onnx_export

ANY_SIZE = [tf.TensorSpec([None, None, None, 3], tf.uint8)]


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("mode", ["resize", "center_crop", "pad"])
def test_resize_by_products_matches_prepare_image_in_a_graph(mode, size):
    # Unknown image sizes, as in the SavedModel's signatures and tf.data pipelines.
    rng = np.random.default_rng(size)
    reference = tf.function(lambda images: prepare_image(images, size, mode), ANY_SIZE)
    products = tf.function(lambda images: prepare_images_by_products(images, size, mode),
                           ANY_SIZE)
    for height, width in [(size, size), (size // 2, size * 3), (17, 29), (500, 333),
                          *rng.integers(size // 4, 3 * size, (4, 2)).tolist()]:
        images = rng.integers(0, 256, (2, height, width, 3), dtype=np.uint8)
        np.testing.assert_allclose(products(images).numpy(), reference(images).numpy(),
                                   atol=0.02, err_msg=f"{mode} {height}x{width}->{size}")


def test_tf2onnx_mistranslates_the_area_resize_prepare_image_uses():
    # Why `prepare_images_by_products` exists: converted as it is, shrinking is wrong.
    # If this starts failing, tf2onnx converts ResizeArea faithfully and ONNX exports
    # could use prepare_image directly.
    pytest.importorskip("tf2onnx")
    import onnxruntime
    import tf2onnx

    onnx_export._patch_tf2onnx()
    resize = tf.function(lambda images: {"out": prepare_image(images, 32)},
                         [tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])
    model, _ = tf2onnx.convert.from_function(resize, input_signature=resize.input_signature,
                                             opset=onnx_export.OPSET)
    session = onnxruntime.InferenceSession(model.SerializeToString())
    images = np.random.default_rng(0).uniform(0, 255, (1, 64, 48, 3)).astype(np.float32)
    converted = session.run(None, {"images": images})[0]
    assert np.abs(converted - resize(images)["out"].numpy()).max() > 10


def test_missing_onnx_packages_name_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)
    with pytest.raises(onnx_export.MissingOnnxError, match=r'pip install "kcls\[onnx\]"'):
        onnx_export.require_onnx()
    model, image = tmp_path / "model.onnx", tmp_path / "image.png"
    model.write_bytes(b"")
    image.write_bytes(b"")
    result = CliRunner().invoke(main, ["predict", str(model), str(image)])
    assert result.exit_code == 2, result.output
    assert 'pip install "kcls[onnx]"' in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_a_trained_run_exports_an_onnx_model_that_matches_its_saved_model(trained_quickstart):
    pytest.importorskip("tf2onnx")
    from kcls.data.sources import load_splits

    recipe, result = trained_quickstart
    metadata = json.loads((result.export_dir / "kcls.json").read_text())
    parity = metadata["onnx"]["parity"]
    assert parity["images"] == 360 and parity["top1_agreement"] >= 0.999
    assert parity["max_probability_difference"] < 1e-4 and parity["known_agreement"] == 1.0
    session = onnx_export.OnnxSession(result.export_dir / "model.onnx")
    assert session.class_names == result.class_names and session.image_size == 32
    assert session.task.temperature == pytest.approx(result.task.temperature)
    assert session.task.rejection.threshold == result.task.rejection.threshold
    assert "string" not in {output.type for output in session.session.get_outputs()}
    # Checked here independently too, at other input sizes: the resize is inside.
    images = np.stack([image for image, _ in load_splits(recipe.data).test.take(16)
                       .as_numpy_iterator()])
    served = tf.saved_model.load(str(result.export_dir)).signatures["predict_images"]
    for side in (8, 32, 57):
        batch = tf.image.resize(images, (side, side), method="nearest").numpy()
        expected = served(images=tf.constant(batch))
        actual = session.run(batch.astype(np.float32))
        np.testing.assert_allclose(actual["probabilities"], expected["probabilities"].numpy(),
                                   atol=1e-5)
        np.testing.assert_array_equal(actual["classes"], expected["classes"].numpy())
        np.testing.assert_array_equal(actual["known"], expected["known"].numpy())


@pytest.mark.slow
def test_kcls_export_format_onnx_writes_a_checked_version(trained_quickstart):
    pytest.importorskip("tf2onnx")
    _, result = trained_quickstart
    output = CliRunner().invoke(main, ["export", str(result.run_dir), "--format", "onnx"])
    assert output.exit_code == 0, output.output
    version = result.export_dir.parent / "2"
    assert (version / "model.onnx").is_file()
    assert "ONNX model" in output.output and "top-1 agreement with the SavedModel 1.0000" in (
        output.output)


@pytest.mark.slow
def test_an_onnx_model_that_disagrees_with_the_saved_model_is_refused(trained_quickstart,
                                                                     tmp_path):
    pytest.importorskip("tf2onnx")
    from kcls.load import load_export
    from kcls.models.classifier import build_classifier

    recipe, result = trained_quickstart
    loaded = load_export(result.export_dir)
    untrained = build_classifier(recipe.model, len(loaded.class_names), 32)
    with pytest.raises(onnx_export.OnnxError, match="agrees with the SavedModel on"):
        onnx_export.write_onnx(result.export_dir, untrained, recipe, loaded.class_names,
                               loaded.task)
    written = json.loads((result.export_dir / "kcls.json").read_text())["onnx"]["bytes"]
    assert (result.export_dir / "model.onnx").stat().st_size == written  # left untouched
