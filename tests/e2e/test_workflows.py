"""Whole workflows through the real `kdflow` command: local Ray, MLflow (embedded and server), registry gates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import kdflow
from tests.helpers import at_once, write_workflow

pytestmark = pytest.mark.slow


def result_of(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"stdout must hold only the result line, got: {proc.stdout[:2000]}"
    return json.loads(lines[0])


def test_digits_runs_end_to_end_and_reruns_with_a_changed_value(workdir: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    path = write_workflow(workdir)
    proc = kdflow("run", str(path), "--json", cwd=workdir)
    first = result_of(proc)
    # a successful run prints nothing that reads like an error or warning from Ray, numpy/torch or MLflow
    for noise in ("PreemptionWatcher", "not writable", "Token authentication", "Add type hints", "pickle",
                  "INFO mlflow", "Successfully registered model", "Created version"):
        assert noise not in proc.stderr, noise
    assert "\x1b[" not in proc.stderr  # stderr is a pipe: no terminal colour codes (Ray's worker prefix had them)
    assert set(first["stages"]) >= {"data", "teacher", "soft targets", "student", "evaluate", "register"}
    assert first["status"] == "succeeded"
    assert first["student"]["test_accuracy"] > 0.6  # chance is 0.1 on 10 classes
    assert first["teacher"]["test_accuracy"] > 0.8
    assert first["student"]["retention"] == pytest.approx(
        first["student"]["test_accuracy"] / first["teacher"]["test_accuracy"])
    assert first["student"]["num_params"] < first["teacher"]["num_params"]
    assert first["soft_targets"]["reused"] is False
    assert first["soft_targets"]["teacher_forward_rows"] == first["soft_targets"]["rows"] == 1797
    assert first["registry"]["version"] == 1
    # workers: 1 on CPUs: one warm actor trained the teacher, wrote every shard and trained the student;
    # no Ray Train run started
    warm = first["warm"]
    assert (warm["fits"], warm["shards"], warm["replaced"]) == (2, first["soft_targets"]["computed_shards"], 0), warm
    assert first["soft_targets"]["computed_shards"] == 5  # 3 train shards, one each for val and test
    assert "RayTrainWorker" not in proc.stderr  # a Ray Train run's epoch lines carry its worker's name

    second = result_of(kdflow("run", str(path), "--json", "--set", "distill.temperature=8",
                              "--set", "student.params={hidden: [24]}", cwd=workdir))
    assert second["soft_targets"]["reused"] is True
    assert second["soft_targets"]["teacher_forward_rows"] == 0
    assert second["soft_targets"]["cache_key"] == first["soft_targets"]["cache_key"]
    assert second["registry"]["version"] == 2
    assert second["student"]["num_params"] != first["student"]["num_params"]

    mlflow.set_tracking_uri(first["mlflow"]["tracking_uri"])
    client = MlflowClient()
    versions = client.search_model_versions("name='test-digits-student'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    run = client.get_run(second["mlflow"]["run_id"])
    assert run.data.params["distill.temperature"] == "8.0"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert len(history) >= 2 and [m.step for m in history] == sorted(m.step for m in history)
    assert {"train_kd", "train_ce", "val_agreement", "samples_per_s"} <= set(run.data.metrics)
    v2 = client.get_model_version("test-digits-student", "2")
    assert v2.tags["kdflow.soft_targets.key"] == first["soft_targets"]["cache_key"]
    import pandas as pd
    from sklearn.datasets import load_digits

    model = mlflow.pyfunc.load_model("models:/test-digits-student/2")
    d = load_digits()
    pred = model.predict(pd.DataFrame(d.data[:300], columns=[f"pixel_{i // 8}_{i % 8}" for i in range(64)]))
    assert (pred == d.target[:300]).mean() > 0.6  # the registered model takes raw features, answers in labels
    assert v2.tags["kdflow.version"] and len(v2.tags["kdflow.workflow.sha256"]) == 64
    resolved = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/workflow.resolved.yaml")
    assert "temperature: 8.0" in resolved  # the workflow as run, --set included


def test_registry_gates_decide_the_alias_on_a_tracking_server(workdir: Path, mlflow_server: str) -> None:
    import mlflow
    from mlflow import MlflowClient

    gates = {"retention": ">= 0.5", "num_params": "<= 20000", "beats_alias": "champion"}
    path = write_workflow(workdir, **{"tracking.uri": mlflow_server, "registry.model": "gated-student",
                                      "registry.promote": {"alias": "champion", "gates": gates}})
    first = result_of(kdflow("run", str(path), "--json", cwd=workdir))
    assert first["registry"]["promoted"] is True and first["registry"]["aliases"] == ["challenger", "champion"]
    assert first["mlflow"]["tracking_uri"] == mlflow_server

    # a student over the size gate is registered but the alias stays where it was
    second = result_of(kdflow("run", str(path), "--json", "--set", "registry.promote.gates.num_params=<= 100",
                              cwd=workdir))
    assert second["registry"]["version"] == 2
    assert second["registry"]["promoted"] is False
    assert second["registry"]["gates"]["num_params"]["passed"] is False
    mlflow.set_tracking_uri(mlflow_server)
    client = MlflowClient()
    assert client.get_model_version_by_alias("gated-student", "champion").version == "1"
    assert client.get_model_version("gated-student", "2").tags["kdflow.gate.num_params"].startswith("FAIL")

    assert client.get_model_version_by_alias("gated-student", "challenger").version == "2"
    # `models show` and a refused `promote` change nothing: both processes at once
    listed, refused = at_once(
        lambda: kdflow("models", "show", "gated-student", "--json", "--tracking-uri", mlflow_server, cwd=workdir),
        lambda: kdflow("promote", "gated-student", "--version", "2", "--tracking-uri", mlflow_server, cwd=workdir))
    assert listed.returncode == 0
    assert [(v["version"], v["aliases"]) for v in json.loads(listed.stdout)["versions"]] == [
        (1, ["champion"]), (2, ["challenger"])]
    assert refused.returncode == 2 and "num_params" in refused.stderr
    assert client.get_model_version_by_alias("gated-student", "champion").version == "1"  # the refusal moved nothing
    moved = kdflow("promote", "gated-student", "--version", "2", "--force", "--reason", "test", "--tracking-uri",
                   mlflow_server, cwd=workdir)
    assert moved.returncode == 0, moved.stderr
    assert client.get_model_version_by_alias("gated-student", "champion").version == "2"


def test_unreachable_tracking_server_exits_2_before_any_work(workdir: Path) -> None:
    """Checked before Ray starts (a run starts its local Ray on a thread beside MLflow's setup): Ray's
    temporary folder (RAY_TMPDIR) would hold a session had the run started one."""
    path = write_workflow(workdir, **{"tracking.uri": "http://127.0.0.1:9"})
    ray_tmp = workdir / "ray"
    proc = kdflow("run", str(path), cwd=workdir, timeout=300, env={"RAY_ADDRESS": "", "RAY_TMPDIR": str(ray_tmp)})
    assert proc.returncode == 2
    assert "tracking.uri" in proc.stderr and "127.0.0.1:9" in proc.stderr and "Traceback" not in proc.stderr
    assert not ray_tmp.exists() and "▶ ray" not in proc.stderr
    assert not (workdir / ".kdflow" / "soft_targets").exists()


def test_a_data_mistake_after_rays_early_start_exits_2_and_leaves_no_ray_process(workdir: Path) -> None:
    """`kdflow run` starts its local Ray on a thread before it imports torch and reads the data: a data
    mistake found meanwhile still exits 2 with one message, and the Ray it began is stopped whole (its
    start awaited, then stopped at exit), not left as orphaned agents or workers."""
    import subprocess
    import time

    path = write_workflow(workdir, **{"data.source": str(workdir / "no-such-table.parquet"), "data.label": "y"})
    ray_tmp = workdir / "ray"
    proc = kdflow("run", str(path), cwd=workdir, timeout=300, env={"RAY_ADDRESS": "", "RAY_TMPDIR": str(ray_tmp)})
    assert proc.returncode == 2, proc.stderr
    assert "data.source" in proc.stderr and "no-such-table.parquet" in proc.stderr
    assert "Traceback" not in proc.stderr and "rror" not in proc.stderr.replace("kdflow: error:", "")
    assert ray_tmp.exists()  # the early start did begin a Ray session
    def left() -> list[str]:  # the session's processes: GCS, raylet, dashboard, monitors, agents
        return subprocess.run(["pgrep", "-f", str(ray_tmp)], check=False, capture_output=True, text=True).stdout.split()

    deadline = time.monotonic() + 15  # a stopped raylet's agents exit on their own within seconds
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left() == [], "Ray processes of the run's session are still running"


def test_user_model_factory_and_missing_factory(workdir: Path) -> None:
    (workdir / "mymodels.py").write_text(
        "import torch\n"
        "def student(num_features, num_classes, width=8):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(num_features, width), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(width, num_classes))\n")
    path = write_workflow(workdir, **{"student.model": "mymodels:student", "student.params": {"width": 12},
                                      "train.epochs": 3})
    out = result_of(kdflow("run", str(path), "--json", cwd=workdir))
    assert out["student"]["num_params"] == 64 * 12 + 12 + 12 * 10 + 10
    proc = kdflow("run", str(path), "--set", "student.model=nomodule:make", cwd=workdir)
    assert proc.returncode == 2 and "nomodule" in proc.stderr and "Traceback" not in proc.stderr
