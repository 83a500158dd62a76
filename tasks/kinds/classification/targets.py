"""Classification's targets: the teachers' logits over the classes as stored, and a worker's rows placed for
its batches (teacher logits decoded once when small enough)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tasks.kinds.base import HeldRows
from tasks.store.formats import decode_topk
from tasks.store.shards import TargetBatch

# A worker decodes its teacher targets to dense float32 once when that copy stays under this size, and
# per batch otherwise (top-k rows over a large vocabulary would not fit dense).
DENSE_TARGETS_BYTES = 256 * 2**20
# On a GPU the worker's share lives in device memory when it takes at most this fraction of the free
# memory; otherwise it stays in pinned host memory and each batch is copied over.
DEVICE_RESIDENT_FRACTION = 0.25


def teacher_logits(targets: Mapping[str, torch.Tensor], num_classes: int) -> torch.Tensor:
    """Dense float32 teacher logits at T=1 from either stored format."""
    if "logits" in targets:
        return targets["logits"].float()
    return decode_topk(targets["topk_values"].float(), targets["topk_indices"], targets["tail_logmass"].float(),
                       num_classes)


@dataclass
class Share(HeldRows):
    """This worker's training rows, placed once: features, labels and teacher logits."""

    x: torch.Tensor
    y: torch.Tensor
    teacher: torch.Tensor | None  # dense float32 logits, decoded once; None when decoded per batch
    targets: dict[str, torch.Tensor]  # stored targets, kept only when decoded per batch
    num_classes: int
    device: torch.device

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        # index_select, not x[idx]: half the per-call overhead of advanced indexing, which shows at ~1 ms steps
        if self.teacher is not None:
            t: torch.Tensor | None = self.teacher.index_select(0, idx)
        elif self.targets:
            t = teacher_logits({k: v.index_select(0, idx) for k, v in self.targets.items()}, self.num_classes)
        else:
            t = None
        x, y = self.x.index_select(0, idx), self.y.index_select(0, idx)
        if self.device.type == "cuda" and self.x.device != self.device:  # pinned host rows: copy overlaps compute
            return (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                    None if t is None else t.to(self.device, non_blocking=True))
        return x, y, t


def place_share(rows: TargetBatch, num_classes: int, device: torch.device) -> Share:
    """Decode teacher targets once when small enough; on a GPU keep the rows there when they fit."""
    dense = None
    if rows.targets and len(rows) * num_classes * 4 <= DENSE_TARGETS_BYTES:
        dense = teacher_logits(rows.targets, num_classes)
    tensors = {"x": rows.x, "y": rows.y, **({"teacher": dense} if dense is not None else
                                            {f"t_{k}": v for k, v in rows.targets.items()})}
    if device.type == "cuda":
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        free, _ = torch.cuda.mem_get_info(device)
        if size <= free * DEVICE_RESIDENT_FRACTION:
            tensors = {k: v.to(device) for k, v in tensors.items()}
        else:
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
    return Share(tensors["x"], tensors["y"], tensors.get("teacher"),
                 {k[2:]: v for k, v in tensors.items() if k.startswith("t_")}, num_classes, device)
