"""Classification's registered student without pickle: safetensors weights plus a JSON recipe that rebuilds it.

Loading a pickled model from a shared registry runs whatever code the pickle carries. A kdflow model
version instead holds `weights.safetensors` (tensors only) and `kdflow_model.json` (factory name and
params, feature names, class labels, the training split's standardization); the MLflow pyfunc is
"models from code" (pyfunc.py beside this module), so the model directory holds no pickle at all.
`mlflow.pyfunc.load_model("models:/NAME@champion")` then predicts the user's class labels from a
pandas DataFrame with the user's feature columns; `load_module` gives the same network as a torch
module (a registered student used as a teacher, or a champion evaluated on a new test split).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.kinds.classification.models import Standardized, build_model

CONFIG = "kdflow_model.json"
WEIGHTS = "weights.safetensors"
FORMAT = "kdflow-safetensors-v1"
CODE = str(Path(__file__).with_name("pyfunc.py"))


def write_artifacts(folder: str | Path, model: nn.Module, *, factory: str, params: dict[str, Any],
                    mean: np.ndarray, std: np.ndarray, feature_names: list[str], classes: list[Any]) -> dict[str, str]:
    """Write the weights and the recipe into `folder`; returns the pyfunc `artifacts` mapping."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS))
    recipe = {"format": FORMAT, "factory": factory, "params": params, "num_features": len(mean),
              "num_classes": len(classes), "feature_names": list(feature_names), "classes": list(classes),
              "mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    (folder / CONFIG).write_text(json.dumps(recipe, indent=1))
    return {"config": str(folder / CONFIG), "weights": str(folder / WEIGHTS)}


def read_recipe(config_path: str | Path) -> dict[str, Any]:
    recipe = json.loads(Path(config_path).read_text())
    if recipe.get("format") != FORMAT:
        raise ValueError(f"{config_path}: not a {FORMAT} model recipe")
    return recipe


def build_from_artifacts(config_path: str | Path, weights_path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The student (taking raw features) rebuilt from its recipe and safetensors weights; no unpickling."""
    from safetensors.torch import load_file

    recipe = read_recipe(config_path)
    net = build_model(recipe["factory"], recipe["params"], recipe["num_features"], recipe["num_classes"])
    net.load_state_dict(load_file(str(weights_path)))
    module = Standardized(net, torch.tensor(recipe["mean"]), torch.tensor(recipe["std"])).eval()
    return module, recipe


def find_artifacts(model_dir: str | Path) -> tuple[Path, Path] | None:
    """(config, weights) inside a downloaded model directory, or None for a model kdflow did not write."""
    for config in Path(model_dir).rglob(CONFIG):
        weights = config.with_name(WEIGHTS)
        if weights.is_file():
            return config, weights
    return None


def load_module(uri: str) -> nn.Module:
    """A registered model as a torch module taking raw features (kdflow's safe format, else MLflow pytorch)."""
    import mlflow

    local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    found = find_artifacts(local)
    if found is None:  # a model the user registered with MLflow's pytorch flavour
        return mlflow.pytorch.load_model(uri, map_location="cpu")
    return build_from_artifacts(*found)[0]


def frame_to_array(frame: Any, feature_names: list[str]) -> np.ndarray:
    """The feature columns, in training order, as float32 [N, F]; a missing column is named."""
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    missing = [c for c in feature_names if c not in frame.columns]
    if missing:
        raise ValueError(f"input lacks the feature columns {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return np.array(frame[feature_names].to_numpy(dtype=np.float32), copy=True)  # torch wants it writable


def predict_labels(module: nn.Module, recipe: dict[str, Any], frame: Any) -> np.ndarray:
    x = torch.from_numpy(frame_to_array(frame, recipe["feature_names"]))
    with torch.inference_mode():
        idx = module(x).argmax(-1).numpy()
    return np.asarray(recipe["classes"], dtype=object if isinstance(recipe["classes"][0], str) else None)[idx]


def log_pyfunc(model: nn.Module, *, factory: str, params: dict[str, Any], mean: np.ndarray, std: np.ndarray,
               feature_names: list[str], classes: list[Any], pip_requirements: list[str], name: str = "student") -> str:
    """Log the student as a pickle-free pyfunc in the active run; returns the model URI."""
    import tempfile

    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    with tempfile.TemporaryDirectory() as tmp:
        artifacts = write_artifacts(tmp, model, factory=factory, params=params, mean=mean, std=std,
                                    feature_names=feature_names, classes=classes)
        module, recipe = build_from_artifacts(artifacts["config"], artifacts["weights"])
        example = pd.DataFrame(np.stack([mean, mean + std]).astype(np.float64), columns=feature_names)
        signature = infer_signature(example, predict_labels(module, recipe, example))
        info = mlflow.pyfunc.log_model(name=name, python_model=CODE, artifacts=artifacts, signature=signature,
                                       input_example=example, pip_requirements=pip_requirements)
    return info.model_uri


def holds_pickle(model_dir: str | Path) -> list[str]:
    """Files in a model directory that are pickles (by name or by the pickle protocol's first bytes)."""
    out = []
    for root, _, files in os.walk(model_dir):
        for f in files:
            p = Path(root, f)
            with p.open("rb") as fh:
                head = fh.read(2)
            if p.suffix in (".pkl", ".pickle", ".pt", ".pth", ".joblib") or head[:1] == b"\x80" and head[1:2] in (
                    b"\x02", b"\x03", b"\x04", b"\x05"):
                out.append(str(p.relative_to(model_dir)))
    return out


def log_student(model: nn.Module, mean: np.ndarray, std: np.ndarray, *, factory: str, params: dict[str, Any],
                feature_names: list[str], classes: list[Any], pip_requirements: list[str]) -> str:
    """Log the student as a pickle-free pyfunc taking the user's raw feature columns; returns the model URI.
    Nameless features are x0, x1, ...; nameless classes their indices."""
    names = feature_names or [f"x{i}" for i in range(len(mean))]
    if not classes:
        with torch.no_grad():
            classes = list(range(int(model(torch.zeros(1, len(mean))).shape[-1])))
    return log_pyfunc(model, factory=factory, params=params, mean=mean, std=std, feature_names=names,
                      classes=classes, pip_requirements=pip_requirements)
