"""Layer-wise (discriminative) learning rates: a learning-rate multiplier per variable.

`train.layer_decay=d` trains the head at the phase's learning rate and backbone block
`k` counted from the top (`k = 1` the last block, `k = n` the stem, blocks as
`kcls.models.backbones.backbone_blocks` cuts them) at `learning_rate * d**k`: the
convention of BEiT, MAE and timm's `--layer-decay`, where the head is layer 0.

The multipliers scale the *learning rate* of each variable inside the optimizer, in
its update step and in its decoupled weight decay. Scaling the gradients instead would
not do: Adam divides a gradient by its own running magnitude, so a constant factor on
it cancels out (except against epsilon).

The multipliers are Python constants fixed when the optimizer is built (one per
trainable variable, looked up by variable path): they are no optimizer state, so
XLA compiles them in as constants, a resumed run gets them from its configuration
(never from a checkpoint), and `tf.distribute` replicas all see the same ones. Under
mixed precision `keras.optimizers.LossScaleOptimizer` wraps the layer-wise optimizer
and calls its update step unchanged; EMA averages the updated weights as usual.

Example:

>>> multipliers = layer_decay_multipliers(classifier, 0.75)  # doctest: +SKIP
>>> optimizer = LayerwiseAdamW(learning_rate=1e-3,
...                            learning_rate_multipliers=multipliers)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import keras

from kcls.models.backbones import backbone_blocks
from kcls.models.classifier import BACKBONE_LAYER


def layer_decay_multipliers(classifier: keras.Model, layer_decay: float) -> dict[str, float]:
    """Learning-rate multiplier of every backbone variable under layer-wise decay.

    Args:
        classifier: keras.Model from `build_classifier` (backbone layer `backbone`).
        layer_decay: float in (0, 1]: block `k` from the top gets `layer_decay**k`.

    Returns:
        dict variable path -> multiplier, for the backbone's variables (trainable or
        not); variables not in it (the head) keep multiplier 1.

    Raises:
        ValueError: a backbone with no known block structure.
    """
    blocks = backbone_blocks(classifier.get_layer(BACKBONE_LAYER))
    multipliers = {}
    for depth, block in enumerate(reversed(blocks), start=1):
        for layer in block:
            for variable in layer.weights:
                multipliers[variable.path] = float(layer_decay ** depth)
    return multipliers


class LayerwiseRates:
    """Mixin for a Keras optimizer: multiplies each variable's learning rate by a constant.

    Put before the optimizer class (`class LayerwiseAdamW(LayerwiseRates, AdamW)`).

    Args:
        learning_rate_multipliers: dict variable path -> multiplier; variables not in
            it train at the plain learning rate.
        **kwargs: the optimizer's own arguments.
    """

    def __init__(self, *args: Any, learning_rate_multipliers: dict[str, float] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A tuple of pairs: optimizers track dict and list attributes as state.
        self._multiplier_items = tuple(sorted((learning_rate_multipliers or {}).items()))
        self._multipliers: tuple[float, ...] = ()

    @property
    def learning_rate_multipliers(self) -> dict[str, float]:
        """Variable path -> multiplier, as given."""
        return dict(self._multiplier_items)

    def build(self, variables):
        by_path = dict(self._multiplier_items)
        # In the order of `_get_variable_index`; set before the subclass's build, which
        # may already need them.
        self._multipliers = tuple(float(by_path.get(variable.path, 1.0))
                                  for variable in variables)
        super().build(variables)

    def variable_multiplier(self, variable) -> float:
        """The multiplier of `variable` (a built optimizer's variable, or its TF value)."""
        return self._multipliers[self._get_variable_index(variable)]

    def update_step(self, gradient, variable, learning_rate):
        multiplier = self.variable_multiplier(variable)
        if multiplier != 1.0:
            learning_rate = learning_rate * multiplier
        # Decoupled weight decay, here instead of in `_apply_weight_decay` so it uses
        # the variable's own rate; the decay only reads the variable before its step,
        # so the result equals the base optimizer's decay-then-step order.
        if self.weight_decay is not None and self._use_weight_decay(variable):
            self.assign_sub(variable, variable * keras.ops.cast(
                self.weight_decay * learning_rate, variable.dtype))
        super().update_step(gradient, variable, learning_rate)

    def _apply_weight_decay(self, variables):
        return  # applied per variable in update_step

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "learning_rate_multipliers": self.learning_rate_multipliers}


@keras.saving.register_keras_serializable(package="kcls")
class LayerwiseAdamW(LayerwiseRates, keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` with per-variable learning-rate multipliers (`LayerwiseRates`)."""


@keras.saving.register_keras_serializable(package="kcls")
class LayerwiseSGD(LayerwiseRates, keras.optimizers.SGD):
    """`keras.optimizers.SGD` with per-variable learning-rate multipliers (`LayerwiseRates`)."""
