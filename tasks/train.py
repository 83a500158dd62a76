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
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from tasks import stream
from tasks.fit_config import EarlyStopping, FitConfig, LossConfig, OptimizerConfig
from tasks.kinds import Share, TaskKind
from tasks.kinds.classification import place_share  # noqa: F401 - kept importable from here (tests, benchmarks)
from tasks.layout import checkpoints_path
from tasks.pieces import SplitRows
from tasks.soft_targets import SoftTargetStore, TargetBatch, shard_ranges
from tasks.storage import Storage
from tasks.trace import span

# A progress line for the first and last epoch and at most one per this many seconds between: a small
# model runs dozens of epochs a second, and every line travels through Ray's log forwarding.
PROGRESS_EVERY_S = 2.0


class StopReason(str, Enum):
    """Why a fit ended (a str, so results and reports carry the plain word)."""

    COMPLETED = "completed"
    EARLY_STOPPED = "early_stopped"  # the watched metric stopped improving for `patience` epochs
    PRUNED = "pruned"  # the search's epoch hook said stop
    RUNNING = "running"  # in a report before the last: the fit goes on


class RowSource(Protocol):
    """Rows a fit reads by range. A source may also say its stored size (`stored_bytes(start, stop)`) and
    where its pieces end (`blocks(start, stop)`): then a share over the fit's `hold_share_bytes` streams
    (tasks/stream.py)."""

    def rows(self) -> int: ...

    def load(self, start: int, stop: int) -> TargetBatch: ...


@dataclass
class ArraySource:
    """Rows held in Ray's object store (refs to numpy arrays): the teacher's training data from a built-in."""

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

    def stored_bytes(self, start: int, stop: int) -> int:
        import ray

        x, y = ray.get(self.x), ray.get(self.y)
        return (stop - start) * (x[:1].nbytes + y[:1].nbytes)


@dataclass
class SourceRows:
    """One split of a Parquet source, read from its pieces by the worker that trains on it: the teacher's
    training data when the data is a Parquet source, so the driver puts nothing into Ray's object store and
    a worker reads only its share (tasks/pieces.py:SplitRows: standardized with the merged statistics, each
    piece's digest checked). Its blocks are the split's rows of one piece each, so a share over the fit's
    `hold_share_bytes` streams piece by piece and reads every piece once per epoch.

    Not kept by a warm process's row cache (tasks/warm.py:with_cache): a teacher is trained once per cache key,
    and a cached split would stay in the warm actor beside the student's rows for the rest of the run."""

    split: SplitRows

    def rows(self) -> int:
        return len(self.split)

    def load(self, start: int, stop: int) -> TargetBatch:
        """The rows an ArraySource over the driver's arrays gives: row ids are split indices, no targets."""
        x, y = self.split.rows(start, stop)
        return TargetBatch(torch.arange(start, stop), torch.from_numpy(x), torch.from_numpy(y), {})

    def blocks(self, start: int, stop: int) -> list[tuple[int, int]]:
        return self.split.ranges(start, stop)

    def chunks(self, start: int, stop: int) -> Iterator[tuple[int, TargetBatch]]:
        """Rows [start, stop) a read chunk at a time (offset from start, rows), each piece's digest checked
        after its last: a streamed window is built from these without holding the block whole beside it."""
        for at, x, y in self.split.chunks(start, stop):
            ids = torch.arange(start + at, start + at + len(y))
            yield at, TargetBatch(ids, torch.from_numpy(x), torch.from_numpy(y), {})

    def stored_bytes(self, start: int, stop: int) -> int:
        """As the rows take in memory (float32 features, int64 label), what an ArraySource says for them."""
        return (stop - start) * (self.split.num_features * 4 + 8)


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

    def _shards(self, start: int, stop: int) -> list[tuple[int, int, dict[str, Any]]]:
        """The shards overlapping [start, stop), each with the part of the range it holds."""
        return [(max(start, s["row_start"]), min(stop, s["row_stop"]), s)
                for s in self.manifest["splits"][self.split]["shards"]
                if s["row_stop"] > start and s["row_start"] < stop]

    def blocks(self, start: int, stop: int) -> list[tuple[int, int]]:
        return [(a, b) for a, b, _ in self._shards(start, stop)]

    def stored_bytes(self, start: int, stop: int) -> int:
        return int(sum(s["bytes"] * (b - a) / s["rows"] for a, b, s in self._shards(start, stop)))


