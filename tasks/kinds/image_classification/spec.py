"""task image_classification: its sections of the workflow (images and a class label; stored targets per
augmented view)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.kinds.base import KindSpec
from tasks.sections import DataSpec, DistillSpec, ModelSpec, SoftTargetSpec, Strict, TeacherSpec


class NormalizeSpec(Strict):
    """Per-channel statistics on the 0-255 pixel scale; default: computed over the training split."""

    mean: list[float] = Field(description="one value per channel (0-255 scale)")
    std: list[float] = Field(description="one value per channel (0-255 scale), each > 0")

    @model_validator(mode="after")
    def _same_length(self) -> NormalizeSpec:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError("mean and std need one value per channel, as many of each")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


class ImageData(DataSpec):
    source: str = Field("sklearn:digits", description="sklearn:digits (8x8 digits written as PNG bytes), a Parquet "
                                                      "file/folder/glob (local or s3://) with an image column, or a "
                                                      "folder tree root/<class>/<file>")
    image: str = Field("image", description="the image column: a struct {bytes, path} (Hugging Face datasets, Ray "
                                            "Data) or a binary column of PNG/JPEG bytes")
    label: str = Field("label", description="the class column (a folder tree: the folder names)")
    layout: Literal["auto", "parquet", "folder"] = Field(
        "auto", description="auto: a local folder holding no .parquet file is a folder tree root/<class>/<file>")
    size: list[int] | int | None = Field(None, description="[height, width] (or one number) every image is resized "
                                                          "to; default: the images' own size, which must be one")
    resize: Literal["stretch", "crop"] = Field("stretch", description="stretch to size, or scale the shorter side "
                                                                     "and center-crop (with size)")
    channels: int | None = Field(None, description="1 or 3; default from the data (1 when every image is grey)")
    normalize: NormalizeSpec | None = Field(None, description="given per-channel mean/std; default computed")

    @field_validator("size")
    @classmethod
    def _size(cls, v: list[int] | int | None) -> list[int] | int | None:
        if v is None:
            return v
        hw = [v, v] if isinstance(v, int) else v
        if len(hw) != 2 or any(s < 4 for s in hw):
            raise ValueError("size is [height, width] (or one number), each >= 4")
        return v

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: int | None) -> int | None:
        if v not in (None, 1, 3):
            raise ValueError("channels is 1 or 3")
        return v


class AugmentSpec(Strict):
    """The draw of each stored view (run on tensors in torch, the same code for the teacher and the student)."""

    crop_scale: list[float] = Field([0.35, 1.0], description="random resized crop: [min, max] share of the area")
    crop_ratio: list[float] = Field([0.75, 1.3333], description="random resized crop: [min, max] aspect ratio")
    hflip: bool = Field(True, description="flip half the views left-right (false for digits and text)")
    rotate: float = Field(0.0, ge=0, le=60, description="small affine: rotate by up to +-this many degrees")

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _range(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or not 0 < v[0] <= v[1]:
            raise ValueError("a range is [min, max] with 0 < min <= max")
        return v

    @model_validator(mode="after")
    def _crop_inside(self) -> AugmentSpec:
        if self.crop_scale[1] > 1.0:
            raise ValueError("crop_scale: a crop's area is at most the image's (max <= 1)")
        return self


class ImageSoftTargets(SoftTargetSpec):
    views: int = Field(0, ge=0, le=64, description="augmented views stored per training image (0: one target per "
                                                   "un-augmented image)")
    augment: AugmentSpec = AugmentSpec()
    mode: Literal["stored", "online"] = Field("stored", description="online: the teacher runs in the training loop "
                                                                   "on each batch's fresh views")


class ImageModel(ModelSpec):
    model: str = Field("cnn", description="cnn, resnet (CIFAR-style), or 'package.module:factory'")


class ImageTeacher(TeacherSpec):
    model: str = Field("resnet", description="a family, 'package.module:factory', or models:/NAME@ALIAS")
    checkpoint: str | None = Field(None, description="a state_dict file for model + params (not trained then)")


class ImageDistill(DistillSpec):
    """`loss`: kl, reverse_kl, jsd, mse, or 'package.module:function' (as for classification)."""


SPEC = KindSpec(data=ImageData, teacher=ImageTeacher, distill=ImageDistill, soft_targets=ImageSoftTargets,
                student=ImageModel,
                teacher_default=ImageTeacher(params={"depth": 8, "width": 16}),
                student_default=ImageModel(params={"channels": [8, 16]}))
