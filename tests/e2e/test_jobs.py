"""Submitting workflows to a real Ray cluster (`ray start --head` on loopback) through the Jobs API: several
users at once on one cluster, and no secret of theirs in anything the cluster or kdflow shows or writes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, SECRET_KEY, free_port, kdflow, wait_for_http
from tests.helpers import SPACE, at_once, workflow, write_workflow

MLFLOW_PASSWORD = "kdflow-mlflow-" + os.urandom(12).hex()

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    temp = tmp_path_factory.mktemp("rayhead")
    port, dash = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for inherited in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):  # jobs inherit the head's environment
        env.pop(inherited, None)
    # the cluster's own credentials, as a RayCluster's Secret gives them: jobs must never echo them
    env.update(MLFLOW_TRACKING_USERNAME="team", MLFLOW_TRACKING_PASSWORD=MLFLOW_PASSWORD)
    # every port with a fixed default gets a free one: another Ray on the machine must not collide
    ports = [f"--{name}={free_port()}" for name in (
        "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")]
    # --block in its own process group: teardown stops this head alone (`ray stop` would end every Ray
    # on the machine, the test session's own included)
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", *ports, "--num-cpus=4",
                             f"--temp-dir={temp}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_for_http(f"{address}/api/version", timeout=180, proc=proc)
        yield address
    finally:  # thrown away: the head's process group killed at once (a graceful stop takes many seconds)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def users(workdir: Path, teacher: Path) -> dict[str, Path]:
    """Four users' workflows in one folder: ana and ben share a store root (the same soft targets, written by
    whichever comes first), ben and cat one search study (search.study on a shared journal), eve's job runs
    long enough to be stopped."""
    shared = workdir / "shared"
    # a teacher checkpoint each (no teacher training): the jobs' own stages, not a teacher's, are the test
    ready = {"train.epochs": 2, "teacher": {"model": "mlp", "params": {"hidden": [64]}, "checkpoint": str(teacher)}}
    study = {"trials": 3, "concurrency": 1, "pruner": "none", "study": "team-search",
             "storage": f"journal://{shared / 'team.journal'}", "space": SPACE}
    specs = {
        "ana": {**ready, "storage.root": str(shared)},
        "ben": {**ready, "storage.root": str(shared), "search": study},
        "cat": {**ready, "storage.root": str(workdir / "cat"), "search": study},
        "eve": {**ready, "storage.root": str(workdir / "eve"), "train.epochs": 2000},
    }
    paths = {}
    for user, spec in specs.items():
        paths[user] = workdir / f"{user}.yaml"
        paths[user].write_text(yaml.safe_dump(workflow(**{"name": f"{user}-digits",
                                                          "registry.model": f"{user}-student", **spec})))
    return paths


def test_users_at_once_share_the_cluster_and_no_secret_leaks(workdir: Path, ray_head: str,
                                                             search_teacher: Path) -> None:
    """Four workflows submitted at once to one cluster all run (jobs queue for CPUs, none fails for want of
    them); two searches on one study share its trials without failing each other's; `kdflow jobs stop` ends
    eve's job only; and the cluster's secrets appear nowhere: job metadata and logs, MLflow, files."""
    paths = users(workdir, search_teacher)
    # ana follows her job (--wait: its logs on stderr, the run's JSON result on stdout); the others return
    subs = at_once(*(lambda u=u, p=p: kdflow("submit", p.name, "--address", ray_head, *(["--wait"] if u == "ana" else []),
                                             cwd=workdir) for u, p in paths.items()))
    assert all(s.returncode == 0 for s in subs), [s.stderr[-2000:] for s in subs]
    ids = dict(zip(paths, (s.stdout.strip().splitlines()[0] for s in subs), strict=True))
    result = json.loads(subs[0].stdout.strip().splitlines()[-1])
    assert result["status"] == "succeeded" and result["student"]["test_accuracy"] > 0.3
    assert (workdir / "shared" / "soft_targets" / result["soft_targets"]["cache_key"] / "manifest.json").exists()

    def status(job: str) -> str:
        return kdflow("jobs", "status", job, "--address", ray_head, cwd=workdir).stdout.strip()

    deadline = time.monotonic() + 600
    while status(ids["eve"]) != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(1)
    stop = kdflow("jobs", "stop", ids["eve"], "--address", ray_head, cwd=workdir)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    while (states := {u: status(j) for u, j in ids.items()}) and \
            any(s not in ("SUCCEEDED", "FAILED", "STOPPED") for s in states.values()):
        assert time.monotonic() < deadline, states
        time.sleep(2)
    logs = {u: kdflow("jobs", "logs", j, "--address", ray_head, cwd=workdir).stdout for u, j in ids.items()}
    assert states == {"ana": "SUCCEEDED", "ben": "SUCCEEDED", "cat": "SUCCEEDED", "eve": "STOPPED"}, \
        {u: logs[u][-1500:] for u in ids}
    listed = kdflow("jobs", "list", "--address", ray_head, cwd=workdir).stdout
    for user, job in ids.items():
        assert any(job in line and states[user] in line and f"{user}-digits" in line for line in listed.splitlines())

    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name="team-search", storage=JournalStorage(JournalFileBackend(
        str(workdir / "shared" / "team.journal"))))
    trials = study.get_trials()
    assert not [t for t in trials if t.state.name == "FAIL"], [t.user_attrs for t in trials]
    assert 3 <= sum(t.state.name == "COMPLETE" for t in trials) <= 4  # two drivers may race for the last one
    assert all(t.user_attrs.get("driver") for t in trials)  # whose trial it is: what a resume asks

    leak_check(workdir, ray_head, logs, listed)


def leak_check(workdir: Path, ray_head: str, logs: dict[str, str], listed: str) -> None:
    """The cluster's secrets in nothing anyone can read: job details (runtime_env, metadata, entrypoint), job
    logs, `kdflow jobs list`, MLflow's stores (params, tags, artifacts) and every file the runs wrote."""
    from ray.job_submission import JobSubmissionClient

    from orchestrator.cluster import auth_headers

    token = auth_headers().get("Authorization", "").removeprefix("Bearer ")
    secrets = {"AWS_SECRET_ACCESS_KEY": SECRET_KEY, "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD,
               **({"RAY_AUTH_TOKEN": token} if len(token) >= 16 else {})}
    details = repr(JobSubmissionClient(ray_head, headers=auth_headers()).list_jobs())
    texts = {"job details": details, "jobs list": listed, **{f"{u}'s job logs": t for u, t in logs.items()}}
    files = {str(p): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    assert any(b"ana-digits" in data for data in files.values()) and "ana-digits" in details  # the grep sees
    for name, secret in secrets.items():
        assert not [where for where, text in texts.items() if secret in text], f"{name} leaked"
        assert not [path for path, data in files.items() if secret.encode() in data], f"{name} leaked"


def test_forwarding_a_secret_is_refused_and_says_what_to_do(workdir: Path) -> None:
    """A job's runtime_env is public on the cluster: --forward-env of a secret exits 2 before anything is
    sent, names the variable (never its value) and points at the documented way."""
    path = write_workflow(workdir)
    for name in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN", "HF_TOKEN"):
        proc = kdflow("submit", path.name, "--address", "http://127.0.0.1:9", "--forward-env", name,
                      cwd=workdir, env={name: SECRET_KEY})
        assert proc.returncode == 2 and f"--forward-env: will not forward {name}" in proc.stderr, proc.stderr
        assert "Credentials on a cluster" in proc.stderr and SECRET_KEY not in proc.stderr + proc.stdout
        assert "Traceback" not in proc.stderr


def test_submit_rejects_a_bad_workflow_before_sending(workdir: Path) -> None:
    path = write_workflow(workdir, **{"distill.temperature": -1})
    proc = kdflow("submit", path.name, "--address", "http://127.0.0.1:9", cwd=workdir)
    assert proc.returncode == 2 and "distill.temperature" in proc.stderr and "Traceback" not in proc.stderr


def test_unreachable_cluster_exits_2(workdir: Path) -> None:
    path = write_workflow(workdir)
    proc = kdflow("submit", path.name, "--address", "http://127.0.0.1:9", cwd=workdir, timeout=120)
    assert proc.returncode == 2 and "127.0.0.1:9" in proc.stderr and "Traceback" not in proc.stderr
