"""Model families with size parameters, user factories, and the size figures a run reports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.spec import validate
from tasks.errors import UserError
from tasks.kinds.classification.models import MODELS, build_model
from tasks.models import model_bytes, num_params
from tests.helpers import workflow

F, C = 40, 10  # MNIST-1D's shape


def params_of(name: str, **params: object) -> int:
    return num_params(build_model(name, params, F, C))


def test_mlp_size_follows_widths_and_depth() -> None:
    # 40-100-100-10: (40*100 + 100) + (100*100 + 100) + (100*10 + 10)
    assert params_of("mlp", hidden=[100, 100]) == 15_210
    assert params_of("mlp", width=100, depth=2) == 15_210
    assert params_of("mlp", width=64, depth=1) < params_of("mlp", width=128, depth=1)
    assert params_of("mlp", width=64, depth=1) < params_of("mlp", width=64, depth=3)


def test_cnn1d_size_follows_channels_and_depth() -> None:
    assert params_of("cnn1d", channels=8, depth=2) < params_of("cnn1d", channels=32, depth=2)
    assert params_of("cnn1d", channels=16, depth=1) < params_of("cnn1d", channels=16, depth=3)
    assert params_of("cnn1d", channels=[8, 16]) == params_of("cnn1d", channels=[8, 16], kernel_size=5)
    assert params_of("cnn1d", channels=[8, 16], hidden=32) > params_of("cnn1d", channels=[8, 16])


def test_transformer_size_follows_layers_and_width() -> None:
    assert params_of("transformer", layers=1, width=32) < params_of("transformer", layers=3, width=32)
    assert params_of("transformer", layers=2, width=16, heads=2) < params_of("transformer", layers=2, width=64,
                                                                             heads=2)
    # heads split the width; they add no parameters
    assert params_of("transformer", width=32, heads=2) == params_of("transformer", width=32, heads=8)
    with pytest.raises(UserError, match="divisible by heads"):
        build_model("transformer", {"width": 30, "heads": 4}, F, C)


@pytest.mark.parametrize("name,params", [
    ("mlp", {"width": 24, "depth": 3, "dropout": 0.1, "activation": "gelu"}),
    ("cnn1d", {"channels": [8, 16], "kernel_size": 3, "stride": 1, "hidden": 16}),
    ("transformer", {"layers": 2, "width": 16, "heads": 4, "patch": 6}),  # 40 = 6 x 7 - 2: padded
])
def test_every_family_maps_features_to_logits_and_learns(name: str, params: dict[str, object]) -> None:
    torch.manual_seed(0)
    model = build_model(name, params, F, C)
    x, y = torch.randn(64, F), torch.randint(0, C, (64,))
    assert model(x).shape == (64, C)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first * 0.7


def test_size_figures_count_parameters_and_bytes() -> None:
    model = build_model("mlp", {"hidden": [100, 100]}, F, C)
    assert num_params(model) == 15_210
    assert model_bytes(model) == 15_210 * 4  # float32, no buffers
    assert model_bytes(model.to(torch.bfloat16)) == 15_210 * 2


def test_a_user_factory_receives_params_as_keyword_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_students.py").write_text(
        "import torch\n"
        "SEEN = []\n"
        "def wide(num_features, num_classes, width=8, depth=1, **extra):\n"
        "    SEEN.append(dict(num_features=num_features, num_classes=num_classes, width=width, depth=depth, **extra))\n"
        "    layers, prev = [], num_features\n"
        "    for _ in range(depth):\n"
        "        layers += [torch.nn.Linear(prev, width), torch.nn.ReLU()]\n"
        "        prev = width\n"
        "    return torch.nn.Sequential(*layers, torch.nn.Linear(prev, num_classes))\n"
        "def shapeless(width):\n"
        "    return torch.nn.Linear(width, 3)\n"
        "def not_a_model(**kw):\n"
        "    return 'a string'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_students

    model = build_model("my_students:wide", {"width": 12, "depth": 2, "tag": "x"}, F, C)
    assert my_students.SEEN == [{"num_features": F, "num_classes": C, "width": 12, "depth": 2, "tag": "x"}]
    assert num_params(model) == (F * 12 + 12) + (12 * 12 + 12) + (12 * C + C)
    assert num_params(build_model("my_students:wide", {"width": 24}, F, C)) > num_params(model) / 2

    # a factory that takes no shape arguments gets only its params, and its output shape is checked
    with pytest.raises(UserError, match=r"expected logits \[2, 10\]|forward on a \[2, 40\] batch failed"):
        build_model("my_students:shapeless", {"width": F}, F, C)
    with pytest.raises(UserError, match="bad params"):  # a misspelt param, for a factory without **kwargs
        build_model("my_students:shapeless", {"widht": 3}, F, C)
    with pytest.raises(UserError, match="not a torch.nn.Module"):
        build_model("my_students:not_a_model", {}, F, C)
    with pytest.raises(UserError, match="cannot import"):
        build_model("no_such_module:make", {}, F, C)
    with pytest.raises(UserError, match="unknown model"):
        build_model("resnet", {}, F, C)


def test_student_size_params_can_be_searched() -> None:
    spec = validate(workflow(**{
        "student.model": "transformer",
        "student.params": {"layers": 1, "width": 16, "heads": 2},
        "search": {"trials": 2, "space": {"student.params.layers": {"type": "int", "low": 1, "high": 3},
                                          "student.params.width": {"type": "categorical", "choices": [16, 32]}}},
    }))
    assert set(spec.search.space) == {"student.params.layers", "student.params.width"}
    size = {(n, w): params_of("transformer", layers=n, width=w, heads=2) for n in (1, 3) for w in (16, 32)}
    assert size[1, 16] < size[3, 16] and size[1, 32] < size[3, 32]
    assert size[1, 16] < size[1, 32] and size[3, 16] < size[3, 32]
    assert set(MODELS) >= {"mlp", "cnn1d", "transformer"}


def test_registering_a_taken_model_name_is_an_error_and_keeps_the_first() -> None:
    """A built-in family cannot be replaced by accident from a user's module (torchdistill's lesson: names are
    stable); a new name registers and builds like a family."""
    from tasks.kinds.classification.models import register_model

    with pytest.raises(ValueError, match="'mlp' is already registered"):
        register_model("mlp")(lambda num_features, num_classes: None)
    assert MODELS["mlp"].__name__ == "mlp"

    @register_model("test-linear")
    def linear(num_features: int, num_classes: int) -> torch.nn.Module:
        return torch.nn.Linear(num_features, num_classes)

    try:
        assert build_model("test-linear", {}, 5, 3)(torch.zeros(2, 5)).shape == (2, 3)
        with pytest.raises(ValueError, match="already registered"):
            register_model("test-linear")(linear)
    finally:
        MODELS.entries.pop("test-linear")
