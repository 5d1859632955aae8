"""Shared fixtures: no network, quiet TensorFlow, tiny recipes."""

from __future__ import annotations

import os
import socket

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from kcls.config import apply_overrides  # noqa: E402
from kcls.recipes import load_recipe  # noqa: E402


class NetworkBlockedError(OSError):
    """Raised by any socket connection attempt during a test."""


def pytest_collection_modifyitems(config, items):
    """Network tests run only when `-m` names them (`-m network`), whatever else it selects.

    So `pytest -m "not slow"`, which replaces the default `-m`, still runs offline.
    """
    if "network" in (config.getoption("markexpr") or ""):
        return
    offline = pytest.mark.skip(reason="needs the network: run with -m network")
    for item in items:
        if item.get_closest_marker("network"):
            item.add_marker(offline)


@pytest.fixture(autouse=True)
def no_network(monkeypatch, request):
    """Tests never touch the network: connecting or resolving a name raises NetworkBlockedError."""
    if request.node.get_closest_marker("network"):
        return

    def refuse(*args, **kwargs):
        raise NetworkBlockedError(f"network access blocked in tests: {args[1:] or args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="session", autouse=True)
def weights_cache(tmp_path_factory):
    """Converted ImageNet weights go to a temporary cache, never the user's ~/.cache/kcls."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("kcls_cache")
        patch.setenv("KCLS_CACHE_DIR", str(path))
        yield path


@pytest.fixture
def tiny_recipe(tmp_path):
    """The quickstart recipe shrunk to seconds: 2 steps per phase, exports under tmp_path."""
    return apply_overrides(load_recipe("quickstart"), [
        "train.frozen_epochs=1", "train.unfrozen_epochs=1", "train.steps_per_epoch=2",
        "data.batch_size=16", f"export.base_dir={tmp_path / 'saved_models'}",
    ])
