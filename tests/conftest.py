"""Shared fixtures: no network, quiet TensorFlow, tiny recipes."""

from __future__ import annotations

import io
import ipaddress
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


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Groups the tests for pytest-xdist and keeps network tests offline.

    Under `--dist loadgroup` (pyproject.toml) a module's tests share one worker, so each
    module-scoped fixture (a trained or exported model) is built once; the modules that
    use the session's `trained_quickstart` share one worker too.

    Network tests run only when `-m` names them (`-m network`), whatever else it selects,
    so `pytest -m "not slow"`, which replaces the default `-m`, still runs offline.
    """
    shared = {item.module.__name__ for item in items
              if "trained_quickstart" in getattr(item, "fixturenames", ())}
    for item in items:
        module = item.module.__name__
        item.add_marker(pytest.mark.xdist_group("trained_quickstart" if module in shared
                                                else module))
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


_CONNECT = socket.socket.connect  # captured before conftest's no_network patches it
_GETADDRINFO = socket.getaddrinfo
_CREATE_CONNECTION = socket.create_connection


def _is_loopback(host) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@pytest.fixture
def loopback_only(no_network, monkeypatch):
    """Re-allows connections to 127.0.0.0/8 and ::1; everything else stays blocked."""
    refuse_connect, refuse_lookup = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and _is_loopback(host):
            return _CONNECT(self, address)
        return refuse_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if _is_loopback(host):
            return _GETADDRINFO(host, *args, **kwargs)
        return refuse_lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    # The original resolves and connects through the two guarded functions above.
    monkeypatch.setattr(socket, "create_connection", _CREATE_CONNECTION)


def closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (free to start a server on)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


@pytest.fixture(scope="module")
def untrained_models(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A run directory as `kcls recipe run` leaves it (untrained weights, classes cat and
    dog, 32 px), its export with a reference profile, and a folder of 12 images."""
    import keras
    import tensorflow as tf

    from kcls.config import DataConfig, ExportConfig, ModelConfig, Recipe, to_json
    from kcls.files import save_weights, write_json, write_text
    from kcls.layout import (
        METRICS_FILE,
        RUN_CONFIG_FILE,
        RUN_INFO_FILE,
        RUN_REFERENCE_FILE,
        WEIGHTS_FILE,
    )
    from kcls.models.classifier import build_classifier
    from kcls.monitoring.profile import reference_profile
    from kcls.serving.export import export_saved_model

    class_names = ["cat", "dog"]
    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("originals")
    recipe = Recipe(name="tiny", data=DataConfig(image_size=32),
                    model=ModelConfig(backbone="resnet_v2_tiny"),
                    export=ExportConfig(base_dir=str(root / "saved_models")))
    classifier = build_classifier(recipe.model, len(class_names), 32)
    images = tf.random.stateless_uniform([12, 32, 32, 3], (0, 1), maxval=255)
    batches = tf.data.Dataset.from_tensor_slices(
        (images, tf.one_hot(tf.range(12) % 2, 2))).batch(6)
    reference = reference_profile(classifier, batches, class_names)
    run_dir = root / "run"
    write_text(run_dir / RUN_CONFIG_FILE, to_json(recipe))
    write_json(run_dir / RUN_INFO_FILE, {"class_names": class_names, "temperature": None})
    write_json(run_dir / METRICS_FILE, {"accuracy": 0.5})
    write_json(run_dir / RUN_REFERENCE_FILE, reference)
    save_weights(classifier, run_dir / WEIGHTS_FILE)
    export_dir = export_saved_model(classifier, recipe, class_names, reference=reference)
    incoming = root / "incoming"
    incoming.mkdir()
    for index, image in enumerate(tf.cast(images, tf.uint8)):
        (incoming / f"{index}.png").write_bytes(tf.io.encode_png(image).numpy())
    return run_dir, export_dir, incoming


def add_images(folder: Path, count: int, classes: tuple[str, ...] = ("cat", "dog"),
               start: int = 0) -> Path:
    """`count` tiny PNGs per class under `folder/<class>/` (a colour per class, with noise)."""
    rng = np.random.default_rng(start + len(str(folder)))
    for channel, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for index in range(start, start + count):
            image = rng.integers(0, 90, (8, 8, 3)).astype(np.uint8)
            image[..., channel % 3] = 200
            Image.fromarray(image).save(folder / name / f"{index:03d}.png")
    return folder


def write_digit_folder(root: Path, per_class: int = 12, classes: int = 3) -> Path:
    """`root/<digit>/<n>.png|jpg`: real scikit-learn digits at 16x16, PNG and JPEG mixed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in range(classes):
        (root / str(digit)).mkdir(parents=True, exist_ok=True)
        images = digits.images[digits.target == digit][:per_class]
        for index, image in enumerate(images):
            gray = np.kron(np.round(image * 255 / 16).astype(np.uint8), np.ones((2, 2), np.uint8))
            Image.fromarray(gray).convert("RGB").save(
                root / str(digit) / f"{index:03d}.{'png' if index % 2 else 'jpg'}")
    return root


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
