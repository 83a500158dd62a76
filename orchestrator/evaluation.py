"""Evaluation on the test split: the student's accuracy, agreement, size and latency; the teacher's accuracy."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.kinds import TaskKind
from tasks.models import model_bytes, num_params
from tasks.soft_targets import SoftTargetStore
from tasks.storage import Storage
from tasks.train import evaluate


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


def evaluate_test(task: TaskKind, model: nn.Module, manifest: dict[str, Any], storage: Storage) -> dict[str, Any]:
    test = SoftTargetStore(storage).read(manifest, "test")
    m = evaluate(task, model, test, task.dims(manifest), torch.device("cpu"))
    return {"test_accuracy": m["accuracy"], "teacher_agreement": m["agreement"], "num_params": num_params(model),
            "model_bytes": model_bytes(model), "latency_ms": latency_ms(model, manifest["num_features"])}


def teacher_test_accuracy(task: TaskKind, manifest: dict[str, Any], storage: Storage) -> float:
    """From the stored test-split logits: no teacher forward needed, on reruns too."""
    test = SoftTargetStore(storage).read(manifest, "test")
    pred = task.decode_targets(test.targets, task.dims(manifest)).argmax(-1)
    return float((pred == test.y).float().mean())