class EpochHook(Protocol):
    """The search's pruner (`FitConfig.epoch_hook`): `hook.ask(epoch, metrics)` sends the epoch's values and
    returns a function that waits for the answer (stop or not), so the loop can train the next epoch while it
    travels (`Decision`)."""

    def ask(self, epoch: int, metrics: dict[str, float]) -> Callable[[], bool]: ...


def log(msg: str) -> None:
    # Not print(): Ray Train patches it in workers to tee into its logger, and each line showed up twice.
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def autocast(device: torch.device, precision: str) -> Any:
    """Mixed precision for the forward pass: bf16 or fp16 autocast, or none for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()  # entering a disabled autocast still costs a few us per step
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def make_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def evaluate(task: TaskKind, model: nn.Module, data: TargetBatch, dims: dict[str, int],
             device: torch.device) -> dict[str, float]:
    """The task kind's metrics (classification: accuracy, cross-entropy and, with teacher targets, agreement)."""
    return task.metrics(task.eval_counts(model, data, dims, device), bool(data.targets))


# ---------------------------------------------------------------- one step, one epoch


def loss_step(task: TaskKind, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, tb: torch.Tensor | None,
              loss: LossConfig | None, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward under autocast, the task's objective in float32; returns the loss and detached [total, kd, ce]."""
    with autocast(xb.device, precision):
        logits = model(xb)
    return task.objective(logits, yb, tb, loss)


@dataclass(frozen=True)
class Schedule:
    """Learning rate per step (linear warmup, then constant or cosine to 0) and gradient clipping."""

    cfg: OptimizerConfig
    first_step: int  # the global step of this epoch's first step
    total_steps: int

    def factor(self, step: int) -> float:
        warm = self.cfg.warmup_steps
        if warm and step < warm:
            return (step + 1) / warm
        if self.cfg.schedule == "cosine":
            done = (step - warm) / max(1, self.total_steps - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))
        return 1.0


def schedule_for(cfg: OptimizerConfig, epoch: int, steps_per_epoch: int, epochs: int) -> Schedule | None:
    """None when no schedule key is set: the step is then exactly the plain one."""
    if cfg.schedule == "constant" and not cfg.warmup_steps and cfg.grad_clip is None:
        return None
    return Schedule(cfg, (epoch - 1) * steps_per_epoch, epochs * steps_per_epoch)


def train_epoch(task: TaskKind, model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                share: Share, order: torch.Tensor, batch_size: int, loss: LossConfig | None,
                precision: str, schedule: Schedule | None = None) -> torch.Tensor:
    """One pass over `order`; returns the summed [total, kd, ce] over the steps (one host sync per epoch)."""
    sums = torch.zeros(3, device=share.device)
    for i, s in enumerate(range(0, len(order), batch_size)):
        xb, yb, tb = share.batch(order[s:s + batch_size])
        if schedule is not None:
            f = schedule.factor(schedule.first_step + i)
            for g in opt.param_groups:
                g["lr"] = schedule.cfg.lr * f
        loss_value, parts = loss_step(task, model, xb, yb, tb, loss, precision)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss_value).backward()
        if schedule is not None and schedule.cfg.grad_clip is not None:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), schedule.cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        sums += parts
    return sums


class Session(Protocol):
    """Where the loop runs: its rank among `world` workers, the checkpoint it resumes from, where reports go.
    `RayTrainSession` inside a Ray Train worker group; a warm trial actor brings its own (tasks/warm.py)."""

    rank: int
    world: int

    def checkpoint(self) -> dict[str, Any] | None: ...

    def report(self, metrics: dict[str, Any], folder: str | None) -> None: ...


