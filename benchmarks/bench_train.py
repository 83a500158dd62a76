"""Student training throughput: kdflow's train stage against a plain PyTorch loop, side by side.

MNIST-1D (generated offline, 4000 training rows), a 40-100-100-10 MLP student, batch 128 per worker,
KD (kl, T=4, alpha=0.7) against float16 teacher logits read from a soft-target store, AdamW, one torch
thread per process. Rows, measured in one run, in this order:

- plain loop: one process, every tensor in memory, randperm + index per batch, the same objective.
- kdflow `train_epoch` (the worker's own epoch function, on the worker's `Share`) and the plain loop,
  epochs taken in turn in one process: in the driver, inside 1 Ray Train worker, inside 2 (DDP).
- kdflow, N workers: `tasks.train.fit` through Ray Train, reading the store's shards; the number is
  FitResult.samples_per_s (median epoch after the first, training steps only: no start-up, no
  validation, no checkpoint), the figure the result JSON's student block carries.
- plain DDP, 2 processes: torch.distributed (gloo) on two spawned processes, no Ray.

Each `fit` row is compared with a plain-loop measurement taken right before and right after it
(their mean), so that load from other processes on the machine hits both sides alike, in ROUNDS
rounds (median, range in brackets). A last run
checkpoints every epoch to measure what a checkpoint costs the loop.

With ``--threads``, only the thread rows: the 1-worker train stage against a plain single-process
loop at PyTorch's default threads (what a person gets without setting any), with the worker's torch
threads as before (`cpus_per_worker`, 1) and as a local run now sets them when `cpus_per_worker` is not
set (the machine's cores, `orchestrator.configs.torch_threads`), in ROUNDS rounds.

Run from the repository root: ``python benchmarks/bench_train.py [--threads]`` (table on stdout, progress
on stderr).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tasks.kinds import kind_for
from tasks.kinds.classification.data import load_dataset
from tasks.kinds.classification.models import build_model
from tasks.kinds.classification.targets import place_share, teacher_logits
from tasks.losses import distillation_objective
from tasks.storage import Storage
from tasks.store.precompute import Encoding, precompute
from tasks.store.store import SoftTargetStore
from tasks.train.config import FitConfig, LossConfig, OptimizerConfig, Resources
from tasks.train.ray_train import fit
from tasks.train.result import steady_samples_per_s
from tasks.train.sources import ShardSource
from tasks.train.step import train_epoch

EPOCHS = 30
ROUNDS = 2
BATCH = 128
STUDENT = {"hidden": [100, 100]}
LOSS = LossConfig(kind="kl", temperature=4.0, alpha=0.7, beta=0.5)
OPTIMIZER = OptimizerConfig(name="adamw", lr=3e-3, weight_decay=0.0, momentum=0.9, schedule="constant",
                            warmup_steps=0, grad_clip=None)
TASK = kind_for("classification")
DEFAULT_THREADS = torch.get_num_threads()  # PyTorch's own choice, read before anything here changes it


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_store(root: str) -> tuple[Storage, dict[str, Any]]:
    """MNIST-1D split 80/10/10 (4000 training rows), a teacher trained in-process, logits in 4 shards."""
    data = load_dataset("mnist1d", val=0.1, test=0.1)
    torch.manual_seed(0)
    teacher = build_model("mlp", {"hidden": [256, 256]}, data.num_features, data.num_classes)
    opt = torch.optim.Adam(teacher.parameters(), lr=2e-3)
    x, y = torch.from_numpy(data.x["train"]), torch.from_numpy(data.y["train"])
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(teacher(x), y).backward()
        opt.step()
    storage = Storage(root)
    splits = {s: (data.x[s], data.y[s]) for s in ("train", "val", "test")}
    manifest, _ = precompute(
        SoftTargetStore(storage), "bench", [teacher.eval()], splits, shards=4, width=data.num_classes,
        encoding=Encoding(TASK, "logits", "float16", None, "mean_probs"),
        meta={"num_classes": data.num_classes, "num_features": data.num_features})
    return storage, manifest


def rows_in_memory(storage: Storage, manifest: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = SoftTargetStore(storage).read(manifest, "train")
    return rows.x, rows.y, teacher_logits(rows.targets, manifest["num_classes"])


def student(manifest: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", STUDENT, manifest["num_features"], manifest["num_classes"])


def plain_loop(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, model: torch.nn.Module, rank: int = 0,
               world: int = 1, opt: torch.optim.Optimizer | None = None, epochs: int = EPOCHS) -> list[float]:
    """The loop a person writes by hand; samples/s of each epoch (all processes together)."""
    opt = opt or torch.optim.AdamW(model.parameters(), lr=OPTIMIZER.lr)
    gen = torch.Generator().manual_seed(rank)
    rates = []
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        total = torch.zeros(())
        t0 = time.perf_counter()
        for s in range(0, len(order), BATCH):
            idx = order[s:s + BATCH]
            loss, _ = distillation_objective(model(x[idx]), t[idx], y[idx], loss=LOSS.kind,
                                             temperature=LOSS.temperature, alpha=LOSS.alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
        rates.append(len(order) * world / (time.perf_counter() - t0))
        assert math.isfinite(float(total))
    return rates


def plain(storage: Storage, manifest: dict[str, Any], threads: int = 1) -> float:
    torch.set_num_threads(threads)
    x, y, t = rows_in_memory(storage, manifest)
    return statistics.median(plain_loop(x, y, t, student(manifest))[1:])


def alternating(config: dict[str, Any]) -> dict[str, float]:
    """Epochs of the plain loop and of the worker's own `train_epoch` taken in turn, in this process.

    Run in the driver and, as a Ray Train function, inside 1 or 2 workers (DDP models, each worker on its
    share of the rows): the two columns share the processes, the moment and the load, so their ratio is
    the loop's own overhead, and the plain column against the driver's is what the Ray worker costs.
    """
    import ray.train

    rank, world = 0, 1
    if config.get("in_ray"):
        rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    storage, manifest = config["storage"], config["manifest"]
    torch.set_num_threads(1)
    x, y, t = rows_in_memory(storage, manifest)
    n = len(y) // world
    x, y, t = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n], t[rank * n:(rank + 1) * n]
    share = place_share(SoftTargetStore(storage).read(manifest, "train", rank * n, (rank + 1) * n),
                        manifest["num_classes"], torch.device("cpu"))
    models = [student(manifest), student(manifest)]
    if world > 1:
        models = [torch.nn.parallel.DistributedDataParallel(m) for m in models]
    plain_opt, kdflow_opt = (torch.optim.AdamW(m.parameters(), lr=OPTIMIZER.lr) for m in models)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    gen = torch.Generator().manual_seed(1 + rank)
    rates: dict[str, list[float]] = {"plain": [], "kdflow": []}

    def kdflow_epoch() -> None:
        order = torch.randperm(len(share), generator=gen)
        t0 = time.perf_counter()
        train_epoch(TASK, models[1], kdflow_opt, scaler, share, order, BATCH, LOSS, "fp32").tolist()
        rates["kdflow"].append(len(order) * world / (time.perf_counter() - t0))

    for epoch in range(EPOCHS):  # which goes first alternates too: neither always follows the other
        if epoch % 2:
            kdflow_epoch()
        rates["plain"] += plain_loop(x, y, t, models[0], rank, world, opt=plain_opt, epochs=1)
        if not epoch % 2:
            kdflow_epoch()
    return {k: statistics.median(v[1:]) for k, v in rates.items()}


def alternating_in_ray(storage: Storage, manifest: dict[str, Any], workers: int) -> dict[str, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(alternating, train_loop_config={"storage": storage, "manifest": manifest, "in_ray": True},
                           scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1.0}),
                           run_config=RunConfig(storage_path=storage.path("checkpoints"),
                                                name=f"bench-alternating-{workers}w-{time.time_ns()}"))
    return trainer.fit().return_value


def _ddp_worker(rank: int, world: int, port: int, root: str, manifest: dict[str, Any], out: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x, y, t = rows_in_memory(Storage(root), manifest)
    n = len(y) // world
    part = slice(rank * n, (rank + 1) * n)
    model = torch.nn.parallel.DistributedDataParallel(student(manifest))
    rates = plain_loop(x[part], y[part], t[part], model, rank, world)
    if rank == 0:
        out.put(statistics.median(rates[1:]))
    dist.destroy_process_group()


def plain_ddp(storage: Storage, manifest: dict[str, Any], world: int = 2) -> float:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, world, port, storage.root, manifest, out)) for r in range(world)]
    for p in procs:
        p.start()
    rate = out.get(timeout=300)
    for p in procs:
        p.join()
    return rate


def kdflow_config(storage: Storage, manifest: dict[str, Any], workers: int, **extra: Any) -> FitConfig:
    config = FitConfig(log_prefix="student", kind=TASK, model="mlp", params=STUDENT, dims=TASK.dims(manifest),
                       seed=0, epochs=EPOCHS, batch_size=BATCH, optimizer=OPTIMIZER, precision="fp32", loss=LOSS,
                       early_stopping=None, data=ShardSource(storage, manifest, "train"),
                       val=ShardSource(storage, manifest, "val"), checkpoint_every=None, checkpoint_interval_s=30.0,
                       resources=Resources(workers=workers, use_gpu=False, cpus_per_worker=1.0, gpus_per_worker=0.0,
                                           max_failures=0, placement="pack", torch_threads=None), epoch_hook=None,
                       hold_share_bytes=2**30, online_teacher=None, after_epochs=None)
    return dataclasses.replace(config, **extra)


def kdflow(storage: Storage, manifest: dict[str, Any], workers: int, **extra: Any) -> Any:
    """A Ray Train fit (`tasks.train.fit`) of the student."""
    config = kdflow_config(storage, manifest, workers, **extra)
    t0 = time.perf_counter()
    result = fit(config, storage=storage, run_name=f"bench-{workers}w-{time.time_ns()}")
    progress(f"  fit() with {workers} worker(s): {time.perf_counter() - t0:.1f} s wall, "
             f"steady {result.samples_per_s:,.0f} samples/s")
    assert result.samples_per_s == steady_samples_per_s(result.history)
    return result


def main() -> None:
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    from orchestrator.runtime import ensure_ray

    t_start = time.perf_counter()
    ensure_ray()
    root = tempfile.mkdtemp(prefix="kdflow-bench-train-")
    try:
        if "--threads" in sys.argv[1:]:
            measure_threads(root, t_start)
        else:
            measure_and_print(root, t_start)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure_threads(root: str, t_start: float) -> None:
    """The 1-worker train stage against a plain loop at PyTorch's default threads, threads before and after."""
    from orchestrator.configs import machine_cores
    from orchestrator.fitting import Slot

    storage, manifest = make_store(root)
    cores = machine_cores()
    machine = Resources(workers=1, use_gpu=False, cpus_per_worker=1.0, gpus_per_worker=0.0, max_failures=0,
                        placement="pack", torch_threads=cores)
    warm = Slot(0, label="bench warm worker")  # a local 1-worker stage's path since issue 11

    def on_warm() -> float:
        cfg = kdflow_config(storage, manifest, 1, resources=machine)
        result = warm.fit(cfg, storage, f"bench-warm-{time.time_ns()}")[0]
        progress(f"  warm actor fit: steady {result.samples_per_s:,.0f} samples/s")
        return result.samples_per_s

    runs = {"before": lambda: kdflow(storage, manifest, 1).samples_per_s,  # cpus_per_worker 1: one thread
            "after": lambda: kdflow(storage, manifest, 1, resources=machine).samples_per_s,
            "warm": on_warm}
    pairs: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    before = plain(storage, manifest, DEFAULT_THREADS)
    for r in range(ROUNDS):
        for name, run in runs.items():
            value = run()
            after = plain(storage, manifest, DEFAULT_THREADS)
            pairs[name].append((value, (before + after) / 2))
            progress(f"round {r + 1} {name}: {value:,.0f} samples/s; plain before {before:,.0f}, after {after:,.0f}")
            before = after
    warm.close()
    load = os.getloadavg()
    print(f"MNIST-1D {manifest['splits']['train']['rows']} training rows, MLP 40-100-100-10, batch {BATCH}, "
          f"{EPOCHS} epochs; plain loop at PyTorch's default {DEFAULT_THREADS} thread(s); {cores} cores.\n")
    print("| train stage, 1 worker (`fit`) | worker's torch threads | samples/s | plain loop samples/s | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, threads in (("before: threads = cpus_per_worker", 1),
                          ("after: local run, cpus_per_worker unset", cores),
                          ("warm: the warm actor a local 1-worker stage runs on, cpus_per_worker unset", cores)):
        ps = pairs[name.split(":")[0]]
        each = [v / b for v, b in ps]
        print(f"| {name} | {threads} | {statistics.median(v for v, _ in ps):,.0f} | "
              f"{statistics.median(b for _, b in ps):,.0f} | **{statistics.median(each):.2f}** "
              f"({min(each):.2f}-{max(each):.2f}) |")
    print(f"\nTotal {time.perf_counter() - t_start:.0f} s; load average at the end "
          f"{', '.join(f'{v:.1f}' for v in load)} on {os.cpu_count()} CPUs.")


