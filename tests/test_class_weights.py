"""`train.class_weights`: balanced weights, carried per example by the pipeline into the loss."""

import numpy as np
import tensorflow as tf

from kcls.config import DataConfig, ModelConfig, TrainConfig
from kcls.data.augment import build_augmentation
from kcls.data.pipeline import balanced_class_weights, train_pipeline
from kcls.data.sources import splits_from_arrays, train_class_counts
from kcls.models.classifier import build_classifier
from kcls.train.phases import fit_phases
from kcls.train.trainer import Trainer

DATA = DataConfig(image_size=32, batch_size=16, augment="none", test_fraction=0.2,
                  validation_fraction=0.0, seed=0)


def dark_and_bright(count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` images per class: class 0 dark, class 1 bright (trivially separable)."""
    rng = np.random.default_rng(0)
    dark = rng.integers(0, 60, (count, 32, 32, 3))
    bright = rng.integers(190, 256, (count, 32, 32, 3))
    return (np.concatenate([dark, bright]).astype(np.uint8),
            np.repeat(np.arange(2), count).astype(np.int64))


def test_balanced_weights_make_every_class_weigh_the_same_with_mean_one():
    counts = np.array([80, 15, 5, 0])
    weights = balanced_class_weights(counts)
    np.testing.assert_allclose(weights, [100 / (3 * 80), 100 / (3 * 15), 100 / (3 * 5), 0.0])
    np.testing.assert_allclose(weights * counts, [100 / 3] * 3 + [0.0])
    assert np.sum(weights * counts) / counts.sum() == 1.0


def test_train_class_counts_come_from_the_training_split_only():
    images, labels = dark_and_bright(50)
    splits = splits_from_arrays(images[:60], labels[:60], ["dark", "bright"], DATA)
    # 50 dark + 10 bright; 20% of each held out for testing.
    assert train_class_counts(splits).tolist() == [40, 8]
    splits.train_labels = None  # the path of sources that keep no labels: one pass over them
    assert train_class_counts(splits).tolist() == [40, 8]


def test_batches_carry_the_weight_of_each_example_class_through_augmentation():
    images, labels = dark_and_bright(20)
    weights = np.array([0.25, 4.0])
    classifier = build_classifier(ModelConfig(backbone="resnet_v2_tiny"), 2, 32)
    trainer = Trainer(classifier, build_augmentation("strong", mixup=1.0, cutmix=0.0, seed=0))
    examples = tf.data.Dataset.from_tensor_slices((images, labels))
    batches = train_pipeline(examples, 2, DATA, weights)
    for batch in batches.take(3):
        # What the training function does to every batch before the model step.
        images_batch, soft_labels, sample_weights = trainer.augment_batch(
            batch, tf.constant([0, 1], tf.int64))
        assert images_batch.shape == (16, 32, 32, 3) and sample_weights.shape == (16,)
        assert set(sample_weights.numpy().tolist()) <= {0.25, 4.0}
        np.testing.assert_array_equal(sample_weights, batch[2])
        # MixUp mixed the labels, not the weights: they still name one original class.
        assert not np.all(np.isin(soft_labels.numpy(), [0.0, 1.0]))


def test_a_zero_class_weight_removes_that_class_from_the_loss():
    images, labels = dark_and_bright(32)
    examples = tf.data.Dataset.from_tensor_slices((images, labels))
    # The head alone on the frozen random backbone: its features already tell dark from
    # bright, and no BatchNorm statistics need to settle for inference.
    config = TrainConfig(frozen_epochs=1, unfrozen_epochs=0, learning_rate=1e-2,
                         jit_compile=False)

    def bright_recall(class_weights: np.ndarray) -> float:
        tf.keras.utils.set_random_seed(0)
        classifier = build_classifier(ModelConfig(backbone="resnet_v2_tiny"), 2, 32)
        fit_phases(classifier, train_pipeline(examples, 2, DATA, class_weights), None,
                   20, config, verbose=0)
        predictions = classifier.predict(images[labels == 1].astype(np.float32), verbose=0)
        return float(np.mean(predictions.argmax(axis=1) == 1))

    assert bright_recall(np.array([1.0, 1.0])) > 0.9
    assert bright_recall(np.array([1.0, 0.0])) < 0.1
