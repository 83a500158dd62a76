"""The workflow sections a kind of task extends: its data, teacher, student, distill and soft_targets keys.

The workflow itself (orchestrator/spec.py) is a union on `task`: each kind's branch takes these sections as
its kind narrows or extends them (tasks/kinds/<kind>/spec.py), and the keys every kind shares (storage,
tracking, train, search, registry). Every section forbids unknown keys, so a typo is an error naming its
YAML path, never a silent default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitSpec(Strict):
    val: float = Field(0.15, ge=0.0, lt=1.0)
    test: float = Field(0.15, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _leaves_training_rows(self) -> SplitSpec:
        if self.val + self.test >= 0.9:
            raise ValueError("val + test must leave at least 10% of the rows for training")
        return self


class DataSpec(Strict):
    """What every kind's data section has: where the rows come from, how they are split, a row limit."""

    source: str
    split: SplitSpec = SplitSpec()
    splits: dict[str, str] | None = Field(
        None, description="the splits as given, each a source of its own: {train: SRC, val: SRC, test: SRC} "
                          "(val optional: then cut from train by split.val); source is not read then")
    limit: int | None = Field(None, ge=1, description="use only the first N rows, for quick tries")

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        from tasks.splits import NAMES

        unknown = [k for k in v if k not in NAMES]
        if unknown:
            raise ValueError(f"unknown split {unknown[0]!r}: use train, val (or validation) and test")
        missing = [k for k in ("train", "test") if k not in {NAMES[n] for n in v}]
        if missing:
            raise ValueError(f"needs a {' and a '.join(missing)} split")
        return v


class ScheduleKeys(Strict):
    """The learning-rate schedule and gradient clipping; the defaults change nothing (constant lr, no clip)."""

    schedule: Literal["constant", "cosine"] = Field("constant", description="cosine: decay to 0 over the fit")
    warmup_steps: int = Field(0, ge=0, description="linear warmup from 0 over this many steps")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradients' global norm to this")


class TeacherTrainSpec(ScheduleKeys):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class ModelSpec(Strict):
    model: str
    params: dict[str, Any] = Field(default_factory=dict)


class TeacherSpec(ModelSpec):
    train: TeacherTrainSpec = TeacherTrainSpec()


class SoftTargetSpec(Strict):
    shards: int = Field(4, ge=1)
    format: Literal["logits", "topk", "sampled"] = "logits"
    top_k: int | None = Field(None, ge=1)
    samples: int | None = Field(None, ge=1, le=255, description="format sampled: teacher draws per target")
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    ensemble: Literal["mean_probs", "mean_logits"] = "mean_probs"
    max_retries: int = Field(3, ge=0)

    @model_validator(mode="after")
    def _topk_needs_k(self) -> SoftTargetSpec:
        if self.format == "topk" and self.top_k is None:
            raise ValueError("format 'topk' needs top_k (the number of classes kept per row)")
        if self.format == "sampled" and self.samples is None:
            raise ValueError("format 'sampled' needs samples (the teacher draws stored per target)")
        return self

    @property
    def kept(self) -> int | None:
        """The ids stored per target: top_k for topk, the draws for sampled, None for logits."""
        return self.top_k if self.format == "topk" else self.samples if self.format == "sampled" else None


class DistillSpec(Strict):
    """The distillation objective. `loss` is a built-in name or a user's 'package.module:function'; what a
    kind accepts, and how it calls a user's function, is its own (`check_loss`, docs/training.md)."""

    loss: str = Field("kl", description="a built-in loss or 'package.module:function'")
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1)
    beta: float = Field(0.5, ge=0, le=1, description="generalized JSD mixture weight (loss: jsd)")

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        cls.check_loss(v)
        return v

    @classmethod
    def check_loss(cls, name: str) -> None:
        """Raise ValueError when this kind cannot train with `name` (a built-in, or a user function that
        imports); kinds narrow it."""
        from tasks.losses import resolve_loss

        resolve_loss(name)
