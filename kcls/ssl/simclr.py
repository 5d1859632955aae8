"""SimCLR: the NT-Xent loss, the pretraining model, and the kNN accuracy SSL runs report.

SimCLR (Chen et al. 2020) trains a backbone so that two random views of the same image
map to nearby points and views of different images to distant ones: each batch of B
images gives 2B views; the backbone's pooled features pass through a small projection
head (dropped afterwards: the features before it transfer better), and the loss is the
normalized-temperature cross-entropy (NT-Xent) of picking each view's partner among
the 2B - 1 other views by cosine similarity.

Progress is measured as most SSL work does, with a weighted k-nearest-neighbour
classifier on the pooled backbone features (cosine similarity, votes weighted by
`exp(similarity / 0.07)`, Wu et al. 2018): labelled "memory" images vote on labelled
query images. It needs no training, so it can run every epoch.

Example:

>>> model = SimCLR(build_backbone("resnet_v2_tiny", 32), ContrastiveAugment(seed=0))
>>> model.compile(optimizer="adam")  # doctest: +SKIP
>>> model.fit(image_batches, steps_per_epoch=10, epochs=2)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

# Temperature of the kNN vote weights (InstDisc, Wu et al. 2018; the usual SSL monitor).
KNN_TEMPERATURE = 0.07


def nt_xent_loss(first: tf.Tensor, second: tf.Tensor, temperature: float) -> tf.Tensor:
    """SimCLR's NT-Xent loss of two batches of projections, averaged over the 2B views.

    Args:
        first: float `[B, D]` projections of the first views.
        second: float `[B, D]` projections of the second views; row i is image i's partner.
        temperature: float > 0, the softmax temperature of the cosine similarities.

    Returns:
        float32 scalar: `mean_i -log(exp(s(i, p(i)) / t) / sum_{k != i} exp(s(i, k) / t))`
        over the 2B views, `s` the cosine similarity and `p(i)` view i's partner.
    """
    projections = tf.math.l2_normalize(tf.concat([first, second], axis=0), axis=1)
    projections = tf.cast(projections, tf.float32)
    views = tf.shape(projections)[0]
    batch = views // 2
    logits = tf.matmul(projections, projections, transpose_b=True) / temperature
    # A view is not its own candidate: -inf on the diagonal would give NaN gradients.
    logits = logits - 1e9 * tf.eye(views)
    partners = tf.concat([tf.range(batch, views), tf.range(batch)], axis=0)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(partners, logits))


def projection_head(width: int, hidden: int, output: int) -> keras.Sequential:
    """SimCLR's head: Dense-BN-ReLU-Dense, `[B, width]` features -> `[B, output]` projections."""
    return keras.Sequential([
        keras.Input((width,)),
        keras.layers.Dense(hidden, use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Dense(output),
    ], name="projection_head")


class SimCLR(keras.Model):
    """A backbone, its pooling and a projection head, trained with NT-Xent on two views.

    Takes batches of float images `[B, S, S, 3]` in [0, 255] (labels, if any, are
    ignored); `fit()` reports `loss`. Calling the model gives the pooled backbone
    features `[B, C]` that the kNN monitor and fine-tuning use.

    Args:
        backbone: keras.Model, images -> feature map `[B, h, w, C]` (`build_backbone`).
        augment: keras.Layer making one random view per image (`ContrastiveAugment`).
        temperature: float, NT-Xent temperature.
        projection_hidden: int, width of the head's hidden layer.
        projection_dim: int, size of the projections the loss compares.
    """

    def __init__(self, backbone: keras.Model, augment: keras.Layer, temperature: float = 0.2,
                 projection_hidden: int = 512, projection_dim: int = 128,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.backbone = backbone
        self.augment = augment
        self.temperature = temperature
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = projection_head(backbone.output.shape[-1], projection_hidden, projection_dim)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.build(backbone.input_shape)

    def build(self, input_shape):
        # Everything is built: the backbone by its constructor, the head by its Input.
        self.built = True

    @property
    def metrics(self):
        return [self.loss_tracker]

    def call(self, images, training=False):
        return self.pool(self.backbone(images, training=training))

    def train_step(self, data):
        images = data[0] if isinstance(data, tuple) else data
        # Both views in one batch: BatchNorm normalises them together, as SimCLR's
        # global BatchNorm does across devices.
        views = tf.concat([self.augment(images, training=True),
                           self.augment(images, training=True)], axis=0)
        with tf.GradientTape() as tape:
            projections = self.head(self(views, training=True), training=True)
            first, second = tf.split(projections, 2, axis=0)
            loss = nt_xent_loss(first, second, self.temperature)
        variables = self.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}


def knn_accuracy(memory_features: np.ndarray, memory_labels: np.ndarray,
                 query_features: np.ndarray, query_labels: np.ndarray,
                 neighbors: int = 20) -> float:
    """Accuracy of a weighted kNN vote with cosine similarity (the usual SSL monitor).

    Args:
        memory_features: float `[N, C]` features of the labelled memory images.
        memory_labels: int `[N]`.
        query_features: float `[M, C]` features of the images to classify.
        query_labels: int `[M]`, their true labels.
        neighbors: int, k (capped at N).

    Returns:
        float in [0, 1]: the share of queries whose vote, each of the k most similar
        memory images weighing `exp(similarity / 0.07)`, picks the right label.
    """
    from sklearn.neighbors import NearestNeighbors

    memory = _unit(memory_features)
    k = min(neighbors, len(memory))
    # Euclidean neighbours of unit vectors are the cosine neighbours: |a-b|^2 = 2 - 2 cos.
    distances, indices = NearestNeighbors(n_neighbors=k).fit(memory).kneighbors(
        _unit(query_features))
    weights = np.exp((1.0 - distances ** 2 / 2.0) / KNN_TEMPERATURE)  # [M, k]
    classes = int(max(memory_labels.max(), query_labels.max())) + 1
    votes = np.zeros((len(query_features), classes))
    np.add.at(votes, (np.arange(len(query_features))[:, None], memory_labels[indices]), weights)
    return float(np.mean(votes.argmax(axis=1) == query_labels))


def _unit(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float64)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


class KnnMonitor(keras.callbacks.Callback):
    """Adds `knn_accuracy` to the logs at the end of every epoch.

    Args:
        memory: finite dataset of `(float32 images [B, S, S, 3], int labels [B])`.
        query: finite dataset of the same structure, classified by `memory`'s votes.
        neighbors: int, k of the vote.
    """

    def __init__(self, memory: tf.data.Dataset, query: tf.data.Dataset,
                 neighbors: int = 20) -> None:
        super().__init__()
        self.memory = memory
        self.query = query
        self.neighbors = neighbors

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["knn_accuracy"] = self.accuracy()

    def accuracy(self) -> float:
        memory_features, memory_labels = self._features(self.memory)
        query_features, query_labels = self._features(self.query)
        return knn_accuracy(memory_features, memory_labels, query_features, query_labels,
                            self.neighbors)

    def _features(self, batches: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
        features, labels = [], []
        for images, batch_labels in batches:
            features.append(self.model(images, training=False).numpy())
            labels.append(batch_labels.numpy())
        return np.concatenate(features), np.concatenate(labels).astype(np.int64)
