"""How teacher outputs are stored: dense logits or top-k with a tail.

Temperature is never baked in: every format stores raw T=1 logits, so one capture serves
students trained at any temperature.

- ``logits``: the dense row ``[C]`` in the storage dtype (float32, float16 or bfloat16).
- ``topk``: the k largest logits (sorted, descending), their class indices (int32), and
  ``tail_logmass`` = logsumexp of the C - k logits left out (float32).

- ``sampled``: per row, N ids drawn (with replacement) from the teacher's softmax at T=1 and how often each
  came up: the distinct ids (uint16 when the classes fit, else int32), most drawn first, and their counts
  (uint8), N slots each, a slot of count 0 unused. ``counts / N`` is an unbiased estimate of the teacher's
  distribution ("Sparse Logit Sampling", arXiv 2503.16870): its mean over draws is the teacher's.
  The draws are seeded from the rows' first id, so equal inputs store equal bytes.

``decode_topk`` rebuilds a dense row with a *uniform tail*: every class outside the top k
gets the logit ``tail_logmass - log(C - k)``. The top-k logits and the total tail mass are
then exact, so softmax of the rebuilt row at T=1 gives the exact top-k probabilities and the
exact tail mass (spread evenly over the tail). At other temperatures the rebuilt softmax is
an approximation, because the tail's shape, which a temperature reshapes, was not stored.
"""

import math

import torch
from torch import Tensor

FORMATS = ("logits", "topk", "sampled")
MAX_SAMPLES = 255  # counts are uint8

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# Stands for log(0) when k == C: finite so that no later exp/softmax/KL turns into NaN.
EMPTY_TAIL_LOGMASS = -1.0e4


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a storage dtype name (``float32``, ``float16``, ``bfloat16``)."""
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {sorted(TORCH_DTYPES)}") from None


def encode_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split logits ``[B, C]`` into top-k values ``[B, k]``, indices ``[B, k]`` and tail logmass ``[B]``.

    Values are raw float32 logits sorted descending; indices are int32; the tail logmass is
    ``EMPTY_TAIL_LOGMASS`` when ``k == C``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, classes], got shape {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"top_k must be in [1, {num_classes}], got {k}")
    logits = logits.float()
    values, indices = torch.topk(logits, k, dim=-1, largest=True, sorted=True)
    if k == num_classes:
        tail_logmass = torch.full((logits.shape[0],), EMPTY_TAIL_LOGMASS, device=logits.device)
    else:
        tail = logits.scatter(-1, indices, float("-inf"))
        tail_logmass = torch.logsumexp(tail, dim=-1)
    return values, indices.to(torch.int32), tail_logmass


def decode_topk(values: Tensor, indices: Tensor, tail_logmass: Tensor, num_classes: int) -> Tensor:
    """Rebuild dense float32 teacher logits ``[B, C]`` from top-k with a uniform tail."""
    batch, k = values.shape
    if indices.shape != values.shape or tail_logmass.shape != (batch,):
        raise ValueError(
            f"shapes disagree: values {tuple(values.shape)}, indices {tuple(indices.shape)}, "
            f"tail_logmass {tuple(tail_logmass.shape)}"
        )
    if not 1 <= k <= num_classes:
        raise ValueError(f"top_k must be in [1, {num_classes}], got {k}")
    # With k == C every position is overwritten below, so the tail fill value does not matter.
    tail_logit = tail_logmass.float() - math.log(max(num_classes - k, 1))
    dense = tail_logit.unsqueeze(-1).expand(batch, num_classes).clone()
    return dense.scatter(-1, indices.long(), values.float())


def kept_per_row(format: str, top_k: int | None) -> int | None:
    """The ids a sparse format keeps per row (top_k for topk, the draws N for sampled); None for dense logits."""
    return top_k if format in ("topk", "sampled") else None


def encode_sampled(logits: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """N draws per row of logits ``[B, C]`` from softmax(logits): distinct ids ``[B, n]`` (most drawn first; an
    unused slot repeats the first id) and their counts ``[B, n]`` (uint8, 0 for an unused slot)."""
    if not 1 <= n <= MAX_SAMPLES:
        raise ValueError(f"samples must be in [1, {MAX_SAMPLES}], got {n}")
    batch = logits.shape[0]
    if batch == 0:
        return torch.zeros(0, n, dtype=torch.int32), torch.zeros(0, n, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(torch.softmax(logits.float(), dim=-1), n, replacement=True, generator=gen)
    drawn, _ = draws.sort(dim=-1)
    new = torch.ones_like(drawn, dtype=torch.bool)
    new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = new.long().cumsum(dim=-1) - 1
    ids = torch.zeros_like(drawn).scatter(-1, slot, drawn)
    counts = torch.zeros_like(drawn).scatter_add(-1, slot, torch.ones_like(drawn))
    order = counts.argsort(dim=-1, descending=True, stable=True)
    ids, counts = ids.gather(-1, order), counts.gather(-1, order)
    ids = torch.where(counts > 0, ids, ids[:, :1])
    return ids.to(torch.int32), counts.to(torch.uint8)


def decode_sampled(ids: Tensor, counts: Tensor, num_classes: int) -> Tensor:
    """The estimate of the teacher's distribution ``[B, C]``: each drawn id's share of the draws."""
    c = counts.float()
    share = c / c.sum(dim=-1, keepdim=True).clamp(min=1.0)
    return torch.zeros(ids.shape[0], num_classes).scatter_add(-1, ids.long(), share)


def id_type_bytes(num_classes: int) -> int:
    """Bytes of one stored sampled id: uint16 when the classes fit."""
    return 2 if num_classes <= 2**16 else 4


def bytes_per_row(format: str, num_classes: int, dtype: str, top_k: int | None = None) -> int:
    """Storage payload of one teacher row, in bytes.

    ``logits``: C values; ``topk``: k values, k int32 indices and one float32 tail logmass; ``sampled``: N ids
    (uint16 or int32) and N uint8 counts (``top_k`` is N).
    """
    itemsize = torch_dtype(dtype).itemsize
    if format == "logits":
        return num_classes * itemsize
    if format == "topk":
        if top_k is None or not 1 <= top_k <= num_classes:
            raise ValueError(f"format 'topk' needs top_k in [1, {num_classes}], got {top_k}")
        return top_k * itemsize + top_k * 4 + 4
    if format == "sampled":
        if top_k is None or not 1 <= top_k <= MAX_SAMPLES:
            raise ValueError(f"format 'sampled' needs samples in [1, {MAX_SAMPLES}], got {top_k}")
        return top_k * (id_type_bytes(num_classes) + 1)
    raise ValueError(f"unknown target format {format!r}; known: {list(FORMATS)}")
