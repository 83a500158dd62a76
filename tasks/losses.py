"""Distillation losses, found by name or by import path, and the objective that mixes them with hard-label CE.

A loss takes ``(student_logits [B, C], teacher_logits [B, C], temperature, beta)`` and returns a
per-sample loss ``[B]``. Register one with ``@register_loss("name")``, or name your own function in the
workflow as ``distill.loss: "package.module:function"``: it is called as ``fn(student_logits,
teacher_logits, temperature)`` (and ``beta=`` when it takes a ``beta``), and kdflow applies alpha, the
hard-label term, masks and the reduction. A kind may call a loss on other distributions than classes (a
causal LM: each token's top-k + tail buckets, docs/training.md).
"""

import functools
import importlib
import inspect
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


@functools.cache
def resolve_loss(name: str) -> LossFn:
    """A registered loss, or the user's ``package.module:function`` as a ``LossFn``; ValueError says why not
    (the spec turns it into an error naming ``distill.loss``)."""
    if name in LOSSES:
        return LOSSES[name]
    if ":" not in name:
        raise ValueError(f"unknown loss {name!r}; built-in: {', '.join(sorted(LOSSES))}, or "
                         "'package.module:function'")
    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr, None)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    if not callable(fn):  # ValueError, not TypeError: pydantic turns it into an error naming distill.loss
        raise ValueError(f"{module_name!r} has no function {attr!r}")  # noqa: TRY004
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    takes_beta = "beta" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if params and len(positional) < 3 and not any(p.kind is p.VAR_POSITIONAL for p in params.values()):
        raise ValueError(f"{name} takes ({', '.join(params)}); a loss takes (student_logits, teacher_logits, "
                         "temperature) and returns a loss per row")

    def user_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float, beta: float) -> Tensor:
        if takes_beta:
            return fn(student_logits, teacher_logits, temperature, beta=beta)
        return fn(student_logits, teacher_logits, temperature)

    user_loss.__name__ = attr
    return user_loss


def per_row(loss: str, student_logits: Tensor, teacher_logits: Tensor, temperature: float, beta: float) -> Tensor:
    """The loss `loss` per row [B], checked to be one value per row (a user's function may return otherwise)."""
    out = resolve_loss(loss)(student_logits, teacher_logits, temperature, beta)
    if not isinstance(out, Tensor) or tuple(out.shape) != tuple(student_logits.shape[:1]):
        from tasks.errors import UserError

        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise UserError(f"{loss} returned {shape} for {len(student_logits)} rows; a loss returns "
                        "one value per row", where="distill.loss")
    return out


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
    kd = per_row(loss, student, teacher, temperature, beta).mean()

    # Masking instead of indexing keeps the step free of a host sync and of an empty mean.
    labels = labels.long()
    labeled = (labels >= 0).float()
    per_row_ce = F.cross_entropy(student, labels.clamp(min=0), reduction="none")
    ce = (per_row_ce * labeled).sum() / labeled.sum().clamp(min=1.0)

    total = alpha * kd + (1.0 - alpha) * ce
    return total, {"kd": kd.detach(), "ce": ce.detach(), "total": total.detach()}
