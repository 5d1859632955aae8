"""TF-MOT pruning and quantization-aware training, run in a child process.

This module is the only place kcls touches `tensorflow_model_optimization`, and only
in a child process started by `kcls.optimize.mot.fine_tune_with_mot`:

    TF_USE_LEGACY_KERAS=1 python -m kcls.optimize.mot_worker JOB.json

Why a separate process: TF-MOT 0.8 wraps tf-keras (Keras 2) models only, and importing
it switches `tf.keras` to legacy Keras for the whole process, after which Keras 3 and
KerasCV (which kcls trains with) no longer work. So the parent process (Keras 3)
writes the trained weights to an `.npz`, keyed by name (`kcls.optimize.weight_keys`);
the child, with `TF_USE_LEGACY_KERAS=1` set before TensorFlow is imported,
rebuilds the same architecture with tf-keras (KerasCV follows `tf.keras` there), loads
the weights by the same keys, fine-tunes with pruning or fake quantization on the
training split, and writes a SavedModel and a `.tflite` (images float32 `[1, S, S, 3]`
in [0, 255] -> probabilities `[1, C]`) plus `result.json` with the kernel sparsity. The
SavedModel is a plain module: `serving_default` and `model_variables` (the weights,
pruning masks stripped, with their Keras names such as `.../kernel:0`).

Job file (JSON): `method` (`prune` or `qat`), `recipe` (`kcls.config.to_dict`),
`num_classes`, `objective` (the task's loss, metric and activation by tf-keras name,
`kcls.tasks.Task.legacy_objective`), `weights` (the .npz), `out_dir`, `epochs`, `steps_per_epoch`,
`learning_rate`, `target_sparsity`. `result.json`: `method`, `sparsity`, `steps` and
`skipped_files` (files of the data that did not reach fine-tuning).

stdout carries progress only (a line per stage and epoch, and at least one every 30 s
while training), which the parent passes on to the user; everything else (TensorFlow's
logs, errors) goes to stderr.
"""

from __future__ import annotations

import os

# Must precede the first TensorFlow import of this process (see the module docstring);
# only when this module is the program: an import (docs checks, tests) must not switch
# the importing process, nor every child process it starts after, to tf-keras.
if __name__ == "__main__":
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kcls.files import write_bytes, write_json  # noqa: E402
from kcls.layout import MOT_RESULT_FILE, MOT_SAVED_MODEL_DIR, TFLITE_FILE  # noqa: E402

# Only these are wrapped: TF-MOT rejects others (e.g. the backbones' Rescaling layer)
# when asked to wrap a whole model, and they hold no weights worth pruning.
PRUNED_LAYERS = (tf.keras.layers.Conv2D, tf.keras.layers.DepthwiseConv2D, tf.keras.layers.Dense)
QUANTIZED_LAYERS = (tf.keras.layers.Conv2D, tf.keras.layers.DepthwiseConv2D,
                    tf.keras.layers.Dense, tf.keras.layers.Add, tf.keras.layers.Activation,
                    tf.keras.layers.ReLU, tf.keras.layers.GlobalAveragePooling2D,
                    tf.keras.layers.MaxPooling2D)
EXIT_UNSUPPORTED = 3  # the model has layers TF-MOT cannot wrap; stderr says which
PROGRESS_SECONDS = 30.0  # longest silence while training (the parent stops a silent child)


def build_legacy_classifier(recipe: Any, num_classes: int) -> tf.keras.Model:
    """The kcls classifier rebuilt with tf-keras as ONE flat functional model.

    TF-MOT wraps the layers of a flat model only, so the head is attached to the
    backbone's graph instead of nesting the backbone as a layer (the Keras 3 layout).
    Weighted layers come in the same order as in `build_classifier`'s model.
    """
    from kcls.models.backbones import construct_backbone, get_spec
    from kcls.models.classifier import classification_head

    size = recipe.data.image_size
    backbone = construct_backbone(get_spec(recipe.model.backbone), (size, size, 3))
    logits = classification_head(tf.keras.layers, backbone.output, num_classes,
                                 recipe.model.dropout)
    return tf.keras.Model(backbone.input, logits, name=f"{recipe.model.backbone}_classifier")


