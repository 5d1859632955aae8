"""Grad-CAM: where in the image the classifier looked for its top-1 class (for a
multi-label model, for each label it predicts: one overlay per label).

Grad-CAM (Selvaraju et al., 2017) weights the channels of the backbone's last
convolutional feature map by the spatial mean of the class score's gradient, sums
them, keeps the positive part and upsamples it to the image. kcls classifiers are
`backbone -> pool -> dropout -> logits`, so the feature map is the backbone output.

Example:

>>> written = explain_model("saved_models/quickstart", ["digit.png"])  # doctest: +SKIP
>>> written[0][0]  # doctest: +SKIP
PosixPath('saved_models/quickstart/explanations/3/digit_gradcam.png')
"""

from __future__ import annotations

import io
from pathlib import Path

import keras
import matplotlib
import numpy as np
import tensorflow as tf

from kcls.data.pipeline import prepare_image
from kcls.files import check_output_dir, safe_file_name, write_bytes, write_new_bytes
from kcls.layout import EXPLANATIONS_DIR, model_output_dir
from kcls.load import LoadedClassifier, load_classifier
from kcls.models.classifier import BACKBONE_LAYER


class ImageError(ValueError):
    """A file to explain that is not an image TensorFlow can decode."""


def grad_cam(classifier: keras.Model, images: tf.Tensor,
             class_indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heatmaps of `classifier` for `images`.

    Args:
        classifier: keras.Model from `build_classifier` (backbone layer named `backbone`,
            then the head layers).
        images: float32 `[B, S, S, 3]` in [0, 255], prepared as for evaluation.
        class_indices: int `[B]` classes to explain; default the top-1 predictions.

    Returns:
        `(heatmaps float32 [B, S, S] in [0, 1], class_indices int [B])`. A map is all
        zeros when no location raises the class score.
    """
    backbone = classifier.get_layer(BACKBONE_LAYER)
    head = classifier.layers[classifier.layers.index(backbone) + 1:]
    with tf.GradientTape() as tape:
        features = tf.cast(backbone(images, training=False), tf.float32)
        tape.watch(features)
        logits = features
        for layer in head:
            logits = layer(logits, training=False)
        if class_indices is None:
            class_indices = tf.argmax(logits, axis=-1).numpy()
        scores = tf.gather(logits, class_indices, axis=1, batch_dims=1)
    gradients = tape.gradient(scores, features)  # [B, h, w, C]
    channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(channel_weights * features, axis=-1))[..., None]
    cam = tf.image.resize(cam, images.shape[1:3], method="bilinear")[..., 0]
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    heatmaps = tf.math.divide_no_nan(cam, peak)
    return heatmaps.numpy(), np.asarray(class_indices)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blends a jet-coloured `heatmap` (`[H, W]` in [0, 1]) onto uint8 `image` `[H, W, 3]`."""
    colours = matplotlib.colormaps["jet"](heatmap)[..., :3] * 255.0
    return np.clip((1 - alpha) * image + alpha * colours, 0, 255).astype(np.uint8)


def explain_model(model_path: str | Path, image_paths: list[str | Path],
                  out_dir: str | Path | None = None, overwrite: bool = False
                  ) -> list[tuple[Path, str, float]]:
    """What `kcls explain` does: checks the output folder, loads the model
    (`kcls.load.load_classifier`) and writes the overlays (`explain_files`).

    Args:
        model_path: an export (version or model folder) or a run directory.
        image_paths: the images to explain.
        out_dir: folder for the overlays; default `<run_dir>/explanations/` or
            `<base_dir>/<model>/explanations/<version>/` (`kcls.layout.model_output_dir`).
        overwrite: replace existing overlays of the same name.

    Raises:
        OutputFolderError: `out_dir` cannot be written (checked before the model loads).
        ImageError, FileNotFoundError, DamagedFileError, ConfigError: as `explain_files`
            and `load_classifier`.
    """
    if out_dir is not None:
        check_output_dir(out_dir)
    loaded = load_classifier(model_path)  # its errors name what `model_path` lacks
    out_dir = out_dir or check_output_dir(model_output_dir(model_path, EXPLANATIONS_DIR))
    return explain_files(loaded, image_paths, out_dir, overwrite)


def explain_files(loaded: LoadedClassifier, image_paths: list[str | Path],
                  out_dir: str | Path, overwrite: bool = False
                  ) -> list[tuple[Path, str, float]]:
    """Writes a Grad-CAM overlay of each image for its top-1 class into `out_dir`; for a
    multi-label model one per predicted label, `photo_<label>_gradcam.png`.

    Each PNG shows the image as the model sees it (resized) beside its overlay, under a
    caption naming the label and its probability (as the export serves it). The overlay
    of `photo.jpg` is `<out_dir>/photo_gradcam.png`; labels in names are escaped
    (`kcls.files.safe_file_name`: `in/out` becomes `in%2Fout`). Names are unique within
    a call: a second `photo.*` (e.g. from another folder) gets `photo_gradcam-2.png`,
    and so on. An existing file is never replaced unless `overwrite` is set: the next
    free name is used instead.

    Args:
        loaded: LoadedClassifier, from `kcls.load.load_classifier`.
        image_paths: list of JPEG, PNG, GIF or BMP files.
        out_dir: folder for the overlays (created if missing).
        overwrite: bool, replace existing overlays of the same name.

    Returns:
        `(overlay path, label, probability)` per overlay, in the order of `image_paths`
        (a multi-label image's labels most probable first).

    Raises:
        ImageError: a file that is not a decodable image (the message names it).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size, mode = loaded.recipe.data.image_size, loaded.recipe.data.resize
    written: list[tuple[Path, str, float]] = []
    for path in map(Path, image_paths):
        try:
            decoded = tf.io.decode_image(path.read_bytes(), channels=3, expand_animations=False)
        except tf.errors.InvalidArgumentError:
            raise ImageError(f"{path}: not a decodable JPEG, PNG, GIF or BMP image.") from None
        prepared = prepare_image(decoded, size, mode)[None]
        logits = loaded.classifier(prepared, training=False)
        image = tf.cast(tf.round(prepared[0]), tf.uint8).numpy()
        for label, probability, stem in _explained_labels(loaded, logits[0], path.stem):
            heatmaps, _ = grad_cam(loaded.classifier, prepared, np.array([label]))
            name = loaded.class_names[label]
            png = panel(image, overlay(image, heatmaps[0]), f"{name} {probability:.3f}")
            target = _write_new(out_dir, stem, {target for target, _, _ in written}, png,
                                overwrite)
            written.append((target, name, probability))
    return written


PANEL_SIDE = 224  # small model inputs (32 px) are enlarged to this, pixels kept sharp
CAPTION_HEIGHT = 24


def panel(image: np.ndarray, overlaid: np.ndarray, caption: str) -> bytes:
    """A PNG of uint8 `image` `[S, S, 3]` beside `overlaid`, under a one-line `caption`.

    Images smaller than `PANEL_SIDE` are enlarged by a whole factor (nearest neighbour).
    """
    from PIL import Image, ImageDraw, ImageFont

    factor = max(1, PANEL_SIDE // max(image.shape[:2]))
    pair = np.concatenate([image, overlaid], axis=1).repeat(factor, 0).repeat(factor, 1)
    height, width = pair.shape[:2]
    canvas = Image.new("RGB", (width, height + CAPTION_HEIGHT), "white")
    canvas.paste(Image.fromarray(pair), (0, CAPTION_HEIGHT))
    ImageDraw.Draw(canvas).text((4, 4), caption, fill="black",
                                font=ImageFont.load_default(size=14))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_new(out_dir: Path, stem: str, taken: set[Path], png: bytes,
               overwrite: bool) -> Path:
    """Writes `png` to the first free overlay name of `stem` (`_overlay_path`)."""
    while True:
        target = _overlay_path(out_dir, stem, taken, overwrite)
        try:  # another process may have taken the name since the check
            return (write_bytes if overwrite else write_new_bytes)(target, png)
        except FileExistsError:
            continue


def _explained_labels(loaded: LoadedClassifier, logits: tf.Tensor, stem: str
                      ) -> list[tuple[int, float, str]]:
    """`(class index, probability, overlay stem)` of what to explain for one image: the
    task's explained labels (the top-1 class; for a multi-label model every label at or
    above its threshold) with the probabilities the export serves, stems
    `<stem>_<escaped label>` when the task explains each label."""
    probabilities = loaded.task.probabilities(np.asarray(logits)[None])[0]
    return [(label, float(probabilities[label]),
             f"{stem}_{safe_file_name(loaded.class_names[label])}"
             if loaded.task.explains_each_label else stem)
            for label in loaded.task.explained_labels(probabilities)]


def _overlay_path(out_dir: Path, stem: str, taken: set[Path], overwrite: bool) -> Path:
    """`<stem>_gradcam.png`, or `<stem>_gradcam-N.png` with the smallest free N >= 2."""
    number = 1
    while True:
        target = out_dir / (f"{stem}_gradcam.png" if number == 1 else
                            f"{stem}_gradcam-{number}.png")
        if target not in taken and (overwrite or not target.exists()):
            return target
        number += 1
