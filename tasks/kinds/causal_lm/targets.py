"""Causal LMs' targets: per token, the teachers' logits as stored (top-k logits, int32 ids and the tail's
log-mass, exact at T=1; sampled ids with their counts, an unbiased estimate; or dense), flattened per row into Parquet list columns by tasks/store/shards.py; this
module reshapes them to [rows, seq_len, k] for a batch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tasks.kinds.base import HeldRows
from tasks.models import teacher_forward
from tasks.store.formats import decode_sampled, decode_topk

# A logit that stands for "no mass" and stays finite (exp underflows to exactly 0 in float32, no NaN).
NO_MASS = -1.0e4


def teacher_tuple(targets: Mapping[str, torch.Tensor], seq_len: int, vocab: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stored per-row targets as ([n, S, k] values, [n, S, k] ids, [n, S] tail log-mass); dense logits as k = V.

    Sampled targets come as the estimate's log-probabilities log(count / N) over the drawn ids, no tail (the
    estimate puts no mass elsewhere), and NO_MASS on an unused slot: the losses leave such a bucket empty on
    both sides (objective.py)."""
    if "logits" in targets:
        logits = targets["logits"].float().reshape(-1, seq_len, vocab)
        ids = torch.arange(vocab, dtype=torch.int32).expand_as(logits)
        return logits, ids, torch.full(logits.shape[:2], NO_MASS)
    if "sample_ids" in targets:
        n = targets["sample_ids"].shape[0]
        counts = targets["sample_counts"].float().reshape(n, seq_len, -1)
        share = counts / counts.sum(-1, keepdim=True).clamp(min=1.0)
        values = torch.where(counts > 0, share.clamp(min=1e-30).log(), torch.full_like(share, NO_MASS))
        return values, targets["sample_ids"].reshape(n, seq_len, -1), torch.full((n, seq_len), NO_MASS)
    n = targets["topk_values"].shape[0]
    return (targets["topk_values"].float().reshape(n, seq_len, -1), targets["topk_indices"].reshape(n, seq_len, -1),
            targets["tail_logmass"].float().reshape(n, seq_len))


@dataclass
class LMShare(HeldRows):
    x: torch.Tensor
    y: torch.Tensor
    targets: dict[str, torch.Tensor]
    seq_len: int
    vocab: int
    device: torch.device

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        x, y = self.x.index_select(0, idx).to(self.device), self.y.index_select(0, idx).to(self.device)
        if not self.targets:
            return x, y, None
        t = teacher_tuple({k: v.index_select(0, idx) for k, v in self.targets.items()}, self.seq_len, self.vocab)
        return x, y, tuple(part.to(self.device) for part in t)


def decode_targets(targets: Mapping[str, torch.Tensor], seq_len: int, vocab: int) -> torch.Tensor:
    """Dense [n, S, V] logits rebuilt with a uniform tail, or the sampled estimate's log-probabilities (NO_MASS
    where nothing was drawn) (small vocabularies and tests only)."""
    if "logits" in targets:
        return targets["logits"].float().reshape(-1, seq_len, vocab)
    if "sample_ids" in targets:
        n = targets["sample_ids"].shape[0]
        k = targets["sample_ids"].shape[1] // seq_len
        est = decode_sampled(targets["sample_ids"].reshape(-1, k), targets["sample_counts"].reshape(-1, k), vocab)
        return torch.where(est > 0, est.clamp(min=1e-30).log(), torch.full_like(est, NO_MASS)).reshape(n, seq_len, -1)
    v, i, t = teacher_tuple(targets, seq_len, vocab)
    n, s, k = v.shape
    return decode_topk(v.reshape(-1, k), i.reshape(-1, k), t.reshape(-1), vocab).reshape(n, s, -1)


class TeacherEnsemble(nn.Module):
    """The teacher(s) as one module giving the ensembled logits the soft targets were made from."""

    def __init__(self, teachers: list[nn.Module], rule: str) -> None:
        super().__init__()
        self.teachers, self.rule = nn.ModuleList(teachers), rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return teacher_forward(list(self.teachers), x.numpy(), self.rule, batch=16, dtype=torch.long)
