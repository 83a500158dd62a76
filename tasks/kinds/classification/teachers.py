"""Classification's teachers from outside kdflow: a registered kdflow student, a .pt/.pth file holding a whole
model, or a state_dict for a family; each made to take the stored (standardized) rows."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from tasks.errors import UserError
from tasks.kinds.classification.models import Standardized, build_model


def load_teacher(teacher: Any, data: Any) -> nn.Module:
    """A teacher from outside kdflow as a module taking the stored (standardized) rows: a registered kdflow
    student (rebuilt from safetensors, nothing unpickled), a .pt/.pth file holding a whole model, or a
    state_dict (`checkpoint`) for `model` + `params`. Errors name 'model' or 'checkpoint'."""
    mean, std = torch.as_tensor(data.mean), torch.as_tensor(data.std)
    if teacher.model.startswith("models:/"):
        from tasks.kinds.classification.serving import load_module

        try:
            model = load_module(teacher.model)
        except Exception as exc:  # noqa: BLE001 - the registry or the model's code: the user's to fix
            raise UserError(f"cannot load {teacher.model}: {str(exc).splitlines()[0]}", where="model") from None
        return Standardized(model, mean, std, inputs="standardized")
    if os.path.isdir(teacher.model):  # not a family: says so, naming the key
        return build_model(teacher.model, teacher.params, data.num_features, data.num_classes)
    path = teacher.checkpoint or teacher.model
    if not os.path.isfile(path):
        raise UserError(f"checkpoint file not found: {path}", where="checkpoint" if teacher.checkpoint else "model")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - unpickling a user's file can raise anything
        raise UserError(f"cannot load checkpoint {path}: {exc}") from None
    if isinstance(obj, nn.Module):
        return Standardized(obj, mean, std, inputs="standardized")
    if isinstance(obj, dict):  # a state_dict for the family named in `model`
        model = build_model(teacher.model, teacher.params, data.num_features, data.num_classes)
        try:
            model.load_state_dict(obj.get("model", obj))
        except RuntimeError as exc:
            raise UserError(f"checkpoint does not fit {teacher.model} {teacher.params}: {str(exc).splitlines()[0]}",
                            where="checkpoint") from None
        return Standardized(model, mean, std, inputs="standardized")
    raise UserError(f"{path} holds a {type(obj).__name__}, not a model or state_dict")
