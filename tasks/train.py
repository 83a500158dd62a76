"""The one train loop: teacher (hard labels) and student (distillation), 1 worker or N data-parallel.

`train_loop` runs inside every Ray Train worker. It reads only this worker's share of the rows (train and
val), runs `epochs` epochs, validates every epoch (the val counts are summed over the workers, so every
rank sees the same metrics), stops early on a plateau or when the epoch hook (the search's pruner) says
so, and checkpoints every `checkpoint_every` epochs or `checkpoint_interval_s` seconds, so a restarted
worker group resumes where it stopped. `fit` builds the `TorchTrainer` around it. docs/training.md
says why the loop looks the way it does and what each choice costs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from orchestrator.errors import UserError
from tasks.losses import distillation_objective
from tasks.models import build_model
from tasks.soft_targets import SoftTargetStore, TargetBatch, shard_ranges, teacher_logits
from tasks.storage import Storage

# A worker decodes its teacher targets to dense float32 once when that copy stays under this size, and
# per batch otherwise (top-k rows over a large vocabulary would not fit dense).
DENSE_TARGETS_BYTES = 256 * 2**20
# On a GPU the worker's share lives in device memory when it takes at most this fraction of the free
# memory; otherwise it stays in pinned host memory and each batch is copied over.
DEVICE_RESIDENT_FRACTION = 0.25
# A progress line for the first and last epoch and at most one per this many seconds between: a small
# model runs dozens of epochs a second, and every line travels through Ray's log forwarding.
PROGRESS_EVERY_S = 2.0


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
        # copies: the object store's arrays are read-only, and a tensor over them warns (and must not be written)
        return TargetBatch(torch.arange(start, stop), torch.tensor(x[start:stop]), torch.tensor(y[start:stop]), {})


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
    # Not print(): Ray Train patches it in workers to tee into its logger, and each line showed up twice.
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def autocast(device: torch.device, precision: str) -> Any:
    """Mixed precision for the forward pass: bf16 or fp16 autocast, or none for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()  # entering a disabled autocast still costs a few us per step
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def make_optimizer(model: nn.Module, spec: dict[str, Any]) -> torch.optim.Optimizer:
    name = spec.get("name", "adamw")
    lr, wd = float(spec.get("lr", 1e-3)), float(spec.get("weight_decay", 0.0))
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd, momentum=float(spec.get("momentum", 0.9)))
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=lr, weight_decay=wd)


# ---------------------------------------------------------------- validation


@torch.no_grad()
def evaluate_counts(model: nn.Module, data: TargetBatch, num_classes: int, device: torch.device,
                    batch: int = 4096) -> torch.Tensor:
    """[correct, summed CE, agreeing with the teacher, labeled rows, rows] over `data`, on `device`.

    Counts rather than means, so that data-parallel workers can sum theirs and divide once.
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(5, dtype=torch.float64, device=device)
    for i in range(0, len(data), batch):
        part = data.take(slice(i, i + batch))
        logits = model(part.x.to(device)).float()
        y = part.y.to(device)
        pred = logits.argmax(-1)
        labeled = y >= 0
        ce = nn.functional.cross_entropy(logits, y.clamp(min=0), reduction="none")
        counts[0] += ((pred == y) & labeled).sum()
        counts[1] += (ce * labeled).sum()
        if part.targets:
            counts[2] += (pred == teacher_logits(part.targets, num_classes).to(device).argmax(-1)).sum()
        counts[3] += labeled.sum()
        counts[4] += len(part)
    model.train(was_training)
    return counts


def metrics_from_counts(counts: torch.Tensor, with_teacher: bool) -> dict[str, float]:
    correct, ce, agree, labeled, rows = counts.tolist()
    out = {"accuracy": correct / max(1.0, labeled), "loss": ce / max(1.0, labeled)}
    if with_teacher:
        out["agreement"] = agree / max(1.0, rows)
    return out


def evaluate(model: nn.Module, data: TargetBatch, num_classes: int, device: torch.device,
             batch: int = 4096) -> dict[str, float]:
    """Accuracy, cross-entropy and (when teacher targets are present) agreement with the teacher."""
    return metrics_from_counts(evaluate_counts(model, data, num_classes, device, batch), bool(data.targets))


# ---------------------------------------------------------------- this worker's rows


@dataclass
class Share:
    """This worker's training rows, placed once: features, labels and teacher logits."""

    x: torch.Tensor
    y: torch.Tensor
    teacher: torch.Tensor | None  # dense float32 logits, decoded once; None when decoded per batch
    targets: dict[str, torch.Tensor]  # stored targets, kept only when decoded per batch
    num_classes: int
    device: torch.device

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        # index_select, not x[idx]: half the per-call overhead of advanced indexing, which shows at ~1 ms steps
        if self.teacher is not None:
            t: torch.Tensor | None = self.teacher.index_select(0, idx)
        elif self.targets:
            t = teacher_logits({k: v.index_select(0, idx) for k, v in self.targets.items()}, self.num_classes)
        else:
            t = None
        x, y = self.x.index_select(0, idx), self.y.index_select(0, idx)
        if self.device.type == "cuda" and self.x.device != self.device:  # pinned host rows: copy overlaps compute
            return (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                    None if t is None else t.to(self.device, non_blocking=True))
        return x, y, t


