"""One optimizer step and one epoch of steps: the forward under autocast, the kind's objective, the schedule."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tasks.kinds.base import Share, TaskKind
from tasks.store.shards import TargetBatch
from tasks.train.config import LossConfig, OptimizerConfig


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


def evaluate(kind: TaskKind, model: nn.Module, data: TargetBatch, dims: dict[str, int],
             device: torch.device) -> dict[str, float]:
    """The kind's metrics over `data` (its counts, then its metrics from them)."""
    return kind.metrics(kind.eval_counts(model, data, dims, device), bool(data.targets))


def loss_step(kind: TaskKind, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, tb: torch.Tensor | None,
              loss: LossConfig | None, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward under autocast, the kind's objective in float32; returns the loss and detached [total, kd, ce]."""
    with autocast(xb.device, precision):
        logits = model(xb)
    return kind.objective(logits, yb, tb, loss)


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


def train_epoch(kind: TaskKind, model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
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
        loss_value, parts = loss_step(kind, model, xb, yb, tb, loss, precision)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss_value).backward()
        if schedule is not None and schedule.cfg.grad_clip is not None:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), schedule.cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        sums += parts
    return sums
