"""Promotion on a real `mlflow server`: challenger and champion, gates, forced promote, rollback, history.

The versions are real pickle-free pyfunc models of a small torch net (no Ray: registering does not need
it); the CLI commands run as a user runs them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from orchestrator.spec import validate
from tasks.errors import UserError
from tests.conftest import kdflow
from tests.helpers import at_once, workflow

FEATURES = ["a", "b", "c"]
CLASSES = ["low", "high"]


def _register(name: str, metrics: dict[str, Any], gates: dict[str, Any], seed: int) -> dict[str, Any]:
    import mlflow

    from orchestrator.registry import PIP_REQUIREMENTS, register
    from tasks.kinds.classification.models import build_model
    from tasks.kinds.classification.serving import log_student
    from tasks.storage import Storage

    spec = validate(workflow(**{"registry.model": name, "registry.promote": {"alias": "champion", "gates": gates}}))
    torch.manual_seed(seed)
    net = build_model("mlp", {"hidden": [4]}, 3, 2)
    with mlflow.start_run() as run:
        uri = log_student(net, np.zeros(3, np.float32), np.ones(3, np.float32), factory="mlp",
                          params={"hidden": [4]}, feature_names=FEATURES, classes=CLASSES,
                          pip_requirements=PIP_REQUIREMENTS)
        return register(spec, uri, run.info.run_id, metrics, {"data_fingerprint": "fp"}, Storage("unused"),
                        {"kdflow.data_fingerprint": "fp"})


@pytest.fixture()
def server(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("registry-tests")
    return mlflow_server


def cli(*args: str, server: str, cwd: Path, actor: str = "tester") -> Any:
    return kdflow(*args, "--tracking-uri", server, cwd=cwd, env={"KDFLOW_ACTOR": actor})


@pytest.mark.slow
def test_gates_challenger_champion_forced_promote_rollback_and_history(server: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    name = f"reg-{tmp_path.name[-12:]}"
    gates = {"retention": ">= 0.9", "num_params": "<= 100", "beats_alias": "champion"}
    good = {"test_accuracy": 0.95, "retention": 0.97, "num_params": 50, "latency_ms": 0.1}
    first = _register(name, good, gates, seed=0)
    assert first["promoted"] is True and first["aliases"] == ["challenger", "champion"]

    # too big: registered and challenger, champion stays on v1, the failing gate recorded on the version
    second = _register(name, {**good, "num_params": 500}, gates, seed=1)
    assert second["version"] == 2 and second["promoted"] is False and second["aliases"] == ["challenger"]
    client = MlflowClient()
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    tags = client.get_model_version(name, "2").tags
    assert tags["kdflow.gate.num_params"].startswith("FAIL num_params <= 100")
    assert tags["kdflow.gate.retention"].startswith("pass")
    assert "num_params" in tags["kdflow.promotion"] and "not promoted" in tags["kdflow.promotion"]
    assert tags["kdflow.num_params"] == "500"

    # two refusals (a failing gate, --force without --reason) change nothing: their processes at once
    refused, no_reason = at_once(lambda: cli("promote", name, "--version", "2", server=server, cwd=tmp_path),
                                 lambda: cli("promote", name, "--version", "2", "--force", server=server, cwd=tmp_path))
    assert refused.returncode == 2 and "num_params" in refused.stderr and "Traceback" not in refused.stderr
    assert no_reason.returncode == 2 and "--reason" in no_reason.stderr
    assert client.get_model_version_by_alias(name, "champion").version == "1"

    forced = cli("promote", name, "--version", "2", "--force", "--reason", "size limit lifted for the edge box",
                 server=server, cwd=tmp_path, actor="alice")
    assert forced.returncode == 0, forced.stderr
    assert client.get_model_version_by_alias(name, "champion").version == "2"

    back = cli("rollback", name, server=server, cwd=tmp_path, actor="bob")
    assert back.returncode == 0, back.stderr
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert client.get_model_version_by_alias(name, "challenger").version == "2"  # rollback moves only @champion

    # four reads and a refused rollback (nothing before v1 held @champion) change nothing: at once
    listed, shown_json, shown_text, history_out, again = at_once(
        lambda: cli("models", "history", name, "--json", server=server, cwd=tmp_path),
        lambda: cli("models", "show", name, "--json", server=server, cwd=tmp_path),
        lambda: cli("models", "show", name, server=server, cwd=tmp_path),
        lambda: cli("models", "history", name, server=server, cwd=tmp_path),
        lambda: cli("rollback", name, server=server, cwd=tmp_path))
    champion = [m for m in json.loads(listed.stdout) if m["alias"] == "champion"]
    assert [(m["from"], m["to"], m["kind"]) for m in champion] == [(None, 1, "run"), (1, 2, "promote"),
                                                                    (2, 1, "rollback")]
    assert "gates passed" in champion[0]["reason"]
    assert champion[1]["actor"] == "alice" and "size limit lifted" in champion[1]["reason"]
    assert "num_params" in champion[1]["reason"]  # the overridden gate is named in the record
    assert champion[2]["actor"] == "bob"
    assert all(m["time"] for m in champion)

    shown = json.loads(shown_json.stdout)
    assert [(v["version"], v["aliases"]) for v in shown["versions"]] == [(1, ["champion"]), (2, ["challenger"])]
    text = shown_text.stdout
    assert "FAIL num_params" in text and "rollback from v2" in text and "bob" in text, text
    history_text = history_out.stdout
    assert "alice" in history_text and "rollback" in history_text

    # nothing before v1 held @champion: a second rollback of the same chain refuses and changes nothing
    assert again.returncode == 2 and "no earlier holder" in again.stderr
    assert client.get_model_version_by_alias(name, "champion").version == "1"


@pytest.mark.slow
def test_promote_passes_when_the_recorded_gates_hold_now(server: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from orchestrator.registry import history, promote

    name = f"reg2-{tmp_path.name[-12:]}"
    gates = {"test_accuracy": ">= 0.9", "beats_alias": "champion"}
    _register(name, {"test_accuracy": 0.95, "retention": 1.0, "num_params": 50}, gates, seed=0)
    # worse than the champion: beats_alias fails at registration and again when promoted by hand
    worse = _register(name, {"test_accuracy": 0.92, "retention": 1.0, "num_params": 50}, gates, seed=1)
    assert worse["promoted"] is False and worse["gates"]["beats_alias"]["passed"] is False
    client = MlflowClient()
    with pytest.raises(UserError, match="beats_alias"):
        promote(client, name, 2, "champion", force=False, reason=None)
    better = _register(name, {"test_accuracy": 0.97, "retention": 1.0, "num_params": 50},
                       {"test_accuracy": ">= 0.99"}, seed=2)
    assert better["promoted"] is False
    # a version to an alias it can reach: v3's own gate failed, v1 -> "staging" has gates that hold
    moved = promote(client, name, 1, "staging", force=False, reason="for the canary")
    assert moved["moved"] and client.get_model_version_by_alias(name, "staging").version == "1"
    assert history(client, name)[-1]["reason"].startswith("for the canary; gates passed")


def test_lineage_names_the_git_commit_of_the_workflow_file(tmp_path: Path) -> None:
    import subprocess

    from orchestrator.registry import git_commit

    wf = tmp_path / "wf.yaml"
    wf.write_text("name: x\n")
    assert git_commit(str(wf)) is None  # not in a repository: no commit claimed
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "wf.yaml"], check=True)
    subprocess.run([*git, "commit", "-qm", "wf"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert git_commit(str(wf)) == head
    wf.write_text("name: y\n")
    assert git_commit(str(wf)) == head + "+dirty"