def place_share(rows: TargetBatch, num_classes: int, device: torch.device) -> Share:
    """Decode teacher targets once when small enough; on a GPU keep the rows there when they fit."""
    dense = None
    if rows.targets and len(rows) * num_classes * 4 <= DENSE_TARGETS_BYTES:
        dense = teacher_logits(rows.targets, num_classes)
    tensors = {"x": rows.x, "y": rows.y, **({"teacher": dense} if dense is not None else
                                            {f"t_{k}": v for k, v in rows.targets.items()})}
    if device.type == "cuda":
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        free, _ = torch.cuda.mem_get_info(device)
        if size <= free * DEVICE_RESIDENT_FRACTION:
            tensors = {k: v.to(device) for k, v in tensors.items()}
        else:
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
    return Share(tensors["x"], tensors["y"], tensors.get("teacher"),
                 {k[2:]: v for k, v in tensors.items() if k.startswith("t_")}, num_classes, device)


# ---------------------------------------------------------------- one step, one epoch


def loss_step(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, tb: torch.Tensor | None,
              loss_cfg: dict[str, Any] | None, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward under autocast, the objective in float32; returns the loss and detached [total, kd, ce]."""
    with autocast(xb.device, precision):
        logits = model(xb)
    if loss_cfg is None:  # hard labels only: teacher training
        ce = nn.functional.cross_entropy(logits.float(), yb)
        return ce, torch.stack((ce.detach(), torch.zeros_like(ce.detach()), ce.detach()))
    assert tb is not None, "distillation needs teacher targets"
    loss, parts = distillation_objective(logits, tb, yb, loss=loss_cfg["kind"], temperature=loss_cfg["temperature"],
                                         alpha=loss_cfg["alpha"], beta=loss_cfg.get("beta", 0.5))
    return loss, torch.stack((parts["total"], parts["kd"], parts["ce"]))


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, share: Share,
                order: torch.Tensor, batch_size: int, loss_cfg: dict[str, Any] | None,
                precision: str) -> torch.Tensor:
    """One pass over `order`; returns the summed [total, kd, ce] over the steps (one host sync per epoch)."""
    sums = torch.zeros(3, device=share.device)
    for s in range(0, len(order), batch_size):
        xb, yb, tb = share.batch(order[s:s + batch_size])
        loss, parts = loss_step(model, xb, yb, tb, loss_cfg, precision)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sums += parts
    return sums


class Reporter:
    """Sends `ray.train.report` calls from a background thread, at most one in flight.

    A report uploads the checkpoint and then waits until Ray Train's controller has taken the previous
    one (it polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S). Here neither holds up the next epoch; the loop
    waits only when the previous report is still going when the next is due. With one in flight, the
    checkpoint a restarted run resumes from is at most two behind the newest one written.
    """

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdflow-report")
        self.pending: Future[None] | None = None

    def send(self, metrics: dict[str, Any], payload: dict[str, Any] | None) -> None:
        self.wait()
        folder = None
        if payload is not None:  # serialized now: the weights keep changing after this returns
            folder = tempfile.mkdtemp(prefix="kdflow-ckpt-")
            torch.save(payload, os.path.join(folder, "state.pt"))
        self.pending = self.pool.submit(self._report, metrics, folder)

    @staticmethod
    def _report(metrics: dict[str, Any], folder: str | None) -> None:
        import ray.train

        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)
        finally:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()  # re-raises a failed report here, in the loop

    def close(self) -> None:
        self.wait()
        self.pool.shutdown()


# ---------------------------------------------------------------- the loop


def record_epoch(state: dict[str, Any], metrics: dict[str, float], model: nn.Module, watch: str,
                 maximize: bool) -> None:
    """Append the epoch to the history; keep a copy of the weights when `watch` strictly improved."""
    value = metrics.get(watch)
    if value is not None and (state["best"] is None or (value > state["best"] if maximize else value < state["best"])):
        state.update(best=value, best_epoch=int(metrics["epoch"]), bad_epochs=0,
                     best_state={k: t.detach().cpu().clone() for k, t in model.state_dict().items()})
    else:
        state["bad_epochs"] += 1
    state["history"].append(metrics)
    state["epoch"] = int(metrics["epoch"])


def checkpoint_due(config: dict[str, Any], epoch: int, since_last_s: float) -> bool:
    """Every `checkpoint_every` epochs when set, else once `checkpoint_interval_s` have passed (docs/training.md)."""
    every = config.get("checkpoint_every")
    return epoch % every == 0 if every else since_last_s >= config.get("checkpoint_interval_s", 30.0)


def quiet_report_lines() -> None:
    """Ray Train 2.60 logs every report at INFO (all metrics, one long line) on a logger named after its
    file, which LoggingConfig(log_level) does not reach; keep it to warnings."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def worker_nodes(world: int) -> list[str]:
    """The Ray node id of every rank, in rank order (the same list on every rank): a run records where it ran."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node]
    nodes: list[Any] = [None] * world
    torch.distributed.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every worker. Every rank reports at every checkpoint; rank 0 attaches the checkpoint."""
    import ray.train
    import ray.train.torch

    quiet_report_lines()

    # ---- setup: device, this worker's rows, model, optimizer, and the checkpoint to resume from
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(config.get("threads", 1)))
    device = ray.train.torch.get_device() if config.get("use_gpu") else torch.device("cpu")
    label, epochs, batch_size = config.get("label", "train"), config["epochs"], config["batch_size"]
    precision, loss_cfg = config.get("precision", "fp32"), config.get("loss")  # loss None: hard labels only
    seed, num_classes = config.get("seed", 0), config["num_classes"]

    source: RowSource = config["data"]
    n = source.rows()
    share = place_share(source.load(*shard_ranges(n, world)[rank]), num_classes, device)
    per_worker = n // world  # every rank takes the same number of steps, as DDP requires
    val = config.get("val")
    val_rows = val.load(*shard_ranges(val.rows(), world)[rank]) if val is not None else None

    torch.manual_seed(seed)
    model = build_model(config["model"], config["params"], config["num_features"], num_classes)
    model = ray.train.torch.prepare_model(model) if world > 1 or device.type != "cpu" else model
    core = model.module if hasattr(model, "module") else model
    opt = make_optimizer(model, config["optimizer"])
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    state: dict[str, Any] = {"epoch": 0, "history": [], "best": None, "best_epoch": -1, "bad_epochs": 0,
                             "resumed_from": None, "best_state": None, "checkpoints": 0, "checkpoint_s": 0.0,
                             "nodes": worker_nodes(world)}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            saved = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=False)
        core.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if scaler.is_enabled() and saved.get("scaler"):  # absent or empty when saved without fp16
            scaler.load_state_dict(saved["scaler"])
        state.update({k: saved[k] for k in state if k in saved and k != "nodes"})  # nodes: this group's
        state["resumed_from"] = saved["epoch"]
        if rank == 0:
            log(f"[{label}] resumed from the checkpoint after epoch {saved['epoch']}")

    es = config.get("early_stopping")
    watch, maximize = (es["metric"], es["direction"] == "max") if es else ("val_accuracy", True)
    hook: EpochHook | None = config.get("epoch_hook")
    gen = torch.Generator()
    stop_reason = "completed"
    reporter = Reporter()
    last_ckpt = last_log = time.monotonic()

    for epoch in range(state["epoch"] + 1, epochs + 1):
        # ---- train: a fresh order of this worker's rows, seeded by epoch so a resumed run repeats it
        gen.manual_seed(seed * 100_003 + epoch * 1000 + rank)
        order = torch.randperm(len(share), generator=gen)[:per_worker].to(share.x.device)
        model.train()
        t0 = time.perf_counter()
        sums_t = train_epoch(model, opt, scaler, share, order, batch_size, loss_cfg, precision)
        if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
            torch.cuda.synchronize(device)
        train_s = time.perf_counter() - t0
        if world > 1:  # the mean over workers, so every rank logs (and may stop on) the same train loss
            torch.distributed.all_reduce(sums_t)
            sums_t /= world
        sums = sums_t.tolist()
        steps = math.ceil(per_worker / batch_size)
        metrics: dict[str, float] = {"epoch": epoch, "train_loss": sums[0] / steps, "train_kd": sums[1] / steps,
                                     "train_ce": sums[2] / steps, "samples_per_s": per_worker * world / train_s,
                                     "epoch_s": train_s}

        # ---- validate on every worker's share of val, summed, so all ranks see the same numbers
        if val_rows is not None:
            counts = evaluate_counts(core, val_rows, num_classes, device)
            if world > 1:
                torch.distributed.all_reduce(counts)
            metrics.update({f"val_{k}": v for k, v in metrics_from_counts(counts, bool(val_rows.targets)).items()})

        # ---- keep the best weights; stop on a plateau (early stopping) or when the hook prunes
        record_epoch(state, metrics, core, watch, maximize)
        stop = 1 if es and state["bad_epochs"] >= es["patience"] else 0
        if hook is not None and rank == 0 and not stop:
            stop = 2 if ray.get(hook.report.remote(epoch, metrics)) else 0
        if world > 1:  # the hook answers rank 0 only, and every rank must leave the loop together
            flag = torch.tensor([stop], device=device)
            torch.distributed.broadcast(flag, src=0)
            stop = int(flag.item())
        if stop:
            stop_reason = "early_stopped" if stop == 1 else "pruned"
        last = bool(stop) or epoch == epochs
        if rank == 0 and (epoch == 1 or last or time.monotonic() - last_log >= PROGRESS_EVERY_S):
            last_log = time.monotonic()
            log(f"[{label}] epoch {epoch}/{epochs} loss {metrics['train_loss']:.4f}"
                + (f" val_acc {metrics['val_accuracy']:.4f}" if "val_accuracy" in metrics else "")
                + f" {metrics['samples_per_s']:,.0f} samples/s" + (f" ({stop_reason})" if stop else ""))

        # ---- checkpoint (and report: a report costs a controller round trip, so none without one)
        if last or checkpoint_due(config, epoch, time.monotonic() - last_ckpt):
            t_ckpt = time.perf_counter()
            report = {**metrics, "stop_reason": stop_reason if last else "running", "world_size": world,
                      "rows_per_worker": per_worker, "resumed_from": state["resumed_from"],
                      "best_epoch": state["best_epoch"], "checkpoints": state["checkpoints"],
                      "checkpoint_s": state["checkpoint_s"]}
            reporter.send(report, {"model": core.state_dict(), "optimizer": opt.state_dict(),
                                   "scaler": scaler.state_dict(), **state} if rank == 0 else None)
            state["checkpoints"] += 1
            state["checkpoint_s"] += time.perf_counter() - t_ckpt
            last_ckpt = time.monotonic()
        if stop:
            break
    reporter.close()


