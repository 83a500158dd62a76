"""Classification: rows of features -> one class each. Today's only task kind (see tasks/kinds/base.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.data import Dataset, load_dataset
from tasks.fit_config import LossConfig
from tasks.losses import distillation_objective
from tasks.models import Standardized, build_model
from tasks.shards import TargetBatch
from tasks.storage import Storage
from tasks.target_formats import decode_topk

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


def ensemble_logits(teachers: list[nn.Module], x: torch.Tensor, rule: str) -> torch.Tensor:
    outs = [t(x).float() for t in teachers]
    if len(outs) == 1:
        return outs[0]
    stacked = torch.stack(outs)
    if rule == "mean_logits":
        return stacked.mean(0)
    # log of the mean probability: a proper distribution whose softmax_T is well defined at any T
    return torch.logsumexp(torch.log_softmax(stacked, dim=-1), dim=0) - float(np.log(len(outs)))


def teacher_forward(teachers: list[nn.Module], x: np.ndarray, rule: str, batch: int = 4096) -> torch.Tensor:
    """Ensemble logits [N, C] at T=1, in batches, without autograd."""
    for t in teachers:
        t.eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            outs.append(ensemble_logits(teachers, torch.from_numpy(np.array(x[i:i + batch])), rule))
    return torch.cat(outs) if outs else torch.zeros(0)


@dataclass
class Share:
    """This worker's training rows, placed once: features, labels and teacher logits."""

    x: torch.Tensor
    y: torch.Tensor
    teacher: torch.Tensor | None  # dense float32 logits, decoded once; None when decoded per batch
    targets: dict[str, torch.Tensor]  # stored targets, kept only when decoded per batch
    num_classes: int
    device: torch.device

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def rows_device(self) -> torch.device:
        return self.x.device

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


class Classification:
    """Features [N, F] -> logits [N, C]; KD on the class distribution, mixed with cross-entropy on labels.

    Transfer rows carry label -1: the distillation term sees them, cross-entropy and accuracy do not.
    """

    name = "classification"
    best_by = ("val_accuracy", True)

    def load_data(self, options: Mapping[str, Any], *, seed: int, storage: Storage | None) -> Dataset:
        split = options.get("split") or {}
        return load_dataset(options["source"], features=options.get("features"), label=options["label"],
                            val=split["val"], test=split["test"], transfer=options.get("transfer"), seed=seed,
                            limit=options.get("limit"), storage=storage)

    def dims(self, meta: Mapping[str, Any]) -> dict[str, int]:
        return {"num_features": int(meta["num_features"]), "num_classes": int(meta["num_classes"])}

    def check_name(self, name: str) -> None:
        from tasks.models import resolve_factory

        resolve_factory(name)

    def build_model(self, name: str, params: Mapping[str, Any], dims: Mapping[str, int]) -> nn.Module:
        return build_model(name, dict(params), dims["num_features"], dims["num_classes"])

    def teacher_outputs(self, teachers: list[nn.Module], x: np.ndarray, rule: str) -> torch.Tensor:
        return teacher_forward(teachers, x, rule)

    def decode_targets(self, targets: Mapping[str, torch.Tensor], dims: Mapping[str, int]) -> torch.Tensor:
        return teacher_logits(targets, dims["num_classes"])

    def place(self, rows: TargetBatch, dims: Mapping[str, int], device: torch.device) -> Share:
        return place_share(rows, dims["num_classes"], device)

    def objective(self, logits: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None,
                  loss: LossConfig | None) -> tuple[torch.Tensor, torch.Tensor]:
        if loss is None:  # hard labels only: teacher training
            ce = nn.functional.cross_entropy(logits.float(), y)
            return ce, torch.stack((ce.detach(), torch.zeros_like(ce.detach()), ce.detach()))
        assert teacher is not None, "distillation needs teacher targets"
        total, parts = distillation_objective(logits, teacher, y, loss=loss.kind, temperature=loss.temperature,
                                              alpha=loss.alpha, beta=loss.beta)
        return total, torch.stack((parts["total"], parts["kd"], parts["ce"]))

    def eval_counts(self, model: nn.Module, rows: TargetBatch, dims: Mapping[str, int],
                    device: torch.device) -> torch.Tensor:
        return evaluate_counts(model, rows, dims["num_classes"], device)

    def metrics(self, counts: torch.Tensor, with_teacher: bool) -> dict[str, float]:
        return metrics_from_counts(counts, with_teacher)

    def serving_inputs(self, meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The training split's standardization: the served student takes the user's raw features."""
        return {"mean": np.asarray(meta["mean"], np.float32), "std": np.asarray(meta["std"], np.float32)}

    def from_serving(self, served: nn.Module, meta: Mapping[str, Any]) -> nn.Module | None:
        if "mean" not in meta or "std" not in meta:
            return None
        return Standardized(served, torch.tensor(meta["mean"]), torch.tensor(meta["std"]), inputs="standardized")
