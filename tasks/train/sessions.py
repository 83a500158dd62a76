"""Where the loop runs: a Ray Train worker group (`RayTrainSession`) or a warm process (`LocalSession`), and
the `Reporter` that sends a worker's reports and checkpoints without holding up its next epoch."""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import torch

from tasks.layout import checkpoints_path
from tasks.storage import Storage, load_torch

STATE = "state.pt"


class Session(Protocol):
    """Where the loop runs: its rank among `world` workers, the checkpoint it resumes from, where reports go.
    `RayTrainSession` inside a Ray Train worker group; `LocalSession` in a warm process (tasks/train/warm.py)."""

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
            return dict(load_torch(os.path.join(d, STATE), "checkpoint"))

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
            torch.save(payload, os.path.join(folder, STATE))
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


class LocalSession:
    """The loop as the only worker of this process; checkpoints go to `checkpoints/<run_name>/state.pt`."""

    rank = 0
    world = 1

    def __init__(self, storage: Storage, run_name: str) -> None:
        self.storage = storage
        self.path = f"{checkpoints_path(storage, run_name)}/{STATE}"
        self.metrics: dict[str, Any] = {}
        self.saved: bytes | None = None  # the newest checkpoint, also kept here: the result is read from it

    def checkpoint(self) -> dict[str, Any] | None:
        if not self.storage.exists(self.path):
            return None
        return dict(self.storage.read_torch(self.path))

    def report(self, metrics: dict[str, Any], folder: str | None) -> None:
        self.metrics = metrics
        if folder is not None:
            with open(os.path.join(folder, STATE), "rb") as f:
                self.saved = f.read()
            self.storage.write_bytes(self.path, self.saved)  # atomic: a crash leaves the previous one
