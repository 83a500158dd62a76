"""Classification's model families, found by name from the spec, and user factories reached as
'package.module:factory'.

Every family takes (num_features, num_classes, **params) and returns an nn.Module mapping [B, F] float
features to [B, C] logits. Register your own with `@register_model("name")` (a taken name is an error).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tasks.errors import UserError
from tasks.models import Registry, call_factory, classifier_head

MODELS = Registry("model")
register_model = MODELS.register


def _widths(hidden: int | list[int] | None, width: int | None, depth: int | None) -> list[int]:
    if width is not None or depth is not None:
        return [int(width or 64)] * int(depth if depth is not None else 1)
    if hidden is None:
        return [64]
    return [int(hidden)] if isinstance(hidden, int) else [int(h) for h in hidden]


@register_model("mlp")
def mlp(num_features: int, num_classes: int, hidden: int | list[int] | None = None, width: int | None = None,
        depth: int | None = None, dropout: float = 0.0, activation: str = "relu") -> nn.Module:
    """Fully connected net: `hidden: [256, 256]`, or `width` x `depth`."""
    act = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}[activation]
    layers: list[nn.Module] = []
    prev = num_features
    for w in _widths(hidden, width, depth):
        layers += [nn.Linear(prev, w), act()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        prev = w
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)


class CNN1d(nn.Module):
    def __init__(self, num_features: int, num_classes: int, channels: list[int], kernel_size: int,
                 stride: int, hidden: int, dropout: float) -> None:
        super().__init__()
        convs: list[nn.Module] = []
        prev = 1
        for c in channels:
            convs += [nn.Conv1d(prev, c, kernel_size, stride=stride, padding=kernel_size // 2), nn.ReLU()]
            prev = c
        self.features = nn.Sequential(*convs)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, 1, num_features)).numel()
        self.head = classifier_head([nn.Flatten()], flat, hidden, dropout, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)))


@register_model("cnn1d")
def cnn1d(num_features: int, num_classes: int, channels: int | list[int] | None = None, depth: int | None = None,
          kernel_size: int = 5, stride: int = 2, hidden: int = 0, dropout: float = 0.0) -> nn.Module:
    """1-d convolutions over the feature vector: `channels: [32, 32]` (or `channels: 32, depth: 3`)."""
    if isinstance(channels, int) or channels is None:
        chans = [int(channels or 16)] * int(depth or 2)
    else:
        chans = [int(c) for c in channels]
    return CNN1d(num_features, num_classes, chans, kernel_size, stride, hidden, dropout)


class TinyTransformer(nn.Module):
    """Splits the feature vector into patches, one token each, then a Transformer encoder + mean pool."""

    def __init__(self, num_features: int, num_classes: int, patch: int, width: int, layers: int,
                 heads: int, dropout: float) -> None:
        super().__init__()
        self.patch = patch
        self.tokens = math.ceil(num_features / patch)
        self.pad = self.tokens * patch - num_features
        self.embed = nn.Linear(patch, width)
        self.pos = nn.Parameter(torch.zeros(1, self.tokens, width))
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = nn.functional.pad(x, (0, self.pad))
        h = self.embed(x.view(x.shape[0], self.tokens, self.patch)) + self.pos
        return self.head(self.encoder(h).mean(dim=1))


@register_model("transformer")
def transformer(num_features: int, num_classes: int, patch: int = 8, width: int = 32, layers: int = 2,
                heads: int = 4, dropout: float = 0.0) -> nn.Module:
    """A small Transformer encoder: `layers`, `width`, `heads`, `patch` features per token."""
    if width % heads:
        raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
    return TinyTransformer(num_features, num_classes, patch, width, layers, heads, dropout)


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    """A built-in family name or 'package.module:factory'."""
    return MODELS.resolve(name)


def build_model(name: str, params: dict[str, Any], num_features: int, num_classes: int) -> nn.Module:
    """Build a model; user factories get `params` as keyword arguments (plus the shape ones they accept)."""
    fn = resolve_factory(name)
    kwargs = dict(params)
    sig = inspect.signature(fn)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    for k, v in (("num_features", num_features), ("num_classes", num_classes)):
        if k in sig.parameters or accepts_any:
            kwargs.setdefault(k, v)
    model = call_factory(fn, name, params, kwargs)
    check_output_shape(model, name, num_features, num_classes)
    return model


def check_output_shape(model: nn.Module, name: str, num_features: int, num_classes: int) -> None:
    """A model must map [B, num_features] to [B, num_classes]: say so now, not mid-training on a worker."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, num_features))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise UserError(f"{name}: forward on a [2, {num_features}] batch failed: {type(exc).__name__}: {exc}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"{name}: a [2, {num_features}] batch gave {shape}, expected logits [2, {num_classes}]")


class Standardized(nn.Module):
    """The one standardization wrapper: a model and its caller that see features on different scales.

    inputs="raw": the caller has raw features, the model was trained on standardized ones (a registered
    student). inputs="standardized": the reverse (a teacher or champion trained outside kdflow, fed
    kdflow's standardized rows).
    """

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor, inputs: str = "raw") -> None:
        super().__init__()
        if inputs not in ("raw", "standardized"):
            raise ValueError(f"inputs is 'raw' or 'standardized', not {inputs!r}")
        self.model = model
        self.inputs = inputs
        self.register_buffer("mean", torch.as_tensor(mean).float())
        self.register_buffer("std", torch.as_tensor(std).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inputs == "raw":
            return self.model((x - self.mean) / self.std)
        return self.model(x * self.std + self.mean)

