"""orchestrator/tracking.py: MLflow's S3 endpoint is set only while a run needs it, never left behind; a new
embedded store is copied from an empty one instead of migrated."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from orchestrator.spec import Workflow, validate
from orchestrator.tracking import artifact_endpoint, connect
from tasks.storage import Storage
from tests.helpers import workflow


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


def _store(root: Path) -> tuple[Workflow, Storage]:
    return validate(workflow(**{"storage.root": str(root)})), Storage(str(root))


def test_a_new_embedded_store_is_a_copy_of_an_empty_one_built_once(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    """MLflow's migrations run once per MLflow version (the cache's template), not once per new store."""
    import mlflow

    cache = tmp_path / "cache"
    monkeypatch.setenv("KDFLOW_CACHE_DIR", str(cache))
    spec, storage = _store(tmp_path / "a")
    connect(spec, storage)
    (template,) = cache.glob("mlflow-*-empty.db")
    assert mlflow.__version__ in template.name
    with sqlite3.connect(template) as conn:  # the template holds no experiment: each store makes its own
        assert conn.execute("SELECT COUNT(*) FROM experiments").fetchone() == (0,)
        conn.execute("CREATE TABLE probe (x INTEGER)")  # to see that the next store is a copy of it
    conn.close()

    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # which MLflow sets beside its own tracking URI
    spec, storage = _store(tmp_path / "b")
    uri = connect(spec, storage)
    db = tmp_path / "b" / "mlflow.db"
    assert uri == f"sqlite:///{db}"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'probe'").fetchone() == ("probe",)
    conn.close()
    # the copy is a working store of its own: its experiments point into its own folder, runs log to it
    assert mlflow.get_experiment("0").name == "Default"
    experiment = mlflow.get_experiment_by_name(spec.experiment)
    assert experiment.artifact_location == (tmp_path / "b" / "mlartifacts").as_uri()
    with mlflow.start_run() as run:
        mlflow.log_metric("m", 1.5)
    assert mlflow.get_run(run.info.run_id).data.metrics == {"m": 1.5}
    assert not list((tmp_path / "b").glob("*.part"))


def test_a_cache_that_cannot_be_written_leaves_the_store_to_mlflow(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    import mlflow

    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("KDFLOW_CACHE_DIR", str(tmp_path / "not-a-folder"))
    spec, storage = _store(tmp_path / "a")
    connect(spec, storage)
    assert mlflow.get_experiment_by_name(spec.experiment) is not None
    assert mlflow.get_experiment("0").artifact_location.startswith(str(Path.cwd()))
