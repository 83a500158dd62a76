"""What every kind's models share: a registry of named factories (built-in families, registered by a
decorator, a taken name an error) that also reaches a user's 'package.module:factory', and a model's size
and content hash."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from tasks.errors import UserError


class Registry:
    """Named factories of one kind of thing (`what`: 'model'); `register(name)` is a decorator."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self.entries:
                raise ValueError(f"a {self.what} named {name!r} is already registered "
                                 f"({self.entries[name].__module__}.{self.entries[name].__qualname__})")
            self.entries[name] = fn
            return fn

        return deco

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> Callable[..., Any]:
        return self.entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def resolve(self, name: str) -> Callable[..., Any]:
        """A registered name or 'package.module:factory'; a UserError says why not."""
        if name in self.entries:
            return self.entries[name]
        if ":" not in name:
            raise UserError(f"unknown {self.what} {name!r}; built-in: {', '.join(sorted(self.entries))}, "
                            "or 'package.module:factory'")
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UserError(f"cannot import {module_name!r}: {exc}") from None
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise UserError(f"{module_name!r} has no callable {attr!r}")
        return fn


def call_factory(fn: Callable[..., Any], name: str, params: dict[str, Any], kwargs: dict[str, Any]) -> nn.Module:
    """`fn(**kwargs)`, a model family's or a user's factory; its mistakes exit 2 naming `name` and its params."""
    try:
        model = fn(**kwargs)
    except TypeError as exc:
        raise UserError(f"{name}: bad params {sorted(params)}: {exc}") from None
    except ValueError as exc:
        raise UserError(f"{name}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{name} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def classifier_head(first: list[nn.Module], inputs: int, hidden: int, dropout: float,
                    num_classes: int) -> nn.Sequential:
    """`first` (pooling, flattening), then an optional hidden layer and dropout, then the class logits: the
    head the built-in convolutional families share (its module order is their state_dict's keys)."""
    head = list(first)
    if hidden:
        head += [nn.Linear(inputs, hidden), nn.ReLU()]
        inputs = hidden
    if dropout:
        head.append(nn.Dropout(dropout))
    head.append(nn.Linear(inputs, num_classes))
    return nn.Sequential(*head)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def weights_digest(model: nn.Module) -> str:
    """Content hash of the weights (names, shapes, dtypes, values), independent of pickling details."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim: BatchNorm counters
    return h.hexdigest()


def ensemble(outputs: list[torch.Tensor], rule: str) -> torch.Tensor:
    """Several teachers' logits [..., C] as one: their mean (`mean_logits`), or the log of their mean
    probability (`mean_probs`: a proper distribution whose softmax at any T is well defined)."""
    if len(outputs) == 1:
        return outputs[0]
    stacked = torch.stack(outputs)
    if rule == "mean_logits":
        return stacked.mean(0)
    return torch.logsumexp(torch.log_softmax(stacked, dim=-1), dim=0) - math.log(len(outputs))


def teacher_forward(teachers: list[nn.Module], x: Any, rule: str, batch: int,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (ensembled) teachers' logits for rows `x` at T=1, `batch` rows at a time, without autograd; the rows
    cast to `dtype` first when given (token ids as int64)."""
    import numpy as np

    for t in teachers:
        t.eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(np.array(x[i:i + batch]))
            outs.append(ensemble([t(xb if dtype is None else xb.to(dtype)).float() for t in teachers], rule))
    return torch.cat(outs) if outs else torch.zeros(0)
