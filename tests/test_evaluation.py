"""orchestrator/evaluation.py: test-split metrics and the latency probe, which must leave the driver as it was."""

from __future__ import annotations

import torch

from orchestrator.evaluation import latency_ms
from tasks.models import build_model


def test_latency_probe_restores_the_thread_count() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ms = latency_ms(build_model("mlp", {"hidden": [8]}, 4, 3), 4, repeats=5)
        assert ms > 0
        assert torch.get_num_threads() == 2  # the probe runs on one thread, then puts the count back
    finally:
        torch.set_num_threads(before)
