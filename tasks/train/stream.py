"""A worker's share read a window of blocks at a time, the next one built ahead, instead of held whole.

A share whose stored bytes are over the fit's `hold_share_bytes` (`train.hold_share_mb`) is cut into
blocks at the source's own boundaries (the soft-target shards; fixed row counts for rows in Ray's object
store). Each epoch visits the blocks in a seeded order, shuffles each block's rows with the same
generator, and feeds the steps from a carry-over buffer, so that every step but the epoch's last has
exactly `batch_size` rows and every rank runs `ceil(rows / batch_size)` steps, as data-parallel training
requires. While one block trains, a thread reads and decodes the next one: a worker holds at most two
blocks and a batch's carry, whatever the corpus size. The order depends only on (seed, epoch, rank), so a
resumed epoch replays it.

Rows are shuffled within a window of blocks, not over the whole share: the price of bounded memory, as in
every streaming loader. The window is as many blocks as fit in WINDOW_SHARE (1/16) of the budget; a worker
holds the window being trained and the next one being built (shuffled as it is built, a block or a read
chunk at a time), so with the default 1 GiB a window is ~64 MB, ~7 bounded soft-target files from random
places of the split. When one block is over that share (a Parquet source's row group, the teacher's
block), no window is read ahead: one is held at a time.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from tasks.store.shards import TargetBatch

ARRAY_BLOCK_ROWS = 65_536  # block size of a source with no boundaries of its own
WINDOW_SHARE = 1 / 16  # of `hold_share_bytes`: the rows a streamed epoch shuffles together
VAL_HOLD_SHARE = 1 / 8  # of `hold_share_bytes`: a validation share over it streams (it is held beside training's)


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
    window: int = 1  # blocks shuffled together (`window_blocks`)
    ahead: bool = True  # the next window built while this one trains; not when one block is over the window share


def streamed(source: Any, start: int, stop: int, hold_bytes: int) -> Streamed | None:
    """Rows [start, stop) as a Streamed share when they stream (`streams`), else None (held whole)."""
    if not streams(source, start, stop, hold_bytes):
        return None
    give_back_freed_windows()
    pieces = blocks(source, start, stop)
    window = window_blocks(source, pieces, hold_bytes)
    # a window of one block over the share: two at once (this one and the next) would be over the budget
    ahead = window > 1 or max(source.stored_bytes(a, b) for a, b in pieces) <= hold_bytes * WINDOW_SHARE
    return Streamed(getattr(source, "uncached", source), pieces, window, ahead)


def give_back_freed_windows() -> None:
    """Have glibc return a freed window's memory to the system, as it does by default until the first one.

    A window is tens of MB; glibc serves such an allocation with its own mmap, but when one is freed it
    raises its mmap threshold to that size (up to 32 MB), so the next windows come from the heap and stay
    there, fragmented: a 20M-row student's worker grew 762 -> 871 MiB from its first epoch to its second,
    and 743 -> 759 with the threshold fixed at 1 MB (benchmarks/RESULTS-scale.md). Fixing it also stops
    the adjustment. Batches (well under 1 MB) are not affected. Nothing is done off glibc."""
    global _MMAP_FIXED
    if _MMAP_FIXED or not sys.platform.startswith("linux"):
        return
    _MMAP_FIXED = True
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # another C library: nothing to set
        pass


_MMAP_FIXED = False


def window_blocks(source: Any, pieces: list[tuple[int, int]], hold_bytes: int) -> int:
    """How many blocks an epoch shuffles together: as many of the largest as fit in WINDOW_SHARE of
    `hold_bytes`, at least one. A worker holds the window being trained and the next one being built."""
    largest = max((source.stored_bytes(a, b) for a, b in pieces), default=0)
    return max(1, int(hold_bytes * WINDOW_SHARE) // largest) if largest else 1


def _load_shuffled(source: Any, group: list[tuple[int, int]], perm: torch.Tensor) -> TargetBatch:
    """The group's rows joined and taken in `perm`'s order, built block by block into the result: what is
    held is the result and one block, never the joined rows beside their shuffled copy."""
    where = torch.empty_like(perm)
    where[perm] = torch.arange(len(perm))  # row i of the joined rows goes to where[i]
    out: TargetBatch | None = None
    at = 0
    for a, b in group:
        # a source that reads in chunks (a Parquet source's pieces) is written a chunk at a time, so not even
        # one block is held beside the window; its digests are checked before the window is returned
        chunked = getattr(source, "chunks", None)
        for offset, part in chunked(a, b) if chunked is not None else [(0, source.load(a, b))]:
            if out is None:
                out = TargetBatch.empty_like(part, len(perm))
            out.put(where[at + offset:at + offset + len(part)], part)
            del part
        at += b - a
    assert out is not None and at == len(perm), "the group's blocks hold other rows than the window's"
    return out


def _load_group(source: Any, group: list[tuple[int, int]]) -> TargetBatch:
    parts = [source.load(a, b) for a, b in group]
    return parts[0] if len(parts) == 1 else TargetBatch.concat(parts)


def _read_ahead(source: Any, groups: list[list[tuple[int, int]]], gen: torch.Generator | None = None,
                ahead: bool = True) -> Iterator[TargetBatch]:
    """Each group's rows (its blocks joined, shuffled by `gen` when given) in order, the next group read by a
    thread while the caller works on the current one. The permutations are drawn here, in group order, so
    the order depends only on `gen`'s seed."""
    if not groups:
        return

    def submit(group: list[tuple[int, int]]) -> Any:
        if gen is None:
            return pool.submit(_load_group, source, group)
        return pool.submit(_load_shuffled, source, group, torch.randperm(sum(b - a for a, b in group), generator=gen))

    with ThreadPoolExecutor(1, thread_name_prefix="kdflow-read-ahead") as pool:
        if not ahead:  # a block over the window's share (a source's row group): one window held at a time
            for group in groups:
                rows = submit(group).result()
                yield rows
                del rows
            return
        pending = submit(groups[0])
        for nxt in [*groups[1:], None]:
            rows = pending.result()
            if nxt is not None:
                pending = submit(nxt)
            yield rows
            del rows  # the caller's chunk holds what it still needs; drop this window before the next read


