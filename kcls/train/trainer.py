"""The training model: a keras.Model that augments each batch on the device, then steps.

`Trainer` wraps a classifier from `kcls.models.classifier.build_classifier` for
`fit()`: its training function runs the augmentation as plain TensorFlow ops and then
the (optionally XLA-compiled) one-step function, which runs Keras's `train_step` on
every replica and averages its outputs across them; inference and evaluation call the
bare classifier. `ClassifierCheckpoint` saves the classifier inside it, so that the
checkpoint loads into a freshly built classifier.

The one-step functions (training and test) are kcls's own, not Keras's, and so is the
symbolic build before the first step: Keras 3's versions fail under
MultiWorkerMirroredStrategy, which Keras 3 does not support (keras-team/keras#20585,
tensorflow/tensorflow#72388; docs/distributed.md). They also serve the default
strategy, MirroredStrategy and TPUStrategy.

Example:

>>> trainer = Trainer(classifier, build_augmentation("light"))  # doctest: +SKIP
>>> trainer.compile(optimizer="adamw", loss="categorical_crossentropy")  # doctest: +SKIP
>>> trainer.fit(train_batches, steps_per_epoch=20, epochs=1)  # doctest: +SKIP
>>> trainer.compiled_functions()  # doctest: +SKIP
{'augmentation': False, 'model_step': True}
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from kcls.data.augment import Augmentation, compiles_with_xla


class Trainer(keras.Model):
    """Trains `classifier`, augmenting each batch on the device before the compiled step.

    The training function (`make_train_function`) is an ordinary `tf.function` that, per
    step, draws one augmentation seed, runs `device_augment` on every replica's share
    of the batch (the replica id folded into the seed, so replicas draw differently) as
    plain TensorFlow ops on the replica's device, and then calls the one-step function
    `one_step_on_data`, which runs Keras's `train_step` (the forward pass, the gradients
    and the update) on every replica under `tf.function(jit_compile=self.jit_compile)`
    and averages the step's logs across replicas. XLA therefore compiles the model step
    even when augmentation ops have no XLA kernel (RandAugment, MixUp, CutMix);
    `jit_compile` only depends on the classifier's layers. The test function
    (`make_test_function`, validation and `evaluate()`) runs `test_step` the same way.

    `device_augment` takes and returns `{"images", "labels"}` batches, so label-mixing
    layers (MixUp) can change the labels; per-example loss weights pass through
    unchanged. Inference and evaluation call the bare classifier: augmentation never
    reaches an export. After the first training step, `compiled_functions()` tells what
    the training function actually compiled.

    Args:
        classifier: keras.Model from `build_classifier`, taking float32 `[B, H, W, 3]`
            images and returning `[B, C]` logits; built in the strategy's scope.
        device_augment: augmentation (`kcls.data.augment.build_augmentation`) of
            `{"images", "labels"}` batches run before each step, or None.
        **kwargs: passed to `keras.Model`.
    """

    def __init__(self, classifier: keras.Model, device_augment: Augmentation | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.classifier = classifier
        self.device_augment = device_augment
        self.train_graph: tf.Graph | None = None
        self.build(classifier.input_shape)

    def build(self, input_shape):
        # Nothing to create: the classifier is built, and augmentation layers keep only
        # random-generator state. BackupAndRestore needs a built model before fit().
        self.built = True

    def call(self, images, training=False):
        return self.classifier(images, training=training)

    @property
    def jit_compile(self) -> bool:
        return keras.Model.jit_compile.fget(self)

    @jit_compile.setter
    def jit_compile(self, value: bool) -> None:
        # Keras asks every layer of the model, augmentation included; only the
        # classifier's layers run in the compiled step.
        self._jit_compile = bool(value) and compiles_with_xla(self.classifier)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # A private Keras method (keras/src/backend/tensorflow/trainer.py), overridden
        # because fit() and evaluate() call it, with no public hook, whenever the model
        # was created in a strategy's scope. Keras's version reduces the whole first
        # distributed batch across replicas only to learn its shapes, and
        # MultiWorkerMirroredStrategy cannot reduce a nest of values ("Attempt to convert a
        # value (PerReplica...) to a Tensor", keras-team/keras#20585). The local replica's
        # values have the same shapes, with no collective. Pinned by
        # tests/test_multiworker.py::test_keras_private_symbolic_build_is_still_called.
        strategy = self._distribute_strategy
        if iterator is not None and strategy is not None:
            for _, _, epoch_iterator in iterator:
                data_batch = tf.nest.map_structure(lambda value: _local_value(strategy, value),
                                                   next(epoch_iterator))
                break
        super()._maybe_symbolic_build(data_batch=data_batch)

    def _one_step_function(self, step_function):
        """`step_function` run on every replica, its outputs averaged across replicas.

        Keras's own one-step function reduces the outputs with `axis=0` under
        MultiWorkerMirroredStrategy, which fails on its scalar logs ("Invalid reduction
        dimension 0 for input with 0 dimensions", tensorflow/tensorflow#72388); this one
        reduces each output as a whole. Its name stays `one_step_on_data`, which
        `compiled_functions` looks for.
        """
        strategy = self.distribute_strategy

        @tf.autograph.experimental.do_not_convert  # plain TensorFlow, as Keras's
        def one_step_on_data(data):
            outputs = strategy.run(step_function, args=(data,))
            return tf.nest.map_structure(lambda value: _replica_mean(strategy, value), outputs)

        return tf.function(one_step_on_data, reduce_retracing=True, jit_compile=self.jit_compile)

    def make_train_function(self, force: bool = False):
        if self.train_function is not None and not force:
            return self.train_function
        _check_one_step_per_call(self)
        model_step = self._one_step_function(self.train_step)
        strategy = self.distribute_strategy
        augmentation = self.device_augment

        @tf.function(reduce_retracing=True)
        def augment_and_step(iterator):
            self.train_graph = tf.compat.v1.get_default_graph()
            data = iterator.get_next()
            if augmentation is not None:
                data = strategy.run(self.augment_batch,
                                    args=(data, augmentation.seed_generator.next()))
            return model_step(data)

        self.train_function = _stopping_at_the_end(augment_and_step)
        return self.train_function

    def make_test_function(self, force: bool = False):
        if self.test_function is not None and not force:
            return self.test_function
        _check_one_step_per_call(self)
        model_step = self._one_step_function(self.test_step)

        @tf.function(reduce_retracing=True)
        def step_on_next_batch(iterator):
            # Under MultiWorkerMirroredStrategy the workers agree on where a finite
            # dataset ends: a worker with no data left gets an empty batch, and all of
            # them raise OutOfRangeError together.
            return model_step(iterator.get_next())

        self.test_function = _stopping_at_the_end(step_on_next_batch)
        return self.test_function

    def augment_batch(self, data: tuple[tf.Tensor, ...], seed: tf.Tensor) -> tuple[tf.Tensor, ...]:
        """Augments one replica's `(images, labels[, sample_weights])` batch, in replica context.

        Args:
            data: float32 `[B, H, W, 3]` images, float32 `[B, C]` labels, optionally
                float32 `[B]` loss weights (passed through).
            seed: int `[2]`, the step's seed; the replica id is folded in.
        """
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        images, labels, sample_weights = keras.utils.unpack_x_y_sample_weight(data)
        augmented = self.device_augment(
            {"images": images, "labels": labels}, training=True,
            seed=tf.random.experimental.stateless_fold_in(seed, replica))
        return keras.utils.pack_x_y_sample_weight(augmented["images"], augmented["labels"],
                                                  sample_weights)

    def compiled_functions(self) -> dict[str, bool | None]:
        """What the traced training function runs under XLA.

        Read from the graph the training function traced (its call ops marked
        `_XlaMustCompile`, as `tf.function(jit_compile=True)` marks them), so it is what
        ran, not what was asked for.

        Returns:
            `{"augmentation": bool or None, "model_step": bool}`: whether the
            augmentation ops (None without augmentation) and the one-step function
            (forward pass, gradients, update) are XLA-compiled.

        Raises:
            ValueError: before the training function was traced (before `fit()`).
        """
        if self.train_graph is None:
            raise ValueError("The training function has not been traced yet: call fit() first.")
        nodes = self.train_graph.as_graph_def().node
        compiled = [node for node in nodes if node.attr["_XlaMustCompile"].b]
        augmentation = None
        if self.device_augment is not None:
            # The augmentation's ops sit in the outer graph, named in its layer's scope.
            scope = self.device_augment.name
            augmentation = any(node.name.startswith(scope) for node in compiled)
        return {"augmentation": augmentation,
                "model_step": any("one_step_on_data" in node.attr["f"].func.name
                                  for node in compiled)}


def _check_one_step_per_call(trainer: Trainer) -> None:
    if trainer.steps_per_execution != 1:
        raise ValueError("kcls's Trainer runs one step per call: compile it with "
                         "steps_per_execution=1.")


def _stopping_at_the_end(step_on_iterator):
    """`step_on_iterator`, raising StopIteration at the end of the data, as Keras's loops expect."""
    def function(iterator):
        try:
            return step_on_iterator(iterator)
        except tf.errors.OutOfRangeError:
            raise StopIteration from None

    return function


def _local_value(strategy: tf.distribute.Strategy, value):
    """The first local replica's part of a distributed value, or `value` itself."""
    if isinstance(value, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(value)[0]
    return value


def _replica_mean(strategy: tf.distribute.Strategy, value):
    """One output of a step, averaged across the replicas (TPUs: the first replica's, as
    Keras does: their logs are already synchronized)."""
    if value is None:
        return None
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return _local_value(strategy, value)
    # Under MultiWorkerMirroredStrategy a plain tensor too: with one local replica,
    # strategy.run may hand back the local value instead of a PerReplica.
    return strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)


class ClassifierCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint of the classifier inside the Trainer, loadable into `build_classifier`."""

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model.classifier if isinstance(model, Trainer) else model)

