"""Issue 29, defect 3: a damaged file of a run directory or an export is one line naming
the file and the fix, in every command that reads it, never a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from kcls.cli import main
from kcls.layout import (
    METADATA_FILE,
    METRICS_FILE,
    REFERENCE_FILE,
    RUN_CONFIG_FILE,
    RUN_INFO_FILE,
    RUN_REFERENCE_FILE,
    SAVED_MODEL_FILE,
    WEIGHTS_FILE,
)

VARIABLES_FILE = "variables/variables.data-00000-of-00001"


def invoke(*args: object):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def damage(path: Path, how: str) -> None:
    if how == "garbage":
        path.write_text("garbage{")
    else:  # cut short, as a full disk or an interrupted copy leaves a file
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def commands(kind: str, model: Path, incoming: Path) -> dict[str, list[object]]:
    image = next(incoming.iterdir())
    common = {"evaluate": ["evaluate", model],
              "explain": ["explain", model, image, "--out", model.parent / "explained"],
              "optimize": ["optimize", model, "--method", "ptq-dynamic"]}
    if kind == "run":
        return {**common, "export": ["export", model, "--base-dir", model.parent / "exports"]}
    return {**common, "predict": ["predict", model, image],
            "monitor": ["monitor", model, "--data", incoming, "--out", model.parent / "mon"]}


CASES = [
    ("run", RUN_CONFIG_FILE, "garbage", ["evaluate", "explain", "optimize", "export"]),
    ("run", RUN_INFO_FILE, "garbage", ["evaluate", "explain", "export"]),
    ("run", METRICS_FILE, "garbage", ["evaluate", "export"]),
    ("run", RUN_REFERENCE_FILE, "garbage", ["export"]),
    ("run", WEIGHTS_FILE, "truncated", ["evaluate", "explain", "optimize", "export"]),
    ("export", METADATA_FILE, "garbage", ["evaluate", "explain", "optimize", "monitor"]),
    ("export", WEIGHTS_FILE, "truncated", ["evaluate", "explain", "optimize"]),
    ("export", REFERENCE_FILE, "garbage", ["monitor"]),
    ("export", SAVED_MODEL_FILE, "garbage", ["predict", "monitor"]),
    ("export", VARIABLES_FILE, "truncated", ["predict", "monitor"]),
]


@pytest.mark.parametrize("kind, name, how, names", CASES,
                         ids=[f"{kind}-{name}-{how}" for kind, name, how, _ in CASES])
def test_a_damaged_file_is_one_line_naming_it_and_the_fix(untrained_models, tmp_path, kind, name,
                                                           how, names):
    run_dir, export_dir, incoming = untrained_models
    model = tmp_path / kind / "1"  # a version folder for exports
    shutil.copytree(run_dir if kind == "run" else export_dir, model)
    damage(model / name, how)
    for command, arguments in commands(kind, model, incoming).items():
        if command not in names:
            continue
        result = invoke(*arguments)
        assert result.exit_code == 1, (command, result.output)
        assert isinstance(result.exception, SystemExit), (command, result.exception)
        message = result.output.strip()
        assert message.startswith("Error: ") and "\n" not in message, (command, message)
        assert (str(model / name) in message if name.endswith(".json") or
                name == WEIGHTS_FILE else str(model) in message), (command, message)
        assert "kcls export" in message or "kcls recipe run" in message or "delete it" in message


def test_the_undamaged_untrained_models_work(untrained_models, tmp_path):
    run_dir, export_dir, incoming = untrained_models
    exported = invoke("export", run_dir, "--base-dir", tmp_path / "exports")
    assert exported.exit_code == 0, exported.output
    predicted = invoke("predict", export_dir, next(incoming.iterdir()))
    assert predicted.exit_code == 0, predicted.output
