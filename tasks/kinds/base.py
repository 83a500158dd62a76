"""The task-kind seam: everything that differs between kinds of task sits behind `TaskKind`.

The train loop, the soft-target store, the search and the registry are kind-agnostic and call these
methods; a kind is picked once per workflow (orchestrator/configs.py) and travels inside the FitConfig.
What a kind decides:

- how its data is read and split (`load_data`) and the shapes its models are built for (`dims`);
- how a model is built (`build_model`);
- how the teacher's outputs are computed and how stored targets decode into a batch (`teacher_outputs`,
  `decode_targets`, `place`);
- the training objective: the per-row loss, its masking and its reduction (`objective`);
- validation: counts summable across workers, and the metrics made from them (`eval_counts`, `metrics`);
- what the registered model takes as input (`serving_inputs`, `from_serving`).

Two kinds exist: classification (tasks/kinds/classification.py) and causal_lm (tasks/kinds/lm.py).
The driver-side half (the test-split report and registration) is orchestrator/kind_runs.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from tasks.data import Dataset
    from tasks.fit_config import LossConfig
    from tasks.shards import TargetBatch
    from tasks.storage import Storage


class Share(Protocol):
    """One worker's training rows, placed once on its device; `batch` gathers the rows of one step."""

    device: torch.device

    def __len__(self) -> int: ...

    @property
    def rows_device(self) -> torch.device: ...

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...


class TaskKind(Protocol):
    name: str
    # the per-epoch metric whose best epoch's weights a fit keeps when no early stopping names one,
    # and whether larger is better
    best_by: tuple[str, bool]

    def load_data(self, options: Mapping[str, Any], *, seed: int, storage: Storage | None) -> Dataset:
        """Read the `data:` section's source and split it (train/val/test, seeded)."""
        ...

    def dims(self, meta: Mapping[str, Any]) -> dict[str, int]:
        """The shapes a model is built for, from a Dataset's or a manifest's metadata."""
        ...

    def check_name(self, name: str) -> None:
        """Fail before any work when a workflow's model name cannot be built (an unknown factory or family)."""
        ...

    def build_model(self, name: str, params: Mapping[str, Any], dims: Mapping[str, int]) -> nn.Module: ...

    def teacher_outputs(self, teachers: list[nn.Module], x: np.ndarray, rule: str) -> torch.Tensor:
        """The (ensembled) teacher's outputs for rows `x`, as stored: logits at T=1."""
        ...

    def decode_targets(self, targets: Mapping[str, torch.Tensor], dims: Mapping[str, int]) -> torch.Tensor:
        """Stored targets (any format) as dense float32 teacher logits."""
        ...

    def place(self, rows: TargetBatch, dims: Mapping[str, int], device: torch.device) -> Share: ...

    def objective(self, logits: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None,
                  loss: LossConfig | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to step on and the detached [total, kd, ce]; `loss` None trains on hard labels only."""
        ...

    def eval_counts(self, model: nn.Module, rows: TargetBatch, dims: Mapping[str, int],
                    device: torch.device) -> torch.Tensor:
        """Validation counts that data-parallel workers sum before `metrics` divides once."""
        ...

    def metrics(self, counts: torch.Tensor, with_teacher: bool) -> dict[str, float]: ...

    def serving_inputs(self, meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """What the registered model's recipe needs to take the user's raw input (classification: the
        training split's `mean` and `std`); tasks/served.py writes it beside the safetensors weights."""
        ...

    def from_serving(self, served: nn.Module, meta: Mapping[str, Any]) -> nn.Module | None:
        """A registered model made to take stored rows (the inverse of `serving_inputs`), to evaluate it on a
        stored split; None when `meta` lacks what that needs."""
        ...
