"""MLflow "models from code" entry point of a registered regression student: standardized feature columns in,
the target (in its own units) out."""

from __future__ import annotations

import json
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class RegressionStudent(PythonModel):
    def load_context(self, context: Any) -> None:
        from safetensors.torch import load_file

        from tiny_kind import mlp

        with open(context.artifacts["recipe"]) as f:
            self.recipe = json.load(f)
        self.model = mlp(self.recipe["num_features"], **self.recipe["params"])
        self.model.load_state_dict(load_file(context.artifacts["weights"]))
        self.model.eval()

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
        import torch

        x = torch.tensor(model_input.to_numpy(dtype="float32"))
        with torch.no_grad():
            pred = self.model(x)[:, 0].numpy()
        return pred * self.recipe["y_std"] + self.recipe["y_mean"]


mlflow.models.set_model(RegressionStudent())