class RayTrainSession:
    """The loop inside a Ray Train worker: rank and world from its context, checkpoints through Ray Train."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def checkpoint(self) -> dict[str, Any] | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if not ckpt:
            return None
        with ckpt.as_directory() as d:
            return dict(torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=False))

    def report(self, metrics: dict[str, Any], folder: str | None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)


class Reporter:
    """Sends `ray.train.report` calls from a background thread, at most one in flight.

    A report uploads the checkpoint and then waits until Ray Train's controller has taken the previous
    one (it polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S). Here neither holds up the next epoch; the loop
    waits only when the previous report is still going when the next is due. With one in flight, the
    checkpoint a restarted run resumes from is at most two behind the newest one written.
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdflow-report")
        self.pending: Future[None] | None = None

    def send(self, metrics: dict[str, Any], payload: dict[str, Any] | None) -> None:
        self.wait()
        folder = None
        if payload is not None:  # serialized now: the weights keep changing after this returns
            folder = tempfile.mkdtemp(prefix="kdflow-ckpt-")
            torch.save(payload, os.path.join(folder, "state.pt"))
        self.pending = self.pool.submit(self._report, metrics, folder)

    def _report(self, metrics: dict[str, Any], folder: str | None) -> None:
        try:
            self.session.report(metrics, folder)
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


@dataclass
class LoopState:
    """What a checkpoint carries besides the weights and the optimizer, so a restarted worker group resumes."""

    epoch: int = 0  # the last finished epoch
    history: list[dict[str, float]] = field(default_factory=list)
    best: float | None = None  # the watched metric's best value so far
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the watched metric last improved
    resumed_from: int | None = None
    best_state: dict[str, torch.Tensor] | None = None  # the best epoch's weights, on the CPU
    checkpoints: int = 0  # checkpoints written before the final one
    checkpoint_s: float = 0.0  # seconds spent writing them
    nodes: list[str] = field(default_factory=list)  # the Ray node id of each rank: this worker group's

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> LoopState:
        """Not `nodes`: a restarted worker group may run elsewhere, and records where it ran itself."""
        known = {f.name for f in fields(cls)} - {"nodes"}
        return cls(**{k: v for k, v in saved.items() if k in known})

    def record(self, metrics: dict[str, float], model: nn.Module, watch: str, maximize: bool) -> None:
        """Append the epoch to the history; keep a copy of the weights when `watch` strictly improved."""
        value = metrics.get(watch)
        if value is not None and (self.best is None or (value > self.best if maximize else value < self.best)):
            self.best, self.best_epoch, self.bad_epochs = value, int(metrics["epoch"]), 0
            self.best_state = {k: t.detach().cpu().clone() for k, t in model.state_dict().items()}
        else:
            self.bad_epochs += 1
        self.history.append(metrics)
        self.epoch = int(metrics["epoch"])


def checkpoint_due(cfg: FitConfig, epoch: int, since_last_s: float) -> bool:
    """Every `checkpoint_every` epochs when set, else once `checkpoint_interval_s` have passed (docs/training.md)."""
    if cfg.checkpoint_every:
        return epoch % cfg.checkpoint_every == 0
    return since_last_s >= cfg.checkpoint_interval_s


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


@dataclass
class Worker:
    """One Ray Train worker's setup: where it runs, its rows, its model and optimizer."""

    cfg: FitConfig
    rank: int
    world: int
    device: torch.device
    share: Share | None  # the rows, held; None when they stream (`train_stream`)
    per_worker: int  # rows per epoch on every rank: the same number of steps everywhere, as DDP requires
    val_rows: TargetBatch | None  # None when there is no val split, or when it streams (`val_stream`)
    model: nn.Module  # DDP-wrapped when distributed
    core: nn.Module  # the model itself
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_stream: stream.Streamed | None = None  # this rank's train rows, read block by block (tasks/stream.py)
    val_stream: stream.Streamed | None = None

    def log(self, msg: str) -> None:
        if self.rank == 0:
            log(f"[{self.cfg.log_prefix}] {msg}")


