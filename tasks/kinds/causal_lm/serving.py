"""A registered causal-LM student: a transformers `save_pretrained` directory (safetensors) with its
tokenizer, served by an MLflow "models from code" pyfunc (pyfunc.py beside this module), so nothing is unpickled.

`mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(["def main("], params={"max_new_tokens": 10})`
returns the generated continuations (a `completion` column); it also takes a DataFrame with a `prompt`
column and chat requests (generation.py). `load_lm(uri)` gives the model and tokenizer themselves.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from tasks.kinds.causal_lm.hf import quiet_transformers

CODE = str(Path(__file__).with_name("pyfunc.py"))
MODEL_DIR = "lm"


def write_lm_artifacts(folder: str | Path, model: nn.Module, tokenizer: Any, chat_template: str | None = None
                       ) -> dict[str, str]:
    """The student's weights and config (save_pretrained, safetensors) and its tokenizer (with its chat
    template, if any) in one directory."""
    from tasks.kinds.causal_lm.data import save_tokenizer_dir

    quiet_transformers()
    out = Path(folder) / MODEL_DIR
    lm = getattr(model, "lm", model)
    lm.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer_dir(tokenizer, out, chat_template)
    return {"lm": str(out)}


def load_from_dir(path: str | Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, **params: Any
             ) -> list[dict[str, Any]]:
    """Continuations of plain prompts (greedy unless `temperature` > 0): the new text and its token ids."""
    from tasks.kinds.causal_lm.generation import GenerationParams, Prompt, generate_one

    gp = GenerationParams.of({**params, "max_new_tokens": max_new_tokens})
    out = []
    for prompt in prompts:
        new = generate_one(model, tokenizer, Prompt(prompt), gp)
        out.append({"completion": tokenizer.decode(new), "token_ids": new})
    return out


def signature() -> Any:
    """No input schema (a list of strings, a DataFrame with `prompt`, conversations: generation.py reads each),
    a `completion` column out, and the generation parameters as MLflow inference params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from tasks.kinds.causal_lm.generation import DEFAULTS

    kinds = {"max_new_tokens": "long", "temperature": "double", "top_p": "double"}
    return ModelSignature(inputs=None, outputs=Schema([ColSpec("string", "completion")]),
                          params=ParamSchema([ParamSpec(k, kinds[k], v) for k, v in DEFAULTS.items()]))


def log_lm_pyfunc(model: nn.Module, tokenizer: Any, *, pip_requirements: list[str], name: str = "student",
                  chat_template: str | None = None) -> str:
    """Log the student as a pickle-free pyfunc in the active run (its tokenizer keeps `chat_template`, which
    chat requests are rendered with); returns the model URI."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        artifacts = write_lm_artifacts(tmp, model, tokenizer, chat_template)
        info = mlflow.pyfunc.log_model(name=name, python_model=CODE, artifacts=artifacts, signature=signature(),
                                       input_example=(["def "], {"max_new_tokens": 8}),
                                       pip_requirements=pip_requirements)
    return info.model_uri


def registered_dir(uri: str) -> Path:
    """The save_pretrained directory (weights, config, tokenizer) of a registered causal LM, downloaded."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    found = next((p.parent for p in local.rglob("tokenizer.json") if (p.parent / "config.json").is_file()), None)
    if found is None:
        raise ValueError(f"{uri} holds no transformers model directory")
    return found


def load_lm(uri: str) -> tuple[Any, Any]:
    """A registered causal-LM student's model and tokenizer."""
    return load_from_dir(registered_dir(uri))
