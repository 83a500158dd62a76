"""What one fit needs, as frozen values: built once from the workflow (orchestrator/configs.py), read by
the train loop. No field has a default here: every value comes from the workflow spec, whose defaults
are the only ones (docs/workflow-reference.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tasks.kinds.base import TaskKind
    from tasks.storage import Storage


@dataclass(frozen=True)
class OptimizerConfig:
    name: str  # adamw | adam | sgd
    lr: float
    weight_decay: float
    momentum: float  # sgd only
    schedule: str  # constant | cosine (decay to 0 over the fit's steps)
    warmup_steps: int  # linear warmup from 0
    grad_clip: float | None  # max global gradient norm; None: no clipping


@dataclass(frozen=True)
class LossConfig:
    """The distillation objective; a fit without one trains on hard labels only (a teacher)."""

    kind: str  # a loss registered in tasks.losses, or a user's 'package.module:function'
    temperature: float
    alpha: float
    beta: float


@dataclass(frozen=True)
class EarlyStopping:
    metric: str
    patience: int
    maximize: bool


@dataclass(frozen=True)
class Resources:
    """How Ray Train runs the fit."""

    workers: int
    use_gpu: bool
    cpus_per_worker: float
    gpus_per_worker: float
    max_failures: int
    placement: str  # pack | spread: Ray's placement strategy for the workers (train.placement)
    # torch threads per worker when not its CPUs: a local run with no cpus_per_worker set shares the
    # machine's cores among the workers that run at once (orchestrator/configs.py decides)
    torch_threads: int | None

    @property
    def threads(self) -> int:
        """Torch threads per worker: `torch_threads` when set, else its CPUs, at least one."""
        return self.torch_threads or max(1, int(self.cpus_per_worker))


@dataclass(frozen=True)
class OnlineTeacher:
    """Teachers a student's workers run in the training loop (the kind's `teacher_in_loop`): each one's
    {model, params, state_dict} on storage (tasks/layout.py:online_teacher_path), rebuilt there by the kind."""

    storage: Storage
    paths: list[str]
    rule: str  # how several teachers are ensembled (soft_targets.ensemble)


@dataclass(frozen=True)
class FitConfig:
    log_prefix: str  # "teacher" or "student": the tag of this fit's progress lines
    kind: TaskKind  # builds the model, places rows, scores a batch (tasks/kinds)
    model: str
    params: dict[str, Any]
    dims: dict[str, int]  # the shapes the model is built for (the task kind's, e.g. num_features, num_classes)
    seed: int
    epochs: int
    batch_size: int  # rows per step on each worker
    optimizer: OptimizerConfig
    precision: str  # fp32 | bf16 | fp16
    loss: LossConfig | None
    data: Any  # a RowSource: the training rows
    val: Any  # a RowSource, or None without a validation split
    early_stopping: EarlyStopping | None
    checkpoint_every: int | None
    checkpoint_interval_s: float
    resources: Resources
    epoch_hook: Any  # the search's pruner (`hook.ask(epoch, metrics)() -> stop`, picklable; train.EpochHook), or None
    hold_share_bytes: int  # a worker holds its share when its stored rows take at most this; else it streams
    online_teacher: OnlineTeacher | None  # teachers run on each batch by the workers; None: targets are stored
    # the kind's stage after the epochs (`TaskKind.after_epochs`: on-policy distillation), run with the online
    # teachers on actors of its own; None: none
    after_epochs: Any
