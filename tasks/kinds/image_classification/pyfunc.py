"""MLflow "models from code" entry point for a registered kdflow image student (logged with the model, never
pickled): image bytes in, class and probabilities out (serving.py beside it)."""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class KdflowImageStudent(PythonModel):
    def load_context(self, context: Any) -> None:
        from tasks.kinds.image_classification.serving import build_from_artifacts

        self.module, self.recipe = build_from_artifacts(context.artifacts["config"], context.artifacts["weights"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
        from tasks.kinds.image_classification.serving import predict

        return predict(self.module, self.recipe, model_input)


mlflow.models.set_model(KdflowImageStudent())
