"""Per-token soft targets of a causal LM: bytes per token and fidelity at k = 8, 32, 128 and T = 1, 2.

The teacher is the one `workflows/lm-stdlib.yaml` trains (read from that workflow's store; run the
workflow first, or pass `--set storage.root=...` to point at a store that holds it). Its real next-token
distributions on the validation split are stored as kdflow stores them (tasks/store/shards.py: fp16 top-k
values, int32 ids, float32 tail log-mass, Parquet zstd) and rebuilt three ways:

- exact tail (kdflow): top-k logits + the stored tail log-mass, the tail spread evenly over the V - k
  left-out tokens (what `decode_topk` rebuilds);
- uniform tail, no stored mass: each left-out token given the smallest kept logit (a common guess when
  only the top k are stored);
- buckets (what kdflow's loss sees): the k tokens + one tail bucket, compared with the teacher's own
  k + 1 buckets; zero at T = 1 up to fp16 rounding, the tempered tail's error at T != 1.

The KL columns are mean KL(teacher_T || rebuilt_T) per real token, in nats.

Run from the repository root: ``python benchmarks/bench_lm.py [--set key=value ...]`` (table on stdout).

With ``--throughput`` it measures instead, side by side in one run, on the workflow's teacher and student
(fresh weights: speed does not depend on them) over the standard library corpus at THROUGHPUT_BYTES:

- precompute tokens/s: `SoftTargetStore.precompute` (Ray tasks, one torch thread each, top-32 + tail
  written as Parquet) against a plain `torch.no_grad()` loop over the same rows and teacher at PyTorch's
  default threads, the plain loop measured before and after each precompute (first with fresh Ray
  workers, then with warm ones);
- train tokens/s: the train stage with 1 worker (`tasks.train.fit` through Ray Train, reading the store;
  FitResult.samples_per_s x seq_len, median epoch after the first, training steps only) against a plain
  single-process loop over the same rows, model and objective, both at the machine's cores in threads;
- a worker's peak RSS (`peak_rss_mb` of its epoch metrics) training on 1x and 8x the corpus, holding its
  share (the default under `train.hold_share_mb`) and streaming it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator import stages
from orchestrator.spec import load_workflow
from orchestrator.teachers import load_teachers
from orchestrator.workspace import storage_for
from tasks.kinds.causal_lm.objective import teacher_buckets
from tasks.store.formats import decode_topk
from tasks.store.shards import decode_rows, encode_rows

WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "lm-stdlib.yaml"
TOP_KS = (8, 32, 128)
TEMPERATURES = (1.0, 2.0)
ROWS = 48
THROUGHPUT_BYTES = 100_000  # the 1x corpus (the example reads 400,000)
TRAIN_EPOCHS = 3
BATCH = 16


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--teacher-file", help="a stored teacher (teachers/KEY/model.pt) to use as it is")
    ap.add_argument("--throughput", action="store_true", help="precompute/train tokens/s against plain loops, "
                    "and a worker's peak memory at 1x and 8x the corpus")
    ap.add_argument("--corpus-bytes", type=int, default=THROUGHPUT_BYTES, help="the 1x corpus of --throughput")
    args = ap.parse_args()
    if args.throughput:
        throughput(args.overrides, args.corpus_bytes)
        return
    spec = load_workflow(WORKFLOW, args.overrides)
    storage = storage_for(spec)
    task = spec.kind
    data = stages.load_data(spec, storage)
    if args.teacher_file:
        t = spec.teachers[0]
        model = task.build_model(t.model, t.params, task.dims(task.manifest_meta(data)))
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


# ---------------------------------------------------------------- --throughput


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def corpus(root: str, scale: int, size: int, overrides: list[str]) -> tuple[Any, Any, Any]:
    """The workflow at `scale` x `size` bytes of the corpus, storing under `root`: (spec, storage, data)."""
    spec = load_workflow(WORKFLOW, [*overrides, f"storage.root={root}",
                                    f"data.corpus.max_bytes={size * scale}"])
    storage = storage_for(spec)
    return spec, storage, stages.load_data(spec, storage)


def seeded(task: Any, model: Any, dims: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(0)
    return task.build_model(model.model, model.params, dims)


def store_targets(storage: Any, data: Any, teacher: torch.nn.Module, key: str, task: Any) -> tuple[dict, float]:
    from tasks.store.precompute import Encoding, precompute
    from tasks.store.store import SoftTargetStore

    splits = {s: (data.x[s], data.y[s]) for s in ("train", "val", "test")}
    t0 = time.perf_counter()
    meta = task.manifest_meta(data)
    manifest, _ = precompute(SoftTargetStore(storage), key, [teacher], splits, shards=8, meta=meta,
                             encoding=Encoding(task, "topk", "float16", 32, "mean_probs"),
                             width=task.target_width(task.dims(meta)))
    return manifest, time.perf_counter() - t0


def plain_forward(teacher: torch.nn.Module, x: np.ndarray, threads: int) -> float:
    """Tokens/s of the loop a person writes to get teacher logits: no_grad, batches of 16, nothing stored."""
    torch.set_num_threads(threads)
    teacher.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(x), BATCH):
            teacher(torch.from_numpy(x[i:i + BATCH]).long())
    return x.size / (time.perf_counter() - t0)


def plain_train(storage: Any, manifest: dict, task: Any, student_spec: Any, loss: Any, threads: int) -> float:
    """Tokens/s of a plain single-process loop: the rows in memory, randperm + index, the same objective and
    AdamW as the train stage (median epoch after the first)."""
    from tasks.kinds.causal_lm.targets import teacher_tuple
    from tasks.store.store import SoftTargetStore

    torch.set_num_threads(threads)
    dims = task.dims(manifest)
    rows = SoftTargetStore(storage).read(manifest, "train")
    x, y = rows.x.long(), rows.y.long()
    values, ids, tail = teacher_tuple(rows.targets, dims["seq_len"], dims["vocab_size"])
    model = seeded(task, student_spec, dims)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(TRAIN_EPOCHS):
        order = torch.randperm(len(y), generator=gen)
        t0 = time.perf_counter()
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]
            total, _ = task.objective(model(x[idx]), y[idx], (values[idx], ids[idx], tail[idx]), loss)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
        rates.append(len(order) * dims["seq_len"] / (time.perf_counter() - t0))
    return statistics.median(rates[1:])


def train_stage(storage: Any, manifest: dict, task: Any, student_spec: Any, loss: Any, threads: int,
                epochs: int = TRAIN_EPOCHS, hold: int = 2**30) -> Any:
    """The train stage with one worker, as `kdflow run` fits the student (no schedule/clip, like the plain loop)."""
    from tasks.train.config import FitConfig, OptimizerConfig, Resources
    from tasks.train.ray_train import fit
    from tasks.train.sources import ShardSource

    config = FitConfig(
        log_prefix="student", kind=task, model=student_spec.model, params=student_spec.params,
        dims=task.dims(manifest), seed=0, epochs=epochs, batch_size=BATCH,
        optimizer=OptimizerConfig(name="adamw", lr=3e-3, weight_decay=0.0, momentum=0.9, schedule="constant",
                                  warmup_steps=0, grad_clip=None),
        precision="fp32", loss=loss, data=ShardSource(storage, manifest, "train"),
        val=ShardSource(storage, manifest, "val"), early_stopping=None, checkpoint_every=None,
        checkpoint_interval_s=3600.0, epoch_hook=None,
        resources=Resources(workers=1, use_gpu=False, cpus_per_worker=1.0, gpus_per_worker=0.0, max_failures=0,
                            placement="pack", torch_threads=threads), hold_share_bytes=hold,
        online_teacher=None, after_epochs=None)
    return fit(config, storage=storage, run_name=f"bench-lm-{time.time_ns()}")


def throughput(overrides: list[str], size: int) -> None:
    from orchestrator.configs import machine_cores
    from orchestrator.runtime import ensure_ray
    from tasks.train.config import LossConfig

    t_start = time.perf_counter()
    for attempt in range(3):  # on an overloaded box a raylet can miss Ray's fixed 30 s start-up window
        try:
            ensure_ray()
            break
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            import ray

            ray.shutdown()
    cores = machine_cores()
    threads = torch.get_num_threads()
    root = tempfile.mkdtemp(prefix="kdflow-bench-lm-")
    spec, storage, data = corpus(root, 1, size, overrides)
    task = spec.kind
    dims = task.dims(task.manifest_meta(data))
    teacher = seeded(task, spec.teachers[0], dims)
    loss = LossConfig(kind=spec.distill.loss, temperature=spec.distill.temperature, alpha=spec.distill.alpha,
                      beta=spec.distill.beta)
    x_all = np.concatenate([data.x[s] for s in ("train", "val", "test")])
    tokens = x_all.size
    progress(f"1x corpus: {tokens:,} tokens in {len(x_all)} rows of {dims['seq_len']}; teacher "
             f"{sum(p.numel() for p in teacher.parameters()):,} params")

    # precompute vs a plain no_grad loop, the plain loop right before and after each
    pre: list[tuple[str, float, float]] = []
    before = plain_forward(teacher, x_all, threads)
    manifest = None
    for label, key in (("fresh Ray workers", "bench-a"), ("warm Ray workers", "bench-b")):
        manifest, seconds = store_targets(storage, data, teacher, key, task)
        after = plain_forward(teacher, x_all, threads)
        pre.append((label, tokens / seconds, (before + after) / 2))
        progress(f"precompute ({label}): {tokens / seconds:,.0f} tokens/s; plain {before:,.0f} / {after:,.0f}")
        before = after

    # the train stage with 1 worker vs a plain loop, same threads, the plain loop before and after
    p_before = plain_train(storage, manifest, task, spec.student, loss, cores)
    fitted = train_stage(storage, manifest, task, spec.student, loss, cores)
    p_after = plain_train(storage, manifest, task, spec.student, loss, cores)
    stage_tps = fitted.samples_per_s * dims["seq_len"]
    rss1 = max(h["peak_rss_mb"] for h in fitted.history)
    train_tokens1 = int((data.y["train"] >= 0).sum())
    progress(f"train stage: {stage_tps:,.0f} tokens/s; plain {p_before:,.0f} / {p_after:,.0f}; peak RSS {rss1:.0f} MiB")

    # a worker's peak memory on 8x the corpus (the same student and targets of the same shape)
    spec8, storage8, data8 = corpus(os.path.join(root, "x8"), 8, size, overrides)
    dims8 = task.dims(task.manifest_meta(data8))
    # the student as the teacher of this store: the stored rows (top-32 + tail per token) are the same size
    manifest8, _ = store_targets(storage8, data8, seeded(task, spec8.student, dims8), "bench-x8", task)
    fitted8 = train_stage(storage8, manifest8, task, spec8.student, loss, cores, epochs=1)
    rss8 = max(h["peak_rss_mb"] for h in fitted8.history)
    # the same 8x share streamed (train.hold_share_mb below its stored size): shard by shard, one read ahead
    streamed8 = train_stage(storage8, manifest8, task, spec8.student, loss, cores, epochs=1, hold=0)
    rss8s = max(h["peak_rss_mb"] for h in streamed8.history)
    train_tokens8 = int((data8.y["train"] >= 0).sum())
    load = os.getloadavg()

    print(f"Workflow {WORKFLOW.name}: teacher {spec.teachers[0].params}, student {spec.student.params}, seq_len "
          f"{dims['seq_len']}, vocabulary {dims['vocab_size']}, top-32 fp16 + tail; 1x corpus = "
          f"{size:,} bytes of stdlib source = {tokens:,} token positions ({len(x_all)} rows). "
          f"Plain loops at PyTorch's default {threads} thread(s); {cores} cores.\n")
    print("| stage | kdflow tokens/s | plain loop tokens/s (before/after mean) | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for label, value, base in pre:
        print(f"| precompute, teacher forward + top-k + Parquet write ({label}) | {value:,.0f} | {base:,.0f} "
              f"(no_grad loop) | **{value / base:.2f}** |")
    base = (p_before + p_after) / 2
    print(f"| train stage, 1 worker (`fit`, {cores} torch threads, batch {BATCH}, median epoch after the first) | "
          f"{stage_tps:,.0f} | {base:,.0f} (single process, {cores} threads) | **{stage_tps / base:.2f}** |")
    print("\n| corpus | train tokens | worker peak RSS (MiB) |")
    print("| --- | ---: | ---: |")
    print(f"| 1x ({size:,} bytes) | {train_tokens1:,} | {rss1:.0f} |")
    print(f"| 8x ({size * 8:,} bytes) | {train_tokens8:,} | {rss8:.0f} |")
    print(f"| 8x, streamed (`train.hold_share_mb: 0`) | {train_tokens8:,} | {rss8s:.0f} |")
    print(f"\nGrowth: {rss8 - rss1:.0f} MiB for {train_tokens8 - train_tokens1:,} more training tokens "
          f"({(rss8 - rss1) * 2**20 / max(1, train_tokens8 - train_tokens1):.0f} bytes/token).")
    print(f"Total {time.perf_counter() - t_start:.0f} s; load average at the end "
          f"{', '.join(f'{v:.1f}' for v in load)} on {os.cpu_count()} CPUs.")


if __name__ == "__main__":
    main()
