"""Shared test fixtures: one local Ray per session, and real servers on loopback (S3 API, MLflow).

Nothing is mocked: the S3 server is moto's standalone server, the tracking server is `mlflow server`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["tests.searches"]  # the search tests' fixtures, for the integration and e2e tiers
BIN = Path(sys.executable).parent

# MLflow and Ray leave temp files behind: keep them in one folder the session removes.
_TMP = tempfile.mkdtemp(prefix="kdflow-tests-")
os.environ.setdefault("TMPDIR", _TMP)
# kdflow's per-user cache (the empty MLflow store every new store is copied from): one per session
os.environ["KDFLOW_CACHE_DIR"] = os.path.join(_TMP, "kdflow-cache")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)
# moto's test credentials for every process from the start: Ray workers take their environment when the
# session's Ray starts (often before the S3 server fixture), and they read S3 with their own credentials,
# as a cluster node does (the endpoint travels with the Storage value; credentials never do).
# The secret is random per session: a test that greps every output of a run for it (tests/e2e/test_jobs.py)
# must not find it by chance, and a fixed word like "testing" would match ordinary text.
SECRET_KEY = "kdflow-secret-" + os.urandom(12).hex()
for _var, _value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
                     ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(_var, _value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri() -> Iterator[None]:
    """A tracking URI one test set must not send the next test's `kdflow` runs elsewhere.

    `mlflow.set_tracking_uri` writes MLFLOW_TRACKING_URI into os.environ, so it is cleared after each test
    too: a module- or session-scoped fixture set up between two tests (a `ray start --head`, whose jobs
    inherit its environment) must not inherit a server that the previous test's fixture has stopped.
    """
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole session (starting one costs seconds)."""
    import ray

    from orchestrator.runtime import ensure_ray

    ensure_ray()
    yield
    ray.shutdown()


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test runs in its own folder, so `.kdflow/` (store, sqlite MLflow) starts empty."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 API server on loopback; yields the env that points clients at it."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    wait_for_http(endpoint, proc=proc)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield {**env, "endpoint": endpoint}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture()
def s3_bucket(s3_server: dict[str, str], request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test."""
    import boto3

    name = f"kdflow-{request.node.name[:30].lower().replace('_', '-')}-{os.getpid() % 1000}-{time.time_ns() % 10**6}"
    name = "".join(c for c in name if c.isalnum() or c == "-")[:60].strip("-")
    boto3.client("s3", endpoint_url=s3_server["endpoint"]).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (sqlite backend, local artifacts) on loopback; yields its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=(root / "server.log").open("w"), env=env)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", timeout=300, proc=proc)  # a loaded 2-core box needs minutes
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def session_ray_address() -> str:
    """The GCS address of the session's local Ray (started here on first use)."""
    import ray

    from orchestrator.runtime import ensure_ray

    ensure_ray()
    return ray.get_runtime_context().gcs_address


def kdflow(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `kdflow` command as a user would.

    `kdflow run` joins the session's Ray (RAY_ADDRESS, as inside a Ray job) instead of starting its own:
    starting a local Ray costs 10-30 s on two cores, most of a small test run. A RAY_ADDRESS in `env` wins;
    tests that start `kdflow run` themselves (test_failures' two runs at once) keep a Ray of their own each,
    as a user's first runs do.
    """
    env = {**os.environ, **(env or {})}
    if args and args[0] == "run" and "RAY_ADDRESS" not in env:
        # joining needs token auth on, as `ray start --address` does
        env.update(RAY_ADDRESS=session_ray_address(), RAY_AUTH_MODE="token")
    return subprocess.run([str(BIN / "kdflow"), *args], check=False, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_TMP, ignore_errors=True)
