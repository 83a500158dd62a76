"""Where a fit's rows come from: ranges of a split, read by the worker that trains on them.

`ShardSource` reads the soft-target store (a student's rows with their teacher targets); `ArraySource` takes
arrays from Ray's object store and `SourceRows` reads a Parquet source's pieces (a teacher's rows, no
targets). A source that can say its stored size and where its blocks end lets a share over the fit's
`hold_share_bytes` stream (tasks/train/stream.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tasks.pieces import SplitRows
from tasks.storage import Storage
from tasks.store.shards import TargetBatch
from tasks.store.store import SoftTargetStore


class RowSource(Protocol):
    """Rows a fit reads by range. A source may also say its stored size (`stored_bytes(start, stop)`) and
    where its pieces end (`blocks(start, stop)`): then a share over the fit's `hold_share_bytes` streams
    (tasks/train/stream.py)."""

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

    Not kept by a warm process's row cache (tasks/train/warm.py:with_cache): a teacher is trained once per cache key,
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
