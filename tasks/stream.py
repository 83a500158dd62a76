"""A worker's share read block by block, one block ahead, instead of held whole.

A share whose stored bytes are over the fit's `hold_share_bytes` (`train.hold_share_mb`) is cut into
blocks at the source's own boundaries (the soft-target shards; fixed row counts for rows in Ray's object
store). Each epoch visits the blocks in a seeded order, shuffles each block's rows with the same
generator, and feeds the steps from a carry-over buffer, so that every step but the epoch's last has
exactly `batch_size` rows and every rank runs `ceil(rows / batch_size)` steps, as data-parallel training
requires. While one block trains, a thread reads and decodes the next one: a worker holds at most two
blocks and a batch's carry, whatever the corpus size. The order depends only on (seed, epoch, rank), so a
resumed epoch replays it. Shuffling is per block rather than over the whole share: the price of bounded
memory, as in every streaming loader (docs/training.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from tasks.shards import TargetBatch

ARRAY_BLOCK_ROWS = 65_536  # block size of a source with no boundaries of its own


def blocks(source: Any, start: int, stop: int) -> list[tuple[int, int]]:
    """[start, stop) cut where the source's own pieces end (its `blocks`), else in ARRAY_BLOCK_ROWS rows."""
    cut = getattr(source, "blocks", None)
    if cut is not None:
        return list(cut(start, stop))
    return [(a, min(a + ARRAY_BLOCK_ROWS, stop)) for a in range(start, stop, ARRAY_BLOCK_ROWS)]


def streams(source: Any, start: int, stop: int, hold_bytes: int) -> bool:
    """Whether rows [start, stop) are read block by block: their stored size is over `hold_bytes` and they
    span more than one block. A source that cannot say its size is held whole, as before."""
    size = getattr(source, "stored_bytes", None)
    if size is None or stop <= start:
        return False
    return size(start, stop) > hold_bytes and len(blocks(source, start, stop)) > 1


@dataclass(frozen=True)
class Streamed:
    """A share read block by block: the source it reads through (a warm process's cache is bypassed, since
    its blocks are what does not fit) and its blocks."""

    source: Any
    pieces: list[tuple[int, int]]


def streamed(source: Any, start: int, stop: int, hold_bytes: int) -> Streamed | None:
    """Rows [start, stop) as a Streamed share when they stream (`streams`), else None (held whole)."""
    if not streams(source, start, stop, hold_bytes):
        return None
    return Streamed(getattr(source, "uncached", source), blocks(source, start, stop))


def _read_ahead(source: Any, pieces: list[tuple[int, int]]) -> Iterator[TargetBatch]:
    """The pieces' rows in order, the next one read by a thread while the caller works on the current one."""
    if not pieces:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="kdflow-read-ahead") as pool:
        pending = pool.submit(source.load, *pieces[0])
        for nxt in [*pieces[1:], None]:
            rows = pending.result()
            if nxt is not None:
                pending = pool.submit(source.load, *nxt)
            yield rows
            del rows  # the caller's chunk holds what it still needs; drop this block before the next read


def epoch_chunks(task: Any, source: Any, pieces: list[tuple[int, int]], rows: int, batch_size: int,
                 gen: torch.Generator, dims: Mapping[str, int], device: torch.device) -> Iterator[tuple[Any, torch.Tensor]]:
    """This epoch's training rows as (placed share, order) chunks: `rows` rows in all, every chunk but the
    last a whole number of batches. `gen` is already seeded for (seed, epoch, rank)."""
    order = [pieces[int(i)] for i in torch.randperm(len(pieces), generator=gen)]
    carry: TargetBatch | None = None
    left = rows
    for i, block in enumerate(_read_ahead(source, order)):
        block = block.take(torch.randperm(len(block), generator=gen))
        if carry is not None:
            block = TargetBatch.concat([carry, block])
            carry = None
        n = min(len(block), left)
        final = n == left or i == len(order) - 1
        use = n if final else (n // batch_size) * batch_size
        if not final and use < n:
            carry = block.take(slice(use, n))
        if use:
            yield task.place(block.take(slice(0, use)), dims, device), torch.arange(use)
        left -= use
        if final:
            return


def streamed_counts(task: Any, model: torch.nn.Module, source: Any, pieces: list[tuple[int, int]],
                    dims: Mapping[str, int], device: torch.device) -> tuple[torch.Tensor, bool]:
    """Validation counts over the pieces, read one ahead (counts add up: TaskKind.eval_counts), and whether
    the rows carry teacher targets."""
    total: torch.Tensor | None = None
    with_teacher = False
    for rows in _read_ahead(source, pieces):
        counts = task.eval_counts(model, rows, dims, device)
        total = counts if total is None else total + counts
        with_teacher = bool(rows.targets)
    assert total is not None, "no validation rows to stream"
    return total, with_teacher
