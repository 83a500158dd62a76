"""The task-kind seam: every decision that differs between kinds of task, asked by the driver and by the
shared machinery (the loop, the store, the search, the registry), which never name a kind.

A kind is a package under tasks/kinds/<kind>/ (or in a separate installed package, found through the
`kdflow.kinds` entry-point group) whose `TaskKind` subclass answers these questions, grouped as its
modules are:

- spec:      its workflow sections (`spec`: data, teacher, distill, soft_targets, defaults) and the rules
             between keys (`check_workflow`); the metrics objectives, early stopping and gates can name;
- data:      reading and splitting its rows (`load_data`), how they are described, what the store's
             manifest keeps of them (`manifest_meta`) and the shapes models are built for (`dims`);
- models:    its families and user factories (`check_name`, `build_model`), teachers from outside kdflow;
- targets:   the teacher's outputs as stored (`teacher_outputs`) and stored targets decoded for a batch
             (`decode_targets`, `place`);
- objective: the loss to step on, with its masks and reduction (`objective`); validation counts summable
             across workers and the metrics made from them (`eval_counts`, `metrics`, `epoch_summary`);
- report:    the test-split report (`report`), other students it compares with (`variants`), its
             summary table;
- serving:   what the registered model takes and returns (`log_model`), and a registered model made to
             take stored rows again (`load_registered`).

docs/architecture.md draws the seam and says how to add a kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from tasks.dataset import Dataset
    from tasks.sections import DataSpec, DistillSpec, ModelSpec, SoftTargetSpec, TeacherSpec
    from tasks.storage import Storage
    from tasks.store.shards import TargetBatch
    from tasks.train.config import LossConfig
    from tasks.train.result import FitResult


class Share(Protocol):
    """One worker's training rows, placed once on its device; `batch` gathers the rows of one step."""

    device: torch.device

    def __len__(self) -> int: ...

    @property
    def rows_device(self) -> torch.device: ...

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]: ...


class HeldRows:
    """What every held `Share` answers the same way, from its `x` and `y` tensors (a mixin: a kind's share
    keeps its own fields)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def rows_device(self) -> torch.device:
        return self.x.device


@dataclass(frozen=True)
class KindSpec:
    """A kind's sections of the workflow (pydantic models, tasks/sections.py's extended) and their defaults;
    a default of None makes the section required."""

    data: type[DataSpec]
    teacher: type[TeacherSpec]
    distill: type[DistillSpec]
    soft_targets: type[SoftTargetSpec]
    student: type[ModelSpec]
    teacher_default: TeacherSpec | None
    student_default: ModelSpec | None


@dataclass(frozen=True)
class Variant:
    """Another student the report compares the chosen one with, trained by the driver on the same rows, steps
    and seed with another objective (`loss` None: hard labels only)."""

    name: str  # its stage, its metrics' prefix and its model's name in `Finished.variants`
    detail: str
    loss: LossConfig | None


@dataclass
class Finished:
    """What a kind's report reads: the chosen student and its fit, the variants, the teachers (as the soft
    targets were made from them) and the store entry with its test split."""

    student: nn.Module
    fit: FitResult
    teachers: list[nn.Module]
    teacher_rule: str  # how several teachers are ensembled (soft_targets.ensemble)
    manifest: dict[str, Any]
    storage: Storage
    variants: dict[str, nn.Module] = field(default_factory=dict)


@dataclass
class Report:
    """A kind's test-split report: its part of the result's student and teacher sections, the metrics logged
    to the run, the values gates compare besides the student's, and one summary line."""

    student: dict[str, Any]
    teacher: dict[str, Any]
    metrics: dict[str, float]
    gate_values: dict[str, Any]
    line: str


@dataclass(frozen=True)
class Champion:
    """How `beats_alias` compares a new version with the alias's holder: on this test metric (a `metrics`
    name, recorded as the tag kdflow.<tag>), larger better or not."""

    metric: str
    tag: str
    larger_is_better: bool = True


