"""The registered student is safe and servable: no pickle in the model directory, `models:/NAME@champion`
loads in a fresh process and answers in the user's own labels from the user's own columns, and
`mlflow models serve` answers a real HTTP request with the same labels as the student itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BIN, free_port, kdflow, wait_for_http
from tests.helpers import write_workflow

pytestmark = pytest.mark.slow

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits_parquet(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """sklearn's digits with the user's own names: columns px_00..px_63, labels as words."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    d = load_digits()
    cols = [f"px_{i:02d}" for i in range(64)]
    labels = np.array([WORDS[t] for t in d.target])
    table = pa.table({**{c: d.data[:, i] for i, c in enumerate(cols)}, "digit": labels})
    pq.write_table(table, path)
    return cols, d.data, labels


def test_registered_student_is_pickle_free_loads_fresh_and_serves_http(workdir: Path) -> None:
    import mlflow
    import requests

    from tasks.kinds.classification.serving import holds_pickle, load_module

    cols, x, labels = digits_parquet(workdir / "digits.parquet")
    path = write_workflow(workdir, **{"data.source": "digits.parquet", "data.label": "digit",
                                      "registry.model": "served-student",
                                      "registry.promote": {"gates": {"retention": ">= 0.5"}}})
    proc = kdflow("run", str(path), "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["registry"]["aliases"] == ["challenger", "champion"]
    uri = result["mlflow"]["tracking_uri"]
    mlflow.set_tracking_uri(uri)

    local = Path(mlflow.artifacts.download_artifacts("models:/served-student@champion"))
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert holds_pickle(local) == [], files
    assert not any(f.endswith((".pkl", ".pt", ".pth")) for f in files), files
    assert any(f.endswith("weights.safetensors") for f in files), files
    mlmodel = (local / "MLmodel").read_text()
    assert "px_00" in mlmodel and "px_63" in mlmodel  # the signature names the user's columns

    # the student itself (rebuilt from safetensors, no pyfunc) on the first rows
    module = load_module("models:/served-student@champion")
    import torch

    with torch.no_grad():
        own = np.array(sorted(set(labels)))[module(torch.tensor(x[:40], dtype=torch.float32)).argmax(-1).numpy()]
    assert (own == labels[:40]).mean() > 0.6

    # a fresh process, as a consumer of the registry would load it
    code = ("import json, sys, mlflow, pandas as pd\n"
            "rows = json.load(sys.stdin)\n"
            "m = mlflow.pyfunc.load_model('models:/served-student@champion')\n"
            "print(json.dumps([str(v) for v in m.predict(pd.DataFrame(rows['data'], columns=rows['columns']))]))\n")
    # `mlflow models serve` execs `uvicorn` from PATH: the venv's bin, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    port = free_port()
    # the server boots while the fresh process loads the model (both only read the registry): their
    # interpreter starts and imports overlap instead of adding up
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", "models:/served-student@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                              env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        fresh = subprocess.run([sys.executable, "-c", code], check=False, timeout=300, capture_output=True, text=True,
                               input=json.dumps({"columns": cols, "data": x[:40].tolist()}), env=env, cwd=workdir)
        assert fresh.returncode == 0, fresh.stderr[-3000:]
        assert json.loads(fresh.stdout.strip().splitlines()[-1]) == own.tolist()

        wait_for_http(f"http://127.0.0.1:{port}/ping", timeout=180, proc=server)
        # two rows, columns in another order than training: the names decide, not the positions
        order = cols[::-1]
        rows = [[float(x[i, cols.index(c)]) for c in order] for i in (0, 1)]
        reply = requests.post(f"http://127.0.0.1:{port}/invocations", timeout=60,
                              json={"dataframe_split": {"columns": order, "data": rows}})
        assert reply.status_code == 200, reply.text
        assert reply.json()["predictions"] == own[:2].tolist()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
        server.wait(timeout=30)

    # the registered student as the next workflow's teacher: rebuilt from safetensors, lineage names it
    path = write_workflow(workdir, "wf2.yaml", **{
        "data.source": "digits.parquet", "data.label": "digit", "registry.model": "served-student-2",
        "teacher": {"model": "models:/served-student@champion"}, "train.epochs": 2})
    second = kdflow("run", str(path), "--json", cwd=workdir)
    assert second.returncode == 0, second.stderr[-3000:]
    out = json.loads(second.stdout)
    assert out["teacher"]["test_accuracy"] > 0.6
    tags = mlflow.MlflowClient().get_model_version("served-student-2", "1").tags
    assert tags["kdflow.teacher.registry"] == "served-student/1"
