"""The soft targets as a run's dataset input name the teachers they came from, a registered one by version."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest


def test_the_store_input_names_a_registered_teacher_by_its_version(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow import MlflowClient

    from orchestrator.lineage import dataset_lines, log_store_input
    from orchestrator.registry import teacher_origins
    from orchestrator.tracking import seed_sqlite_store

    seed_sqlite_store(tmp_path / "mlflow.db")  # the cached empty store: no migrations here
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    client.create_registered_model("t")
    for _ in range(2):
        client.create_model_version("t", source=str(tmp_path), run_id=None)
    client.set_registered_model_alias("t", "champion", "2")
    teachers = [SimpleNamespace(origin="models:/t@champion"), SimpleNamespace(origin="/store/teachers/abc")]
    assert teacher_origins(teachers) == ["models:/t/2", "/store/teachers/abc"]

    experiment = mlflow.create_experiment("lineage", artifact_location=str(tmp_path / "artifacts"))
    manifest = {"key": "5dc5832c08b92db82c0c", "rows": 60, "format": "topk"}
    with mlflow.start_run(experiment_id=experiment) as run:
        log_store_input(manifest, str(tmp_path / "soft_targets" / manifest["key"]), teacher_origins(teachers))
    *_, shown = dataset_lines(client.get_run(run.info.run_id))
    assert shown["context"] == "soft_targets" and shown["digest"] == manifest["key"] and shown["rows"] == 60
    assert shown["teachers"] == "models:/t/2,/store/teachers/abc"
    assert shown["source"].endswith(manifest["key"])
    ds = client.get_run(run.info.run_id).inputs.dataset_inputs[0].dataset
    assert json.loads(ds.profile)["fingerprint"] == manifest["key"]


def test_each_split_and_the_transfer_rows_are_inputs_with_the_fingerprint_as_digest(tmp_path: Path) -> None:
    import mlflow
    import pyarrow.parquet as pq

    from orchestrator.lineage import dataset_lines, log_data_inputs
    from orchestrator.tracking import seed_sqlite_store
    from tasks.kinds.classification.data import load_dataset
    from tests.unit.test_splits import table, write_splits

    paths = write_splits(tmp_path)
    pq.write_table(table(7, seed=9).drop_columns(["label"]), tmp_path / "unlabeled.parquet")
    data = load_dataset("x", features=["f0", "f1"], transfer=str(tmp_path / "unlabeled.parquet"),
                        splits={"train": str(paths["train"]), "dev": str(paths["validation"]),
                                "test": str(paths["test"])})
    seed_sqlite_store(tmp_path / "mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("splits", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=experiment) as run:
        log_data_inputs(data, "unused")
    shown = {d["context"]: d for d in dataset_lines(mlflow.MlflowClient().get_run(run.info.run_id))}
    assert {k: (d["rows"], Path(d["source"]).name) for k, d in shown.items()} == {
        "training": (40, "train.parquet"), "validation": (9, "validation.parquet"), "test": (11, "test.parquet"),
        "transfer": (7, "unlabeled.parquet")}
    assert {d["digest"] for d in shown.values()} == {data.fingerprint[:32]}
