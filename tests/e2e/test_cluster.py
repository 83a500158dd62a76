"""A workflow submitted to a real two-node Ray cluster, as docs/operations.md "Run on a cluster" walks it.

A head and a second node joined to it on loopback (tests/cluster.py: each node its own ports, its own
--temp-dir and its own process group), the data and storage.root on moto's S3 API server, tracking on
a real `mlflow server`. The lost-node test kills the second node's process group while the student
trains; it runs last because the cluster has one node from then on.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import TwoNodes
from tests.conftest import BIN, kdflow
from tests.helpers import write_workflow

pytestmark = pytest.mark.slow

# the nodes have their own credentials (started from this environment); only what is not secret travels
AWS = ["AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"]
FORWARD = [a for k in AWS for a in ("--forward-env", k)]
EPOCHS = 30  # the lost-node student: long enough to kill a node in the middle


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    nodes = TwoNodes(tmp_path_factory.mktemp("two-nodes"), cpus=4)
    try:
        yield nodes.start()
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def bucket(s3_server: dict[str, str]) -> str:
    """One bucket for the module's runs: the lost-node run reuses the first run's teacher and soft targets."""
    import boto3

    name = f"kdflow-cluster-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_server["endpoint"]).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def digits_on_s3(s3_server: dict[str, str], bucket: str) -> str:
    """The digits as two Parquet files (the job reads its data from S3 too)."""
    from tests.e2e.test_s3 import digits_table, fs, upload_parquet

    table = digits_table()
    upload_parquet(fs(s3_server), table.slice(0, 900), f"{bucket}/digits/part-0.parquet")
    upload_parquet(fs(s3_server), table.slice(900), f"{bucket}/digits/part-1.parquet")
    return f"s3://{bucket}/digits/*.parquet"


def cluster_workflow(folder: Path, bucket: str, data: str, tracking: str, **overrides: object) -> Path:
    return write_workflow(folder, **{"storage.root": f"s3://{bucket}/runs", "data.source": data,
                                     "tracking.uri": tracking, "train.workers": 2, "train.placement": "spread",
                                     "train.cpus_per_worker": 1, "train.checkpoint_every": 2,
                                     "teacher.train.epochs": 3, "registry.model": f"cluster-{bucket}"[:60],
                                     **overrides})


def node_ids(cluster: TwoNodes) -> dict[str, str]:
    """{node id: 'head' | 'worker'} from the dashboard."""
    return {n["raylet"]["nodeId"]: "head" if n["raylet"].get("isHeadNode") else "worker"
            for n in cluster.alive_nodes()}


def test_submit_refuses_local_disk_and_embedded_stores_on_two_nodes(cluster: TwoNodes, s3_bucket: str,
                                                                     workdir: Path) -> None:
    local = write_workflow(workdir, "local.yaml", **{"storage.root": str(workdir / "store")})
    proc = kdflow("submit", local.name, "--address", cluster.address, cwd=workdir, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "storage.root" in proc.stderr and "s3://" in proc.stderr
    embedded = write_workflow(workdir, "embedded.yaml", **{"storage.root": f"s3://{s3_bucket}/runs"})
    proc = kdflow("submit", embedded.name, "--address", cluster.address, cwd=workdir, timeout=120)
    assert proc.returncode == 2 and "tracking.uri" in proc.stderr and "MLflow server" in proc.stderr
    listed = kdflow("jobs", "list", "--address", cluster.address, cwd=workdir)
    assert listed.returncode == 0 and "kdflow run" not in listed.stdout  # nothing was submitted
    assert not (workdir / "store").exists()


def test_two_node_job_with_s3_and_an_mlflow_server(cluster: TwoNodes, bucket: str, digits_on_s3: str,
                                                   mlflow_server: str, workdir: Path, tmp_path_factory:
                                                   pytest.TempPathFactory) -> None:
    import mlflow

    from tests.e2e.test_s3 import fs

    nodes = node_ids(cluster)
    assert sorted(nodes.values()) == ["head", "worker"]
    # the workflow lives outside the directory that ships (which still goes, for user factories)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    path = cluster_workflow(elsewhere, bucket, digits_on_s3, mlflow_server)
    t0 = time.monotonic()
    proc = kdflow("submit", str(path), "--address", cluster.address, "--wait", *FORWARD, cwd=workdir)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-5000:]
    job_id, result = proc.stdout.splitlines()[0], json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "succeeded", result
    print(f"two-node job: {seconds:.1f}s wall, {result['seconds']}s in kdflow run")

    # workers really spread: one on each node, read from the result and from the run's record
    student = result["student"]
    assert len(student["nodes"]) == 2 and set(student["nodes"]) == set(nodes), (student["nodes"], nodes)
    assert student["test_accuracy"] > 0.6  # the 1-worker band of tests/test_e2e.py
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(result["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert set(run.data.tags["kdflow.student.nodes"].split(",")) == set(nodes)
    versions = client.search_model_versions(f"name='{result['registry']['model']}'")
    assert [v.run_id for v in versions] == [run.info.run_id]

    # soft targets and checkpoints are on S3, nothing went to local disk
    s3 = fs({"endpoint": os.environ["AWS_ENDPOINT_URL"]})
    key = result["soft_targets"]["cache_key"]
    assert result["soft_targets"]["uri"] == f"s3://{bucket}/runs/soft_targets/{key}"
    assert s3.exists(f"{bucket}/runs/soft_targets/{key}/manifest.json")
    assert any("student-" in p for p in s3.ls(f"{bucket}/runs/checkpoints"))
    assert not (workdir / ".kdflow").exists()

    # the job's logs, streamed until it ended
    logs = kdflow("jobs", "logs", job_id, "--follow", "--address", cluster.address, cwd=workdir)
    assert logs.returncode == 0 and "register" in logs.stdout and '"status": "succeeded"' in logs.stdout
    print("stages:", "; ".join(ln.strip() for ln in logs.stdout.splitlines() if ln.startswith("✓")))


def test_a_lost_node_is_survived_from_the_last_checkpoint(cluster: TwoNodes, bucket: str, digits_on_s3: str,
                                                          mlflow_server: str, workdir: Path) -> None:
    from tests.e2e.test_s3 import fs

    nodes = node_ids(cluster)
    head = next(n for n, role in nodes.items() if role == "head")
    s3 = fs({"endpoint": os.environ["AWS_ENDPOINT_URL"]})
    before = set(s3.ls(f"{bucket}/runs/checkpoints", refresh=True))
    path = cluster_workflow(workdir, bucket, digits_on_s3, mlflow_server,
                            **{"train.max_failures": 1, "train.epochs": EPOCHS})
    follow = subprocess.Popen([str(BIN / "kdflow"), "submit", path.name, "--address", cluster.address, "--wait",
                               *FORWARD], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    checkpoint = None
    while checkpoint is None:  # the student's first checkpoint on S3: kill the second node then
        assert time.monotonic() < deadline and follow.poll() is None, "no student checkpoint appeared"
        runs = [p for p in s3.ls(f"{bucket}/runs/checkpoints", refresh=True) if "student-" in p and p not in before]
        found = [p for r in runs for p in s3.ls(r, refresh=True) if "checkpoint_" in p.rsplit("/", 1)[-1]]
        checkpoint = found[0] if found else None
        time.sleep(0.2)
    t_kill = time.monotonic()
    cluster.worker.kill()
    out, err = follow.communicate(timeout=400)
    after_kill = time.monotonic() - t_kill
    assert follow.returncode == 0, err[-5000:]
    result = json.loads(out.strip().splitlines()[-1])
    student = result["student"]
    print(f"lost node: resumed from epoch {student['resumed_from']}, {after_kill:.1f}s from the kill to the end")
    assert result["status"] == "succeeded"
    assert isinstance(student["resumed_from"], int) and 1 <= student["resumed_from"] < EPOCHS
    assert result["soft_targets"]["reused"]  # the first job's, from S3
    assert student["epochs"] == EPOCHS and student["test_accuracy"] > 0.6
    assert set(student["nodes"]) == {head}  # the restarted workers all run on the surviving node
    assert student["resumed_from"] % 2 == 0  # train.checkpoint_every: 2, so only even epochs were saved
