"""Classification's objective and metrics: KD on the class distribution mixed with cross-entropy on the labels,
and validation counts (correct, cross-entropy, agreement with the teacher) that workers sum.

Transfer rows carry label -1: the distillation term sees them, cross-entropy and accuracy do not.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from tasks.kinds.classification.targets import teacher_logits
from tasks.losses import distillation_objective
from tasks.store.shards import TargetBatch
from tasks.train.config import LossConfig


def objective(logits: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None, loss: LossConfig | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss to step on and the detached [total, kd, ce]; `loss` None: hard labels only (a teacher)."""
    if loss is None:
        ce = nn.functional.cross_entropy(logits.float(), y)
        return ce, torch.stack((ce.detach(), torch.zeros_like(ce.detach()), ce.detach()))
    assert teacher is not None, "distillation needs teacher targets"
    total, parts = distillation_objective(logits, teacher, y, loss=loss.kind, temperature=loss.temperature,
                                          alpha=loss.alpha, beta=loss.beta)
    return total, torch.stack((parts["total"], parts["kd"], parts["ce"]))


@torch.no_grad()
def evaluate_counts(model: nn.Module, data: TargetBatch, num_classes: int, device: torch.device,
                    batch: int = 4096) -> torch.Tensor:
    """[correct, summed CE, agreeing with the teacher, labeled rows, rows] over `data`, on `device`.

    Counts rather than means, so that data-parallel workers can sum theirs and divide once.
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(5, dtype=torch.float64, device=device)
    for i in range(0, len(data), batch):
        part = data.take(slice(i, i + batch))
        logits = model(part.x.to(device)).float()
        y = part.y.to(device)
        pred = logits.argmax(-1)
        labeled = y >= 0
        ce = nn.functional.cross_entropy(logits, y.clamp(min=0), reduction="none")
        counts[0] += ((pred == y) & labeled).sum()
        counts[1] += (ce * labeled).sum()
        if part.targets:
            counts[2] += (pred == teacher_logits(part.targets, num_classes).to(device).argmax(-1)).sum()
        counts[3] += labeled.sum()
        counts[4] += len(part)
    model.train(was_training)
    return counts


def metrics_from_counts(counts: torch.Tensor, with_teacher: bool) -> dict[str, float]:
    correct, ce, agree, labeled, rows = counts.tolist()
    out = {"accuracy": correct / max(1.0, labeled), "loss": ce / max(1.0, labeled)}
    if with_teacher:
        out["agreement"] = agree / max(1.0, rows)
    return out


def epoch_summary(metrics: Mapping[str, float]) -> str:
    line = f"loss {metrics['train_loss']:.4f}"
    if "val_accuracy" in metrics:
        line += f" val_acc {metrics['val_accuracy']:.4f}"
    return line + f" {metrics['samples_per_s']:,.0f} samples/s"
