"""MLflow "models from code" entry point for a registered causal-LM student (see serving.py beside it)."""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


class KdflowLM(PythonModel):
    """Prompts, a DataFrame with a `prompt` column, or conversations in (generation.py); a `completion` column
    out. Params: max_new_tokens, temperature (0: greedy), top_p."""

    # MLflow reads predict's type hints as an input schema and, without hints, warns in colour wherever the
    # class is defined (every log and every load): the three request forms share no schema, so predict has
    # none, and this attribute (MLflow's own switch for its ChatModel) tells it not to look
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from tasks.kinds.causal_lm.serving import load_from_dir

        self.model, self.tokenizer = load_from_dir(context.artifacts["lm"])

    # no type hints: MLflow reads predict's hints as an input schema, and the three request forms have none
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        from tasks.kinds.causal_lm.generation import BadRequest, GenerationParams, generate_one, read_request

        try:
            prompts, gp = read_request(model_input, self.tokenizer), GenerationParams.of(params)
        except BadRequest as exc:  # the server's 400, not a 500 with a traceback
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        done = [self.tokenizer.decode(generate_one(self.model, self.tokenizer, p, gp)) for p in prompts]
        return pd.DataFrame({"completion": done})


mlflow.models.set_model(KdflowLM())