def whole_batches(segments: Iterator[TargetBatch], rows: int, batch_size: int) -> Iterator[TargetBatch]:
    """`rows` rows of the segments, in order, as chunks of which all but the last are whole batches. A batch
    that spans two segments is joined on its own (a batch of rows), so no segment is copied whole."""
    carry: TargetBatch | None = None
    left = rows
    for seg in segments:
        at = 0
        if carry is not None:
            at = min(batch_size - len(carry), len(seg), left - len(carry))
            carry = TargetBatch.concat([carry, seg.take(slice(0, at))])
            if len(carry) < min(batch_size, left):  # this segment ended inside the batch
                continue
            yield carry
            left -= len(carry)
            carry = None
        n = min(len(seg) - at, left)
        use = n if n == left else (n // batch_size) * batch_size
        if use:
            yield seg.take(slice(at, at + use))
            left -= use
        if left == 0:
            return
        if use < n:  # a copy: the segment is dropped before the next one is used
            carry = seg.take(torch.arange(at + use, at + n))
        del seg  # not held while the next segment is built
    if carry is not None:
        yield carry


def epoch_chunks(task: Any, source: Any, pieces: list[tuple[int, int]], rows: int, batch_size: int,
                 gen: torch.Generator, dims: Mapping[str, int], device: torch.device, window: int = 1,
                 ahead: bool = True) -> Iterator[tuple[Any, torch.Tensor]]:
    """This epoch's training rows as (placed share, order) chunks: `rows` rows in all, every chunk but the
    last a whole number of batches. The blocks are visited in a seeded order, `window` at a time, each
    window's rows shuffled together. `gen` is already seeded for (seed, epoch, rank)."""
    order = [pieces[int(i)] for i in torch.randperm(len(pieces), generator=gen)]
    groups = [order[i:i + window] for i in range(0, len(order), max(1, window))]
    for chunk in whole_batches(_read_ahead(source, groups, gen, ahead), rows, batch_size):
        placed = task.place(chunk, dims, device)
        n = len(chunk)
        del chunk  # the caller drops its placed chunk too: no window outlives its training
        yield placed, torch.arange(n)
        del placed


def streamed_counts(task: Any, model: torch.nn.Module, source: Any, pieces: list[tuple[int, int]],
                    dims: Mapping[str, int], device: torch.device) -> tuple[torch.Tensor, bool]:
    """Validation counts over the pieces, read one ahead (counts add up: TaskKind.eval_counts), and whether
    the rows carry teacher targets."""
    total: torch.Tensor | None = None
    with_teacher = False
    for rows in _read_ahead(source, [[p] for p in pieces]):
        counts = task.eval_counts(model, rows, dims, device)
        total = counts if total is None else total + counts
        with_teacher = bool(rows.targets)
    assert total is not None, "no validation rows to stream"
    return total, with_teacher
