"""The software a result was made with, recorded beside it (run.json, kcls.json)."""

from __future__ import annotations

import keras
import tensorflow as tf

from kcls import __version__


def software_versions() -> dict[str, str]:
    """`{"kcls_version", "tensorflow_version", "keras_version"}` of this process."""
    return {"kcls_version": __version__, "tensorflow_version": tf.__version__,
            "keras_version": keras.__version__}
