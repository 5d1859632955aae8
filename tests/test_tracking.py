"""MLflow tracking (`track.mlflow`) against a real MLflow tracking server on 127.0.0.1.

The server (`mlflow server`, a sqlite backend and served artifacts in a temporary
folder) is started once for the module; runs are read back through MLflow's client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import closed_port

from kcls.config import apply_overrides
from kcls.layout import RUN_INFO_FILE, TRACKING_FILE
from kcls.tracking import RunStopped
from kcls.tracking.mlflow_tracker import git_commit
from kcls.workflows.run import run_recipe

mlflow = pytest.importorskip("mlflow", reason='needs MLflow: pip install -e ".[test]"')

pytestmark = pytest.mark.slow
# No usage reports to MLflow's servers from tests (the socket guard would refuse them).
QUIET_MLFLOW = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """The URL of an MLflow tracking server started for this module (~40 s to start)."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = closed_port()
    with open(folder / "server.log", "wb") as server_log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", str(folder / "artifacts")],
            stdout=server_log, stderr=subprocess.STDOUT, env={**os.environ, **QUIET_MLFLOW})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not _healthy(url):
            assert server.poll() is None, (folder / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the MLflow server did not start in 180 s"
            time.sleep(1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def client(tracking_server, loopback_only, monkeypatch):
    for name, value in QUIET_MLFLOW.items():
        monkeypatch.setenv(name, value)
    return mlflow.MlflowClient(tracking_uri=tracking_server)


class RaiseAfterFirstEpoch:
    """A run observer whose callback raises `error` at the end of the first epoch."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def started(self, recipe, run_dir, settings):
        pass

    def callbacks(self):
        import keras

        error = self.error

        class Raiser(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                raise error

        return [Raiser()]

    def finished(self, run_dir, record):
        pass

    def failed(self, run_dir, error):
        pass


def only_run(client, experiment: str):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def test_a_run_logs_its_recipe_curves_metrics_files_and_export(client, tracking_server,
                                                               tiny_recipe, tmp_path):
    recipe = apply_overrides(tiny_recipe, [f"track.mlflow={tracking_server}",
                                           "track.experiment=finished"])
    result = run_recipe(recipe, tmp_path / "run", log=lambda line: None, verbose=0)
    run = only_run(client, "finished")
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["data.image_size"] == "32" and params["train.frozen_epochs"] == "1"
    assert params["track.mlflow"] == tracking_server
    assert params["resolved.precision"] == "float32" and "resolved.jit_compile" in params
    for name in ("loss", "val_loss", "accuracy", "val_accuracy"):  # both phases, one axis
        assert [point.step for point in client.get_metric_history(run.info.run_id, name)] \
            == [0, 1], name
    assert run.data.metrics["test.accuracy"] == pytest.approx(result.metrics["accuracy"])
    assert run.data.metrics["test.per_class.3.f1"] == pytest.approx(
        result.metrics["per_class"]["3"]["f1"])
    artifacts = {entry.path for entry in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "run.json", "metrics.json", "report.md",
            "training_curves.png", "confusion_matrix.png"} <= artifacts
    report = client.download_artifacts(run.info.run_id, "report.md", str(tmp_path))
    assert Path(report).read_text() == (result.run_dir / "report.md").read_text()
    tags = run.data.tags
    assert tags["kcls.export_version"] == result.export_dir.name == "1"
    assert tags["kcls.export_dir"] == str(result.export_dir)
    assert tags["kcls.phases"] == "frozen: epochs 0-0; unfrozen: epochs 1-1"
    assert tags.get("mlflow.source.git.commit") == git_commit()


def test_failed_and_interrupted_runs_are_marked_and_a_resumed_run_reopens_its_own(
        client, tracking_server, tiny_recipe, tmp_path):
    for experiment, error, status in (("failed", ValueError("broken callback"), "FAILED"),
                                      ("stopped", RunStopped("pruned"), "KILLED")):
        recipe = apply_overrides(tiny_recipe, [f"track.mlflow={tracking_server}",
                                               f"track.experiment={experiment}"])
        with pytest.raises(type(error)):
            run_recipe(recipe, tmp_path / experiment, log=lambda line: None, verbose=0,
                       observers=[RaiseAfterFirstEpoch(error)])
        run = only_run(client, experiment)
        assert run.info.status == status
        assert run.data.tags["kcls.error"] == f"{type(error).__name__}: {error}"
    # Run again in the interrupted run's directory: it resumes after its first epoch
    # and logs the rest into the same MLflow run.
    run_recipe(recipe, tmp_path / "stopped", log=lambda line: None, verbose=0)
    resumed = only_run(client, "stopped")
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert [point.step for point in client.get_metric_history(run.info.run_id, "loss")] \
        == [0, 1]
    saved = json.loads((tmp_path / "stopped" / TRACKING_FILE).read_text())
    assert saved["mlflow_run_id"] == run.info.run_id
    assert (tmp_path / "stopped" / RUN_INFO_FILE).is_file()
