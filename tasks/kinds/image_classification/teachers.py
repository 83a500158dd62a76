"""Image teachers from outside kdflow: a registered kdflow image model, or a state_dict (`checkpoint`) for a
family or factory; each checked against the data's images (channels, size, classes) before any work."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tasks.errors import UserError
from tasks.kinds.image_classification.models import build_model

SHAPE = ("channels", "height", "width", "num_classes")


def _registered(uri: str, dims: Mapping[str, Any]) -> nn.Module:
    from tasks.kinds.image_classification.serving import load_registered

    try:
        module, recipe = load_registered(uri)
    except Exception as exc:  # noqa: BLE001 - the registry or the model's code: the user's to fix
        raise UserError(f"cannot load {uri}: {str(exc).splitlines()[0]}", where="model") from None
    d = recipe["dims"]
    if int(d["channels"]) != int(dims["channels"]):
        raise UserError(f"{uri} takes {d['channels']}-channel images; the data's have {dims['channels']} "
                        "(set data.channels)", where="model")
    wrong = [k for k in SHAPE[1:] if int(d[k]) != int(dims[k])]
    if wrong:
        raise UserError(f"{uri} takes {d['height']}x{d['width']} images over {d['num_classes']} classes; the data "
                        f"has {dims['height']}x{dims['width']} over {dims['num_classes']} (set data.size)",
                        where="model")
    module.kdflow_recipe = (recipe["factory"], dict(recipe["params"]))  # what a worker rebuilds it from (online)
    return module


def load_teacher(teacher: Any, dims: Mapping[str, Any]) -> nn.Module:
    """A teacher from outside kdflow as an ImageModel taking the stored 0-255 pixel rows. A checkpoint holds the
    network's state_dict (or kdflow's whole ImageModel's, keys under 'net.'); errors name 'model' or
    'checkpoint'."""
    if teacher.model.startswith("models:/"):
        return _registered(teacher.model, dims)
    path = teacher.checkpoint
    if not os.path.isfile(path):
        raise UserError(f"checkpoint file not found: {path}", where="checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a user's file can hold anything
        raise UserError(f"cannot load checkpoint {path} as a state_dict: {str(exc).splitlines()[0]}",
                        where="checkpoint") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state_dict", where="checkpoint")
    state = state.get("model", state)
    model = build_model(teacher.model, teacher.params, dims)
    target = model if any(k.startswith("net.") for k in state) else model.net
    try:
        target.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"checkpoint does not fit {teacher.model} {teacher.params} for {dims['channels']}-channel "
                        f"{dims['height']}x{dims['width']} images: {first}", where="checkpoint") from None
    return model.eval()