class TaskKind:
    """A kind of task. Subclasses set the class attributes and implement every method that raises here."""

    name: ClassVar[str]
    spec: ClassVar[KindSpec]
    # the per-epoch metric whose best epoch's weights a fit keeps when no early stopping names one, and
    # whether larger is better
    best_by: ClassVar[tuple[str, bool]]
    # the metrics every epoch records (train_* and val_*): what objectives and early stopping may name
    epoch_metrics: ClassVar[tuple[str, ...]]
    # the values of the result's student section (and report's gate_values) a registry gate may compare
    gate_metrics: ClassVar[tuple[str, ...]]
    # registry tables' columns: (metric, header), read from a version's kdflow.<metric> tags
    headline: ClassVar[tuple[tuple[str, str], ...]]
    champion: ClassVar[Champion | None] = None  # None: this kind offers no beats_alias gate

    # ------------------------------------------------ spec

    def check_workflow(self, workflow: Any) -> None:
        """Rules between keys that no one section can check; raise ValueError('key: why')."""

    def unknown_param(self, model: str, param: str) -> str | None:
        """Why `student.params.<param>` is not a parameter of `model` (None when it is, or cannot be told
        before the model is built): a search space is checked with it."""
        return None

    # ------------------------------------------------ data

    def load_data(self, data: DataSpec, *, seed: int, storage: Storage | None) -> Dataset:
        """Read the data section's source and split it (train/val/test, seeded)."""
        raise NotImplementedError

    def load_workflow_data(self, workflow: Any, *, storage: Storage | None) -> Dataset:
        """The data a whole workflow trains on: `load_data` of its data section. A kind whose rows depend on
        other sections too (image views drawn per `soft_targets.views`) reads them here; errors name keys
        relative to the data section, as `load_data`'s do."""
        return self.load_data(workflow.data, seed=workflow.seed, storage=storage)

    def describe(self, data: Dataset) -> str:
        """The data stage's line: the rows' shape in the kind's words."""
        raise NotImplementedError

    def manifest_meta(self, data: Dataset) -> dict[str, Any]:
        """What the store's manifest keeps beside the rows (JSON): what `dims` reads, and any more."""
        raise NotImplementedError

    def dims(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        """The shapes a model is built for, from a Dataset's `manifest_meta` or a manifest."""
        raise NotImplementedError

    def target_width(self, dims: Mapping[str, Any]) -> int:
        """How many classes a stored target spans (what soft_targets.top_k selects from)."""
        raise NotImplementedError

    # ------------------------------------------------ models

    def check_name(self, name: str) -> None:
        """Fail before any work when a workflow's model name cannot be built (an unknown factory or family)."""
        raise NotImplementedError

    def build_model(self, name: str, params: Mapping[str, Any], dims: Mapping[str, Any]) -> nn.Module:
        raise NotImplementedError

    def external_teacher(self, teacher: TeacherSpec) -> bool:
        """Whether the teacher is loaded from outside kdflow (a checkpoint, a registered model) rather than
        trained by the workflow."""
        return teacher.model.startswith("models:/")

    def load_teacher(self, teacher: TeacherSpec, data: Dataset) -> nn.Module:
        """An external teacher (`external_teacher`) as a module taking the stored rows; errors name its keys
        relative to the teacher section ('model', 'checkpoint')."""
        raise NotImplementedError

    # ------------------------------------------------ targets

    def teacher_outputs(self, teachers: list[nn.Module], x: np.ndarray, rule: str) -> torch.Tensor:
        """The (ensembled, by `rule`) teachers' outputs for rows `x`, as stored: logits at T=1."""
        raise NotImplementedError

    def decode_targets(self, targets: Mapping[str, torch.Tensor], dims: Mapping[str, Any]) -> torch.Tensor:
        """Stored targets (any format) as dense float32 teacher logits."""
        raise NotImplementedError

    def place(self, rows: TargetBatch, dims: Mapping[str, Any], device: torch.device) -> Share:
        raise NotImplementedError

    def teacher_in_loop(self, workflow: Any) -> bool:
        """Whether the student's workers run the teachers on each batch themselves (an online teacher, on exactly
        the inputs the student gets) instead of reading stored training targets; default: stored."""
        return False

    def teacher_recipe(self, teacher: TeacherSpec, model: nn.Module) -> tuple[str, dict[str, Any]]:
        """The (model, params) that `build_model` rebuilds a loaded teacher from on a worker (its weights travel
        through storage, never a pickled module); default: the teacher section's."""
        return teacher.model, dict(teacher.params)

    def with_teacher(self, share: Share, teachers: list[nn.Module], rule: str, dims: Mapping[str, Any]) -> Share:
        """`share` (as `place` made it) whose batches carry the (ensembled, by `rule`) teachers' outputs on the
        very inputs each batch gives the student (`teacher_in_loop`)."""
        raise NotImplementedError(f"{self.name} has no online teacher")

    def after_epochs(self, workflow: Any, manifest: Mapping[str, Any]) -> Any:
        """A stage the student's workers run after the offline epochs with the in-loop teachers
        (`teacher_in_loop`: on Ray actors of their own, not in the workers, when a stage takes them): a
        picklable plan for `run_after_epochs`, or None (the default: no such stage). Causal LMs' on-policy
        distillation is one (docs/on-policy.md)."""
        return None

    def run_after_epochs(self, worker: Any, plan: Any) -> list[dict[str, Any]]:
        """Run `plan` on `worker` (tasks/train/loop.py's Worker: its model, optimizer, rows and FitConfig) and
        return its records: each a `step` with numeric metrics logged at that step and optionally `samples`, rows
        of a table of examples (`render_ids` turns token ids in them into text)."""
        raise NotImplementedError(f"{self.name} has no stage after the epochs")

    def render_ids(self, data: Dataset, ids: list[int]) -> str:
        """Token ids of a record's samples as text, in the data's terms (default: as they are)."""
        return str(ids)

    # ------------------------------------------------ objective

    def objective(self, logits: torch.Tensor, y: torch.Tensor, teacher: Any, loss: LossConfig | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to step on and the detached [total, kd, ce]; `loss` None trains on hard labels only."""
        raise NotImplementedError

    def eval_counts(self, model: nn.Module, rows: TargetBatch, dims: Mapping[str, Any],
                    device: torch.device) -> torch.Tensor:
        """Validation counts that data-parallel workers sum before `metrics` divides once."""
        raise NotImplementedError

    def metrics(self, counts: torch.Tensor, with_teacher: bool) -> dict[str, float]:
        raise NotImplementedError

    def epoch_summary(self, metrics: Mapping[str, float], dims: Mapping[str, Any]) -> str:
        """An epoch's progress line in the kind's own terms."""
        raise NotImplementedError

    # ------------------------------------------------ report

    def variants(self, distill: DistillSpec) -> list[Variant]:
        """Other students the report compares with (trained by the driver after the chosen one)."""
        return []

    def report(self, done: Finished) -> Report:
        """The test-split report of a finished run."""
        raise NotImplementedError

    def summary_table(self, teacher: Mapping[str, Any], student: Mapping[str, Any]
                      ) -> tuple[list[str], list[list[str]]]:
        """The closing summary's table of a result (columns, rows), from its teacher and student sections."""
        raise NotImplementedError

    def targets_summary(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """What the result's soft_targets section says of the stored targets in the kind's terms."""
        return {}

    def rate(self, student: Mapping[str, Any]) -> str:
        """The student's training throughput in the kind's unit ('93,308 samples/s')."""
        return f"{student['samples_per_s']:,.0f} samples/s"

    # ------------------------------------------------ serving

    def log_model(self, model: nn.Module, student: ModelSpec, data: Dataset, manifest: Mapping[str, Any],
                  pip_requirements: list[str]) -> str:
        """Log the student in the active MLflow run as a pyfunc (no pickle) that takes what a user has (raw
        features, text) and answers in the user's terms; returns its model URI."""
        raise NotImplementedError

    def lineage(self, manifest: Mapping[str, Any]) -> dict[str, str]:
        """Registry tags beyond the kind-agnostic lineage (e.g. the tokenizer a model needs)."""
        return {}

    def load_registered(self, uri: str, manifest: Mapping[str, Any]) -> nn.Module | None:
        """A registered model made to take this store entry's rows (to evaluate a champion on its test
        split); None when it cannot take them."""
        return None
