"""orchestrator/tracking.py: MLflow's S3 endpoint is set only while a run needs it, never left behind."""

from __future__ import annotations

import os

import pytest

from orchestrator.tracking import artifact_endpoint
from tasks.storage import Storage


def test_artifact_endpoint_is_scoped_to_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    storage = Storage("s3://bucket/prefix", endpoint_url="http://127.0.0.1:1")
    with artifact_endpoint(storage):
        assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:1"
    assert "MLFLOW_S3_ENDPOINT_URL" not in os.environ
    with pytest.raises(RuntimeError), artifact_endpoint(storage):  # restored when the run fails too
        raise RuntimeError("a stage failed")
    assert "MLFLOW_S3_ENDPOINT_URL" not in os.environ


def test_artifact_endpoint_keeps_the_users_own_value(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://mine:9000")
    with artifact_endpoint(Storage("s3://bucket/prefix", endpoint_url="http://127.0.0.1:1")):
        assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == "http://mine:9000"
    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == "http://mine:9000"
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL")
    with artifact_endpoint(Storage(str(tmp_path))):  # a local root needs no endpoint
        assert "MLFLOW_S3_ENDPOINT_URL" not in os.environ
