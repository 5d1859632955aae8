"""deploy/: the cluster files parse, and the command they run is one `kcls` accepts.

Offline: the YAML is parsed and the command line goes through kcls's own click parser and
recipe overrides; nothing is built, applied or submitted.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import yaml

from kcls.cli import main
from kcls.config import apply_overrides
from kcls.recipes import load_recipe

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ROOT = DEPLOY.parent


def _parse_kcls(argv: list[str]) -> dict:
    """The parameters of the `kcls` subcommand that `argv` (starting with `kcls`) names,
    parsed by kcls's click commands without running them."""
    assert argv[0] == "kcls", argv
    command, args = main, list(argv[1:])
    context = click.Context(main, info_name="kcls")
    while isinstance(command, click.Group):
        name = args.pop(0)
        command = command.get_command(context, name)
        assert command is not None, f"kcls has no command {name!r} in {argv}"
    return command.make_context(command.name, args, parent=context).params


def _check_multiworker_run(argv: list[str]) -> None:
    params = _parse_kcls(argv)
    assert params["run_dir"] is not None, "multiworker runs need --out on shared storage"
    assert params["workers"] is None  # a cluster's scheduler starts the workers
    recipe = apply_overrides(load_recipe(params["name"]), list(params["overrides"]))
    assert recipe.train.strategy == "multiworker"
    shared = str(params["run_dir"]).split("/")[1]
    assert recipe.export.base_dir.startswith(f"/{shared}/"), (
        "the export and the run directory belong on the same shared storage")


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def test_kubeflow_tfjob_runs_one_kcls_command_on_every_replica():
    job = _load("kubeflow-tfjob.yaml")
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "TFJob"
    replicas = job["spec"]["tfReplicaSpecs"]
    assert set(replicas) == {"Chief", "Worker"}  # kcls refuses evaluator and ps tasks
    assert replicas["Chief"]["replicas"] == 1
    containers = [spec["template"]["spec"]["containers"][0] for spec in replicas.values()]
    assert all(container["name"] == "tensorflow" for container in containers)  # operator's name
    commands = [container["command"] for container in containers]
    assert commands[0] == commands[1]
    _check_multiworker_run(commands[0])
    for spec in replicas.values():
        assert spec["restartPolicy"] == "OnFailure"  # a restarted job resumes from the backup
        claims = [volume["persistentVolumeClaim"]["claimName"]
                  for volume in spec["template"]["spec"]["volumes"]]
        mounts = [mount["mountPath"] for mount in spec["template"]["spec"]["containers"][0]
                  ["volumeMounts"]]
        assert claims == ["kcls-shared"] and mounts == ["/shared"]


def test_vertex_custom_job_runs_one_kcls_command_on_every_pool():
    job = _load("vertex-custom-job.yaml")
    pools = job["workerPoolSpecs"]
    assert len(pools) == 2 and pools[0]["replicaCount"] == 1  # pool 0 is the chief
    containers = [pool["containerSpec"] for pool in pools]
    assert containers[0] == containers[1]
    _check_multiworker_run([*containers[0]["command"], *containers[0]["args"]])
    assert job["scheduling"]["restartJobOnWorkerRestart"] is True


def test_training_image_installs_the_kcls_command():
    dockerfile = (DEPLOY / "Dockerfile.train").read_text()
    instructions = [line.split()[0] for line in dockerfile.splitlines()
                    if line.strip() and not line.startswith("#")]
    assert instructions[0] == "FROM" and "COPY" in instructions
    assert re.search(r"^RUN pip install [^\n]*\s\.(\s|$)", dockerfile, re.MULTILINE)
    # The console script the YAML files call is the one the package declares.
    assert re.search(r'^kcls = "kcls\.cli:main"$', (ROOT / "pyproject.toml").read_text(),
                     re.MULTILINE)


def test_an_unknown_override_in_a_deploy_command_would_fail():
    # The check above has teeth: kcls's parser refuses what the cluster would refuse.
    with pytest.raises(click.UsageError):
        _parse_kcls(["kcls", "recipe", "run", "quickstart", "--workers", "0"])
    with pytest.raises(Exception, match="train.strategyy"):
        apply_overrides(load_recipe("quickstart"), ["train.strategyy=multiworker"])