def setup_worker(cfg: FitConfig, session: Session | None = None) -> Worker:
    """Device, this worker's share of the rows (train and val), the model and its optimizer."""
    session = session or RayTrainSession()
    rank, world = session.rank, session.world
    torch.set_num_threads(cfg.resources.threads)
    if cfg.resources.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    n = cfg.data.rows()
    a, b = shard_ranges(n, world)[rank]
    train_stream = stream.streamed(cfg.data, a, b, cfg.hold_share_bytes)
    share = cfg.task.place(cfg.data.load(a, b), cfg.dims, device) if train_stream is None else None
    val_rows, val_stream = None, None
    if cfg.val is not None:
        va, vb = shard_ranges(cfg.val.rows(), world)[rank]
        # held beside the training rows for the whole fit: streamed past a smaller share of the budget
        val_stream = stream.streamed(cfg.val, va, vb, int(cfg.hold_share_bytes * stream.VAL_HOLD_SHARE))
        val_rows = cfg.val.load(va, vb) if val_stream is None else None
    torch.manual_seed(cfg.seed)
    core = cfg.task.build_model(cfg.model, cfg.params, cfg.dims)
    if world > 1 or device.type != "cpu":
        import ray.train.torch

        model = ray.train.torch.prepare_model(core)
    else:
        model = core
    core = model.module if hasattr(model, "module") else model
    return Worker(cfg, rank, world, device, share, n // world, val_rows, model, core,
                  make_optimizer(model, cfg.optimizer),
                  torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16"), train_stream, val_stream)


def resume(w: Worker, session: Session | None = None) -> LoopState:
    """The loop state of the session's latest checkpoint (weights and optimizer loaded), or a fresh one."""
    saved = (session or RayTrainSession()).checkpoint()
    if saved is None:
        return LoopState()
    w.core.load_state_dict(saved["model"])
    w.opt.load_state_dict(saved["optimizer"])
    if w.scaler.is_enabled() and saved.get("scaler"):  # absent or empty when saved without fp16
        w.scaler.load_state_dict(saved["scaler"])
    state = LoopState.from_checkpoint(saved)
    state.resumed_from = saved["epoch"]
    w.log(f"resumed from the checkpoint after epoch {saved['epoch']}")
    return state


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MiB (what a worker's share of the rows costs it)."""
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / (1024 * 1024 if sys.platform == "darwin" else 1024)


def run_epoch(w: Worker, epoch: int, gen: torch.Generator) -> dict[str, float]:
    """Train on a fresh order of this worker's rows (seeded by epoch: a resumed run repeats it), then validate
    on every worker's share of val, summed, so that all ranks see the same numbers."""
    cfg = w.cfg
    gen.manual_seed(cfg.seed * 100_003 + epoch * 1000 + w.rank)
    w.model.train()
    t0 = time.perf_counter()
    steps = math.ceil(w.per_worker / cfg.batch_size)
    schedule = schedule_for(cfg.optimizer, epoch, steps, cfg.epochs)
    if w.share is not None:
        order = torch.randperm(len(w.share), generator=gen)[:w.per_worker].to(w.share.rows_device)
        sums_t = train_epoch(cfg.task, w.model, w.opt, w.scaler, w.share, order, cfg.batch_size, cfg.loss,
                             cfg.precision, schedule)
    else:  # streamed: chunks of whole batches, the next block read while this one trains
        assert w.train_stream is not None
        sums_t, done = torch.zeros(3, device=w.device), 0
        for chunk, order in stream.epoch_chunks(cfg.task, w.train_stream.source, w.train_stream.pieces, w.per_worker,
                                                cfg.batch_size, gen, cfg.dims, w.device, w.train_stream.window,
                                                w.train_stream.ahead):
            part = None if schedule is None else replace(schedule, first_step=schedule.first_step + done)
            sums_t += train_epoch(cfg.task, w.model, w.opt, w.scaler, chunk, order.to(chunk.rows_device),
                                  cfg.batch_size, cfg.loss, cfg.precision, part)
            done += math.ceil(len(order) / cfg.batch_size)
            del chunk, order  # not held while the stream builds the next window
    if w.device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize(w.device)
    train_s = time.perf_counter() - t0
    if w.world > 1:  # the mean over workers, so every rank logs (and may stop on) the same train loss
        torch.distributed.all_reduce(sums_t)
        sums_t /= w.world
    sums = sums_t.tolist()
    metrics: dict[str, float] = {"epoch": epoch, "train_loss": sums[0] / steps, "train_kd": sums[1] / steps,
                                 "train_ce": sums[2] / steps, "samples_per_s": w.per_worker * w.world / train_s,
                                 "epoch_s": train_s, "peak_rss_mb": peak_rss_mb()}
    if w.val_rows is not None or w.val_stream is not None:
        with span("validate", epoch=epoch):
            metrics.update(validate(w))
    return metrics


def validate(w: Worker) -> dict[str, float]:
    """The validation metrics over every worker's share of val (held or streamed), summed across workers."""
    cfg = w.cfg
    if w.val_rows is not None:
        counts = cfg.task.eval_counts(w.core, w.val_rows, cfg.dims, w.device)
        with_teacher = bool(w.val_rows.targets)
    else:
        assert w.val_stream is not None
        counts, with_teacher = stream.streamed_counts(cfg.task, w.core, w.val_stream.source, w.val_stream.pieces,
                                                      cfg.dims, w.device)
    if w.world > 1:
        torch.distributed.all_reduce(counts)
    return {f"val_{k}": v for k, v in cfg.task.metrics(counts, with_teacher).items()}


@dataclass
class Decision:
    """Whether to stop after `epoch`: early stopping on a plateau (decided here), else the epoch hook's answer
    (rank 0 asks; `answer` waits for it and gives every rank rank 0's answer).

    The hook is the search's pruner, a round trip to its monitor actor (2-8 ms here, as long as a digits
    trial's epoch). The loop trains the next epoch while the answer travels and drops that epoch when the
    answer is "pruned": the trial's history, values and decisions are those of asking and waiting, at the
    cost of one epoch's compute in a pruned trial (whose weights nobody keeps)."""

    epoch: int
    metrics: dict[str, float]
    early: bool = False
    waiting: Callable[[], bool] | None = None

    def answer(self, w: Worker) -> StopReason | None:
        stop = 1 if self.early else 2 if self.waiting is not None and self.waiting() else 0
        if w.world > 1:  # the hook answers rank 0 only, and every rank must leave the loop together
            flag = torch.tensor([stop], device=w.device)
            torch.distributed.broadcast(flag, src=0)
            stop = int(flag.item())
        return {0: None, 1: StopReason.EARLY_STOPPED, 2: StopReason.PRUNED}[stop]


def ask_decision(w: Worker, state: LoopState, epoch: int, metrics: dict[str, float]) -> Decision:
    es, hook = w.cfg.early_stopping, w.cfg.epoch_hook
    decision = Decision(epoch, metrics, early=bool(es and state.bad_epochs >= es.patience))
    if hook is not None and w.rank == 0 and not decision.early:
        decision.waiting = hook.ask(epoch, metrics)
    return decision


def checkpoint(w: Worker, state: LoopState, reporter: Reporter, metrics: dict[str, float],
               stop_reason: StopReason) -> None:
    """Report this epoch with a checkpoint (rank 0 attaches the weights; every rank reports)."""
    t0 = time.perf_counter()
    report = {**metrics, "stop_reason": stop_reason.value, "world_size": w.world, "rows_per_worker": w.per_worker,
              "resumed_from": state.resumed_from, "best_epoch": state.best_epoch, "checkpoints": state.checkpoints,
              "checkpoint_s": state.checkpoint_s}
    payload = None
    if w.rank == 0:
        payload = {"model": w.core.state_dict(), "optimizer": w.opt.state_dict(), "scaler": w.scaler.state_dict(),
                   **{f.name: getattr(state, f.name) for f in fields(state)}}
    reporter.send(report, payload)
    state.checkpoints += 1
    state.checkpoint_s += time.perf_counter() - t0


def epoch_summary(metrics: dict[str, float], dims: Mapping[str, Any]) -> str:
    """The progress line's numbers in the task's own terms: a causal LM's rows are token sequences, judged by
    perplexity (its next-token accuracy is not what anyone reads), a classifier's by accuracy."""
    line = f"loss {metrics['train_loss']:.4f}"
    if "val_perplexity" in metrics:
        return line + f" val_ppl {metrics['val_perplexity']:.3f} {metrics['samples_per_s'] * int(dims['seq_len']):,.0f} tokens/s"
    if "val_accuracy" in metrics:
        line += f" val_acc {metrics['val_accuracy']:.4f}"
    return line + f" {metrics['samples_per_s']:,.0f} samples/s"


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every worker: setup, resume, then per epoch train + validate, decide, maybe checkpoint.

    `config["session"]` says where it runs; absent, in a Ray Train worker group."""
    cfg: FitConfig = config["fit"]
    session: Session | None = config.get("session")
    if session is None:  # in a Ray Train worker (a warm actor's fit does not import Ray Train: seconds, idle)
        quiet_report_lines()
        session = RayTrainSession()
    with span("setup worker"):
        w = setup_worker(cfg, session)
    with span("resume"):
        state = resume(w, session)
    state.nodes = worker_nodes(w.world)
    es: EarlyStopping | None = cfg.early_stopping
    watch, maximize = (es.metric, es.maximize) if es else cfg.task.best_by
    gen = torch.Generator()
    reporter = Reporter(session)
    last_ckpt = last_log = time.monotonic()
    asked: Decision | None = None  # the previous epoch's, answered after this epoch trained
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        with span("epoch", epoch=epoch):
            metrics = run_epoch(w, epoch, gen)
        if asked is not None:
            with span("stop decision", epoch=asked.epoch):
                stopped = asked.answer(w)
            if stopped is not None:  # the epoch just trained is dropped: the trial ends where it was stopped
                finish(w, state, reporter, asked, stopped)
                break
        state.record(metrics, w.core, watch, maximize)
        asked = ask_decision(w, state, epoch, metrics)
        if asked.early or epoch == cfg.epochs:  # nothing left to train while the answer travels
            with span("stop decision", epoch=epoch):
                stopped = asked.answer(w)
            finish(w, state, reporter, asked, stopped or StopReason.COMPLETED)
            break
        if epoch == 1 or time.monotonic() - last_log >= PROGRESS_EVERY_S:
            last_log = time.monotonic()
            w.log(f"epoch {epoch}/{cfg.epochs} {epoch_summary(metrics, cfg.dims)}")
        # a report costs a controller round trip, so none without a checkpoint
        if checkpoint_due(cfg, epoch, time.monotonic() - last_ckpt):
            with span("checkpoint", epoch=epoch):
                checkpoint(w, state, reporter, metrics, StopReason.RUNNING)
            last_ckpt = time.monotonic()
    with span("reporter close"):
        reporter.close()


def finish(w: Worker, state: LoopState, reporter: Reporter, last: Decision, stopped: StopReason) -> None:
    """The last epoch's line and the final checkpoint, of the epoch the fit stopped at."""
    suffix = f" ({stopped.value})" if stopped != StopReason.COMPLETED else ""
    w.log(f"epoch {last.epoch}/{w.cfg.epochs} {epoch_summary(last.metrics, w.cfg.dims)}{suffix}")
    with span("checkpoint", epoch=last.epoch):
        checkpoint(w, state, reporter, last.metrics, stopped)


# ---------------------------------------------------------------- the trainer


@dataclass
class FitResult:
    state_dict: dict[str, torch.Tensor]  # the best epoch's weights
    history: list[dict[str, float]]
    stop_reason: StopReason
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


def fit(cfg: FitConfig, *, storage: Storage, run_name: str) -> FitResult:
    """Train with Ray Train (`cfg.resources.workers` data-parallel workers; gloo on CPU, NCCL on GPU)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    res = cfg.resources
    resources = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.use_gpu else {})}
    run_config = RunConfig(
        name=run_name,
        storage_path=checkpoints_path(storage),
        storage_filesystem=storage.pyarrow_fs() if storage.is_s3 else None,
        failure_config=FailureConfig(max_failures=res.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        logging_config=LoggingConfig(log_level="WARNING"),
    )
    trainer = TorchTrainer(
        train_loop, train_loop_config={"fit": cfg},
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=res.use_gpu, resources_per_worker=resources,
                                     placement_strategy=res.placement.upper()),
        run_config=run_config,
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        saved = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=False)
    return fit_result(saved, result.metrics or {}, res.workers)


def fit_result(saved: dict[str, Any], metrics: dict[str, Any], workers: int) -> FitResult:
    """The FitResult of a finished fit: its final checkpoint (`saved`) and its last report's metrics."""
    history = saved["history"]
    return FitResult(
        state_dict=saved["best_state"] or saved["model"], history=history,
        stop_reason=StopReason(metrics.get("stop_reason", StopReason.COMPLETED.value)),
        resumed_from=saved["resumed_from"], best_epoch=saved["best_epoch"],
        samples_per_s=steady_samples_per_s(history), workers=int(metrics.get("world_size", workers)),
        checkpoints=int(saved.get("checkpoints", 0)), checkpoint_s=float(saved.get("checkpoint_s", 0.0)),
        nodes=list(saved.get("nodes", [])),
    )
