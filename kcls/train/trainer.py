"""The training model: a keras.Model that augments each batch on the device, then steps.

`Trainer` wraps a classifier from `kcls.models.classifier.build_classifier` for
`fit()`: its training function runs the augmentation as plain TensorFlow ops and then
Keras's own (optionally XLA-compiled) one-step function; inference and evaluation call
the bare classifier. `ClassifierCheckpoint` saves the classifier inside it, so that the
checkpoint loads into a freshly built classifier.

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
    plain TensorFlow ops on the replica's device, and then calls Keras's own one-step
    function, which runs the forward pass, the gradients and the update under
    `tf.function(jit_compile=self.jit_compile)`. XLA therefore compiles the model step
    even when augmentation ops have no XLA kernel (RandAugment, MixUp, CutMix);
    `jit_compile` only depends on the classifier's layers.

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

    def make_train_function(self, force: bool = False):
        if self.train_function is not None and not force:
            return self.train_function
        if self.steps_per_execution != 1:
            raise ValueError("kcls's Trainer runs one step per call: compile it with "
                             "steps_per_execution=1.")
        # Keras's train function, given a list of one batch instead of an iterator, runs
        # its one-step function on it: strategy.run(train_step), reduced across replicas,
        # in a tf.function with jit_compile=self.jit_compile.
        model_step = super().make_train_function(force=True) or self.train_function
        strategy = self.distribute_strategy
        augmentation = self.device_augment

        @tf.function(reduce_retracing=True)
        def augment_and_step(iterator):
            self.train_graph = tf.compat.v1.get_default_graph()
            data = iterator.get_next()
            if augmentation is not None:
                data = strategy.run(self.augment_batch,
                                    args=(data, augmentation.seed_generator.next()))
            return model_step([data])

        def train_function(iterator):
            try:
                return augment_and_step(iterator)
            except tf.errors.OutOfRangeError:
                raise StopIteration from None

        self.train_function = train_function
        return train_function

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
            augmentation ops (None without augmentation) and Keras's one-step function
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


class ClassifierCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint of the classifier inside the Trainer, loadable into `build_classifier`."""

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model.classifier if isinstance(model, Trainer) else model)

