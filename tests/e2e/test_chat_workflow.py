"""A small chat Parquet set distilled end to end by the `kdflow` command (the template from a tokenizer
directory, sampled soft targets on the assistant's tokens only), and the registered student served as MLflow
serves LLMs: `predict(["def main("])`, a DataFrame with a `prompt` column and chat requests rendered with the
stored template, generation parameters as inference params; `mlflow models serve` answers /invocations with
each form, as the pyfunc does, and a malformed conversation with a 400."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tasks.kinds.causal_lm.data import EOS
from tests.conftest import BIN, free_port, kdflow, wait_for_http
from tests.unit.test_chat import arithmetic, tokenizer_dir, write_chat
from tests.unit.test_lm import lm_workflow

pytestmark = pytest.mark.slow

CHAT = [{"role": "system", "content": "Answer with the number."}, {"role": "user", "content": "1 + 2 = ?"}]


def run_chat_workflow(workdir: Path) -> dict:
    raw = lm_workflow(source=write_chat(workdir / "chat.parquet", arithmetic(40)), seq_len=96,
                      tokenizer={"path": tokenizer_dir(workdir / "tok")}, split={"val": 0.1, "test": 0.1})
    raw["soft_targets"] = {"format": "sampled", "samples": 12, "shards": 1}
    raw["teacher"]["train"] = {"epochs": 1, "batch_size": 8}
    raw["distill"]["baseline"] = True  # the no-KD student beside it, in the report (one more 1-worker fit)
    raw.update(train={"epochs": 1, "batch_size": 8, "workers": 1},
               registry={"model": "t-chat", "promote": {"alias": "champion", "gates": {"perplexity_ratio": "<= 1000"}}})
    (workdir / "chat.yaml").write_text(yaml.safe_dump(raw))
    proc = kdflow("run", "chat.yaml", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a successful run prints nothing that looks like an error (MLflow's colour warning about predict's type
    # hints came with every LM registration)
    assert "Warning" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_stored_targets(workdir: Path, result: dict) -> None:
    """Per token, 12 draws where the assistant speaks and nothing stored elsewhere."""
    from tasks.storage import Storage
    from tasks.store.store import SoftTargetStore

    st = result["soft_targets"]
    assert st["format"] == "sampled" and st["samples"] == 12 and st["bytes_per_token"] > 0
    store = SoftTargetStore(Storage(str(workdir / ".kdflow")))
    manifest = store.manifest(st["cache_key"])
    assert manifest["chat_template"] and manifest["samples"] == 12
    rows = store.read(manifest, "train")
    draws = rows.targets["sample_counts"].reshape(len(rows), 96, -1).sum(-1)
    assert torch.equal(draws, torch.where(rows.y >= 0, 12, 0).to(draws.dtype))
    assert 0 < int((rows.y >= 0).sum()) < rows.y.numel() // 4  # the assistant's share of the tokens


def test_chat_parquet_runs_end_to_end_and_the_student_serves_every_request_form(workdir: Path) -> None:
    import mlflow
    import requests

    from tasks.kinds.causal_lm.generation import GenerationParams, Prompt, generate_one
    from tasks.kinds.causal_lm.serving import load_lm

    result = run_chat_workflow(workdir)
    check_stored_targets(workdir, result)
    assert "champion" in result["registry"]["aliases"] and result["student"]["perplexity"] > 1
    assert 1 < result["student"]["baseline_perplexity"] < 1e4 and "baseline_agreement" in result["student"]
    uri_db = result["mlflow"]["tracking_uri"]
    mlflow.set_tracking_uri(uri_db)
    assert mlflow.MlflowClient().get_model_version("t-chat", "1").tags["kdflow.chat_template"]
    uri = "models:/t-chat@champion"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri_db, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    port = free_port()
    # the server boots while this process loads the model and answers (both only read the registry)
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env=env, cwd=workdir,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        served = mlflow.pyfunc.load_model(uri)
        params = {"max_new_tokens": 5}
        listed = served.predict(["def main(", "1 + "], params=params)  # a plain list: the first thing a user tries
        assert list(listed.columns) == ["completion"] and len(listed) == 2
        framed = served.predict(pd.DataFrame({"prompt": ["def main("]}), params=params)
        assert framed["completion"][0] == listed["completion"][0]
        chat = served.predict([CHAT], params={"max_new_tokens": 4})
        # rendered with the stored template (the tokenizer directory's) and the generation prompt; ends at EOS
        model, tok = load_lm(uri)
        rendered = "".join(f"<|{m['role']}|>\n{m['content']}{EOS}\n" for m in CHAT) + "<|assistant|>\n"
        assert tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == rendered
        answer = generate_one(model, tok, Prompt(rendered, chat=True), GenerationParams(max_new_tokens=4))
        assert len(chat) == 1 and chat["completion"][0] == tok.decode(answer) and EOS not in chat["completion"][0]
        assert len(served.predict(["1 + "], params={"max_new_tokens": 5, "temperature": 2.0, "top_p": 0.9})) == 1
        wait_for_http(f"http://127.0.0.1:{port}/ping", timeout=180, proc=server)

        def post(body: dict) -> list:
            reply = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)
            assert reply.status_code == 200, reply.text
            return [row["completion"] for row in reply.json()["predictions"]]

        assert post({"inputs": ["def main(", "1 + "], "params": params}) == listed["completion"].tolist()
        assert post({"dataframe_split": {"columns": ["prompt"], "data": [["def main("]]},
                     "params": params}) == framed["completion"].tolist()
        assert post({"inputs": [CHAT], "params": {"max_new_tokens": 4}}) == chat["completion"].tolist()
        bad = requests.post(f"http://127.0.0.1:{port}/invocations", timeout=60,
                            json={"inputs": [[{"role": "bot", "content": "hi"}]]})
        assert bad.status_code == 400 and "unknown role" in bad.text
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
        server.wait(timeout=30)
