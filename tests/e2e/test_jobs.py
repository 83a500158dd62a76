"""Submitting a workflow to a real Ray cluster (`ray start --head` on loopback) through the Jobs API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN, free_port, kdflow, wait_for_http
from tests.helpers import at_once, write_workflow

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    temp = tmp_path_factory.mktemp("rayhead")
    port, dash = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for inherited in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):  # jobs inherit the head's environment
        env.pop(inherited, None)
    # every port with a fixed default gets a free one: another Ray on the machine must not collide
    ports = [f"--{name}={free_port()}" for name in (
        "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")]
    # --block in its own process group: teardown stops this head alone (`ray stop` would end every Ray
    # on the machine, the test session's own included)
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", *ports, "--num-cpus=8",
                             f"--temp-dir={temp}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_for_http(f"{address}/api/version", timeout=180, proc=proc)
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_submit_waits_for_the_job_and_prints_its_result(workdir: Path, ray_head: str) -> None:
    path = write_workflow(workdir, **{"storage.root": str(workdir / "store"), "train.epochs": 3})
    proc = kdflow("submit", path.name, "--address", ray_head, "--wait", "--set", "distill.alpha=0.5", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    job_id, result = lines[0], json.loads(lines[-1])
    assert result["status"] == "succeeded" and result["student"]["test_accuracy"] > 0.3
    assert (workdir / "store" / "soft_targets" / result["soft_targets"]["cache_key"] / "manifest.json").exists()

    # three read-only commands on the finished job: their processes at once
    listed, status, logs = at_once(*(lambda args=args: kdflow("jobs", *args, "--address", ray_head, cwd=workdir)
                                     for args in (("list",), ("status", job_id), ("logs", job_id))))
    assert listed.returncode == 0 and job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    assert status.stdout.strip() == "SUCCEEDED"
    assert "soft targets" in logs.stdout


def test_submit_rejects_a_bad_workflow_before_sending(workdir: Path) -> None:
    path = write_workflow(workdir, **{"distill.temperature": -1})
    proc = kdflow("submit", path.name, "--address", "http://127.0.0.1:9", cwd=workdir)
    assert proc.returncode == 2 and "distill.temperature" in proc.stderr and "Traceback" not in proc.stderr


def test_unreachable_cluster_exits_2(workdir: Path) -> None:
    path = write_workflow(workdir)
    proc = kdflow("submit", path.name, "--address", "http://127.0.0.1:9", cwd=workdir, timeout=120)
    assert proc.returncode == 2 and "127.0.0.1:9" in proc.stderr and "Traceback" not in proc.stderr
