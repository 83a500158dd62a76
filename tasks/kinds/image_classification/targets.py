"""Image classification's targets: the teachers' logits per stored view (or per un-augmented image) as stored,
and a worker's rows placed so that each batch replays one stored view per image with that view's targets.

A training row with V views is stored with targets [V, C] (the store's per-position path: top-k + tail per
view, or dense logits); val and test rows are un-augmented, one target each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.kinds.base import HeldRows
from tasks.kinds.classification.targets import DENSE_TARGETS_BYTES, teacher_logits
from tasks.kinds.image_classification.views import PARAMS, apply_views, draw, split_rows
from tasks.models import ensemble, teacher_forward
from tasks.store.shards import TargetBatch

FORWARD_IMAGES = 1024  # views through the teacher at once


def image_shape(teachers: list[nn.Module]) -> tuple[int, int, int]:
    shape = getattr(teachers[0], "image_shape", None)
    assert shape is not None, "an image teacher is an ImageModel (models.py)"
    return shape


def teacher_outputs(teachers: list[nn.Module], x: np.ndarray, rule: str) -> torch.Tensor:
    """Logits [n, C] for un-augmented rows, or [n, V, C] for rows carrying V views: each view made by
    `apply_views` from its stored parameters, exactly as a training worker replays it."""
    shape = image_shape(teachers)
    pixels = math.prod(shape)
    if x.shape[1] == pixels:
        return teacher_forward(teachers, x, rule, batch=FORWARD_IMAGES)
    rows = torch.from_numpy(np.array(x))  # writable (a Ray object is read-only)
    images, views = split_rows(rows, pixels)
    assert views is not None
    n, v = views.shape[0], views.shape[1]
    for t in teachers:
        t.eval()
    step = max(1, FORWARD_IMAGES // v)
    out = []
    with torch.inference_mode():
        for i in range(0, n, step):
            img = images[i:i + step].reshape(-1, *shape).repeat_interleave(v, 0)
            seen = apply_views(img, views[i:i + step].reshape(-1, PARAMS))
            logits = ensemble([t(seen).float() for t in teachers], rule)
            out.append(logits.view(-1, v, logits.shape[-1]))
    return torch.cat(out)


def per_view_logits(targets: Mapping[str, torch.Tensor], views: int, num_classes: int) -> torch.Tensor:
    """Stored targets of rows with `views` views -> dense float32 logits [n, views, C]."""
    flat = {k: v.reshape(v.shape[0] * views, -1) if v.dim() == 2 else v.reshape(-1) for k, v in targets.items()}
    if "tail_logmass" in flat:
        flat["tail_logmass"] = flat["tail_logmass"].reshape(-1)
    return teacher_logits(flat, num_classes).view(-1, views, num_classes)


@dataclass
class ViewShare(HeldRows):
    """A worker's training images [n, C, H, W] (uint8) with their stored views [n, V, 6] (None: no views)
    and teacher targets (dense [n, V, C] or [n, C]; or stored, decoded per batch)."""

    x: torch.Tensor
    y: torch.Tensor
    views: torch.Tensor | None
    teacher: torch.Tensor | None
    targets: dict[str, torch.Tensor]
    num_classes: int
    device: torch.device
    gen: torch.Generator

    def pick(self, idx: torch.Tensor) -> torch.Tensor | None:
        """One stored view per image of the batch, drawn uniformly (a fresh draw each time an image comes)."""
        if self.views is None:
            return None
        return torch.randint(self.views.shape[1], (len(idx),), generator=self.gen).to(idx.device)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        which = self.pick(idx)
        img = self.x.index_select(0, idx)
        x = img.float() if which is None else apply_views(img, self.views.index_select(0, idx)[  # type: ignore[union-attr]
            torch.arange(len(idx), device=idx.device), which])
        return x, self.y.index_select(0, idx), self.targets_for(idx, which)

    def targets_for(self, idx: torch.Tensor, which: torch.Tensor | None) -> torch.Tensor | None:
        if self.teacher is not None:
            t = self.teacher.index_select(0, idx)
        elif self.targets:
            sel = {k: v.index_select(0, idx) for k, v in self.targets.items()}
            t = teacher_logits(sel, self.num_classes) if which is None else per_view_logits(
                sel, self.views.shape[1], self.num_classes)  # type: ignore[union-attr]
        else:
            return None
        return t if which is None or t.dim() == 2 else t[torch.arange(len(idx), device=idx.device), which]


def place_share(rows: TargetBatch, dims: Mapping[str, Any], device: torch.device, seed: int = 0) -> ViewShare:
    """The images as uint8 [n, C, H, W] and their views; teacher targets decoded once when small enough."""
    shape = (int(dims["channels"]), int(dims["height"]), int(dims["width"]))
    c = int(dims["num_classes"])
    images, views = split_rows(rows.x, math.prod(shape))
    images = images.to(torch.uint8).reshape(-1, *shape)
    views = None if views is None else views.to(torch.uint8)
    v = 1 if views is None else views.shape[1]
    dense = None
    if rows.targets and len(rows) * v * c * 4 <= DENSE_TARGETS_BYTES:
        dense = teacher_logits(rows.targets, c) if views is None else per_view_logits(rows.targets, v, c)
    kept = {} if dense is not None else dict(rows.targets)
    gen = torch.Generator().manual_seed(seed * 7_919 + len(rows))
    put = (lambda t: t.to(device)) if device.type == "cuda" else (lambda t: t)
    return ViewShare(put(images), put(rows.y), None if views is None else put(views),
                     None if dense is None else put(dense), {k: put(t) for k, t in kept.items()}, c, device, gen)


@dataclass
class OnlineShare(HeldRows):
    """A worker's training images [n, C, H, W] (uint8), each seen through a fresh view every time it comes up
    (drawn as the stored views are, made by `apply_views`) and labelled right here by the teachers, under
    no_grad, on exactly the pixels the student gets (soft_targets.mode: online)."""

    x: torch.Tensor
    y: torch.Tensor
    teachers: list[nn.Module]
    rule: str
    augment: Any  # an AugmentSpec: what `draw` reads
    gen: torch.Generator
    device: torch.device

    @classmethod
    def around(cls, share: Any, teachers: list[nn.Module], rule: str, dims: Mapping[str, Any]) -> OnlineShare:
        from tasks.kinds.image_classification.spec import AugmentSpec

        return cls(share.x, share.y, teachers, rule, AugmentSpec(**dims.get("augment", {})), share.gen, share.device)

    def views(self, n: int, device: torch.device) -> torch.Tensor:
        """[n, 6] fresh view parameters: one seed from the share's generator per batch, so every epoch differs."""
        seed = int(torch.randint(2**62, (1,), generator=self.gen))
        return torch.from_numpy(draw(np.random.default_rng(seed), n, self.augment)).to(device)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = apply_views(self.x.index_select(0, idx), self.views(len(idx), idx.device))
        with torch.no_grad():
            teacher = ensemble([t(x).float() for t in self.teachers], self.rule)
        return x, self.y.index_select(0, idx), teacher
