"""Evaluation on the test split: the student's accuracy, agreement, size and latency; the teacher's accuracy."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.errors import UserError
from tasks.kinds import TaskKind
from tasks.models import model_bytes, num_params
from tasks.soft_targets import SoftTargetStore
from tasks.storage import Storage


def latency_ms(model: nn.Module, num_features: int, repeats: int = 200) -> float:
    """Median single-row CPU latency on one thread: what a caller serving one request at a time waits.

    The driver's torch thread count is restored afterwards (the registry's champion check runs after this).
    """
    x = torch.randn(1, num_features)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for _ in range(20):
                model(x)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return float(np.median(times) * 1000)


def stream_metrics(task: TaskKind, model: nn.Module, manifest: dict[str, Any], storage: Storage,
                   split: str = "test") -> dict[str, float]:
    """The task kind's metrics over a split, read one shard at a time (see `split_metrics`)."""
    return split_metrics(task, {"model": model}, manifest, storage, split)["model"]


def split_metrics(task: TaskKind, models: dict[str, nn.Module], manifest: dict[str, Any], storage: Storage,
                  split: str = "test", without_targets: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """Each model's metrics over a split, in one pass that reads each shard once.

    The task kind's counts are additive (`TaskKind.eval_counts`), so the driver holds one shard and the
    running sums, never the split. A model named in `without_targets` is scored on the labels alone (a
    teacher judged against its own stored outputs would agree with itself).
    """
    dims, cpu = task.dims(manifest), torch.device("cpu")
    counts: dict[str, torch.Tensor] = {}
    with_teacher = False
    for batch in SoftTargetStore(storage).batches(manifest, split):
        with_teacher = with_teacher or bool(batch.targets)
        bare = dataclasses.replace(batch, targets={}) if without_targets else batch
        for name, model in models.items():
            c = task.eval_counts(model, bare if name in without_targets else batch, dims, cpu)
            counts[name] = c if name not in counts else counts[name] + c
    if not counts:
        raise UserError(f"no rows in split {split}", where=SoftTargetStore(storage).uri(manifest["key"]))
    return {name: task.metrics(c, with_teacher and name not in without_targets) for name, c in counts.items()}


def evaluate_test(task: TaskKind, model: nn.Module, manifest: dict[str, Any], storage: Storage) -> dict[str, Any]:
    m = stream_metrics(task, model, manifest, storage)
    return {"test_accuracy": m["accuracy"], "teacher_agreement": m["agreement"], "num_params": num_params(model),
            "model_bytes": model_bytes(model), "latency_ms": latency_ms(model, manifest["num_features"])}


def teacher_test_accuracy(task: TaskKind, manifest: dict[str, Any], storage: Storage) -> float:
    """From the stored test-split logits, shard by shard (correct predictions and positions summed): no
    teacher forward needed, on reruns too."""
    dims = task.dims(manifest)
    correct = total = 0
    for test in SoftTargetStore(storage).batches(manifest, "test"):
        pred = task.decode_targets(test.targets, dims).argmax(-1)
        correct += int((pred == test.y).sum())
        total += test.y.numel()
    return correct / total if total else 0.0
