"""How teacher outputs are stored: dense logits or top-k with a tail.

Temperature is never baked in: every format stores raw T=1 logits, so one capture serves
students trained at any temperature.

- ``logits``: the dense row ``[C]`` in the storage dtype (float32, float16 or bfloat16).
- ``topk``: the k largest logits (sorted, descending), their class indices (int32), and
  ``tail_logmass`` = logsumexp of the C - k logits left out (float32).

``decode_topk`` rebuilds a dense row with a *uniform tail*: every class outside the top k
gets the logit ``tail_logmass - log(C - k)``. The top-k logits and the total tail mass are
then exact, so softmax of the rebuilt row at T=1 gives the exact top-k probabilities and the
exact tail mass (spread evenly over the tail). At other temperatures the rebuilt softmax is
an approximation, because the tail's shape, which a temperature reshapes, was not stored.
"""

import math

import torch
from torch import Tensor

FORMATS = ("logits", "topk")

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


def bytes_per_row(format: str, num_classes: int, dtype: str, top_k: int | None = None) -> int:
    """Storage payload of one teacher row, in bytes.

    ``logits``: C values; ``topk``: k values, k int32 indices and one float32 tail logmass.
    """
    itemsize = torch_dtype(dtype).itemsize
    if format == "logits":
        return num_classes * itemsize
    if format == "topk":
        if top_k is None or not 1 <= top_k <= num_classes:
            raise ValueError(f"format 'topk' needs top_k in [1, {num_classes}], got {top_k}")
        return top_k * itemsize + top_k * 4 + 4
    raise ValueError(f"unknown target format {format!r}; known: {list(FORMATS)}")
