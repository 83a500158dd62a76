"""task classification: its sections of the workflow (rows of features and a class label)."""

from __future__ import annotations

from pydantic import Field, field_validator

from tasks.kinds.base import KindSpec
from tasks.sections import DataSpec, DistillSpec, ModelSpec, SoftTargetSpec, TeacherSpec


class ClassificationData(DataSpec):
    source: str = Field("sklearn:digits", description="sklearn:digits, mnist1d, or a Parquet file, folder or glob "
                                                      "(local or s3://)")
    features: list[str] | str | None = Field(None, description="numeric columns, or one list/array column; "
                                                               "default every numeric column but the label")
    label: str = Field("label", description="the class column")
    transfer: int | str | None = Field(None, description="extra unlabeled rows only the teacher labels: a Parquet "
                                                         "source, or a row count for mnist1d")

    @field_validator("transfer")
    @classmethod
    def _positive_rows(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v < 1:
            raise ValueError("a transfer row count must be >= 1")
        return v


class ClassificationModel(ModelSpec):
    model: str = Field("mlp", description="mlp, cnn1d, transformer, or 'package.module:factory'")


class ClassificationTeacher(TeacherSpec):
    model: str = Field("mlp", description="a family, 'package.module:factory', models:/NAME@ALIAS, or a .pt/.pth "
                                          "file holding a whole model")
    checkpoint: str | None = Field(None, description="a state_dict file for model + params (not trained then)")


class ClassificationDistill(DistillSpec):
    """`loss`: kl, reverse_kl, jsd, mse, or 'package.module:function' called as fn(student_logits [B, C],
    teacher_logits [B, C], temperature) -> loss per row [B] (beta too, if it takes one)."""


SPEC = KindSpec(data=ClassificationData, teacher=ClassificationTeacher, distill=ClassificationDistill,
                soft_targets=SoftTargetSpec, student=ClassificationModel,
                teacher_default=ClassificationTeacher(params={"hidden": [256, 256]}),
                student_default=ClassificationModel(params={"hidden": [32]}))
