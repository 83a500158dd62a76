"""The one train loop on a single warm process: no Ray Train run, checkpoints straight to the storage.

A search's trials (and a single-worker run's teacher and student stages) are short (a small student, a few
epochs, many of them pruned), and starting a Ray Train run for each costs seconds of controller, worker
group and placement group before the first step. A long-lived warm actor (orchestrator/fitting.py) instead
calls `fit_here`, which runs the same `train_loop` with a `LocalSession`: rank 0 of 1, its checkpoints
written to the run's folder under `checkpoints/`, so a retry on a fresh actor resumes from the newest one.
`CachedSource` keeps the decoded soft-target rows between fits, keyed by the store entry's cache key.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import Any

import torch

from tasks.storage import Storage, load_torch
from tasks.store.shards import TargetBatch
from tasks.train.config import FitConfig
from tasks.train.loop import train_loop
from tasks.train.result import FitResult, fit_result
from tasks.train.sessions import LocalSession
from tasks.train.sources import ShardSource


@dataclass
class CachedSource:
    """A ShardSource whose decoded rows are kept in `cache` under (store root, cache key, split, range).

    The cache key names the soft targets' content (teachers x data x format), so two searches over
    different targets never read each other's rows, even from one warm process."""

    source: ShardSource
    cache: dict[tuple[str, str, str, int, int], TargetBatch]

    def rows(self) -> int:
        return self.source.rows()

    def load(self, start: int, stop: int) -> TargetBatch:
        key = (self.source.storage.base, str(self.source.manifest["key"]), self.source.split, start, stop)
        if key not in self.cache:
            self.cache[key] = self.source.load(start, stop)
        return self.cache[key]

    def blocks(self, start: int, stop: int) -> list[tuple[int, int]]:
        return self.source.blocks(start, stop)

    def stored_bytes(self, start: int, stop: int) -> int:
        return self.source.stored_bytes(start, stop)

    @property
    def uncached(self) -> ShardSource:
        """What a streamed share reads through: its blocks are not kept (they are what does not fit)."""
        return self.source


def with_cache(cfg: FitConfig, cache: dict[tuple[str, str, str, int, int], TargetBatch]) -> FitConfig:
    """The config with its stored rows (train and val) read through `cache`."""
    def wrap(src: Any) -> Any:
        return CachedSource(src, cache) if isinstance(src, ShardSource) else src

    return dataclasses.replace(cfg, data=wrap(cfg.data), val=wrap(cfg.val))


def warm_up() -> None:
    """Pay, when the process starts, the first-use costs a fit would pay inside its first epoch: the first
    optimizer step imports torch._dynamo with sympy (Optimizer.step is wrapped by `torch._disable_dynamo`,
    which imports it on first call: ~820 modules, 0.85 s here), and the first Parquet read imports pyarrow's
    dataset layer and pandas (0.14 s). In a search these landed in each slot's first trial, during which the
    other slot ran trials alone (benchmarks/RESULTS-search.md)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 2)).sum().backward()
    opt.step()
    buf = io.BytesIO()
    pq.write_table(pa.table({"x": [0.0]}), buf)
    pq.read_table(io.BytesIO(buf.getvalue()))


def fit_here(cfg: FitConfig, *, storage: Storage, run_name: str) -> FitResult:
    """One worker's fit in this process (resuming from the run's checkpoint when one exists)."""
    if cfg.resources.workers != 1:
        raise ValueError("fit_here runs a single worker; data-parallel fits go through tasks.train.fit")
    session = LocalSession(storage, run_name)
    train_loop({"fit": cfg, "session": session})
    if session.saved is None and storage.exists(session.path):  # a finished fit's checkpoint: nothing to train
        session.saved = storage.read_bytes(session.path)
    if session.saved is None:
        raise RuntimeError(f"training run {run_name} produced no checkpoint")
    saved = load_torch(session.saved, f"checkpoint of {run_name}")
    return fit_result(saved, session.metrics, 1)
