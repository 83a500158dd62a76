"""The causal LM's soft targets on the session's Ray: a precompute killed mid-way resumes computing only the
missing shards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.kinds.causal_lm.data import Document, pack
from tasks.kinds.causal_lm.models import build_lm
from tests.helpers import precompute
from tests.unit.test_lm import KIND, TEXT, tokenizer

# The job a user's run would be, its own process joined to the session's Ray (as a `kdflow run` in a Ray job),
# precomputing one shard at a time. Its teacher SIGKILLs the job, and then its own worker, as the fourth
# shard's forward starts: exactly three shards are whole when the job dies.
LM_PRECOMPUTE_JOB = """
import glob
import os
import signal
import sys

import numpy as np
import ray
import torch

from tasks.kinds.causal_lm import CausalLM
from tasks.kinds.causal_lm.models import build_lm
from tasks.store.store import SoftTargetStore
from tasks.storage import Storage
from tests.helpers import precompute
from tests.integration.test_lm_store import KILL_AFTER, LM_PRECOMPUTE_ARGS, TINY_TEACHER


class KilledAfter(torch.nn.Module):
    def __init__(self, model, entry, driver):
        super().__init__()
        self.model, self.entry, self.driver = model, entry, driver

    def forward(self, x):
        if len(glob.glob(os.path.join(self.entry, "*", "*.parquet"))) >= KILL_AFTER:
            os.kill(self.driver, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        return self.model(x)


ray.init(address=sys.argv[1], logging_level="WARNING")
rows = np.load("rows.npz")
splits = {s: (rows[f"{s}_x"], rows[f"{s}_y"]) for s in ("train", "val", "test")}
teacher = build_lm("llama", TINY_TEACHER, {"vocab_size": int(rows["vocab"]), "seq_len": 16})
teacher.load_state_dict(torch.load("teacher.pt"))
store = SoftTargetStore(Storage(".kdflow"))
precompute(store, "killed", [KilledAfter(teacher, store.dir("killed"), os.getpid())], splits,
                 kind=CausalLM(), **LM_PRECOMPUTE_ARGS)
"""


TINY_TEACHER = {"layers": 1, "width": 16, "heads": 2, "ffn": 32}


# 6 train shards + 1 val + 1 test, one at a time so that the kill lands between two shards
LM_PRECOMPUTE_ARGS = {"shards": 6, "format": "topk", "dtype": "float16", "top_k": 8, "ensemble": "mean_probs",
                      "meta": {}, "workers": 1, "max_retries": 0}


KILL_AFTER = 3


@pytest.mark.slow
def test_killed_lm_precompute_resumes_computing_only_the_missing_shards(ray_session: None, workdir: Path) -> None:
    from tasks.storage import Storage
    from tasks.store.store import SoftTargetStore
    from tests.conftest import REPO, session_ray_address

    tok = tokenizer()
    x, y = pack([Document(t) for t in TEXT * 2], tok, seq_len=16)
    cut = [len(x) - 8, len(x) - 4]
    np.savez("rows.npz", train_x=x[:cut[0]], train_y=y[:cut[0]], val_x=x[cut[0]:cut[1]], val_y=y[cut[0]:cut[1]],
             test_x=x[cut[1]:], test_y=y[cut[1]:], vocab=tok.get_vocab_size())
    torch.manual_seed(0)
    teacher = build_lm("llama", TINY_TEACHER, {"vocab_size": tok.get_vocab_size(), "seq_len": 16}).eval()
    torch.save(teacher.state_dict(), "teacher.pt")
    (workdir / "job.py").write_text(LM_PRECOMPUTE_JOB)
    job = subprocess.run([sys.executable, "job.py", session_ray_address()], check=False, cwd=workdir,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "token"})
    assert job.returncode == -9, job.stderr[-3000:]  # killed, not finished or failed

    entry = workdir / ".kdflow" / "soft_targets" / "killed"
    kept = {p: p.stat().st_mtime_ns for p in entry.rglob("*.parquet")}
    assert len(kept) == KILL_AFTER and not (entry / "manifest.json").exists()
    (entry / "val").mkdir()
    (entry / "val" / "part-00000-of-00001.parquet.tmp-0badf00d").write_bytes(b"half a shard")  # a writer killed mid-shard

    splits = {"train": (x[:cut[0]], y[:cut[0]]), "val": (x[cut[0]:cut[1]], y[cut[0]:cut[1]]),
              "test": (x[cut[1]:], y[cut[1]:])}
    store = SoftTargetStore(Storage(".kdflow"))
    seen: list[tuple[str, int, bool]] = []
    resumed, stats = precompute(store, "killed", [teacher], splits, kind=KIND, **LM_PRECOMPUTE_ARGS,
                                      on_shard=lambda split, i, n, reused: seen.append((split, i, reused)))
    assert stats.computed_shards == 8 - KILL_AFTER
    assert sorted((s, i) for s, i, reused in seen if reused) == [("train", i) for i in range(KILL_AFTER)]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # the whole shards were not rewritten
    assert stats.forward_rows == sum(s["rows"] for sp in ("train", "val", "test") for s in resumed["splits"][sp]["shards"]
                                     if entry / s["path"] not in kept)
    assert not [p for p in entry.rglob("*") if ".tmp-" in p.name]

    # the resumed entry is the one an uninterrupted precompute writes: the same shards, byte for byte
    whole, _ = precompute(store, "whole", [teacher], splits, kind=KIND, **LM_PRECOMPUTE_ARGS)
    shards = {k: [(s["path"], s["rows"], s["sha256"]) for sp in ("train", "val", "test") for s in m["splits"][sp]["shards"]]
              for k, m in (("resumed", resumed), ("whole", whole))}
    assert shards["resumed"] == shards["whole"]
    for split in ("train", "val", "test"):
        a, b = store.read(resumed, split), store.read(whole, split)
        assert torch.equal(a.targets["topk_indices"], b.targets["topk_indices"])
        assert torch.equal(a.targets["topk_values"], b.targets["topk_values"])
