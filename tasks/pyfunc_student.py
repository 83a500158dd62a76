"""MLflow "models from code" entry point for a registered kdflow student (logged with the model, never pickled).

MLflow runs this file when it loads the model; the network is rebuilt from the logged recipe and
safetensors weights (see tasks/served.py).
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class KdflowStudent(PythonModel):
    """Raw feature columns in, the user's class labels out."""

    def load_context(self, context: Any) -> None:
        from tasks.served import build_from_artifacts

        self.module, self.recipe = build_from_artifacts(context.artifacts["config"], context.artifacts["weights"])

    # no type hints: MLflow would read them as the input schema (the logged signature is the schema)
    def predict(self, context, model_input, params=None):
        from tasks.served import predict_labels

        return predict_labels(self.module, self.recipe, model_input)


mlflow.models.set_model(KdflowStudent())
