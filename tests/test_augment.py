"""Augmentation on the device: per-image draws, seeds, an XLA model step, no tf.data ops."""

import numpy as np
import pytest
import tensorflow as tf

from kcls.config import DataConfig, ModelConfig, TrainConfig
from kcls.data.augment import (
    Cutout,
    RandAugment,
    RandomShift,
    build_augmentation,
    compiles_with_xla,
    place_augmentation,
)
from kcls.data.pipeline import train_pipeline
from kcls.models.classifier import build_classifier
from kcls.train.phases import fit_phases

# Op types that only augmentation produces (flips, shifts' reflect padding, RandAugment's
# per-image partitions and projective transforms, random draws).
AUGMENTATION_OPS = {"ReverseV2", "MirrorPad", "DynamicPartition", "DynamicStitch",
                    "ImageProjectiveTransformV3", "StatelessRandomUniformV2",
                    "StatelessRandomUniformIntV2"}


def batch(count: int = 16, same_image: bool = False) -> dict[str, tf.Tensor]:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (1 if same_image else count, 32, 32, 3)).astype("float32")
    return {"images": tf.constant(np.repeat(images, count, axis=0) if same_image else images),
            "labels": tf.one_hot(np.arange(count) % 4, 4)}


def test_policies_stack_their_stages():
    assert build_augmentation("none") is None
    assert build_augmentation("strong").stage_names == [
        "RandomFlip", "RandomShift", "RandAugment", "MixUpOrCutMix"]
    assert build_augmentation("randaugment", horizontal_flip=False).stage_names == [
        "RandomShift", "RandAugment"]
    assert build_augmentation("light", horizontal_flip=False).stage_names == ["RandomShift"]
    assert compiles_with_xla(build_augmentation("light"))
    assert not compiles_with_xla(build_augmentation("randaugment"))


def test_cutout_erases_one_square_per_image_to_the_batch_mean():
    assert build_augmentation("light", cutout=0.25).stage_names == [
        "RandomFlip", "RandomShift", "Cutout"]
    data = batch()
    images = data["images"].numpy() + 1000.0  # no pixel equals the fill by chance
    layer = Cutout(0.25, seed=2)
    erased = layer.augment({**data, "images": tf.constant(images)},
                           layer.seed_generator)["images"]
    changed = np.any(erased.numpy() != images, axis=-1)  # [B, 32, 32]
    centres = set()
    for mask in changed:
        rows, columns = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        # A filled rectangle, an 8x8 square cut by the border at most.
        assert mask.sum() == len(rows) * len(columns)
        assert 4 <= len(rows) <= 8 and 4 <= len(columns) <= 8
        assert rows[-1] - rows[0] == len(rows) - 1
        assert columns[-1] - columns[0] == len(columns) - 1
        centres.add((rows[0], columns[0]))
    assert len(centres) > 8  # drawn per image
    fill = images.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(erased.numpy()[changed], np.broadcast_to(
        fill, (changed.sum(), 3)), rtol=1e-5)
    compiled = tf.function(lambda x: layer({**data, "images": x}), jit_compile=True)
    assert compiled(data["images"])["images"].shape == data["images"].shape


def test_random_shift_moves_whole_images_by_at_most_the_factor():
    layer = RandomShift(0.125, seed=3)
    # A ramp along the columns: a shift by k columns adds k to every interior value.
    ramp = np.tile(np.arange(32, dtype=np.float32), (16, 32, 1))[..., None]
    shifted = layer(tf.constant(ramp), training=True).numpy()
    deltas = shifted[:, :, 8:24, 0] - ramp[:, :, 8:24, 0]
    per_image = deltas.reshape(16, -1)
    assert np.all(per_image == per_image[:, :1])  # one whole-pixel shift per image
    assert np.abs(per_image).max() <= 4 and len(np.unique(per_image[:, 0])) > 1
    assert np.array_equal(layer(tf.constant(ramp), training=False).numpy(), ramp)
    compiled = tf.function(lambda x: layer(x, training=True), jit_compile=True)
    assert compiled(tf.constant(ramp)).shape == ramp.shape


@pytest.mark.parametrize("policy", ["light", "randaugment", "strong"])
def test_policies_run_eagerly_and_in_graphs(policy):
    augmentation = build_augmentation(policy, seed=1)
    data = batch()
    eager = augmentation(data, training=True)
    in_graph = tf.function(lambda data: augmentation(data, training=True))(data)
    for augmented in (eager, in_graph):
        assert augmented["images"].shape == data["images"].shape
        assert augmented["images"].dtype == tf.float32
        assert 0 <= float(tf.reduce_min(augmented["images"]))
        assert float(tf.reduce_max(augmented["images"])) <= 255
        np.testing.assert_allclose(augmented["labels"].numpy().sum(axis=1), 1.0, atol=1e-5)
    unchanged = augmentation(data, training=False)
    np.testing.assert_array_equal(unchanged["images"], data["images"])


def test_strong_mixes_labels():
    augmentation = build_augmentation("strong", mixup=1.0, cutmix=0.0, seed=0)
    mixed = augmentation(batch())["labels"].numpy()
    assert np.min(np.max(mixed, axis=1)) < 0.99  # soft labels (a row can pair with itself)


def test_randaugment_draws_its_ops_per_image():
    # The same image 64 times: one draw per batch would give at most a handful of
    # distinct results; per-image ops and magnitudes give nearly one per image.
    data = batch(64, same_image=True)
    augmented = RandAugment(num_ops=2, factor=0.3, seed=0)(data)["images"].numpy()
    assert len({image.tobytes() for image in augmented}) > 48


