"""Distillation losses, found by name, and the objective that mixes them with hard-label CE.

A loss takes ``(student_logits [B, C], teacher_logits [B, C], temperature, beta)`` and returns
a per-sample loss ``[B]``. Register your own with ``@register_loss("name")`` and name it in the
spec; losses that have no use for ``beta`` (or ``temperature``) ignore it.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor, float, float], Tensor]

LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator that makes a per-sample loss available under ``name``."""

    def decorator(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = fn
        return fn

    return decorator


def get_loss(name: str) -> LossFn:
    """The registered loss called ``name``; KeyError lists the known names."""
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; known: {sorted(LOSSES)}") from None


def _kl_from_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row KL(p || q) from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


@register_loss("kl")
def forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float, beta: float) -> Tensor:
    """Hinton's loss: T^2 * KL(softmax(t/T) || softmax(s/T))."""
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    return temperature**2 * _kl_from_log_probs(log_p_teacher, log_p_student)


@register_loss("reverse_kl")
def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float, beta: float) -> Tensor:
    """MiniLLM's mode-seeking loss: T^2 * KL(softmax(s/T) || softmax(t/T))."""
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    return temperature**2 * _kl_from_log_probs(log_p_student, log_p_teacher)


@register_loss("jsd")
def generalized_jsd(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, beta: float
) -> Tensor:
    """Generalized JSD as in TRL's GKD, times T^2.

    beta == 0 is KL(teacher || student), beta == 1 is KL(student || teacher); otherwise, with
    M = beta * P_teacher + (1 - beta) * P_student, it is
    beta * KL(P_teacher || M) + (1 - beta) * KL(P_student || M).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd needs beta in [0, 1], got {beta}")
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    if beta == 0.0:
        divergence = _kl_from_log_probs(log_p_teacher, log_p_student)
    elif beta == 1.0:
        divergence = _kl_from_log_probs(log_p_student, log_p_teacher)
    else:
        log_mixture = torch.logsumexp(
            torch.stack([log_p_teacher + math.log(beta), log_p_student + math.log(1.0 - beta)]), dim=0
        )
        divergence = beta * _kl_from_log_probs(log_p_teacher, log_mixture) + (
            1.0 - beta
        ) * _kl_from_log_probs(log_p_student, log_mixture)
    return temperature**2 * divergence


@register_loss("mse")
def logit_mse(student_logits: Tensor, teacher_logits: Tensor, temperature: float, beta: float) -> Tensor:
    """Logit matching (Buciluă et al.): mean over classes of (s - t)^2; temperature is ignored."""
    return (student_logits - teacher_logits).pow(2).mean(dim=-1)


def distillation_objective(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    loss: str,
    temperature: float,
    alpha: float,
    beta: float = 0.5,
) -> tuple[Tensor, dict[str, Tensor]]:
    """alpha * mean KD over all rows + (1 - alpha) * mean CE over labeled rows.

    Rows with ``label < 0`` are unlabeled transfer rows and get only the KD term; a batch with
    no labeled row has CE = 0. The teacher is treated as a constant and everything is computed
    in float32. Returns the scalar total and detached ``{"kd", "ce", "total"}`` for logging.
    """
    loss_fn = get_loss(loss)
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must both be [batch, classes], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if labels.shape != student_logits.shape[:1]:
        raise ValueError(f"labels must be [batch], got {tuple(labels.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")

    student = student_logits.float()
    teacher = teacher_logits.detach().float()
    kd = loss_fn(student, teacher, temperature, beta).mean()

    # Masking instead of indexing keeps the step free of a host sync and of an empty mean.
    labels = labels.long()
    labeled = (labels >= 0).float()
    per_row_ce = F.cross_entropy(student, labels.clamp(min=0), reduction="none")
    ce = (per_row_ce * labeled).sum() / labeled.sum().clamp(min=1.0)

    total = alpha * kd + (1.0 - alpha) * ce
    return total, {"kd": kd.detach(), "ce": ce.detach(), "total": total.detach()}


# ---------------------------------------------------------------- per token (causal language models)

# A logit that stands for "no mass" and stays finite (exp underflows to exactly 0 in float32, no NaN).
NO_MASS = -1.0e4
TOKEN_LOSSES = ("kl", "reverse_kl", "jsd")


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


def student_buckets(student_logits: Tensor, indices: Tensor, temperature: float) -> Tensor:
    """The student's log-probabilities at T over the same k + 1 buckets (its full vocabulary, coarsened)."""
    s = student_logits.float() / temperature
    idx = indices.long()
    top = s.gather(-1, idx)
    tail = torch.logsumexp(s.scatter(-1, idx, NO_MASS), dim=-1, keepdim=True)
    return F.log_softmax(torch.cat([top, tail], dim=-1), dim=-1)


def token_divergence(student_logits: Tensor, values: Tensor, indices: Tensor, tail_logmass: Tensor, *, loss: str,
                     temperature: float, beta: float) -> Tensor:
    """Per-token divergence [B, S] (times T^2) between teacher and student over the top-k + tail buckets.

    The teacher is never dense: [B, S, k] values and ids plus [B, S] tail log-mass. The registered
    sequence-level losses are reused on the bucket log-probabilities (log_softmax of log-probabilities is
    the identity, so they see exactly these distributions at T = 1, and the T^2 factor is applied here).
    """
    if loss not in TOKEN_LOSSES:
        raise ValueError(f"loss {loss!r} has no per-token form; known: {', '.join(TOKEN_LOSSES)}")
    vocab = student_logits.shape[-1]
    log_p = teacher_buckets(values, tail_logmass, vocab, temperature)
    log_q = student_buckets(student_logits, indices, temperature)
    flat = get_loss(loss)(log_q.reshape(-1, log_q.shape[-1]), log_p.reshape(-1, log_p.shape[-1]), 1.0, beta)
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
