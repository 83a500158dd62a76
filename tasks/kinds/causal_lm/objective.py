"""Causal LMs' objective and metrics: per-token KD over the teacher's top-k + tail buckets mixed with
next-token cross-entropy, over real tokens only (label >= 0), and validation counts that workers sum.

The teacher is never dense: per token its top-k logits and ids and the tail's log-mass (exact at T = 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.kinds.causal_lm.spec import TOKEN_LOSSES
from tasks.kinds.causal_lm.targets import NO_MASS, teacher_tuple
from tasks.losses import per_row
from tasks.store.shards import TargetBatch
from tasks.train.config import LossConfig

# what every epoch records (tasks/train/loop.py: train_* and the timings; val_* from `lm_metrics`)
EPOCH_METRICS = ("val_perplexity", "val_loss", "val_accuracy", "val_agreement", "train_loss", "train_kd", "train_ce",
                 "samples_per_s")


def teacher_buckets(values: Tensor, tail_logmass: Tensor, vocab: int, temperature: float) -> Tensor:
    """The teacher's log-probabilities at T over k + 1 buckets: its top-k tokens and one tail bucket.

    At T = 1 this is exact: the tail bucket holds exactly the mass outside the top k (the stored tail
    log-mass is the logsumexp of the left-out logits). At T != 1 the tail's own shape, which a temperature
    reshapes, was not stored: the tail is taken as uniform (each left-out logit tail_logmass - log(V - k)),
    which is exact for the top-k logits and the approximation for the tail's tempered mass (docs/soft-targets.md).
    """
    k = values.shape[-1]
    log_rest = math.log(max(vocab - k, 1))
    tail = tail_logmass.float()
    tail_t = torch.where(tail <= NO_MASS / 2, torch.full_like(tail, NO_MASS), (tail - log_rest) / temperature + log_rest)
    return F.log_softmax(torch.cat([values.float() / temperature, tail_t.unsqueeze(-1)], dim=-1), dim=-1)


def student_buckets(student_logits: Tensor, indices: Tensor, temperature: float, unused: Tensor | None = None,
                    tail: bool = True) -> Tensor:
    """The student's log-probabilities at T over the same k + 1 buckets (its full vocabulary, coarsened); an
    `unused` slot (a sampled target's, which repeats a drawn id) is an empty bucket, and without `tail` the
    student is renormalized over the k ids (its tail bucket empty)."""
    s = student_logits.float() / temperature
    idx = indices.long()
    top = s.gather(-1, idx)
    if unused is not None:
        top = top.masked_fill(unused, NO_MASS)
    tail = torch.logsumexp(s.scatter(-1, idx, NO_MASS), dim=-1, keepdim=True) if tail else \
        torch.full_like(top[..., :1], NO_MASS)
    return F.log_softmax(torch.cat([top, tail], dim=-1), dim=-1)


def token_divergence(student_logits: Tensor, values: Tensor, indices: Tensor, tail_logmass: Tensor, *, loss: str,
                     temperature: float, beta: float) -> Tensor:
    """Per-token divergence [B, S] (times T^2) between teacher and student over the top-k + tail buckets.

    The teacher is never dense: [B, S, k] values and ids plus [B, S] tail log-mass (sampled targets: the
    estimate's log-probabilities over the drawn ids, no tail). The registered
    sequence-level losses are reused on the bucket log-probabilities (log_softmax of log-probabilities is
    the identity, so they see exactly these distributions at T = 1, and the T^2 factor is applied here).
    """
    if ":" not in loss and loss not in TOKEN_LOSSES:
        raise ValueError(f"loss {loss!r} has no per-token form; known: {', '.join(TOKEN_LOSSES)}")
    vocab = student_logits.shape[-1]
    log_p = teacher_buckets(values, tail_logmass, vocab, temperature)
    # a sampled estimate has no tail: forward KL's unbiased form keeps the student's whole distribution (the
    # tail term has no weight), while reverse KL and JSD, which would weigh an empty teacher bucket against
    # the student's tail, compare both over the drawn ids
    no_tail = indices.shape[-1] < vocab and bool((tail_logmass <= NO_MASS / 2).all())
    log_q = student_buckets(student_logits, indices, temperature, unused=values <= NO_MASS / 2,
                            tail=not (no_tail and loss != "kl"))
    flat = per_row(loss, log_q.reshape(-1, log_q.shape[-1]), log_p.reshape(-1, log_p.shape[-1]), 1.0, beta)
    return temperature**2 * flat.reshape(log_q.shape[:-1])


def token_objective(student_logits: Tensor, labels: Tensor, teacher: tuple[Tensor, Tensor, Tensor] | None, *,
                    loss: str | None, temperature: float, alpha: float, beta: float, tokens: Tensor,
                    scale: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """alpha * KD + (1 - alpha) * next-token CE, summed over real tokens (label >= 0) and divided by `tokens`.

    `tokens` is the number of real tokens in this step over all data-parallel workers and `scale` the
    number of workers: DDP averages gradients, so scale * (this worker's sum) / tokens averages every real
    token of the step exactly once, whatever each worker's share of padding or prompt tokens. `teacher`
    None (or `loss` None) trains on next-token CE only. The logged parts are this worker's means per token.
    """
    s = student_logits.float()
    mask = labels >= 0
    maskf = mask.float()
    local = maskf.sum().clamp(min=1.0)
    ce_tok = F.cross_entropy(s.reshape(-1, s.shape[-1]), labels.long().clamp(min=0).reshape(-1),
                             reduction="none").reshape(labels.shape)
    ce_sum = (ce_tok * maskf).sum()
    if teacher is None or loss is None:
        total = scale * ce_sum / tokens.clamp(min=1.0)
        ce = (ce_sum / local).detach()
        return total, {"kd": torch.zeros_like(ce), "ce": ce, "total": ce}
    values, indices, tail = teacher
    kd_tok = token_divergence(s, values, indices, tail, loss=loss, temperature=temperature, beta=beta)
    kd_sum = (kd_tok * maskf).sum()
    total = scale * (alpha * kd_sum + (1.0 - alpha) * ce_sum) / tokens.clamp(min=1.0)
    kd, ce = (kd_sum / local).detach(), (ce_sum / local).detach()
    return total, {"kd": kd, "ce": ce, "total": alpha * kd + (1.0 - alpha) * ce}


def global_tokens(mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Real tokens of this step summed over the data-parallel workers, and the number of workers."""
    count = mask.sum().float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            count = count.clone()
            torch.distributed.all_reduce(count)
            return count, float(world)
    return count, 1.0


@torch.no_grad()
def lm_counts(model: nn.Module, rows: TargetBatch, seq_len: int, vocab: int, device: torch.device,
              batch: int = 32) -> torch.Tensor:
    """[summed next-token CE, real tokens, correct top-1, agreeing with the teacher's top-1, tokens with a
    teacher] over `rows`: sums, so that workers add theirs and `lm_metrics` divides once."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(5, dtype=torch.float64, device=device)
    for i in range(0, len(rows), batch):
        part = rows.take(slice(i, i + batch))
        logits = model(part.x.to(device)).float()
        y = part.y.to(device).long()
        mask = y >= 0
        ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.clamp(min=0).reshape(-1),
                                         reduction="none").reshape(y.shape)
        pred = logits.argmax(-1)
        counts[0] += (ce * mask).sum()
        counts[1] += mask.sum()
        counts[2] += ((pred == y) & mask).sum()
        if part.targets:
            _, ids, _ = teacher_tuple(part.targets, seq_len, vocab)
            top = ids[..., 0].to(device).long() if "logits" not in part.targets else \
                part.targets["logits"].float().reshape(-1, seq_len, vocab).argmax(-1).to(device)
            counts[3] += ((pred == top) & mask).sum()
            counts[4] += mask.sum()
    model.train(was_training)
    return counts


def lm_metrics(counts: torch.Tensor, with_teacher: bool) -> dict[str, float]:
    ce, tokens, correct, agree, teacher_tokens = counts.tolist()
    loss = ce / max(1.0, tokens)
    out = {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "accuracy": correct / max(1.0, tokens)}
    if with_teacher:
        out["agreement"] = agree / max(1.0, teacher_tokens)
    return out


def objective(logits: torch.Tensor, y: torch.Tensor, teacher: Any, loss: LossConfig | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, scale = global_tokens(y >= 0)
    if loss is None:
        total, parts = token_objective(logits, y, None, loss=None, temperature=1.0, alpha=0.0, beta=0.0,
                                       tokens=tokens, scale=scale)
    else:
        total, parts = token_objective(logits, y, teacher, loss=loss.kind, temperature=loss.temperature,
                                       alpha=loss.alpha, beta=loss.beta, tokens=tokens, scale=scale)
    return total, torch.stack((parts["total"], parts["kd"], parts["ce"]))


def epoch_summary(metrics: Mapping[str, float], seq_len: int) -> str:
    """A causal LM's rows are token sequences, judged by perplexity (its next-token accuracy is not what anyone
    reads)."""
    line = f"loss {metrics['train_loss']:.4f}"
    if "val_perplexity" in metrics:
        line += f" val_ppl {metrics['val_perplexity']:.3f}"
    return line + f" {metrics['samples_per_s'] * seq_len:,.0f} tokens/s"
