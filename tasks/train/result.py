"""What a fit gives back: the best epoch's weights, its history and why it stopped."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch


class StopReason(str, Enum):
    """Why a fit ended (a str, so results and reports carry the plain word)."""

    COMPLETED = "completed"
    EARLY_STOPPED = "early_stopped"  # the watched metric stopped improving for `patience` epochs
    PRUNED = "pruned"  # the search's epoch hook said stop
    RUNNING = "running"  # in a report before the last: the fit goes on


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
    after: list[dict[str, Any]] = field(default_factory=list)  # records of the kind's stage after the epochs


def steady_samples_per_s(history: list[dict[str, float]]) -> float:
    """Median epoch throughput, leaving out the first epoch (warm-up) when there are more."""
    rates = [h["samples_per_s"] for h in history]
    return float(np.median(rates[1:] if len(rates) > 1 else rates)) if rates else 0.0


def fit_result(saved: dict[str, Any], metrics: dict[str, Any], workers: int) -> FitResult:
    """The FitResult of a finished fit: its final checkpoint (`saved`) and its last report's metrics."""
    history = saved["history"]
    return FitResult(
        state_dict=saved["best_state"] or saved["model"], history=history,
        stop_reason=StopReason(metrics.get("stop_reason", StopReason.COMPLETED.value)),
        resumed_from=saved["resumed_from"], best_epoch=saved["best_epoch"],
        samples_per_s=steady_samples_per_s(history), workers=int(metrics.get("world_size", workers)),
        checkpoints=int(saved.get("checkpoints", 0)), checkpoint_s=float(saved.get("checkpoint_s", 0.0)),
        nodes=list(saved.get("nodes", [])), after=list(saved.get("after", [])),
    )
