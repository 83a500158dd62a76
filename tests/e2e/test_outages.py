"""Services away for a while during a run: S3 and the MLflow server go down (a proxy in front of the real
server cuts every connection and refuses new ones) at a stage, and come back.

A run rides out a short outage (each retry said on stderr) and ends as a fault-free run would, with its
soft targets whole and one registered version; an outage longer than `tracking.retries` allows exits 2
naming tracking.uri, with no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tasks.storage import Storage
from tasks.store.store import SoftTargetStore
from tests.conftest import BIN, session_ray_address
from tests.e2e.test_s3 import digits_table, fs, upload_parquet
from tests.helpers import write_workflow
from tests.proxy import Proxy

pytestmark = pytest.mark.slow


def run_watched(wf: Path, cwd: Path, on_line: dict[str, Callable[[], object]], *extra: str,
                env: dict[str, str] | None = None) -> tuple[int, dict, str]:
    """`kdflow run wf --json`, calling on_line[text]() the first time a stderr line holds text."""
    env = {**os.environ, "RAY_ADDRESS": session_ray_address(), "RAY_AUTH_MODE": "token", **(env or {})}
    proc = subprocess.Popen([str(BIN / "kdflow"), "run", str(wf), "--json", *extra], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[str] = []

    def watch() -> None:
        for line in proc.stderr:
            lines.append(line)
            for prefix in [p for p in on_line if p in line]:  # a Ray worker's line can share the line
                on_line.pop(prefix)()

    # The watcher is stderr's only reader: `communicate()` would read the same pipe and take lines from it.
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = proc.stdout.read()
    proc.wait(timeout=600)
    watcher.join(timeout=30)
    result = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    return proc.returncode, result, "".join(lines)


# The end of the student's fit, by whichever of its lines shows first: a worker's epoch line can arrive after
# the run has moved on.
AFTER_STUDENT = ("[student] epoch 1/1", "[student] epoch 2/2", "✓ student", "▶ evaluate", "student 0.", "▶ register")


def first_of(markers: tuple[str, ...], call: Callable[[], object]) -> dict[str, Callable[[], object]]:
    """on_line entries that call `call` once, at the first of `markers` seen."""
    fired: list[bool] = []

    def once() -> None:
        if not fired:
            fired.append(True)
            call()

    return dict.fromkeys(markers, once)


def test_s3_away_during_the_data_and_target_stages(s3_server: dict[str, str], s3_bucket: str,
                                                   workdir: Path) -> None:
    """S3 goes away as the data stage starts (the driver lists and reads the Parquet source) and again as the
    soft-target stage starts (Ray tasks write shards): both are waited for, and the store is whole."""
    upload_parquet(fs(s3_server), digits_table(), f"{s3_bucket}/data/digits.parquet")
    proxy = Proxy(urlsplit(s3_server["endpoint"]).port)
    root = f"s3://{s3_bucket}/runs"
    wf = write_workflow(workdir, **{"storage.root": root, "storage.s3": {"endpoint_url": proxy.url},
                                    "storage.retries": {"attempts": 12, "max_wait_s": 2},
                                    "data.source": f"s3://{s3_bucket}/data/digits.parquet",
                                    "teacher.train.epochs": 2, "train.epochs": 2})
    try:
        code, result, err = run_watched(wf, workdir, {"▶ data": lambda: proxy.away_for(4),
                                                      "▶ soft targets": lambda: proxy.away_for(4)})
    finally:
        proxy.up()
    assert code == 0, err[-4000:]
    # at least one cut met a call (one that s3fs's own two quick retries absorb is not said)
    assert proxy.cuts >= 1 and "unreachable, retrying" in err, err[-4000:]
    assert "Traceback" not in err
    assert result["status"] == "succeeded" and result["soft_targets"]["rows"] == 1797
    store = SoftTargetStore(Storage(root, endpoint_url=s3_server["endpoint"]))
    manifest = store.require(result["soft_targets"]["cache_key"])
    store.verify(manifest)  # every shard whole, checksums as the manifest says


def mlflow_proxy(mlflow_server: str) -> Proxy:
    return Proxy(urlsplit(mlflow_server).port)


def test_mlflow_away_while_the_run_logs_and_registers(mlflow_server: str, workdir: Path) -> None:
    """The tracking server goes away as the student's last epoch is reported and comes back 6 s later: the run waits
    (saying so), logs every metric and registers exactly one version."""
    from mlflow import MlflowClient

    proxy = mlflow_proxy(mlflow_server)
    name = f"outage-{os.getpid()}"
    wf = write_workflow(workdir, **{"tracking.uri": proxy.url, "registry.model": name, "name": name,
                                    "teacher.train.epochs": 2, "train.epochs": 2})
    try:
        code, result, err = run_watched(wf, workdir, first_of(AFTER_STUDENT[1:], lambda: proxy.away_for(6)))
    finally:
        proxy.up()
    assert code == 0, err[-4000:]
    assert f"MLflow server 127.0.0.1:{proxy.port} unreachable, retrying" in err, err[-4000:]
    assert "Traceback" not in err
    client = MlflowClient(mlflow_server)
    versions = client.search_model_versions(f"name = '{name}'")
    assert [int(v.version) for v in versions] == [result["registry"]["version"]]
    run = client.get_run(versions[0].run_id)
    assert {"test_accuracy", "teacher_test_accuracy", "retention"} <= set(run.data.metrics), run.data.metrics
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert len(history) == len({m.step for m in history}) == 2  # each epoch logged once


def test_mlflow_gone_for_good_exits_2_naming_the_tracking_uri(mlflow_server: str, workdir: Path) -> None:
    proxy = mlflow_proxy(mlflow_server)
    name = f"gone-{os.getpid()}"
    wf = write_workflow(workdir, **{"tracking.uri": proxy.url, "tracking.retries": {"attempts": 3, "max_wait_s": 1},
                                    "registry.model": name, "name": name,
                                    "teacher.train.epochs": 1, "train.epochs": 1})
    code, result, err = run_watched(wf, workdir, first_of(AFTER_STUDENT, proxy.down))
    assert code == 2, err[-4000:]
    assert "tracking.uri: the MLflow tracking server at" in err and "Traceback" not in err, err[-4000:]
    assert result["status"] == "failed"
