"""The one train loop: teacher (hard labels) and student (distillation), 1 worker or N data-parallel.

`train_loop` runs inside every Ray Train worker. It reads only this worker's share of the rows, runs
`epochs` epochs with a checkpoint after each (so a restarted worker group resumes where it stopped),
validates every epoch, and stops early on a plateau or when the epoch hook (the search's pruner) says so.
`fit` builds the `TorchTrainer` around it.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from tasks.losses import distillation_objective
from tasks.models import build_model
from tasks.soft_targets import SoftTargetStore, TargetBatch, shard_ranges, teacher_logits
from tasks.storage import Storage


class RowSource(Protocol):
    def rows(self) -> int: ...

    def load(self, start: int, stop: int) -> TargetBatch: ...


@dataclass
class ArraySource:
    """Rows held in Ray's object store (refs to numpy arrays): the teacher's training data."""

    x: Any
    y: Any

    def rows(self) -> int:
        import ray

        return len(ray.get(self.y))

    def load(self, start: int, stop: int) -> TargetBatch:
        import ray

        x, y = ray.get(self.x), ray.get(self.y)
        return TargetBatch(torch.arange(start, stop), torch.from_numpy(np.ascontiguousarray(x[start:stop])),
                           torch.from_numpy(np.ascontiguousarray(y[start:stop])), {})


@dataclass
class ShardSource:
    """Rows of one split of the soft-target store; a worker reads only the shards its share overlaps."""

    storage: Storage
    manifest: dict[str, Any]
    split: str

    def rows(self) -> int:
        return int(self.manifest["splits"][self.split]["rows"])

    def load(self, start: int, stop: int) -> TargetBatch:
        return SoftTargetStore(self.storage).read(self.manifest, self.split, start, stop)


class EpochHook(Protocol):
    def report(self, epoch: int, metrics: dict[str, float]) -> bool: ...


def log(msg: str) -> None:
    # not print(): Ray Train patches print() to tee into its logger, which shows every line twice
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def _autocast(device: torch.device, precision: str) -> Any:
    if precision == "fp32" or (precision == "fp16" and device.type != "cuda"):
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def make_optimizer(model: nn.Module, spec: dict[str, Any]) -> torch.optim.Optimizer:
    name = spec.get("name", "adamw")
    lr, wd = float(spec.get("lr", 1e-3)), float(spec.get("weight_decay", 0.0))
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd, momentum=float(spec.get("momentum", 0.9)))
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=lr, weight_decay=wd)


@torch.no_grad()
def evaluate(model: nn.Module, data: TargetBatch, num_classes: int, device: torch.device,
             batch: int = 4096) -> dict[str, float]:
    """Accuracy, cross-entropy and (when teacher targets are present) agreement with the teacher."""
    model.eval()
    correct = agree = 0
    loss = 0.0
    labeled = data.y >= 0
    for i in range(0, len(data), batch):
        part = data.take(slice(i, i + batch))
        logits = model(part.x.to(device)).float()
        y = part.y.to(device)
        pred = logits.argmax(-1)
        mask = y >= 0
        correct += int((pred[mask] == y[mask]).sum())
        if mask.any():
            loss += float(nn.functional.cross_entropy(logits[mask], y[mask], reduction="sum"))
        if part.targets:
            agree += int((pred == teacher_logits(part.targets, num_classes).to(device).argmax(-1)).sum())
    n = max(1, int(labeled.sum()))
    out = {"accuracy": correct / n, "loss": loss / n}
    if data.targets:
        out["agreement"] = agree / max(1, len(data))
    model.train()
    return out


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every worker. Every rank reports every epoch; rank 0 attaches the checkpoint."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(config.get("threads", 1)))
    device = ray.train.torch.get_device() if config.get("use_gpu") else torch.device("cpu")
    label = config.get("label", "train")

    # this worker's share: a contiguous row range, so it reads only the shards that overlap it
    source: RowSource = config["data"]
    n = source.rows()
    start, stop = shard_ranges(n, world)[rank] if world > 1 else (0, n)
    data = source.load(start, stop)
    steps = max(1, math.ceil((n // world) / config["batch_size"]))
    per_worker = n // world
    val = config["val"].load(0, config["val"].rows()) if config.get("val") else None

    torch.manual_seed(config.get("seed", 0))
    model = build_model(config["model"], config["params"], config["num_features"], config["num_classes"])
    model = ray.train.torch.prepare_model(model) if world > 1 or device.type != "cpu" else model
    core = model.module if hasattr(model, "module") else model
    opt = make_optimizer(model, config["optimizer"])
    scaler = torch.amp.GradScaler(enabled=config.get("precision") == "fp16" and device.type == "cuda")
    loss_cfg = config.get("loss")  # None: hard labels only (teacher training)

    state = {"epoch": 0, "history": [], "best": None, "best_epoch": -1, "bad_epochs": 0, "resumed_from": None,
             "best_state": None}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            saved = torch.load(os.path.join(d, "state.pt"), weights_only=False)
        core.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state.update({k: saved[k] for k in ("epoch", "history", "best", "best_epoch", "bad_epochs", "best_state")})
        state["resumed_from"] = saved["epoch"]
        if rank == 0:
            log(f"[{label}] resumed from the checkpoint after epoch {saved['epoch']}")

    es = config.get("early_stopping")
    watch = es["metric"] if es else "val_accuracy"
    maximize = (es["direction"] == "max") if es else True
    hook: EpochHook | None = config.get("epoch_hook")
    x_all, y_all = data.x.to(device), data.y.to(device)
    t_all = {k: v.to(device) for k, v in data.targets.items()}
    gen = torch.Generator().manual_seed(config.get("seed", 0) * 1000 + rank)
    stop_reason = "completed"
    last_ckpt = time.monotonic()

    for epoch in range(state["epoch"] + 1, config["epochs"] + 1):
        gen.manual_seed(config.get("seed", 0) * 100_003 + epoch * 1000 + rank)
        order = torch.randperm(len(data), generator=gen)[:per_worker].to(device)
        sums = {"total": 0.0, "kd": 0.0, "ce": 0.0}
        model.train()
        t0 = time.perf_counter()
        for s in range(steps):
            idx = order[s * config["batch_size"]:(s + 1) * config["batch_size"]]
            xb, yb = x_all[idx], y_all[idx]
            with _autocast(device, config.get("precision", "fp32")):
                logits = model(xb)
            if loss_cfg is None:
                loss = nn.functional.cross_entropy(logits.float(), yb)
                parts = {"total": loss.detach(), "ce": loss.detach(), "kd": torch.zeros(())}
            else:
                tb = teacher_logits({k: v[idx] for k, v in t_all.items()}, config["num_classes"])
                loss, parts = distillation_objective(logits, tb, yb, loss=loss_cfg["kind"],
                                                     temperature=loss_cfg["temperature"], alpha=loss_cfg["alpha"],
                                                     beta=loss_cfg.get("beta", 0.5))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            for k in sums:
                sums[k] += float(parts[k])
        train_time = time.perf_counter() - t0

        metrics: dict[str, float] = {"epoch": epoch, "train_loss": sums["total"] / steps,
                                     "train_kd": sums["kd"] / steps, "train_ce": sums["ce"] / steps,
                                     "samples_per_s": per_worker * world / train_time, "epoch_s": train_time}
        if val is not None:
            v = evaluate(core, val, config["num_classes"], device)
            metrics.update({f"val_{k}": float(x) for k, x in v.items()})
        value = metrics.get(watch)
        improved = value is not None and (state["best"] is None or (value > state["best"] if maximize
                                                                    else value < state["best"]))
        if improved:
            state.update(best=value, best_epoch=epoch, bad_epochs=0,
                         best_state={k: t.detach().cpu().clone() for k, t in core.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        state["history"].append(metrics)
        state["epoch"] = epoch

        stop = 0
        if es and state["bad_epochs"] >= es["patience"]:
            stop = 1
        if hook is not None and rank == 0 and not stop:
            import ray as _ray

            stop = 2 if _ray.get(hook.report.remote(epoch, metrics)) else 0
        if world > 1:  # every rank must leave the loop together
            flag = torch.tensor([stop], device=device)
            torch.distributed.broadcast(flag, src=0)
            stop = int(flag.item())
        if stop:
            stop_reason = "early_stopped" if stop == 1 else "pruned"
        last = stop or epoch == config["epochs"]

        # A report blocks until Ray Train's controller takes it (~its poll interval), so report only
        # with a checkpoint: every `checkpoint_every` epochs, or every `checkpoint_interval_s` seconds.
        due = (epoch % config["checkpoint_every"] == 0) if config.get("checkpoint_every") else (
            time.monotonic() - last_ckpt >= config.get("checkpoint_interval_s", 30.0))
        if rank == 0:
            log(f"[{label}] epoch {epoch}/{config['epochs']} loss {metrics['train_loss']:.4f}"
                + (f" val_acc {metrics['val_accuracy']:.4f}" if "val_accuracy" in metrics else "")
                + f" {metrics['samples_per_s']:,.0f} samples/s" + (f" ({stop_reason})" if stop else ""))
        if due or last:
            last_ckpt = time.monotonic()
            report = {**metrics, "stop_reason": stop_reason if last else "running",
                      "resumed_from": state["resumed_from"], "best_epoch": state["best_epoch"]}
            if rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    torch.save({"model": core.state_dict(), "optimizer": opt.state_dict(), **state},
                               os.path.join(d, "state.pt"))
                    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(report)
        if stop:
            break


@dataclass
class FitResult:
    state_dict: dict[str, torch.Tensor]  # the best epoch's weights
    history: list[dict[str, float]]
    stop_reason: str
    resumed_from: int | None
    best_epoch: int
    samples_per_s: float


def steady_samples_per_s(history: list[dict[str, float]]) -> float:
    """Median epoch throughput, leaving out the first epoch (warm-up) when there are more."""
    rates = [h["samples_per_s"] for h in history]
    return float(np.median(rates[1:] if len(rates) > 1 else rates)) if rates else 0.0


def fit(config: dict[str, Any], *, workers: int, use_gpu: bool, cpus_per_worker: float, gpus_per_worker: float,
        storage: Storage, run_name: str, max_failures: int) -> FitResult:
    """Train with Ray Train (`workers` data-parallel workers; gloo on CPU, NCCL on GPU)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    config = {**config, "use_gpu": use_gpu, "threads": max(1, int(cpus_per_worker))}
    ckpt_root = storage.path("checkpoints")
    run_config = RunConfig(
        name=run_name,
        storage_path=ckpt_root if not storage.is_s3 else ckpt_root,
        storage_filesystem=storage.pyarrow_fs() if storage.is_s3 else None,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        logging_config=LoggingConfig(log_level="WARNING"),
    )
    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=run_config,
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        saved = torch.load(os.path.join(d, "state.pt"), weights_only=False)
    history = saved["history"]
    metrics = result.metrics or {}
    return FitResult(
        state_dict=saved["best_state"] or saved["model"], history=history,
        stop_reason=metrics.get("stop_reason", "completed"), resumed_from=metrics.get("resumed_from"),
        best_epoch=saved["best_epoch"], samples_per_s=steady_samples_per_s(history),
    )
