"""The registered image student: `weights.safetensors` plus `kdflow_image_model.json` (the factory and params,
the image shape, the per-channel statistics, the resize policy and the class labels), served by a "models from
code" pyfunc (pyfunc.py): a list of image bytes, or a DataFrame column of them (`image`), in; each image's class
and its probabilities out. Nothing is pickled; the preprocessing is the recipe plus `data.to_pixels`, the same
function the training rows were made with.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.kinds.image_classification.models import ImageModel, build_model

CONFIG = "kdflow_image_model.json"
WEIGHTS = "weights.safetensors"
FORMAT = "kdflow-image-safetensors-v1"
CODE = str(Path(__file__).with_name("pyfunc.py"))
COLUMN = "image"


def write_artifacts(folder: str | Path, model: nn.Module, recipe: dict[str, Any]) -> dict[str, str]:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps({"format": FORMAT, **recipe}, indent=1))
    return {"config": str(folder / CONFIG), "weights": str(folder / WEIGHTS)}


def build_from_artifacts(config_path: str | Path, weights_path: str | Path) -> tuple[ImageModel, dict[str, Any]]:
    """The student (taking 0-255 pixels) rebuilt from its recipe and safetensors weights; no unpickling."""
    from safetensors.torch import load_file

    recipe = json.loads(Path(config_path).read_text())
    if recipe.get("format") != FORMAT:
        raise ValueError(f"{config_path}: not a {FORMAT} model recipe")
    model = build_model(recipe["factory"], recipe["params"], recipe["dims"])
    model.load_state_dict(load_file(str(weights_path)))
    return model.eval(), recipe


def find_artifacts(model_dir: str | Path) -> tuple[Path, Path] | None:
    for config in Path(model_dir).rglob(CONFIG):
        if config.with_name(WEIGHTS).is_file():
            return config, config.with_name(WEIGHTS)
    return None


def load_registered(uri: str) -> tuple[ImageModel, dict[str, Any]]:
    """A registered image model (kdflow's format) as its module and recipe."""
    import mlflow

    found = find_artifacts(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    if found is None:
        raise ValueError(f"{uri} is not a kdflow image model (no {CONFIG})")
    return build_from_artifacts(*found)


def images_of(model_input: Any) -> list[bytes]:
    """A list of image bytes, or a DataFrame with an `image` column (bytes, or a {bytes, path} struct)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        col = model_input[COLUMN] if COLUMN in model_input.columns else model_input.iloc[:, 0]
        values = col.tolist()
    elif isinstance(model_input, (bytes, bytearray)):
        values = [model_input]
    else:
        values = list(model_input)
    return [bytes(v["bytes"]) if isinstance(v, Mapping) else bytes(v) for v in values]


def pixels_of(images: list[bytes], recipe: Mapping[str, Any]) -> torch.Tensor:
    from PIL import Image

    from tasks.kinds.image_classification.data import to_pixels

    d = recipe["dims"]
    hw = (int(d["height"]), int(d["width"]))
    arrays = [to_pixels(Image.open(io.BytesIO(b)), int(d["channels"]), hw, recipe["resize"]) for b in images]
    return torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, int(d["channels"]), *hw, dtype=torch.uint8)


def predict(module: nn.Module, recipe: Mapping[str, Any], model_input: Any) -> Any:
    """Each image's class (the user's label) and the probability of every class, in the labels' order."""
    import pandas as pd

    x = pixels_of(images_of(model_input), recipe)
    with torch.inference_mode():
        probs = torch.softmax(module(x).float(), -1).numpy() if len(x) else np.zeros((0, len(recipe["classes"])))
    classes = list(recipe["classes"])
    return pd.DataFrame({"class": [str(classes[i]) for i in probs.argmax(-1)],
                         "probabilities": [[float(p) for p in row] for row in probs]})


def log_student(model: nn.Module, recipe: dict[str, Any], example: list[bytes], pip_requirements: list[str],
                name: str = "student") -> str:
    """Log the student as a pickle-free pyfunc taking image bytes; returns its model URI."""
    import tempfile

    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    with tempfile.TemporaryDirectory() as tmp:
        artifacts = write_artifacts(tmp, model, recipe)
        module, saved = build_from_artifacts(artifacts["config"], artifacts["weights"])
        frame = pd.DataFrame({COLUMN: example})
        signature = infer_signature(frame, predict(module, saved, frame))
        info = mlflow.pyfunc.log_model(name=name, python_model=CODE, artifacts=artifacts, signature=signature,
                                       input_example=frame, pip_requirements=pip_requirements)
    return info.model_uri
