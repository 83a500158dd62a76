"""Image classifiers: a small CNN and CIFAR-style ResNets (depth and width as params, so a search can size a
student), user factories ('package.module:factory'), and `ImageModel`, the wrapper every one of them is
trained, stored and served in.

A family takes (in_channels, image_height, image_width, num_classes: those it names, **params) and maps float images [B, C, H, W]
(normalized) to logits [B, num_classes]. `ImageModel` takes what kdflow's rows hold: pixels on the 0-255
scale, flat [B, C*H*W] (stored rows) or [B, C, H, W] (augmented views), normalizes them with the per-channel
statistics it keeps as buffers (so they travel with the weights) and calls the family's network.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from tasks.errors import UserError
from tasks.models import Registry, call_factory, classifier_head

MODELS = Registry("image model")
register_model = MODELS.register
SHAPE_ARGS = {"in_channels": "channels", "image_height": "height", "image_width": "width", "num_classes": "num_classes"}


class ImageModel(nn.Module):
    """0-255 pixels (flat or [B, C, H, W], any dtype) -> normalized float images -> the network's logits."""

    def __init__(self, net: nn.Module, shape: tuple[int, int, int], mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.net = net
        self.image_shape = tuple(int(s) for s in shape)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().reshape(-1, *self.image_shape)
        return self.net((x - self.mean) / self.std)


def _chans(channels: int | list[int] | None, width: int | None, depth: int | None) -> list[int]:
    if isinstance(channels, list):
        return [int(c) for c in channels]
    base = int(channels or width or 16)
    return [base * 2 ** min(i, 2) for i in range(int(depth or 2))]


class CNN(nn.Module):
    def __init__(self, in_channels: int, height: int, width: int, num_classes: int, chans: list[int],
                 hidden: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev, h, w = in_channels, height, width
        for c in chans:
            layers += [nn.Conv2d(prev, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            if min(h, w) >= 4:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            prev = c
        self.features = nn.Sequential(*layers)
        # pooled to a 2x2 grid, which keeps where the strokes are
        self.head = classifier_head([nn.AdaptiveAvgPool2d(2), nn.Flatten()], prev * 4, hidden, dropout, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("cnn")
def cnn(in_channels: int, image_height: int, image_width: int, num_classes: int,
        channels: list[int] | int | None = None, width: int | None = None, depth: int | None = None,
        hidden: int = 0, dropout: float = 0.0) -> nn.Module:
    """Conv-BN-ReLU blocks (2x2 max-pool while the map is >= 4 pixels), average-pooled to 2x2, linear head:
    `channels: [8, 16]`, or `width` channels doubling (up to 4x) over `depth` blocks."""
    return CNN(in_channels, image_height, image_width, num_classes, _chans(channels, width, depth), hidden, dropout)


class Block(nn.Module):
    """The basic residual block (two 3x3 convolutions), with a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(out)) + self.skip(x))


class ResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, blocks: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages: list[nn.Module] = []
        prev = width
        for i in range(3):
            out = width * 2 ** i
            for j in range(blocks):
                stages.append(Block(prev, out, 2 if i > 0 and j == 0 else 1))
                prev = out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


@register_model("resnet")
def resnet(in_channels: int, num_classes: int, depth: int = 8, width: int = 16) -> nn.Module:
    """CIFAR-style ResNet-`depth` (depth = 6n + 2: 8, 14, 20, 32, ...; three stages of n basic blocks at `width`,
    2x`width` and 4x`width` channels)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth is 6n + 2 (8, 14, 20, ...), not {depth}")
    return ResNet(in_channels, num_classes, (depth - 2) // 6, width)


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    return MODELS.resolve(name)


def unknown_param(name: str, param: str) -> str | None:
    if name not in MODELS:
        return None
    params = inspect.signature(MODELS[name]).parameters
    if param in params and param not in SHAPE_ARGS:
        return None
    known = [p for p in params if p not in SHAPE_ARGS]
    return f"{name} has no parameter {param!r} (it takes {', '.join(known)})"


def build_net(name: str, params: Mapping[str, Any], dims: Mapping[str, Any]) -> nn.Module:
    """The family's (or factory's) bare network for images of `dims`; it gets the shape arguments it accepts."""
    fn = resolve_factory(name)
    kwargs = dict(params)
    sig = inspect.signature(fn)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    for k, dim in SHAPE_ARGS.items():
        if k in sig.parameters or accepts_any:
            kwargs.setdefault(k, int(dims[dim]))
    net = call_factory(fn, name, params, kwargs)
    return net


def build_model(name: str, params: Mapping[str, Any], dims: Mapping[str, Any]) -> ImageModel:
    """The network wrapped to take 0-255 pixel rows; its output shape checked now, not on a worker."""
    shape = (int(dims["channels"]), int(dims["height"]), int(dims["width"]))
    model = ImageModel(build_net(name, params, dims), shape, list(dims["mean"]), list(dims["std"]))
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *shape))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise UserError(f"{name}: forward on a [2, {', '.join(map(str, shape))}] batch failed: "
                        f"{type(exc).__name__}: {exc}") from None
    finally:
        model.train()
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, int(dims["num_classes"])):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"{name}: a batch of 2 images gave {got}, expected logits [2, {dims['num_classes']}]")
    return model