def measure_and_print(root: str, t_start: float) -> None:
    storage, manifest = make_store(root)
    rows = manifest["splits"]["train"]["rows"]
    progress(f"store ready: {rows} training rows, {len(manifest['splits']['train']['shards'])} shards")

    # Where the time goes: the loop's own code, then the Ray worker around it (1 worker, then 2 with DDP).
    here = alternating({"storage": storage, "manifest": manifest})
    progress(f"alternating epochs, driver: {here}")
    one = alternating_in_ray(storage, manifest, 1)
    progress(f"alternating epochs, 1 Ray Train worker: {one}")
    two = alternating_in_ray(storage, manifest, 2)
    progress(f"alternating epochs, 2 Ray Train workers (DDP): {two}")

    # The train stage itself, against the plain loop measured right before and after it, in rounds.
    ratios: dict[str, list[tuple[float, float]]] = {"kdflow 1": [], "kdflow 2": [], "plain DDP": []}
    runs = {"kdflow 1": lambda: kdflow(storage, manifest, 1).samples_per_s,
            "plain DDP": lambda: plain_ddp(storage, manifest),
            "kdflow 2": lambda: kdflow(storage, manifest, 2).samples_per_s}
    before = plain(storage, manifest)
    for r in range(ROUNDS):
        for name, run in runs.items():
            value = run()
            after = plain(storage, manifest)
            ratios[name].append((value, (before + after) / 2))
            progress(f"round {r + 1} {name}: {value:,.0f} samples/s; plain before {before:,.0f}, after {after:,.0f}")
            before = after

    every = kdflow(storage, manifest, 1, checkpoint_every=1)
    epoch_s = statistics.median(h["epoch_s"] for h in every.history[1:])
    per_ckpt = every.checkpoint_s / max(1, every.checkpoints)

    def row(label: str, pairs: list[tuple[float, float]], against: str) -> str:
        value = statistics.median(v for v, _ in pairs)
        base = statistics.median(b for _, b in pairs)
        each = [v / b for v, b in pairs]
        spread = f" ({min(each):.2f}-{max(each):.2f})" if len(each) > 1 else ""
        return f"| {label} | {value:,.0f} | {against} | {base:,.0f} | {statistics.median(each):.2f}{spread} |"

    print(f"MNIST-1D {rows} training rows, MLP 40-100-100-10 ({sum(p.numel() for p in student(manifest).parameters())}"
          f" params), batch {BATCH} per worker, 1 torch thread per process, {EPOCHS} epochs; "
          f"steady state = median epoch after the first, training steps only.\n")
    print("| path | samples/s | against | its samples/s | ratio |")
    print("| --- | --- | --- | --- | --- |")
    print(row("kdflow `train_epoch`, driver process, epochs alternating with the plain loop",
              [(here["kdflow"], here["plain"])], "plain loop, same process"))
    print(row("plain loop inside 1 Ray Train worker", [(one["plain"], here["plain"])], "plain loop, driver"))
    print(row("kdflow `train_epoch` inside 1 Ray Train worker", [(one["kdflow"], one["plain"])],
              "plain loop, same worker"))
    print(row("plain DDP loop inside 2 Ray Train workers", [(two["plain"], here["plain"])],
              "plain loop, driver (1 process)"))
    print(row("kdflow `train_epoch` inside 2 Ray Train workers (DDP)", [(two["kdflow"], two["plain"])],
              "plain DDP loop, same workers"))
    print(row(f"**kdflow train stage, 1 worker** (`fit`), median of {ROUNDS} rounds", ratios["kdflow 1"],
              "plain loop, driver, before/after"))
    print(row("plain DDP loop, 2 spawned processes (gloo), no Ray", ratios["plain DDP"],
              "plain loop, driver, before/after"))
    print(row(f"**kdflow train stage, 2 workers** (`fit`, gloo DDP), median of {ROUNDS} rounds", ratios["kdflow 2"],
              "plain loop, driver, before/after"))
    print(row("kdflow train stage, 2 workers, against plain DDP",
              [(k, d) for (k, _), (d, _) in zip(ratios["kdflow 2"], ratios["plain DDP"])], "plain DDP, 2 processes"))
    print(f"\nCheckpoint every epoch (1 worker): {every.checkpoints} checkpoints cost the loop "
          f"{every.checkpoint_s:.2f} s, {per_ckpt * 1000:.0f} ms each, against a median training epoch of "
          f"{epoch_s * 1000:.1f} ms ({per_ckpt / epoch_s:.1f}x an epoch).")
    print(f"\nTotal {time.perf_counter() - t_start:.0f} s; load average at the end "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs.")


if __name__ == "__main__":
    main()