def test_draws_follow_the_seed_and_advance_every_call():
    data = batch(8, same_image=True)
    augmentation = build_augmentation("randaugment", seed=5)
    seeded = tf.function(lambda data, seed: augmentation(data, seed=seed)["images"])
    first = seeded(data, tf.constant([5, 1], tf.int64)).numpy()
    np.testing.assert_array_equal(first, seeded(data, tf.constant([5, 1], tf.int64)).numpy())
    assert not np.array_equal(first, seeded(data, tf.constant([5, 2], tf.int64)).numpy())
    # Per image: the 8 copies of one image come out different.
    assert len({image.tobytes() for image in first}) > 4

    # Unseeded calls draw from the layer's generator: a new draw each call (each step,
    # each epoch), the same sequence for the same seed.
    def three_calls(seed: int) -> list[np.ndarray]:
        layer = build_augmentation("randaugment", seed=seed)
        return [layer(data)["images"].numpy() for _ in range(3)]

    run_a, run_b, other = three_calls(5), three_calls(5), three_calls(6)
    for a, b in zip(run_a, run_b):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(run_a[0], run_a[1])
    assert not np.array_equal(run_a[0], other[0])


def test_the_tf_data_pipeline_contains_no_augmentation_op():
    examples = tf.data.Dataset.from_tensor_slices(
        (np.zeros((32, 40, 40, 3), np.uint8), np.arange(32) % 4))
    config = DataConfig(image_size=32, batch_size=8, augment="strong")
    pipeline = train_pipeline(examples, 4, config, np.ones(4))
    graph = tf.compat.v1.GraphDef.FromString(pipeline._as_serialized_graph().numpy())
    pipeline_ops = {node.op for node in graph.node} | {
        node.op for function in graph.library.function for node in function.node_def}
    assert "ResizeArea" in pipeline_ops or "ResizeBilinear" in pipeline_ops  # it is the graph

    augmentation = build_augmentation("strong", seed=0)
    traced = tf.function(lambda data: augmentation(data)).get_concrete_function(batch(8))
    augment_ops = {node.op for node in traced.graph.as_graph_def().node} | {
        node.op for function in traced.graph.as_graph_def().library.function
        for node in function.node_def}
    assert AUGMENTATION_OPS <= augment_ops  # the check below can see augmentation
    assert not pipeline_ops & AUGMENTATION_OPS


def test_off_a_tpu_every_policy_runs_on_the_device():
    strategy = tf.distribute.get_strategy()
    for policy in ("light", "randaugment", "strong"):
        augmentation = build_augmentation(policy)
        assert place_augmentation(augmentation, strategy) == (None, augmentation)
    assert place_augmentation(None, strategy) == (None, None)


def test_host_augmentation_for_tpus_is_per_batch_and_reproducible():
    # What a TPU run gets for policies XLA cannot compile: the policy in tf.data, batch k
    # seeded with (data.seed, k), parallel map and all.
    rng = np.random.default_rng(0)
    examples = tf.data.Dataset.from_tensor_slices(
        (rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), np.arange(16) % 4))
    config = DataConfig(image_size=32, batch_size=8, augment="strong", shuffle_buffer=1,
                        deterministic=True)

    def first_batches(augment: bool) -> list[np.ndarray]:
        host = build_augmentation("strong", seed=0) if augment else None
        pipeline = train_pipeline(examples, 4, config, host_augment=host)
        return [images for images, _ in pipeline.take(4).as_numpy_iterator()]

    plain, augmented, again = first_batches(False), first_batches(True), first_batches(True)
    for index in range(4):
        assert not np.array_equal(plain[index], augmented[index])
        np.testing.assert_array_equal(augmented[index], again[index])
    # Batches 0 and 2 hold the same images (shuffle buffer 1, 16 examples): new draws.
    np.testing.assert_array_equal(plain[0], plain[2])
    assert not np.array_equal(augmented[0], augmented[2])


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["randaugment", "strong"])
def test_the_model_step_stays_xla_compiled_with_augmentation_on_the_device(policy):
    augmentation = build_augmentation(policy, seed=0)
    classifier = build_classifier(ModelConfig(backbone="resnet_v2_tiny"), 4, 32)
    data = batch()
    # Class weights: a third batch element that must pass the augmentation untouched.
    batches = tf.data.Dataset.from_tensors(
        (data["images"], data["labels"], tf.ones([16]))).repeat()
    seed_before = augmentation.seed_generator.state.numpy().copy()
    result = fit_phases(classifier, batches, None, steps_per_epoch=2,
                        config=TrainConfig(frozen_epochs=1, unfrozen_epochs=0, jit_compile=True),
                        device_augment=augmentation, verbose=0)
    assert result.jit_compile is True
    assert result.augmentation == {"host": [], "device": augmentation.stage_names,
                                      "compiled": False, "model_step_compiled": True}
    assert np.isfinite(result.history["loss"][0])
    # One seed per step: the two steps augmented differently.
    assert augmentation.seed_generator.state.numpy()[1] == seed_before[1] + 2


def test_without_xla_the_record_says_so():
    classifier = build_classifier(ModelConfig(backbone="resnet_v2_tiny"), 4, 32)
    data = batch()
    batches = tf.data.Dataset.from_tensors((data["images"], data["labels"])).repeat()
    result = fit_phases(classifier, batches, None, steps_per_epoch=1,
                        config=TrainConfig(frozen_epochs=1, unfrozen_epochs=0, jit_compile=False),
                        verbose=0)
    assert result.augmentation == {"host": [], "device": [], "compiled": None,
                                      "model_step_compiled": False}
