"""A causal-LM workflow run by the `kdflow` command with two data-parallel workers, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import kdflow
from tests.unit.test_lm import lm_workflow


@pytest.mark.slow
def test_lm_workflow_runs_with_two_workers(workdir: Path, s3_bucket: str) -> None:
    """The whole LM path once: stored on the loopback S3 server (tokenizer, teacher, per-token shards)."""
    raw = lm_workflow(source="python-stdlib", corpus={"max_bytes": 30000}, split={"val": 0.1, "test": 0.1})
    raw["storage"] = {"root": f"s3://{s3_bucket}/lm"}
    # one shard per split: each shard is a Ray task in a fresh worker process (torch, tokenizer and S3 client
    # loaded again), and the default 4 train shards put six of those on two cores at once; sharding a split
    # and resuming a half-written entry are covered above (test_killed_lm_precompute_resumes_...)
    raw["soft_targets"]["shards"] = 1
    raw.update(train={"epochs": 2, "batch_size": 8, "workers": 2,
                      "optimizer": {"schedule": "cosine", "warmup_steps": 2, "grad_clip": 1.0}})
    # one teacher epoch and no baseline student (the chat test has one): each Ray Train fit with two workers
    # starts a worker group, which costs tens of seconds on two cores
    raw["teacher"]["train"] = {"epochs": 1, "batch_size": 8}
    raw["registry"] = {"model": "t-lm-student", "promote": {"alias": "champion",
                                                            "gates": {"perplexity_ratio": "<= 1000"}}}
    (workdir / "lm.yaml").write_text(yaml.safe_dump(raw))
    proc = kdflow("run", "lm.yaml", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    s, t = result["student"], result["teacher"]
    assert t["trained"] and 1 < t["perplexity"] < 270
    assert 1 < s["perplexity"] < 270
    assert "Warning" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert s["tokens_per_s"] > 0 and len(s["nodes"]) == 2  # one Ray node id per rank: two workers ran
    st = result["soft_targets"]
    assert st["format"] == "topk" and st["top_k"] == 8 and st["seq_len"] == 16 and st["bytes_per_token"] > 0
    from tasks.storage import Storage

    store = Storage(f"s3://{s3_bucket}/lm")
    entry = store.path("soft_targets", st["cache_key"])
    assert store.exists(store.path("soft_targets", st["cache_key"], "manifest.json"))
    assert any(p.endswith(".parquet") for p in store.ls(store.path("soft_targets", st["cache_key"], "train"))), entry
    assert store.ls(store.path("tokenizers"))  # the BPE trained on the training split is kept with the cache
    # registered with its tokenizer, promoted by the perplexity gate, and it generates from models:/NAME@ALIAS
    assert "champion" in result["registry"]["aliases"]
    import mlflow
    import pandas as pd

    from tasks.kinds.causal_lm.serving import generate, load_lm

    mlflow.set_tracking_uri(result["mlflow"]["tracking_uri"])
    served = mlflow.pyfunc.load_model("models:/t-lm-student@champion")
    out = served.predict(pd.DataFrame({"prompt": ["def main("]}), params={"max_new_tokens": 10})
    assert list(out.columns) == ["completion"] and len(out) == 1
    model, tok = load_lm("models:/t-lm-student@champion")
    (row,) = generate(model, tok, ["def main("], 10)
    assert len(row["token_ids"]) == 10 and row["completion"] == out["completion"][0]
    assert tok.eos_token == "<|endoftext|>" and len(tok) == model.config.vocab_size
