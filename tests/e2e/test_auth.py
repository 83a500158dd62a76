"""A tracking server with authentication (`mlflow server --app-name basic-auth`): credentials only from
MLFLOW_TRACKING_USERNAME/PASSWORD, a wrong one exits 2 before any work, and the password appears in
nothing the run wrote (output, store, params, tags, artifacts)."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BIN, free_port, kdflow, session_ray_address, wait_for_http
from tests.helpers import at_once, write_workflow

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("mlflow-auth")
    password = "pw-" + secrets.token_hex(12)
    (root / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root}/auth.db\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=(root / "server.log").open("w"), env=env)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", timeout=120, proc=proc)
    yield {"url": url, "user": "admin", "password": password, "artifacts": str(root / "artifacts")}
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def files_holding(folder: Path, secret: bytes) -> list[str]:
    hits = []
    for p in folder.rglob("*"):
        if p.is_file() and secret in p.read_bytes():
            hits.append(str(p))
    return hits


def test_credentials_from_the_environment_only_and_never_written(workdir: Path,
                                                                 auth_server: dict[str, str]) -> None:
    import mlflow
    from mlflow import MlflowClient

    url, password = auth_server["url"], auth_server["password"]
    path = write_workflow(workdir, **{"tracking.uri": url, "registry.model": "auth-student", "train.epochs": 2,
                                      "teacher.train.epochs": 2})
    # three refused runs, each a whole `kdflow run` process; at once, as none of them may start any work
    session_ray_address()  # started here, not by three threads at once
    refused = {"wrong": (str(path),), "none": (str(path),),
               "in_uri": (str(path), "--set", f"tracking.uri=http://admin:{password}@{url.removeprefix('http://')}")}
    envs = {"wrong": {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "not-" + password}}
    wrong, none, in_uri = at_once(*(lambda k=k: kdflow("run", *refused[k], cwd=workdir, env=envs.get(k))
                                    for k in ("wrong", "none", "in_uri")))
    assert wrong.returncode == 2, wrong.stderr[-2000:]
    assert "tracking.uri" in wrong.stderr and "wrong user name or password" in wrong.stderr
    assert "Traceback" not in wrong.stderr and password not in wrong.stderr
    assert not (workdir / ".kdflow" / "soft_targets").exists()  # refused before any work, all three
    assert none.returncode == 2 and "MLFLOW_TRACKING_USERNAME" in none.stderr

    assert in_uri.returncode == 2 and "credentials in the URI" in in_uri.stderr and password not in in_uri.stderr

    creds = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
    ok = kdflow("run", str(path), "--json", cwd=workdir, env=creds)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert password not in ok.stdout and password not in ok.stderr

    # everything the run wrote: the store, the server's artifacts, every param, tag and metric name
    assert files_holding(workdir, password.encode()) == []
    assert files_holding(Path(auth_server["artifacts"]), password.encode()) == []
    os.environ.update(creds)
    try:
        mlflow.set_tracking_uri(url)
        client = MlflowClient()
        runs = client.search_runs([mlflow.get_experiment_by_name("test-digits").experiment_id])
        assert runs
        for run in runs:
            written = [*run.data.params.items(), *run.data.tags.items(), *run.data.metrics]
            assert not any(password in str(item) for item in written)
        versions = client.search_model_versions("name='auth-student'")
        assert versions and not any(password in str(v.tags) for v in versions)
        assert password not in str(client.get_registered_model("auth-student").tags)
    finally:
        for k in creds:
            os.environ.pop(k, None)
