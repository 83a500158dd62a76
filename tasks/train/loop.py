"""The one train loop: teacher (hard labels) and student (distillation), 1 worker or N data-parallel.

`train_loop` runs inside every worker (a Ray Train worker, or a warm process's only one). It reads only
this worker's share of the rows (train and val), runs `epochs` epochs, validates every epoch (the val
counts are summed over the workers, so every rank sees the same metrics), stops early on a plateau or when
the epoch hook (the search's pruner) says so, and checkpoints every `checkpoint_every` epochs or
`checkpoint_interval_s` seconds, so a restarted worker group resumes where it stopped. What differs
between kinds of task (the model, how rows are placed, the objective, the metrics) it asks the kind in
the FitConfig. docs/training.md says why the loop looks the way it does and what each choice costs.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

import torch
from torch import nn

from tasks.kinds.base import Share
from tasks.ray_internals import quiet_train_reports
from tasks.store.shards import TargetBatch
from tasks.store.store import shard_ranges
from tasks.trace import span
from tasks.train import stream
from tasks.train.config import EarlyStopping, FitConfig
from tasks.train.result import StopReason
from tasks.train.sessions import RayTrainSession, Reporter, Session
from tasks.train.step import make_optimizer, schedule_for, train_epoch

# A progress line for the first and last epoch and at most one per this many seconds between: a small
# model runs dozens of epochs a second, and every line travels through Ray's log forwarding.
PROGRESS_EVERY_S = 2.0


class EpochHook(Protocol):
    """The search's pruner (`FitConfig.epoch_hook`): `hook.ask(epoch, metrics)` sends the epoch's values and
    returns a function that waits for the answer (stop or not), so the loop can train the next epoch while it
    travels (`Decision`)."""

    def ask(self, epoch: int, metrics: dict[str, float]) -> Callable[[], bool]: ...


def log(msg: str) -> None:
    # Not print(): Ray Train patches it in workers to tee into its logger, and each line showed up twice.
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


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
    after: list[dict[str, Any]] = field(default_factory=list)  # the records of the kind's stage after the epochs

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
    train_stream: stream.Streamed | None = None  # this rank's train rows, read block by block (tasks/train/stream.py)
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
    # an online teacher labels the held share's batches (a streamed share is not built for it yet)
    train_stream = None if cfg.online_teacher else stream.streamed(cfg.data, a, b, cfg.hold_share_bytes)
    share = cfg.kind.place(cfg.data.load(a, b), cfg.dims, device) if train_stream is None else None
    if cfg.online_teacher is not None and cfg.after_epochs is None:  # else the stage after the epochs takes them
        share = cfg.kind.with_teacher(share, online_teachers(cfg, device), cfg.online_teacher.rule, cfg.dims)
    val_rows, val_stream = None, None
    if cfg.val is not None:
        va, vb = shard_ranges(cfg.val.rows(), world)[rank]
        # held beside the training rows for the whole fit: streamed past a smaller share of the budget
        val_stream = stream.streamed(cfg.val, va, vb, int(cfg.hold_share_bytes * stream.VAL_HOLD_SHARE))
        val_rows = cfg.val.load(va, vb) if val_stream is None else None
    torch.manual_seed(cfg.seed)
    core = cfg.kind.build_model(cfg.model, cfg.params, cfg.dims)
    if world > 1 or device.type != "cpu":
        import ray.train.torch

        model = ray.train.torch.prepare_model(core)
    else:
        model = core
    core = model.module if hasattr(model, "module") else model
    return Worker(cfg, rank, world, device, share, n // world, val_rows, model, core,
                  make_optimizer(model, cfg.optimizer),
                  torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16"), train_stream, val_stream)


def online_teachers(cfg: FitConfig, device: torch.device) -> list[nn.Module]:
    """The fit's online teachers, rebuilt by the kind from their recipe and weights on storage, in eval mode."""
    assert cfg.online_teacher is not None
    out = []
    for path in cfg.online_teacher.paths:
        saved = cfg.online_teacher.storage.read_torch(path)
        model = cfg.kind.build_model(saved["model"], saved["params"], cfg.dims)
        model.load_state_dict(saved["state_dict"])
        out.append(model.to(device).eval())
    return out


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
        sums_t = train_epoch(cfg.kind, w.model, w.opt, w.scaler, w.share, order, cfg.batch_size, cfg.loss,
                             cfg.precision, schedule)
    else:  # streamed: chunks of whole batches, the next block read while this one trains
        assert w.train_stream is not None
        sums_t, done = torch.zeros(3, device=w.device), 0
        for chunk, order in stream.epoch_chunks(cfg.kind, w.train_stream.source, w.train_stream.pieces, w.per_worker,
                                                cfg.batch_size, gen, cfg.dims, w.device, w.train_stream.window,
                                                w.train_stream.ahead):
            part = None if schedule is None else replace(schedule, first_step=schedule.first_step + done)
            sums_t += train_epoch(cfg.kind, w.model, w.opt, w.scaler, chunk, order.to(chunk.rows_device),
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
        counts = cfg.kind.eval_counts(w.core, w.val_rows, cfg.dims, w.device)
        with_teacher = bool(w.val_rows.targets)
    else:
        assert w.val_stream is not None
        counts, with_teacher = stream.streamed_counts(cfg.kind, w.core, w.val_stream.source, w.val_stream.pieces,
                                                      cfg.dims, w.device)
    if w.world > 1:
        torch.distributed.all_reduce(counts)
    return {f"val_{k}": v for k, v in cfg.kind.metrics(counts, with_teacher).items()}


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


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every worker: setup, resume, then per epoch train + validate, decide, maybe checkpoint.

    `config["session"]` says where it runs; absent, in a Ray Train worker group."""
    cfg: FitConfig = config["fit"]
    session: Session | None = config.get("session")
    if session is None:  # in a Ray Train worker (a warm actor's fit does not import Ray Train: seconds, idle)
        quiet_train_reports()
        session = RayTrainSession()
    with span("setup worker"):
        w = setup_worker(cfg, session)
    with span("resume"):
        state = resume(w, session)
    state.nodes = worker_nodes(w.world)
    es: EarlyStopping | None = cfg.early_stopping
    watch, maximize = (es.metric, es.maximize) if es else cfg.kind.best_by
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
            if cfg.after_epochs is not None and stopped is None:
                with span("after epochs"):
                    after_epochs(w, state, asked.metrics)
            finish(w, state, reporter, asked, stopped or StopReason.COMPLETED)
            break
        if epoch == 1 or time.monotonic() - last_log >= PROGRESS_EVERY_S:
            last_log = time.monotonic()
            w.log(f"epoch {epoch}/{cfg.epochs} {cfg.kind.epoch_summary(metrics, cfg.dims)}")
        # a report costs a controller round trip, so none without a checkpoint
        if checkpoint_due(cfg, epoch, time.monotonic() - last_ckpt):
            with span("checkpoint", epoch=epoch):
                checkpoint(w, state, reporter, metrics, StopReason.RUNNING)
            last_ckpt = time.monotonic()
    if cfg.epochs == 0 and state.epoch == 0:  # the kind's stage alone (on-policy distillation instead of offline KD)
        metrics: dict[str, float] = {"epoch": 0}
        with span("after epochs"):
            after_epochs(w, state, metrics)
        checkpoint(w, state, reporter, metrics, StopReason.COMPLETED)
    with span("reporter close"):
        reporter.close()


def after_epochs(w: Worker, state: LoopState, metrics: dict[str, float]) -> None:
    """The kind's stage after the offline epochs (on-policy distillation): it trains on, so the fit keeps its final
    weights rather than the best epoch's, and the last epoch's val_* metrics (what a search judges a trial by, and
    the last report) become those of the final weights."""
    state.after = w.cfg.kind.run_after_epochs(w, w.cfg.after_epochs)
    state.best_state = None
    if w.val_rows is not None or w.val_stream is not None:
        metrics.update(validate(w))
    if state.history:
        state.history[-1].update(metrics)
        state.best_epoch = int(state.history[-1]["epoch"])


def finish(w: Worker, state: LoopState, reporter: Reporter, last: Decision, stopped: StopReason) -> None:
    """The last epoch's line and the final checkpoint, of the epoch the fit stopped at."""
    suffix = f" ({stopped.value})" if stopped != StopReason.COMPLETED else ""
    w.log(f"epoch {last.epoch}/{w.cfg.epochs} {w.cfg.kind.epoch_summary(last.metrics, w.cfg.dims)}{suffix}")
    with span("checkpoint", epoch=last.epoch):
        checkpoint(w, state, reporter, last.metrics, stopped)
