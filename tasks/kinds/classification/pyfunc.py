"""MLflow "models from code" entry point for a registered kdflow student (logged with the model, never pickled).

MLflow runs this file when it loads the model; the network is rebuilt from the logged recipe and
safetensors weights (see serving.py beside it).
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class KdflowStudent(PythonModel):
    """Raw feature columns in, the user's class labels out."""

    def load_context(self, context: Any) -> None:
        from tasks.kinds.classification.serving import build_from_artifacts

        self.module, self.recipe = build_from_artifacts(context.artifacts["config"], context.artifacts["weights"])

    # model_input typed as a DataFrame (MLflow reads the hint; without one it warns on every load);
    # the columns are checked against the logged signature, which names the user's features
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
        from tasks.kinds.classification.serving import predict_labels

        return predict_labels(self.module, self.recipe, model_input)


mlflow.models.set_model(KdflowStudent())
