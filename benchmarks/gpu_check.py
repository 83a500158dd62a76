"""GPU check: kdflow's train step (tasks/train/step.py `train_epoch`, the one loop's inner loop, with the task
kind's batch and objective) against a plain PyTorch loop on the same device, for a classifier and a
causal LM, in bf16 autocast. Prints one table: rows/s or tokens/s of each, their ratio, peak device memory.

Without a CUDA device it says so and exits 0. `--device cpu` runs the same on the CPU (a smoke check of
the script itself; small sizes). Fits in well under 5 minutes on one GPU.

Run from the repository root: ``python benchmarks/gpu_check.py [--device cpu]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.kinds import kind_for
from tasks.store.formats import encode_topk
from tasks.store.shards import TargetBatch
from tasks.train.config import LossConfig
from tasks.train.step import autocast, train_epoch


def timed(device: torch.device, fn) -> tuple[float, int]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter() - t0, int(torch.cuda.max_memory_allocated(device))
    return time.perf_counter() - t0, 0


def classifier(device: torch.device, rows: int, precision: str) -> tuple[float, float, int, int]:
    task = kind_for("classification")
    dims = {"num_features": 256, "num_classes": 100}
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(rows, 256, generator=gen), torch.randint(0, 100, (rows,), generator=gen)
    logits = torch.randn(rows, 100, generator=gen) * 3
    batch = TargetBatch(torch.arange(rows), x, y, {"logits": logits.half()})
    loss = LossConfig("kl", 4.0, 0.7, 0.5)

    def kdflow() -> None:
        torch.manual_seed(0)
        model = task.build_model("mlp", {"hidden": [1024, 1024]}, dims).to(device)
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        share = task.place(batch, dims, device)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        train_epoch(task, model, opt, scaler, share, torch.arange(rows, device=share.rows_device), 512, loss, precision)

    def plain() -> None:
        torch.manual_seed(0)
        model = task.build_model("mlp", {"hidden": [1024, 1024]}, dims).to(device)
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        xd, yd, td = x.to(device), y.to(device), logits.to(device)
        for s in range(0, rows, 512):
            with autocast(device, precision):
                out = model(xd[s:s + 512])
            out = out.float()
            kd = F.kl_div(F.log_softmax(out / 4, -1), F.log_softmax(td[s:s + 512] / 4, -1), log_target=True,
                          reduction="batchmean") * 16
            total = 0.7 * kd + 0.3 * F.cross_entropy(out, yd[s:s + 512])
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()

    kdflow()  # warm-up (kernels, allocator)
    t_k, m_k = timed(device, kdflow)
    t_p, m_p = timed(device, plain)
    return rows / t_k, rows / t_p, m_k, m_p


def causal_lm(device: torch.device, rows: int, seq: int, params: dict, precision: str) -> tuple[float, float, int, int]:
    task = kind_for("causal_lm")
    vocab, k = 512, 32
    dims = {"vocab_size": vocab, "seq_len": seq}
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (rows, seq), generator=gen)
    y = torch.roll(x, -1, 1)
    y[:, -1] = -1
    teacher = torch.randn(rows * seq, vocab, generator=gen) * 3
    values, ids, tail = encode_topk(teacher, k)
    batch = TargetBatch(torch.arange(rows), x.int(), y, {"topk_values": values.half().reshape(rows, -1),
                                                         "topk_indices": ids.reshape(rows, -1),
                                                         "tail_logmass": tail.reshape(rows, -1)})
    loss = LossConfig("kl", 1.0, 0.5, 0.5)
    bs = 16

    def kdflow() -> None:
        torch.manual_seed(0)
        model = task.build_model("llama", params, dims).to(device)
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        share = task.place(batch, dims, device)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        train_epoch(task, model, opt, scaler, share, torch.arange(rows), bs, loss, precision)

    def plain() -> None:  # hard labels only: the floor any KD step sits on
        torch.manual_seed(0)
        model = task.build_model("llama", params, dims).to(device)
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        xd, yd = x.to(device), y.to(device)
        for s in range(0, rows, bs):
            with autocast(device, precision):
                out = model(xd[s:s + bs])
            total = F.cross_entropy(out.float().reshape(-1, vocab), yd[s:s + bs].reshape(-1), ignore_index=-1)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()

    kdflow()
    t_k, m_k = timed(device, kdflow)
    t_p, m_p = timed(device, plain)
    return rows * seq / t_k, rows * seq / t_p, m_k, m_p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device on this machine: nothing to check (run it where `torch.cuda.is_available()`)")
        return 0
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    precision = "bf16" if gpu else "fp32"
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    print(f"device {name}, torch {torch.__version__}, precision {precision}\n")
    print("| path | kdflow step | plain loop | ratio | peak MiB kdflow / plain |")
    print("| --- | ---: | ---: | ---: | ---: |")
    c = classifier(device, 65536 if gpu else 4096, precision)
    print(f"| classifier mlp 2x1024, KD | {c[0]:,.0f} rows/s | {c[1]:,.0f} rows/s | {c[0] / c[1]:.2f} | "
          f"{c[2] / 2**20:.0f} / {c[3] / 2**20:.0f} |")
    params = {"layers": 8, "width": 512, "heads": 8, "ffn": 1536} if gpu else {"layers": 2, "width": 64, "heads": 4,
                                                                               "ffn": 128}
    lm = causal_lm(device, 512 if gpu else 32, 256 if gpu else 64, params, precision)
    print(f"| causal LM llama {params['layers']}x{params['width']}, KD top-32 | {lm[0]:,.0f} tokens/s | "
          f"{lm[1]:,.0f} tokens/s (CE only) | {lm[0] / lm[1]:.2f} | {lm[2] / 2**20:.0f} / {lm[3] / 2**20:.0f} |")
    return 0


if __name__ == "__main__":
    np.random.seed(0)
    sys.exit(main())
