"""A registered causal LM answers as MLflow serves LLMs: `predict(["def main("])`, a DataFrame with a `prompt`
column and chat requests (conversations rendered with the stored template), generation parameters as MLflow
inference params; `mlflow models serve` answers /invocations with each form, the same as the pyfunc."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from tasks.kinds.causal_lm.data import EOS
from tests.conftest import BIN, free_port, wait_for_http
from tests.unit.test_chat import TEMPLATE

pytestmark = pytest.mark.slow

CHAT = [{"role": "system", "content": "Answer with the number."}, {"role": "user", "content": "1 + 2 = ?"}]


def test_served_lm_answers_prompts_a_prompt_column_and_chat_requests(workdir: Path) -> None:
    import mlflow
    import requests
    import torch

    from tasks.kinds.causal_lm.data import train_bpe
    from tasks.kinds.causal_lm.models import build_lm
    from tasks.kinds.causal_lm.serving import log_lm_pyfunc

    tok = train_bpe(["def main():\n    return 1 + 2\n" * 4, "<|user|>\n1 + 2 = ?\n<|assistant|>\n3\n"], 290)
    torch.manual_seed(0)
    model = build_lm("llama", {"layers": 1, "width": 16, "heads": 2, "ffn": 32},
                     {"vocab_size": tok.get_vocab_size(), "seq_len": 64})
    uri_db = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri_db)
    with mlflow.start_run():
        uri = log_lm_pyfunc(model, tok, pip_requirements=["transformers"], chat_template=TEMPLATE)

    # the server boots while this process loads the model and answers (both only read the store)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri_db, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    port = free_port()
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env=env, cwd=workdir,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        served = mlflow.pyfunc.load_model(uri)
        params = {"max_new_tokens": 5}
        listed = served.predict(["def main(", "x = "], params=params)  # a plain list: the first thing a user tries
        assert list(listed.columns) == ["completion"] and len(listed) == 2
        framed = served.predict(pd.DataFrame({"prompt": ["def main("]}), params=params)
        assert framed["completion"][0] == listed["completion"][0]
        chat = served.predict([CHAT], params={"max_new_tokens": 4})
        # rendered with the stored template and the generation prompt, the answer cut at EOS
        rendered = "".join(f"<|{m['role']}|>\n{m['content']}{EOS}\n" for m in CHAT) + "<|assistant|>\n"
        plain = served.predict([rendered], params={"max_new_tokens": 4})["completion"][0]
        assert len(chat) == 1 and chat["completion"][0] == plain.split(EOS)[0]
        sampled = served.predict(["def main("], params={"max_new_tokens": 5, "temperature": 2.0, "top_p": 0.9})
        assert len(sampled) == 1
        wait_for_http(f"http://127.0.0.1:{port}/ping", timeout=180, proc=server)

        def post(body: dict) -> list:
            reply = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)
            assert reply.status_code == 200, reply.text
            return [row["completion"] for row in reply.json()["predictions"]]

        assert post({"inputs": ["def main(", "x = "], "params": params}) == listed["completion"].tolist()
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