def load_weights_by_key(model: tf.keras.Model, weights_file: str) -> None:
    """Assigns the weights `kcls.optimize.mot.save_weights_by_key` saved, matched by key.

    Raises:
        ValueError: a weight without a counterpart on either side, or of another shape.
    """
    from kcls.optimize.weight_keys import weight_keys

    saved = np.load(weights_file)
    variables = weight_keys(model.weights)
    missing, unexpected = sorted(set(variables) - set(saved)), sorted(set(saved) - set(variables))
    if missing or unexpected:
        raise ValueError(f"the tf-keras rebuild and the trained model hold different weights: "
                         f"not trained {missing[:5]}, not in the rebuild {unexpected[:5]}")
    for key, variable in variables.items():
        if tuple(variable.shape) != saved[key].shape:
            raise ValueError(f"weight {key}: shape {tuple(variable.shape)} in the tf-keras "
                             f"rebuild, {saved[key].shape} trained")
        variable.assign(saved[key])


def training_batches(recipe: Any, num_classes: int) -> tuple[tf.data.Dataset, list[str]]:
    """Training split, no augmentation, and the source's files that do not reach it.

    Returns:
        `(batches, skipped)`: batches of float32 `[B, S, S, 3]` and float32 `[B, C]`
        labels (one-hot, or multi-hot as a multi-label source gives them); `skipped` is
        `Splits.skipped`, to which files failing to decode during training are appended
        (read it after training).
    """
    from kcls.data.pipeline import prepare_image
    from kcls.data.sources import load_splits

    data = recipe.data

    def prepare(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        targets = (tf.cast(label, tf.float32) if label.shape.rank == 1
                   else tf.one_hot(label, num_classes))
        return prepare_image(image, data.image_size, data.resize), targets

    splits = load_splits(data, recipe.label_format)
    examples = splits.train.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return (examples.cache().shuffle(10_000, seed=data.seed).repeat()
            .batch(data.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE),
            splits.skipped)


def kernel_sparsity(model: tf.keras.Model) -> dict[str, float]:
    """Share of exact zeros per Conv/Dense kernel, and `overall` over all of them."""
    zeros, total, per_layer = 0, 0, {}
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        values = kernel.numpy()
        per_layer[layer.name] = float(np.mean(values == 0))
        zeros += int(np.sum(values == 0))
        total += values.size
    return {"overall": zeros / max(total, 1), **per_layer}


def wrap_for_method(model: tf.keras.Model, method: str, steps: int, target_sparsity: float
                    ) -> tuple[tf.keras.Model, list[tf.keras.callbacks.Callback]]:
    """`model` wrapped for magnitude pruning or quantization-aware training, and the
    callbacks its training needs."""
    import tensorflow_model_optimization as tfmot

    if method == "prune":
        # Masks change only on steps that are multiples of `frequency`, up to `end_step`:
        # end on one of them, with the last ~30% of steps left to recover at full sparsity.
        frequency = max(1, min(100, steps // 10))
        end_step = max(frequency * (int(0.7 * steps) // frequency), frequency)
        schedule = tfmot.sparsity.keras.PolynomialDecay(
            initial_sparsity=0.0, final_sparsity=target_sparsity, begin_step=0,
            end_step=end_step, frequency=frequency)
        return tf.keras.models.clone_model(model, clone_function=lambda layer: (
            tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
            if isinstance(layer, PRUNED_LAYERS) else layer)), [
                tfmot.sparsity.keras.UpdatePruningStep()]
    annotate = tfmot.quantization.keras.quantize_annotate_layer
    annotated = tf.keras.models.clone_model(model, clone_function=lambda layer: (
        annotate(layer) if isinstance(layer, QUANTIZED_LAYERS) else layer))
    return tfmot.quantization.keras.quantize_apply(annotated), []


def run(job: dict[str, Any]) -> dict[str, Any]:
    """Fine-tunes with pruning or QAT and writes `saved_model/`, `model.tflite`, `result.json`."""
    import tensorflow_model_optimization as tfmot

    from kcls.config import from_dict

    recipe = from_dict(job["recipe"])
    num_classes, method = int(job["num_classes"]), job["method"]
    out_dir = Path(job["out_dir"])
    say(f"{method}: rebuilding {recipe.model.backbone} with tf-keras")
    model = build_legacy_classifier(recipe, num_classes)
    load_weights_by_key(model, job["weights"])
    for layer in model.layers:
        # kcls fine-tunes with BatchNorm in inference mode; keep its statistics here too.
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.trainable = False
    steps = int(job["epochs"]) * int(job["steps_per_epoch"])
    model_for_training, callbacks = wrap_for_method(model, method, steps,
                                                    float(job["target_sparsity"]))
    # The task's loss, metric and activation by tf-keras name (the job's `objective`).
    objective = job["objective"]
    model_for_training.compile(
        optimizer=tf.keras.optimizers.Adam(float(job["learning_rate"])),
        loss=getattr(tf.keras.losses, objective["loss"])(from_logits=True),
        metrics=[getattr(tf.keras.metrics, objective["metric"])(
            name="accuracy", **objective["metric_arguments"])])
    activation = getattr(tf.nn, objective["activation"])
    skipped: list[str] = []
    if steps:  # zero epochs: rebuild, load and convert only (what the transfer test checks)
        say(f"{method}: fine-tuning {job['epochs']} epoch(s) of {job['steps_per_epoch']} steps")
        batches, skipped = training_batches(recipe, num_classes)
        model_for_training.fit(batches, epochs=int(job["epochs"]),
                               steps_per_epoch=int(job["steps_per_epoch"]),
                               callbacks=[*callbacks, Progress(method)], verbose=0)
    if method == "prune":
        final = tfmot.sparsity.keras.strip_pruning(model_for_training)
        sparsity = kernel_sparsity(final)
    else:
        final, sparsity = model_for_training, {}

    size = recipe.data.image_size

    @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.float32, name="images")])
    def probabilities(images: tf.Tensor) -> dict[str, tf.Tensor]:
        logits = final(images, training=False)
        return {"probabilities": activation(logits)}

    # A plain module holding the variables and the one signature: saving the Keras model
    # itself traces every layer's call functions, which takes minutes on 2 CPU cores.
    module = tf.Module()
    module.model_variables = list(final.weights)
    module.probabilities = probabilities
    saved_model = out_dir / MOT_SAVED_MODEL_DIR
    say(f"{method}: writing {saved_model} and converting it to TFLite")
    tf.saved_model.save(module, str(saved_model), signatures={"serving_default": probabilities})
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if method == "qat":
        # Uses the fake-quantization ranges learned in training: an int8 model, no calibration.
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    write_bytes(out_dir / TFLITE_FILE, converter.convert())
    # Files of the data that did not reach fine-tuning; the parent reports them.
    result = {"method": method, "sparsity": sparsity, "steps": steps,
              "skipped_files": list(skipped)}
    write_json(out_dir / MOT_RESULT_FILE, result)
    return result


def say(message: str) -> None:
    """One progress line on stdout, which the parent passes on as it comes."""
    print(message, flush=True)


class Progress(tf.keras.callbacks.Callback):
    """A line per epoch and, within an epoch, one at least every `interval` seconds."""

    def __init__(self, method: str, interval: float = PROGRESS_SECONDS) -> None:
        super().__init__()
        self.method = method
        self.interval = interval

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch
        self.started = self.last = time.monotonic()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if time.monotonic() - self.last >= self.interval:
            self.last = time.monotonic()
            say(f"{self.method}: epoch {self.epoch + 1}/{self.params['epochs']}, step "
                f"{batch + 1}/{self.params['steps']}, loss {(logs or {}).get('loss', 0):.4f}")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        say(f"{self.method}: epoch {epoch + 1}/{self.params['epochs']} done in "
            f"{time.monotonic() - self.started:.0f} s, loss {logs.get('loss', 0):.4f}, "
            f"accuracy {logs.get('accuracy', 0):.4f}")


def main(argv: list[str]) -> int:
    """Entry point: `python -m kcls.optimize.mot_worker JOB.json`; exit status 0 on success."""
    job = json.loads(Path(argv[1]).read_text())
    try:
        run(job)
    except (ValueError, RuntimeError) as error:
        # TF-MOT reports layers it cannot wrap as ValueError/RuntimeError naming the layer.
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_UNSUPPORTED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
