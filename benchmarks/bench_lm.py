"""Per-token soft targets of a causal LM: bytes per token and fidelity at k = 8, 32, 128 and T = 1, 2.

The teacher is the one `workflows/lm-stdlib.yaml` trains (read from that workflow's store; run the
workflow first, or pass `--set storage.root=...` to point at a store that holds it). Its real next-token
distributions on the validation split are stored as kdflow stores them (tasks/shards.py: fp16 top-k
values, int32 ids, float32 tail log-mass, Parquet zstd) and rebuilt three ways:

- exact tail (kdflow): top-k logits + the stored tail log-mass, the tail spread evenly over the V - k
  left-out tokens (what `decode_topk` rebuilds);
- uniform tail, no stored mass: each left-out token given the smallest kept logit (a common guess when
  only the top k are stored);
- buckets (what kdflow's loss sees): the k tokens + one tail bucket, compared with the teacher's own
  k + 1 buckets; zero at T = 1 up to fp16 rounding, the tempered tail's error at T != 1.

The KL columns are mean KL(teacher_T || rebuilt_T) per real token, in nats.

Run from the repository root: ``python benchmarks/bench_lm.py [--set key=value ...]`` (table on stdout).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator import stages
from orchestrator.configs import data_meta, task_for
from orchestrator.spec import load_workflow
from orchestrator.teachers import load_teachers
from orchestrator.workspace import storage_for
from tasks.losses import teacher_buckets
from tasks.shards import decode_rows, encode_rows
from tasks.target_formats import decode_topk

WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "lm-stdlib.yaml"
TOP_KS = (8, 32, 128)
TEMPERATURES = (1.0, 2.0)
ROWS = 48


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--teacher-file", help="a stored teacher (teachers/KEY/model.pt) to use as it is")
    args = ap.parse_args()
    spec = load_workflow(WORKFLOW, args.overrides)
    storage = storage_for(spec)
    task = task_for(spec)
    data = stages.load_data(spec, storage)
    if args.teacher_file:
        t = spec.teachers[0]
        model = task.build_model(t.model, t.params, task.dims(data_meta(data)))
        model.load_state_dict(torch.load(args.teacher_file, map_location="cpu")["state_dict"])
        models = [model.eval()]
    else:
        models = [t.model for t in load_teachers(spec, data, storage)]  # trained first when not in the store
    x, y = data.x["val"][:ROWS], data.y["val"][:ROWS]
    logits = task.teacher_outputs(models, x, "mean_probs")  # [n, S, V] float32
    n, s, vocab = logits.shape
    real = torch.from_numpy(y >= 0).reshape(-1)
    flat = logits.reshape(-1, vocab)[real]
    tokens = n * s
    dense = len(encode_rows(np.arange(n), x, y, logits, "logits", "float16", None)) / tokens
    print(f"teacher: {sum(p.numel() for p in models[0].parameters()):,} params, vocabulary {vocab}, "
          f"{int(real.sum()):,} real tokens of {n} validation rows; dense fp16 logits: {dense:.0f} bytes/token\n")
    print("| k | bytes/token | T | KL exact tail (kdflow) | KL uniform tail, no mass | KL buckets (loss) | "
          "top-k mass |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k in TOP_KS:
        data_bytes = encode_rows(np.arange(n), x, y, logits, "topk", "float16", k)
        rows = decode_rows(data_bytes, "float16")
        values = rows.targets["topk_values"].float().reshape(-1, k)[real]
        ids = rows.targets["topk_indices"].long().reshape(-1, k)[real]
        tail = rows.targets["tail_logmass"].float().reshape(-1)[real]
        exact = decode_topk(values, ids, tail, vocab)
        guess = values[:, -1:].expand(-1, vocab).clone().scatter(-1, ids, values)
        mass = F.softmax(flat, -1).gather(-1, ids).sum(-1).mean()
        for temp in TEMPERATURES:
            log_p = F.log_softmax(flat / temp, -1)
            kl_exact = kl(log_p, F.log_softmax(exact / temp, -1)).mean()
            kl_guess = kl(log_p, F.log_softmax(guess / temp, -1)).mean()
            p_top = log_p.gather(-1, ids)
            p_buckets = torch.cat([p_top, torch.log1p(-p_top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-7))], -1)
            kl_buckets = kl(p_buckets, teacher_buckets(values, tail, vocab, temp)).mean()
            print(f"| {k} | {len(data_bytes) / tokens:.0f} | {temp:g} | {kl_exact:.2e} | {kl_guess:.2e} | "
                  f"{kl_buckets:.2e} | {mass:.4f} |")


if __name__ == "__main__":
    main()
