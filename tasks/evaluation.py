"""Evaluation on a stored split, for every kind: its metrics streamed shard by shard, and a model's latency."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.errors import UserError
from tasks.kinds.base import TaskKind
from tasks.storage import Storage
from tasks.store.store import SoftTargetStore


def split_metrics(kind: TaskKind, models: dict[str, nn.Module], manifest: dict[str, Any], storage: Storage,
                  split: str = "test", without_targets: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """Each model's metrics over a split, in one pass that reads each shard once.

    The kind's counts are additive (`TaskKind.eval_counts`), so the driver holds one shard and the running
    sums, never the split. A model named in `without_targets` is scored on the labels alone (a teacher judged
    against its own stored outputs would agree with itself).
    """
    dims, cpu = kind.dims(manifest), torch.device("cpu")
    counts: dict[str, torch.Tensor] = {}
    with_teacher = False
    for batch in SoftTargetStore(storage).batches(manifest, split):
        with_teacher = with_teacher or bool(batch.targets)
        bare = dataclasses.replace(batch, targets={}) if without_targets else batch
        for name, model in models.items():
            c = kind.eval_counts(model, bare if name in without_targets else batch, dims, cpu)
            counts[name] = c if name not in counts else counts[name] + c
    if not counts:
        raise UserError(f"no rows in split {split}", where=SoftTargetStore(storage).uri(manifest["key"]))
    return {name: kind.metrics(c, with_teacher and name not in without_targets) for name, c in counts.items()}


def stream_metrics(kind: TaskKind, model: nn.Module, manifest: dict[str, Any], storage: Storage,
                   split: str = "test") -> dict[str, float]:
    """One model's metrics over a split, read one shard at a time (see `split_metrics`)."""
    return split_metrics(kind, {"model": model}, manifest, storage, split)["model"]


def latency_ms(model: nn.Module, example: torch.Tensor, repeats: int = 200) -> float:
    """Median latency of one request (`example`: one row) on one CPU thread: what a caller serving one request
    at a time waits. The driver's torch thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for _ in range(20):
                model(example)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(example)
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return float(np.median(times) * 1000)
