"""The process kcls runs in: the software a result was made with, recorded beside it
(run.json, kcls.json), and muting the native libraries' own log lines.

Nothing heavy is imported here at module level: the command line uses `native_stderr_muted`
before TensorFlow is imported.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from kcls import __version__


def software_versions() -> dict[str, str]:
    """`{"kcls_version", "tensorflow_version", "keras_version"}` of this process."""
    import keras
    import tensorflow as tf

    return {"kcls_version": __version__, "tensorflow_version": tf.__version__,
            "keras_version": keras.__version__}


def native_logs_wanted() -> bool:
    """Whether the user asked for TensorFlow's C++ logs (`TF_CPP_MIN_LOG_LEVEL=0`)."""
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0"


@contextlib.contextmanager
def native_stderr_muted(mute: bool = True) -> Iterator[None]:
    """Sends what native code writes to the standard error (file descriptor 2) to
    /dev/null inside the block, e.g. the TFLite converter's `Ignored output_format` and
    the interpreter's `Created TensorFlow Lite XNNPACK delegate` lines. Exceptions still
    propagate; Python's own writes to stderr inside the block are lost too.
    """
    if not mute:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
