"""Data as users keep it, end to end, and its lineage in MLflow: a `save_to_disk` folder and a split-folder source
run whole workflows; the run's dataset inputs are read back through the MLflow client and shown by
`kdflow models show`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.test_splits import write_save_to_disk, write_splits

pytestmark = pytest.mark.slow


def run(workdir: Path, **data: object) -> dict:
    from orchestrator.pipeline import run_workflow
    from orchestrator.spec import validate
    from tests.helpers import workflow

    spec = workflow(**{"data": {"features": ["f0", "f1"], **data}, "teacher.train.epochs": 2, "train.epochs": 2,
                       "soft_targets.shards": 1, "registry.model": "splits-student"})
    return run_workflow(validate(spec))


def test_split_folders_run_end_to_end_and_the_run_logs_its_data_as_mlflow_inputs(
        ray_session: None, workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from mlflow import MlflowClient

    from orchestrator.cli import main
    from tasks.kinds.classification.data import load_dataset

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/mlflow.db")
    write_save_to_disk(workdir / "hf")
    hf = run(workdir, source=str(workdir / "hf"))
    assert hf["soft_targets"]["rows"] == 40 + 9 + 11  # every split, as given, in the store
    fingerprint = load_dataset(str(workdir / "hf"), features=["f0", "f1"]).fingerprint

    run_ = MlflowClient().get_run(hf["mlflow"]["run_id"])
    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
              for i in run_.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "test", "soft_targets"}
    for context, split, rows in (("training", "train", 40), ("validation", "validation", 9), ("test", "test", 11)):
        ds = inputs[context]
        assert ds.digest == fingerprint[:32] and json.loads(ds.profile)["num_rows"] == rows
        assert json.loads(ds.profile)["fingerprint"] == fingerprint
        assert json.loads(ds.source)["uri"].endswith(f"hf/{split}")
        assert [c["name"] for c in json.loads(ds.schema)["mlflow_colspec"]] == ["f0", "f1", "label"]
    store = inputs["soft_targets"]
    assert store.digest == hf["soft_targets"]["cache_key"][:32] and json.loads(store.profile)["num_rows"] == 60

    # the registered version's run carries them, and `kdflow models show` prints them
    version = MlflowClient().get_model_version("splits-student", str(hf["registry"]["version"]))
    assert version.run_id == hf["mlflow"]["run_id"]
    capsys.readouterr()
    assert main(["models", "show", "splits-student", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["versions"][-1]["datasets"]
    assert {(d["context"], d["digest"]) for d in shown} == {
        ("training", fingerprint[:32]), ("validation", fingerprint[:32]), ("test", fingerprint[:32]),
        ("soft_targets", hf["soft_targets"]["cache_key"][:32])}
    assert main(["models", "show", "splits-student"]) == 0
    assert "data lineage" in capsys.readouterr().out

    # the same rows as a folder of split files: other files, so another fingerprint and other soft targets
    write_splits(workdir / "files")
    files = run(workdir, source=str(workdir / "files"))
    assert files["soft_targets"]["rows"] == 60 and files["soft_targets"]["cache_key"] != hf["soft_targets"]["cache_key"]
    assert files["student"]["test_accuracy"] == pytest.approx(hf["student"]["test_accuracy"])
