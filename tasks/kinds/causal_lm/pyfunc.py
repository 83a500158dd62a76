"""MLflow "models from code" entry point for a registered causal-LM student (see serving.py beside it)."""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class KdflowLM(PythonModel):
    """A `prompt` column in, a `completion` column (greedy, `max_new_tokens` tokens) out."""

    def load_context(self, context: Any) -> None:
        from tasks.kinds.causal_lm.serving import load_from_dir

        self.model, self.tokenizer = load_from_dir(context.artifacts["lm"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
        from tasks.kinds.causal_lm.serving import generate

        n = int((params or {}).get("max_new_tokens", 8))
        rows = generate(self.model, self.tokenizer, [str(p) for p in model_input["prompt"]], n)
        return pd.DataFrame({"completion": [r["completion"] for r in rows]})


mlflow.models.set_model(KdflowLM())
