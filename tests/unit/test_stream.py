"""A worker streams its share when it is over `train.hold_share_mb`: block by block, one read ahead, every
step a whole batch, every row once per epoch, the order seeded; and a streamed fit learns as a held one."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import pytest
import torch

from tasks.kinds import kind_for
from tasks.store.shards import TargetBatch
from tasks.train import stream

CLASSIFICATION = kind_for("classification")


@dataclass
class Blocks:
    """Rows in memory cut into fixed blocks, recording every load and how many run at once."""

    rows_total: int
    block: int
    loads: list[tuple[int, int]] = field(default_factory=list)
    running: int = 0
    most_at_once: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def rows(self) -> int:
        return self.rows_total

    def blocks(self, start: int, stop: int) -> list[tuple[int, int]]:
        return [(a, min(a + self.block, stop)) for a in range(start, stop, self.block)]

    def stored_bytes(self, start: int, stop: int) -> int:
        return (stop - start) * 16

    def load(self, start: int, stop: int) -> TargetBatch:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(0.002)  # long enough for a second read to overlap if the reader started one
        with self.lock:
            self.loads.append((start, stop))
            self.running -= 1
        ids = torch.arange(start, stop)
        return TargetBatch(ids, ids[:, None].float().repeat(1, 4), ids % 3, {})


def one_epoch(source: Blocks, start: int, stop: int, rows: int, batch: int, seed: int,
              window: int = 1) -> list[torch.Tensor]:
    """The row ids of every step of one epoch, in order."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    steps = []
    for chunk, order in stream.epoch_chunks(CLASSIFICATION, source, stream.blocks(source, start, stop), rows, batch,
                                            gen, {"num_classes": 3}, torch.device("cpu"), window):
        for s in range(0, len(order), batch):
            steps.append(chunk.x[order[s:s + batch], 0].long())
    return steps


@pytest.mark.parametrize(("rows", "block", "batch"), [(1000, 96, 32), (1000, 100, 7), (257, 300, 64), (50, 8, 50)])
def test_every_step_is_a_whole_batch_and_every_row_comes_once(rows: int, block: int, batch: int) -> None:
    source = Blocks(rows, block)
    steps = one_epoch(source, 0, rows, rows, batch, seed=1)
    assert len(steps) == math.ceil(rows / batch)  # what every data-parallel rank must agree on
    assert all(len(s) == batch for s in steps[:-1])
    assert sorted(torch.cat(steps).tolist()) == list(range(rows))
    assert sorted(source.loads) == source.blocks(0, rows)  # block by block, never the whole share
    assert source.most_at_once == 1  # the read-ahead thread reads one block at a time


def test_a_rank_whose_share_is_longer_stops_at_the_common_row_count() -> None:
    source = Blocks(1001, 100)
    steps = one_epoch(source, 0, 1001, 1000, 64, seed=3)  # per_worker = n // world: one row left out
    assert len(steps) == math.ceil(1000 / 64) and sum(len(s) for s in steps) == 1000
    assert len(set(torch.cat(steps).tolist())) == 1000


def test_a_block_over_the_window_share_is_read_with_no_read_ahead_in_the_same_order() -> None:
    small = stream.streamed(Blocks(1000, 50), 0, 1000, hold_bytes=15_999)  # 800-byte blocks, a 999-byte share
    assert small is not None and small.ahead
    source = Blocks(1000, 100)  # 1,600-byte blocks: over the window's share of the budget
    share = stream.streamed(source, 0, 1000, hold_bytes=15_999)
    assert share is not None and not share.ahead  # two such blocks at once would be over the budget
    gen, steps = torch.Generator(), []
    gen.manual_seed(4)
    for chunk, order in stream.epoch_chunks(CLASSIFICATION, source, share.pieces, 1000, 32, gen, {"num_classes": 3},
                                            torch.device("cpu"), share.window, share.ahead):
        steps += [chunk.x[order[s:s + 32], 0].long() for s in range(0, len(order), 32)]
    assert [s.tolist() for s in steps] == [s.tolist() for s in one_epoch(Blocks(1000, 100), 0, 1000, 1000, 32, 4)]


def test_the_order_is_seeded_reproducible_and_new_each_epoch() -> None:
    first = torch.cat(one_epoch(Blocks(600, 50), 0, 600, 600, 32, seed=5))
    again = torch.cat(one_epoch(Blocks(600, 50), 0, 600, 600, 32, seed=5))
    other = torch.cat(one_epoch(Blocks(600, 50), 0, 600, 600, 32, seed=6))
    assert torch.equal(first, again)  # a resumed epoch replays its order
    assert not torch.equal(first, other)
    assert not torch.equal(first, torch.arange(600))  # shuffled, across blocks too
    assert first[:50].div(50, rounding_mode="floor").unique().numel() == 1  # ...but block by block


def test_only_a_share_over_the_budget_with_several_blocks_streams() -> None:
    source = Blocks(1000, 100)  # 16 bytes a row: 16,000 bytes
    assert stream.streams(source, 0, 1000, hold_bytes=15_999)
    assert not stream.streams(source, 0, 1000, hold_bytes=16_000)
    assert not stream.streams(source, 0, 100, hold_bytes=0)  # a single block gains nothing from streaming


def test_a_window_of_blocks_is_shuffled_together_so_a_sorted_share_gives_mixed_batches() -> None:
    # a share whose blocks each hold one "class" (row id // 50), as a label-sorted source's split gives
    source = Blocks(1000, 50)  # 800 bytes a block
    share = stream.streamed(source, 0, 1000, hold_bytes=15_999)
    assert share is not None and share.window == 1  # its window share (1/16) is under one block: one at a time
    window = stream.window_blocks(source, source.blocks(0, 1000), hold_bytes=int(4 * 800 / stream.WINDOW_SHARE))
    assert window == 4  # blocks that fit in the window's share of the budget
    mixed = one_epoch(source, 0, 1000, 1000, 32, seed=2, window=window)
    single = one_epoch(Blocks(1000, 50), 0, 1000, 1000, 32, seed=2)
    assert len(mixed) == math.ceil(1000 / 32) and all(len(s) == 32 for s in mixed[:-1])
    assert sorted(torch.cat(mixed).tolist()) == list(range(1000))  # every row once
    classes_per_step = [s.div(50, rounding_mode="floor").unique().numel() for s in mixed[:-1]]
    assert min(classes_per_step) >= 2 and sum(classes_per_step) / len(classes_per_step) >= 3
    assert max(s.div(50, rounding_mode="floor").unique().numel() for s in single) <= 2  # a block (+ carry) a step
    assert sorted(source.loads) == source.blocks(0, 1000)  # still block by block, each read once


def test_streamed_validation_counts_equal_the_held_ones() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    source = Blocks(500, 64)
    held = CLASSIFICATION.eval_counts(model, source.load(0, 500), {"num_classes": 3}, torch.device("cpu"))
    streamed, with_teacher = stream.streamed_counts(CLASSIFICATION, model, source, source.blocks(0, 500),
                                                    {"num_classes": 3}, torch.device("cpu"))
    assert torch.allclose(held, streamed) and with_teacher is False
