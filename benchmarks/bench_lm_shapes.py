"""Causal-LM throughput at realistic shapes, side by side in one run: kdflow's precompute against a plain
transformers `no_grad` loop plus the same encoding and write, and kdflow's train stage against a plain PyTorch
loop, at a given vocabulary, sequence length, teacher and student (random token rows: speed does not depend on
the text).

- precompute: `tasks.store.precompute.precompute` (a Ray task per shard, the kind's forward, the stored format
  encoded and written as Parquet) against a loop over the same rows: `model(ids).logits` under `no_grad` at
  batch 16, `encode_rows` in the same format, the bytes written to a file; the plain loop measured before and
  after;
- train: the train stage with one worker (`tasks.train.ray_train.fit`, reading the store) against a plain
  single-process loop over the same rows, model, objective and AdamW (benchmarks/bench_lm.py's, median epoch
  after the first), the plain loop before and after.

The goal (issue 27): >= 0.9 for both at vocabulary 8k and 32k, sequence 512, a 20-50M teacher, on an otherwise
idle machine:

    python benchmarks/bench_lm_shapes.py --vocab 8192 32768 --seq 512 --rows 256 \\
        --teacher 8,512,8,1536 --student 4,256,4,768 --format sampled --samples 12

`--tiny` runs the same code at toy sizes (a check that it works on a shared machine; its ratios mean little).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_lm import BATCH, plain_train, progress, train_stage
from tasks.kinds.causal_lm import CausalLM
from tasks.kinds.causal_lm.data import TokenRows
from tasks.storage import Storage
from tasks.store.shards import encode_rows

KIND = CausalLM()


def shape(text: str) -> dict[str, int]:
    layers, width, heads, ffn = (int(v) for v in text.split(","))
    return {"layers": layers, "width": width, "heads": heads, "ffn": ffn}


def rows(vocab: int, seq: int, n: int) -> TokenRows:
    """Random token rows split 8:1:1 (every position a target)."""
    gen = np.random.default_rng(0)
    x = gen.integers(0, vocab, size=(n, seq + 1))
    cut = [int(n * 0.8), int(n * 0.9)]
    parts = {"train": x[:cut[0]], "val": x[cut[0]:cut[1]], "test": x[cut[1]:]}
    xs = {k: np.ascontiguousarray(v[:, :-1]) for k, v in parts.items()}
    ys = {k: np.ascontiguousarray(v[:, 1:]) for k, v in parts.items()}
    return TokenRows(arrays=(xs, ys), fingerprint=f"bench-{vocab}-{seq}-{n}", labeled_fingerprint="", tokenizer=None,
                     tokenizer_hash="", vocab_size=vocab, seq_len=seq, documents={k: len(v) for k, v in xs.items()})


def plain_precompute(teacher: torch.nn.Module, data: TokenRows, fmt: str, kept: int | None, folder: str) -> float:
    """Tokens/s of a person's loop: transformers' forward under no_grad, the same encoding, the bytes written."""
    lm = teacher.lm.eval()
    tokens, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for split in ("train", "val", "test"):
            x, y = data.x[split], data.y[split]
            for i in range(0, len(x), BATCH):
                logits = lm(torch.from_numpy(x[i:i + BATCH]).long()).logits.float()
                blob = encode_rows(np.arange(i, i + len(logits)), x[i:i + BATCH], y[i:i + BATCH], logits, fmt,
                                   "float16", kept)
                Path(folder, f"{split}-{i}.parquet").write_bytes(blob)
                tokens += x[i:i + BATCH].size
    return tokens / (time.perf_counter() - t0)


def kdflow_precompute(storage: Storage, data: TokenRows, teacher: torch.nn.Module, fmt: str, kept: int | None,
                      key: str) -> tuple[dict[str, Any], float]:
    from tasks.store.precompute import Encoding, precompute
    from tasks.store.store import SoftTargetStore

    splits = {s: (data.x[s], data.y[s]) for s in ("train", "val", "test")}
    meta = KIND.manifest_meta(data)
    t0 = time.perf_counter()
    manifest, _ = precompute(SoftTargetStore(storage), key, [teacher], splits, shards=4, meta=meta,
                             encoding=Encoding(KIND, fmt, "float16", kept, "mean_probs"),
                             width=data.vocab_size)
    tokens = sum(data.x[s].size for s in splits)
    return manifest, tokens / (time.perf_counter() - t0)


def one_shape(vocab: int, args: argparse.Namespace, root: str) -> list[str]:
    from orchestrator.configs import machine_cores
    from tasks.sections import ModelSpec
    from tasks.train.config import LossConfig

    data = rows(vocab, args.seq, args.rows)
    dims = {"vocab_size": vocab, "seq_len": args.seq}
    torch.manual_seed(0)
    teacher = KIND.build_model("llama", shape(args.teacher), dims).eval()
    student = ModelSpec(model="llama", params=shape(args.student))
    params = sum(p.numel() for p in teacher.parameters())
    kept = args.samples if args.format == "sampled" else args.top_k if args.format == "topk" else None
    storage = Storage(os.path.join(root, str(vocab)))
    plain_dir = tempfile.mkdtemp(dir=root)
    before = plain_precompute(teacher, data, args.format, kept, plain_dir)
    manifest, mine = kdflow_precompute(storage, data, teacher, args.format, kept, f"shapes-{vocab}")
    after = plain_precompute(teacher, data, args.format, kept, plain_dir)
    progress(f"V={vocab}: precompute {mine:,.0f} tokens/s; plain {before:,.0f} / {after:,.0f}")
    loss = LossConfig(kind="kl", temperature=1.0, alpha=0.5, beta=0.5)
    cores = machine_cores()
    p_before = plain_train(storage, manifest, KIND, student, loss, cores)
    stage = train_stage(storage, manifest, KIND, student, loss, cores).samples_per_s * args.seq
    p_after = plain_train(storage, manifest, KIND, student, loss, cores)
    progress(f"V={vocab}: train {stage:,.0f} tokens/s; plain {p_before:,.0f} / {p_after:,.0f}")
    pre_base, train_base = (before + after) / 2, (p_before + p_after) / 2
    return [(f"| {vocab} | {args.seq} | {params / 1e6:.1f}M | precompute ({args.format}) | {mine:,.0f} | "
            f"{pre_base:,.0f} | **{mine / pre_base:.2f}** |"),
            (f"| {vocab} | {args.seq} | {params / 1e6:.1f}M | train stage, 1 worker | {stage:,.0f} | {train_base:,.0f} | "
            f"**{stage / train_base:.2f}** |")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--teacher", default="8,512,8,1536", help="layers,width,heads,ffn (llama)")
    ap.add_argument("--student", default="4,256,4,768")
    ap.add_argument("--format", choices=("logits", "topk", "sampled"), default="sampled")
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--tiny", action="store_true", help="toy sizes: a check that the script runs")
    args = ap.parse_args()
    if args.tiny:
        args.vocab, args.seq, args.rows, args.teacher, args.student = [512], 64, 80, "2,64,4,128", "1,32,4,64"
    from orchestrator.runtime import ensure_ray

    ensure_ray()
    t0 = time.perf_counter()
    root = tempfile.mkdtemp(prefix="kdflow-bench-shapes-")
    lines = [("| vocabulary | seq | teacher | stage | kdflow tokens/s | plain loop tokens/s (before/after mean) | "
             "ratio |"), "| ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for vocab in args.vocab:
        lines += one_shape(vocab, args, root)
    print("\n".join(lines))
    load = os.getloadavg()
    print(f"\n{time.perf_counter() - t0:.0f} s; student {args.student}; load average at the end "
          f"{', '.join(f'{v:.1f}' for v in load)} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