# ---------------------------------------------------------------- the trainer


@dataclass
class FitResult:
    state_dict: dict[str, torch.Tensor]  # the best epoch's weights
    history: list[dict[str, float]]
    stop_reason: str
    resumed_from: int | None
    best_epoch: int
    samples_per_s: float
    workers: int = 1
    checkpoints: int = 0  # checkpoints written before the final one
    checkpoint_s: float = 0.0  # seconds the loop spent on those
    nodes: list[str] = field(default_factory=list)  # the Ray node id of each rank (the last worker group)


def steady_samples_per_s(history: list[dict[str, float]]) -> float:
    """Median epoch throughput, leaving out the first epoch (warm-up) when there are more."""
    rates = [h["samples_per_s"] for h in history]
    return float(np.median(rates[1:] if len(rates) > 1 else rates)) if rates else 0.0


def fit(config: dict[str, Any], *, workers: int, use_gpu: bool, cpus_per_worker: float, gpus_per_worker: float,
        storage: Storage, run_name: str, max_failures: int, placement: str = "pack") -> FitResult:
    """Train with Ray Train (`workers` data-parallel workers; gloo on CPU, NCCL on GPU)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if config.get("precision", "fp32") not in ("fp32", "bf16", "fp16"):
        raise UserError(f"unknown precision {config['precision']!r}: fp32, bf16 or fp16", where="train.precision")
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    config = {**config, "use_gpu": use_gpu, "threads": max(1, int(cpus_per_worker))}
    run_config = RunConfig(
        name=run_name,
        storage_path=storage.path("checkpoints"),
        storage_filesystem=storage.pyarrow_fs() if storage.is_s3 else None,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        logging_config=LoggingConfig(log_level="WARNING"),
    )
    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=placement.upper()),
        run_config=run_config,
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        saved = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=False)
    history = saved["history"]
    metrics = result.metrics or {}
    return FitResult(
        state_dict=saved["best_state"] or saved["model"], history=history,
        stop_reason=metrics.get("stop_reason", "completed"), resumed_from=saved["resumed_from"],
        best_epoch=saved["best_epoch"], samples_per_s=steady_samples_per_s(history),
        workers=int(metrics.get("world_size", workers)), checkpoints=int(saved.get("checkpoints", 0)),
        checkpoint_s=float(saved.get("checkpoint_s", 0.0)), nodes=list(saved.get("nodes", [])),
    )
