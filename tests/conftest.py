"""Shared fixtures: no network, quiet TensorFlow, tiny recipes."""

from __future__ import annotations

import io
import os
import socket
import struct
import zlib
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

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


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def write_decompression_bomb(path: Path, side: int = 20_000) -> None:
    """A PNG of a few hundred bytes whose header claims `side` x `side` pixels."""
    # The first rows only: Pillow refuses the file from its header alone.
    rows = zlib.compress(b"\x00" * (side + 1) * 4, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b""))


def write_truncated_jpeg(path: Path, rng: np.random.Generator) -> None:
    """The first half of a real 64x64 JPEG: Pillow's verify() passes, decoding fails."""
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


@pytest.fixture
def damaged_folder(tmp_path: Path) -> Path:
    """Two classes of 6 good JPEGs plus a non-UTF-8 name, a decompression bomb and a
    half-truncated JPEG."""
    rng = np.random.default_rng(1)
    root = tmp_path / "damaged"
    for name in ("ants", "bees"):
        (root / name).mkdir(parents=True)
        for index in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(
                root / name / f"{index}.jpg")
    with open(os.path.join(os.fsencode(root / "ants"), b"caf\xe9.png"), "wb") as file:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(file, format="PNG")
    write_decompression_bomb(root / "bees" / "bomb.png")
    write_truncated_jpeg(root / "bees" / "half.jpg", rng)
    return root


@pytest.fixture(scope="session")
def trained_quickstart(tmp_path_factory):
    """`(recipe, RunResult)` of a quickstart run trained enough to mean something (60
    steps, about a minute on 2 CPU cores), exported with its rejection rule and ONNX."""
    from kcls.workflows.run import run_recipe

    base = tmp_path_factory.mktemp("trained_quickstart")
    recipe = apply_overrides(load_recipe("quickstart"), [
        "train.frozen_epochs=1", "train.unfrozen_epochs=2", "train.steps_per_epoch=20",
        "data.batch_size=32", f"export.base_dir={base / 'saved_models'}", "export.onnx=true"])
    return recipe, run_recipe(recipe, base / "run", log=lambda message: None, verbose=0)
