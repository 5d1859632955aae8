"""Weight keys that name the same variable in Keras 3 and in tf-keras.

The TF-MOT child (`kcls.optimize.mot_worker`) rebuilds the classifier with tf-keras and
receives the trained weights of the Keras 3 parent. Positions cannot carry them: the
two list a block's variables in different orders (tf-keras puts every trainable
variable of an EfficientNetV2 block before its BatchNorm statistics), and shapes cannot
tell a BatchNorm's four `[C]` vectors apart. Variable paths can, once three differences
are removed:

- tf-keras names end in `:0`;
- Keras 3 calls a depthwise kernel `kernel`, tf-keras `depthwise_kernel`;
- a layer created without a name gets a process-wide counter (`conv2d_36`), which depends
  on what the process built before. Every path component becomes its base name and its
  rank among the siblings with that base (`conv2d~1`): both processes create the
  layers in the same order, so the ranks agree where the counters do not.

Imports no Keras: the same code runs in the Keras 3 parent and the tf-keras child.

Example:

>>> class Variable:
...     def __init__(self, name): self.name = name
>>> sorted(weight_keys([Variable("se_3/conv2d_8/kernel:0"), Variable("se_3/conv2d_9/bias:0")]))
['se~0/conv2d~0/kernel', 'se~0/conv2d~1/bias']
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

_COUNTER = re.compile(r"^(.*?)(?:_(\d+))?$")
_LEAF_ALIASES = {"depthwise_kernel": "kernel"}


def weight_keys(variables: Iterable[Any]) -> dict[str, Any]:
    """Maps a process-independent key to each variable.

    Args:
        variables: Keras 3 variables (`.path`, e.g. `block2a_/block2a_expand_bn/gamma`)
            or tf-keras ones (`.name`, e.g. `block2a_/block2a_expand_bn/gamma:0`), e.g.
            `model.weights`.

    Returns:
        dict key -> variable, e.g. `block2a_~0/block2a_expand_bn~0/gamma`.

    Raises:
        ValueError: two variables with the same key.
    """
    variables = list(variables)
    paths = [tuple(_path(variable).split("/")) for variable in variables]
    ranks = _ranks(paths)
    keys: dict[str, Any] = {}
    for path, variable in zip(paths, variables):
        key = "/".join([*(ranks[path[:depth + 1]] for depth in range(len(path) - 1)),
                        _LEAF_ALIASES.get(path[-1], path[-1])])
        if key in keys:
            raise ValueError(f"two weights share the key {key!r}: {_path(keys[key])!r} and "
                             f"{_path(variable)!r}")
        keys[key] = variable
    return keys


def _path(variable: Any) -> str:
    path = getattr(variable, "path", None)
    name = path if isinstance(path, str) else variable.name
    return re.sub(r":\d+$", "", name)


def _ranks(paths: list[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    """`base~rank` for every layer prefix of `paths`, ranked among siblings of one base."""
    siblings: dict[tuple[tuple[str, ...], str], set[tuple[int, str]]] = defaultdict(set)
    for path in paths:
        for depth in range(len(path) - 1):
            base, counter = _COUNTER.match(path[depth]).groups()
            siblings[path[:depth], base].add((-1 if counter is None else int(counter),
                                               path[depth]))
    ranks: dict[tuple[str, ...], str] = {}
    for (parent, base), names in siblings.items():
        for rank, (_, name) in enumerate(sorted(names)):
            ranks[(*parent, name)] = f"{base}~{rank}"
    return ranks
