"""The fine-tuning schedule on real training steps: freezing, unfreezing, optimizers, EMA."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kcls.config import ConfigError, ModelConfig, Recipe, TrainConfig, apply_overrides
from kcls.models.backbones import backbone_blocks
from kcls.models.classifier import build_classifier
from kcls.train.phases import fit_phases
from kcls.train.schedule import WarmupCosine, make_optimizer, plan_phases

NUM_CLASSES = 4
STEPS = 3


def tiny_classifier() -> keras.Model:
    keras.utils.set_random_seed(0)
    return build_classifier(ModelConfig(backbone="resnet_v2_tiny", dropout=0.0), NUM_CLASSES, 32)


def batches(batch_size: int = 8, repeat: bool = True) -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (32, 32, 32, 3)).astype("float32")
    labels = keras.utils.to_categorical(np.arange(32) % NUM_CLASSES, NUM_CLASSES)
    examples = tf.data.Dataset.from_tensor_slices((images, labels))
    return (examples.repeat() if repeat else examples).batch(batch_size)


def train(classifier: keras.Model, **overrides) -> dict:
    config = TrainConfig(**{"jit_compile": False, "learning_rate": 1e-2,
                            "unfrozen_lr_factor": 1.0, **overrides})
    return fit_phases(classifier, batches(), None, STEPS, config, verbose=0)


def values(layers: list[keras.Layer]) -> dict[str, np.ndarray]:
    return {variable.path: variable.numpy().copy() for layer in layers
            for variable in layer.weights}


def changed(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> set[str]:
    return {path for path in before if not np.array_equal(before[path], after[path])}


def test_plan_and_learning_rate_schedule():
    phases = plan_phases(TrainConfig(frozen_epochs=2, unfrozen_epochs=3, learning_rate=1e-3,
                                     unfrozen_lr_factor=0.1))
    assert [(p.name, p.epochs, p.backbone_trainable) for p in phases] == [
        ("frozen", 2, False), ("unfrozen", 3, True)]
    assert phases[1].learning_rate == pytest.approx(1e-4)
    assert [p.name for p in plan_phases(TrainConfig(frozen_epochs=0))] == ["unfrozen"]
    schedule = WarmupCosine(1.0, total_steps=100, warmup_fraction=0.1)
    rates = [float(schedule(step)) for step in (0, 5, 10, 55, 100)]
    np.testing.assert_allclose(rates, [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)


def test_new_keys_parse_and_validate():
    recipe = apply_overrides(Recipe(name="r"), [
        "train.unfreeze=3", "train.train_batchnorm=true", "train.optimizer=sgd",
        "train.clipnorm=1.5", "train.ema=on", "train.early_stopping_patience=2",
        "train.strategy=mirrored"])
    train_config = recipe.train
    assert (train_config.unfreeze, train_config.optimizer, train_config.strategy) == (
        "3", "sgd", "mirrored")
    assert train_config.train_batchnorm and train_config.ema
    assert train_config.clipnorm == 1.5 and train_config.early_stopping_patience == 2
    for bad in ("train.unfreeze=0", "train.unfreeze=top", "train.clipnorm=0",
                "train.early_stopping_patience=-1", "train.optimizer=adam",
                "train.strategy=tpu", "train.lr_find_steps=4"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            apply_overrides(Recipe(name="r"), [bad])


def test_frozen_phase_changes_no_backbone_weight_nor_batchnorm_statistic():
    classifier = tiny_classifier()
    backbone, head = classifier.get_layer("backbone"), classifier.get_layer("logits")
    before_backbone, before_head = values([backbone]), values([head])
    train(classifier, frozen_epochs=1, unfrozen_epochs=0)
    assert any("moving_mean" in path for path in before_backbone)
    assert changed(before_backbone, values([backbone])) == set()
    assert changed(before_head, values([head])) == set(before_head)


@pytest.mark.parametrize("unfreeze, train_batchnorm", [
    ("2", False), ("2", True), ("all", False)])
def test_unfrozen_phase_trains_exactly_the_chosen_blocks(unfreeze, train_batchnorm):
    classifier = tiny_classifier()
    blocks = backbone_blocks(classifier.get_layer("backbone"))
    kept = [] if unfreeze == "all" else blocks[:-int(unfreeze)]
    assert len(kept) == (0 if unfreeze == "all" else 5)
    before = [values(block) for block in blocks]
    train(classifier, frozen_epochs=0, unfrozen_epochs=1, unfreeze=unfreeze,
          train_batchnorm=train_batchnorm)
    after = [values(block) for block in blocks]

    for block, old, new in zip(blocks, before, after):
        kernels = {path for path in old if path.endswith("/kernel")}
        norms = {path for path in old if "_bn/" in path}
        if any(block is kept_block for kept_block in kept):
            assert changed(old, new) == set(), [layer.name for layer in block]
            continue
        assert kernels <= changed(old, new), [layer.name for layer in block]
        if train_batchnorm:
            moving = {path for path in norms if "moving" in path}
            assert moving and moving <= changed(old, new)
        else:
            assert changed(old, new) & norms == set()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_weight_decay_shrinks_kernels_but_not_biases_or_norms(optimizer):
    classifier = tiny_classifier()
    config = TrainConfig(optimizer=optimizer, learning_rate=0.5, weight_decay=0.1,
                         warmup_fraction=0.0)
    decayer = make_optimizer(config.learning_rate, config)
    variables = classifier.trainable_variables
    for variable in variables:
        variable.assign(np.ones(variable.shape, "float32"))
    # Zero gradients: AdamW and momentum SGD make no step, so only weight decay acts.
    decayer.apply_gradients([(np.zeros(v.shape, "float32"), v) for v in variables])
    exempt = {v.path for v in variables if v.name in ("bias", "gamma", "beta")}
    assert exempt and len(exempt) < len(variables)
    for variable in variables:
        expected = 1.0 if variable.path in exempt else 1.0 - 0.5 * 0.1
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-6, err_msg=variable.path)


def test_clipnorm_bounds_the_step():
    config = TrainConfig(optimizer="sgd", learning_rate=0.1, weight_decay=0.0,
                         warmup_fraction=0.0, clipnorm=1.0)
    optimizer = make_optimizer(config.learning_rate, config)
    variable = keras.Variable(np.zeros((10, 10), "float32"))
    optimizer.apply_gradients([(np.full((10, 10), 1000.0, "float32"), variable)])
    # Nesterov's first step: learning rate x (1 + momentum) x the clipped gradient.
    assert np.linalg.norm(variable.numpy()) == pytest.approx(0.1 * 1.9, rel=1e-5)


def test_ema_weights_replace_the_raw_ones_at_the_end_of_a_phase():
    classifier = tiny_classifier()
    kernel = classifier.get_layer("logits").kernel
    raw = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: raw.append(kernel.numpy().copy()))
    fit_phases(classifier, batches(), None, 4,
               TrainConfig(frozen_epochs=1, unfrozen_epochs=0, ema=True, jit_compile=False,
                           learning_rate=1e-2), callbacks=[record], verbose=0)
    average = raw[0]
    for weights in raw[1:]:
        average = 0.99 * average + 0.01 * weights
    assert len(raw) == 4
    assert not np.allclose(kernel.numpy(), raw[-1])
    np.testing.assert_allclose(kernel.numpy(), average, rtol=1e-5, atol=1e-7)


def test_early_stopping_ends_a_phase_and_the_next_starts_after_it():
    classifier = tiny_classifier()
    # A learning rate too small to change float32 weights: val_loss never improves.
    config = TrainConfig(frozen_epochs=4, unfrozen_epochs=1, unfreeze="1", learning_rate=1e-12,
                         early_stopping_patience=1, train_batchnorm=False, jit_compile=False)
    result = fit_phases(classifier, batches(), batches(16, repeat=False), 1, config, verbose=0)
    assert [(p.name, p.first_epoch, p.epochs) for p in result.phases] == [
        ("frozen", 0, 2), ("unfrozen", 2, 1)]
    assert len(result.history["val_loss"]) == 3


def test_batchnorm_trains_by_default_only_when_the_backbone_is_not_pretrained():
    from kcls.train.schedule import resolve_train_batchnorm

    assert TrainConfig().train_batchnorm is None  # auto
    assert resolve_train_batchnorm(TrainConfig(), weights=None) is True
    assert resolve_train_batchnorm(TrainConfig(), weights="imagenet") is False
    assert resolve_train_batchnorm(TrainConfig(), weights="backbone.weights.h5") is False
    assert resolve_train_batchnorm(TrainConfig(train_batchnorm=False), weights=None) is False
    assert resolve_train_batchnorm(TrainConfig(train_batchnorm=True), "imagenet") is True
    # fit_phases cannot know where the weights came from: it asks instead of guessing.
    with pytest.raises(ValueError, match="resolve_train_batchnorm"):
        train(tiny_classifier(), frozen_epochs=0, unfrozen_epochs=1)


def test_xla_is_automatic_where_it_was_measured_faster():
    from kcls.train.compute import resolve_jit_compile

    assert TrainConfig().jit_compile == "auto"
    assert apply_overrides(Recipe(name="r"), ["train.jit_compile=auto"]).train.jit_compile == "auto"
    assert apply_overrides(Recipe(name="r"), ["train.jit_compile=off"]).train.jit_compile is False
    with pytest.raises(ConfigError, match="'train.jit_compile': expected a boolean"):
        TrainConfig(jit_compile="yes")
    assert resolve_jit_compile(True, "efficientnetv2_b0") == (True, "train.jit_compile=true")
    assert resolve_jit_compile(False, "compact_resnet") == (False, "train.jit_compile=false")
    if tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"):
        pytest.skip("the CPU rules apply on CPU-only machines")
    used, reason = resolve_jit_compile("auto", "efficientnetv2_b0")
    assert not used and "0.41x" in reason  # benchmarks/train_step.py on the 2-core CPU
    used, reason = resolve_jit_compile("auto", "my_new_backbone")
    assert not used and "not measured" in reason


def test_recalibrated_batchnorm_holds_the_statistics_of_the_training_batches():
    from kcls.train.batchnorm import recalibrate_batchnorm

    model = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.BatchNormalization()])
    images = np.random.default_rng(0).normal([5.0, -3.0], [2.0, 0.5], (64, 4, 4, 2))
    batches = tf.data.Dataset.from_tensor_slices(
        (images.astype("float32"), np.zeros(64))).batch(16).repeat()
    assert recalibrate_batchnorm(model, batches, max_batches=4) == 64
    # The mean over the 4 batches of each batch's mean and (biased) variance.
    per_batch = images.reshape(4, 16 * 4 * 4, 2)
    norm = model.layers[0]
    np.testing.assert_allclose(norm.moving_mean.numpy(), per_batch.mean(axis=1).mean(axis=0),
                               rtol=1e-4)
    np.testing.assert_allclose(norm.moving_variance.numpy(),
                               per_batch.var(axis=1).mean(axis=0), rtol=1e-4)
    assert norm.momentum == 0.99
    norm.trainable = False  # frozen layers keep their statistics
    before = norm.moving_mean.numpy().copy()
    assert recalibrate_batchnorm(model, batches.map(lambda x, y: (x + 1, y)), 4) == 0
    np.testing.assert_array_equal(norm.moving_mean.numpy(), before)


def test_validation_sees_the_re_estimated_batchnorm_statistics():
    from kcls.train.batchnorm import PreciseBatchNorm

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.Conv2D(3, 1),
                              keras.layers.BatchNormalization(),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    images = np.random.default_rng(0).normal(4.0, 2.0, (48, 4, 4, 2)).astype("float32")
    labels = keras.utils.to_categorical(np.arange(48) % 2, 2)
    train_batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16).repeat()
    seen = {}

    def probe(logs):  # at validation: the statistics and the conv outputs they should match
        features = model.layers[0](images).numpy().reshape(3, -1, 3)
        seen.update(moving=model.layers[1].moving_mean.numpy(),
                    expected=features.mean(axis=1).mean(axis=0))

    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="categorical_crossentropy")
    model.fit(train_batches, steps_per_epoch=3, epochs=1, verbose=0, shuffle=False,
              validation_data=tf.data.Dataset.from_tensor_slices((images, labels)).batch(16),
              callbacks=[PreciseBatchNorm(model, train_batches, 3),
                         keras.callbacks.LambdaCallback(on_test_begin=probe)])
    np.testing.assert_allclose(seen["moving"], seen["expected"], rtol=1e-4, atol=1e-5)
