"""Strategies and precision: MirroredStrategy over two logical CPUs, mixed precision on CPU."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import kcls
from kcls.config import ConfigError, ModelConfig, TrainConfig
from kcls.models.classifier import build_classifier
from kcls.train.compute import describe_strategy, make_strategy
from kcls.train.phases import fit_phases

# Logical devices must be configured before TensorFlow initialises its runtime, which
# this pytest process has long done: the mirrored run happens in a fresh interpreter.
MIRRORED_SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras
    from kcls.config import ModelConfig, TrainConfig
    from kcls.models.classifier import build_classifier
    from kcls.train.compute import describe_strategy, make_strategy
    from kcls.train.phases import fit_phases

    strategy = make_strategy("mirrored")
    model_config = ModelConfig(backbone="resnet_v2_tiny", dropout=0.0)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        mirrored = build_classifier(model_config, 4, 32)
    single = build_classifier(model_config, 4, 32)
    single.set_weights(mirrored.get_weights())
    initial = [w.copy() for w in single.get_weights()]

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (64, 32, 32, 3)).astype("float32")
    labels = keras.utils.to_categorical(np.arange(64) % 4, 4)
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(16)
    # SGD: unlike Adam, its steps scale with the gradient, so a loss summed or averaged
    # over the wrong number of examples shows up in the weights.
    config = TrainConfig(frozen_epochs=0, unfrozen_epochs=1, optimizer="sgd",
                         learning_rate=0.05, unfrozen_lr_factor=1.0, warmup_fraction=0.0,
                         train_batchnorm=False, jit_compile=False)
    results = {}
    for name, model, run_strategy in [("mirrored", mirrored, strategy),
                                      ("single", single, None)]:
        results[name] = fit_phases(model, batches, None, 3, config, verbose=0,
                                   strategy=run_strategy).history["loss"]
    print(json.dumps({
        "strategy": describe_strategy(strategy),
        "mirrored_variable": type(mirrored.weights[0].value).__name__,
        "losses": results,
        "max_difference": max(float(np.abs(a - b).max()) for a, b in
                              zip(mirrored.get_weights(), single.get_weights())),
        "max_change": max(float(np.abs(a - b).max()) for a, b in
                          zip(mirrored.get_weights(), initial)),
    }))
""")


# Two replicas augment the same image (a global batch of 8 copies, 4 per replica):
# each replica folds its id into the step's seed, so their draws differ. Then a
# mirrored fit() with the strong policy on the device.
MIRRORED_AUGMENTATION_SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras
    from kcls.config import ModelConfig, TrainConfig
    from kcls.data.augment import build_augmentation
    from kcls.models.classifier import build_classifier
    from kcls.train.compute import make_strategy
    from kcls.train.phases import fit_phases
    from kcls.train.trainer import Trainer

    strategy = make_strategy("mirrored")
    augmentation = build_augmentation("strong", seed=0)
    with strategy.scope():
        classifier = build_classifier(ModelConfig(backbone="resnet_v2_tiny"), 4, 32)
        trainer = Trainer(classifier, augmentation)
    image = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    images = np.repeat(image, 8, axis=0)
    labels = keras.utils.to_categorical(np.arange(8) % 4, 4)
    batches = tf.data.Dataset.from_tensors((images, labels)).repeat()

    @tf.function
    def augment(data):
        return strategy.run(trainer.augment_batch,
                            args=(data, augmentation.seed_generator.next()))

    augmented = augment(next(iter(strategy.experimental_distribute_dataset(batches))))
    replicas = [values.numpy() for values in strategy.experimental_local_results(augmented[0])]
    result = fit_phases(classifier, batches, None, 2,
                        TrainConfig(frozen_epochs=1, unfrozen_epochs=0, jit_compile=False),
                        device_augment=augmentation, verbose=0, strategy=strategy)
    print(json.dumps({
        "shapes": [list(values.shape) for values in replicas],
        "replica_difference": float(np.abs(replicas[0] - replicas[1]).max()),
        "augmentation": result.augmentation,
        "loss": result.history["loss"],
    }))
""")


def run_on_two_cpus(tmp_path, script_text: str) -> dict:
    """Runs `script_text` in a fresh interpreter; returns the JSON of its last line."""
    script = tmp_path / "mirrored.py"
    script.write_text(script_text)
    # The same kcls as this process, whichever checkout that is.
    source_root = os.path.dirname(os.path.dirname(kcls.__file__))
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [source_root, os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                               timeout=240, env=environment)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("layer_decay", [None, 0.5])
def test_mirrored_training_on_two_cpus_matches_one_device(tmp_path, layer_decay):
    # With layer decay the per-variable learning rates apply on every replica alike.
    result = run_on_two_cpus(tmp_path, MIRRORED_SCRIPT.replace(
        "jit_compile=False)", f"jit_compile=False, layer_decay={layer_decay})"))
    assert result["strategy"] == "MirroredStrategy x 2 replicas"
    assert result["mirrored_variable"] == "MirroredVariable"
    assert result["max_change"] > 1e-3  # it trained
    # A global batch of 16 split 8 + 8 takes the same step as 16 on one device.
    assert result["max_difference"] < 1e-4, result
    np.testing.assert_allclose(result["losses"]["mirrored"], result["losses"]["single"],
                               rtol=1e-4)


@pytest.mark.slow
def test_two_replicas_augment_differently_on_their_devices(tmp_path):
    result = run_on_two_cpus(tmp_path, MIRRORED_AUGMENTATION_SCRIPT)
    assert result["shapes"] == [[4, 32, 32, 3], [4, 32, 32, 3]]
    assert result["replica_difference"] > 1.0, result
    assert result["augmentation"]["device"] == [
        "RandomFlip", "RandomShift", "RandAugment", "MixUpOrCutMix"]
    assert result["augmentation"]["host"] == []
    assert np.isfinite(result["loss"]).all()


def test_default_and_multiworker_strategies(monkeypatch):
    default = make_strategy("default")
    assert default is tf.distribute.get_strategy()
    assert describe_strategy(default) == "DefaultDistributionStrategy x 1 replicas"
    assert make_strategy("auto").num_replicas_in_sync == 1  # CPU only, no TPU
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        make_strategy("multiworker")


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains_with_float32_logits(precision):
    keras.utils.set_random_seed(0)
    classifier = build_classifier(ModelConfig(backbone="resnet_v2_tiny"), 4, 32, precision)
    assert classifier.get_layer("backbone").compute_dtype == precision.removeprefix("mixed_")
    assert classifier.output.dtype == "float32"
    optimizers = []
    seen = keras.callbacks.LambdaCallback(
        on_train_begin=lambda logs: optimizers.append(type(seen.model.optimizer).__name__))
    images = np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    labels = keras.utils.to_categorical(np.arange(16) % 4, 4)
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(8)
    result = fit_phases(classifier, batches, None, 2,
                        TrainConfig(frozen_epochs=1, unfrozen_epochs=0, jit_compile=False),
                        callbacks=[seen], verbose=0)
    assert np.isfinite(result.history["loss"]).all()
    # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
    expected = "LossScaleOptimizer" if precision == "mixed_float16" else "AdamW"
    assert optimizers == [expected]
    assert all(variable.dtype == "float32" for variable in classifier.weights)
