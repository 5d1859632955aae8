import json
import sys

import pytest
from click.testing import CliRunner

from kcls.cli import main


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def test_recipe_list_shows_every_recipe_with_a_description():
    result = invoke("recipe", "list")
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert "quickstart" in lines and "cifar10_effnet" in lines
    assert "digits" in lines["quickstart"]


def test_recipe_show_prints_the_resolved_config_with_overrides():
    result = invoke("recipe", "show", "quickstart", "--set", "train.unfrozen_epochs=4")
    assert result.exit_code == 0
    config = json.loads(result.output)
    assert config["train"]["unfrozen_epochs"] == 4
    assert config["data"]["source"] == "sklearn:digits"


def test_unknown_recipe_is_a_usage_error_without_traceback():
    result = invoke("recipe", "run", "nope")
    assert result.exit_code == 2
    assert "Unknown recipe 'nope'" in result.output and "quickstart" in result.output
    assert "Traceback" not in result.output


def test_unknown_override_key_is_a_usage_error_listing_valid_keys():
    result = invoke("recipe", "run", "quickstart", "--set", "train.epochz=1")
    assert result.exit_code == 2
    assert "train.epochz" in result.output and "train.frozen_epochs" in result.output
    assert "Traceback" not in result.output


def test_bad_override_value_names_key_and_type():
    result = invoke("recipe", "run", "quickstart", "--set", "data.batch_size=big")
    assert result.exit_code == 2
    assert "'data.batch_size'" in result.output and "expected an integer" in result.output


def test_unprepared_cifar10_with_downloads_off_fails_fast_with_the_fix(tmp_path):
    # data.download=auto would have TFDS download it (tests/test_data.py prepares a local
    # builder that way, and checks the offline error).
    result = invoke("recipe", "run", "cifar10_effnet", "--set", f"data.data_dir={tmp_path}",
                    "--set", "data.download=never", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert "'cifar10' is not prepared" in result.output
    assert str(tmp_path) in result.output and "data.source=folder:" in result.output
    assert not (tmp_path / "run").exists()


def test_offline_imagenet_weights_fail_fast_with_the_fix(tmp_path):
    result = invoke("recipe", "run", "quickstart", "--set", "model.backbone=efficientnetv2_b0",
                    "--set", "model.weights=imagenet", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert "Could not fetch the ImageNet weights of 'efficientnetv2_b0'" in result.output
    assert "model.weights=none" in result.output


def test_predict_on_a_missing_model_dir_is_a_clear_error(tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes(b"not an image")
    result = invoke("predict", str(tmp_path), str(image))
    assert result.exit_code == 1
    assert "neither a SavedModel directory" in result.output


def test_a_broken_recipe_file_is_one_line_and_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("from kcls.config import Recipe\n\n\ndef get_config():\n"
                    "    return Recipe(name='x', description=1 / 0)\n")
    result = invoke("recipe", "show", str(path))
    assert result.exit_code == 2
    assert f"{path}, line 5: ZeroDivisionError: division by zero" in result.output
    assert "Traceback" not in result.output
    debug = invoke("--debug", "recipe", "show", str(path))
    assert debug.exit_code == 1
    assert isinstance(debug.exception.__cause__, ZeroDivisionError)


def test_a_recipe_file_with_a_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text("def get_config(:\n    pass\n")
    result = invoke("recipe", "run", str(path))
    assert result.exit_code == 2
    assert f"{path}, line 1: SyntaxError" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command", [
    ["recipe", "show", "quickstart", "--set", "train.nope=1"],
    ["recipe", "run", "quickstart", "--set", "train.nope=1"],
    ["lr-find", "quickstart", "--set", "train.nope=1"],
    ["predict", "{empty}", "{image}"],
    ["export", "{empty}"],
    ["evaluate", "{empty}"],
    ["explain", "{empty}", "{image}"],
    ["optimize", "{empty}", "--method", "ptq-dynamic"],
    ["monitor", "{empty}", "--data", "{empty}"],
    ["pretrain", "{empty}", "--set", "pretrain.nope=1"],
    ["tune", "quickstart", "--budget", "1m", "--set", "train.nope=1"],
    ["data", "pack", "folder:{empty}", "{empty}/pack"],
], ids=lambda command: " ".join(command[:2]))
def test_every_command_gives_one_line_errors_and_debug_gives_the_traceback(command, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    image = tmp_path / "image.png"
    image.write_bytes(b"not an image")
    arguments = [part.format(empty=empty, image=image) for part in command]
    result = invoke(*arguments)
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output and result.output.strip().startswith(
        ("Usage:", "Error:")), result.output
    debug = invoke("--debug", *arguments)
    assert isinstance(debug.exception, (ValueError, OSError)), (debug.exception, debug.output)


def test_missing_tracking_and_tuning_extras_are_one_line_errors_naming_the_install(
        monkeypatch, tmp_path):
    # A module set to None in sys.modules fails to import, as an uninstalled one does.
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "optuna", None)
    result = invoke("recipe", "run", "quickstart", "--set", "track.mlflow=sqlite:///x.db",
                    "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and 'pip install "kcls[mlflow]"' in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
    result = invoke("tune", "quickstart", "--budget", "1m", "--out", str(tmp_path / "tune"))
    assert result.exit_code == 2 and 'pip install "kcls[tune]"' in result.output
    assert "Traceback" not in result.output and not (tmp_path / "tune").exists()


def test_tune_refuses_budgets_and_spaces_it_cannot_use(tmp_path):
    pytest.importorskip("optuna", reason='needs Optuna: pip install -e ".[test]"')
    for arguments, message in (
            (["--budget", "soon"], "--budget soon: 'soon' is not a duration"),
            (["--budget", "1m", "--trial-budget", "2m"], "longer than --budget 1m"),
            (["--budget", "1m", "--space", "big"], "Unknown search space 'big'"),
            (["--budget", "1m", "--set", "data.validation_fraction=0"],
             "set data.validation_fraction above 0")):
        result = invoke("tune", "quickstart", *arguments, "--out", str(tmp_path / "tune"))
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "tune").exists()


def test_python_dash_m_kcls_is_the_kcls_command():
    import subprocess

    result = subprocess.run([sys.executable, "-m", "kcls", "recipe", "list"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "quickstart" in result.stdout
