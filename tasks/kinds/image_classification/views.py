"""Augmented views: drawn once, stored as six small integers each, replayed exactly.

A view is (cx, cy, w, h, flip, angle): the crop's center and size as multiples of 1/254 of the image's
width and height, a left-right flip (0/1) and a rotation in half degrees (stored + 128). Every value is an
integer in [0, 255] (254 units: the image's center, 127, is one), so a view takes 6 bytes of information and is exactly what is stored: the teacher's
view at precompute and the student's replay in training are made from the same integers by the same torch
code (`apply_views`), elementwise ops and `grid_sample` only (no matmul whose blocking could depend on the
batch), so a replayed view is bit-identical to the one the teacher labelled.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch

PARAMS = 6  # integers per view
UNITS = 254  # a crop's center and size in 1/254ths of the image
IDENTITY = (127, 127, 254, 254, 0, 128)  # the whole image, not flipped, not rotated


def draw_views(row_ids: np.ndarray, views: int, augment: Any, seed: int) -> np.ndarray:
    """[n, views, 6] int32 view parameters for the rows `row_ids`, a function of (seed, row id, view) only."""
    n = len(row_ids)
    out = np.empty((n, views, PARAMS), np.int32)
    base = int.from_bytes(hashlib.sha256(f"views|{seed}".encode()).digest()[:8], "little")
    for i, rid in enumerate(row_ids):
        out[i] = draw(np.random.default_rng([base, int(rid)]), views, augment)
    return out


def draw(rng: np.random.Generator, n: int, augment: Any) -> np.ndarray:
    """[n, 6] int32 view parameters drawn from `rng` (`augment`'s keys: crop_scale, crop_ratio, hflip, rotate)."""
    out = np.empty((n, PARAMS), np.int32)
    scale = rng.uniform(augment.crop_scale[0], augment.crop_scale[1], n)
    log_r = rng.uniform(math.log(augment.crop_ratio[0]), math.log(augment.crop_ratio[1]), n)
    ratio = np.exp(log_r)
    w = np.clip(np.sqrt(scale * ratio), 0.0, 1.0)
    h = np.clip(np.sqrt(scale / ratio), 0.0, 1.0)
    wq, hq = np.maximum(1, np.round(w * UNITS)), np.maximum(1, np.round(h * UNITS))
    cx = rng.uniform(wq / 2, UNITS - wq / 2)
    cy = rng.uniform(hq / 2, UNITS - hq / 2)
    flip = rng.random(n) < 0.5 if augment.hflip else np.zeros(n, bool)
    angle = rng.uniform(-augment.rotate, augment.rotate, n) if augment.rotate else np.zeros(n)
    out[:, 0], out[:, 1] = np.round(cx), np.round(cy)
    out[:, 2], out[:, 3] = wq, hq
    out[:, 4] = flip
    out[:, 5] = np.clip(np.round(angle * 2), -127, 127) + 128
    return out


def apply_views(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Images [B, C, H, W] (any dtype, 0-255 scale) seen through views [B, 6] -> float32 [B, C, H, W]."""
    x = images.float()
    b, _, hgt, wid = x.shape
    p = params.to(torch.float32)
    cx, cy = p[:, 0] * (2.0 / UNITS) - 1.0, p[:, 1] * (2.0 / UNITS) - 1.0  # the crop's center in [-1, 1]
    sx = p[:, 2] / UNITS * (1.0 - 2.0 * p[:, 4])  # half-extent of the crop (normalized); negative: flipped
    sy = p[:, 3] / UNITS
    theta = (p[:, 5] - 128.0) * (math.pi / 360.0)
    cos, sin = torch.cos(theta), torch.sin(theta)
    # the output grid's pixel centers in [-1, 1] (align_corners=False), mapped elementwise to the source
    u = ((torch.arange(wid, dtype=torch.float32) * 2.0 + 1.0) / wid - 1.0).view(1, 1, wid)
    v = ((torch.arange(hgt, dtype=torch.float32) * 2.0 + 1.0) / hgt - 1.0).view(1, hgt, 1)
    su, sv = sx.view(b, 1, 1) * u, sy.view(b, 1, 1) * v
    gx = cos.view(b, 1, 1) * su - sin.view(b, 1, 1) * sv + cx.view(b, 1, 1)
    gy = sin.view(b, 1, 1) * su + cos.view(b, 1, 1) * sv + cy.view(b, 1, 1)
    grid = torch.stack((gx, gy), dim=-1)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def split_rows(x: torch.Tensor, pixels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stored rows [n, pixels + V * 6] -> (pixels [n, pixels], views [n, V, 6] or None without views)."""
    if x.shape[1] == pixels:
        return x, None
    return x[:, :pixels], x[:, pixels:].reshape(x.shape[0], -1, PARAMS)
