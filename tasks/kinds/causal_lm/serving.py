"""A registered causal-LM student: a transformers `save_pretrained` directory (safetensors) with its
tokenizer, served by an MLflow "models from code" pyfunc (pyfunc.py beside this module), so nothing is unpickled.

`mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(DataFrame({"prompt": [...]}),
params={"max_new_tokens": 10})` returns the generated continuations; `load_lm(uri)` gives the model
and tokenizer themselves.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from torch import nn

CODE = str(Path(__file__).with_name("pyfunc.py"))
MODEL_DIR = "lm"


def quiet_transformers() -> None:
    """No progress bars or reminders from transformers in a run's output (a successful run prints no noise)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def write_lm_artifacts(folder: str | Path, model: nn.Module, tokenizer: Any) -> dict[str, str]:
    """The student's weights and config (save_pretrained, safetensors) and its tokenizer in one directory."""
    from tasks.kinds.causal_lm.data import save_tokenizer_dir

    quiet_transformers()
    out = Path(folder) / MODEL_DIR
    lm = getattr(model, "lm", model)
    lm.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer_dir(tokenizer, out)
    return {"lm": str(out)}


def load_from_dir(path: str | Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy continuations: the new text and its token ids, per prompt (the prompt keeps its last tokens when
    prompt + continuation would run past the model's positions)."""
    import torch

    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 1024)
    max_new_tokens = min(max_new_tokens, positions - 1)
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids[:, -(positions - max_new_tokens):]
        if ids.shape[1] == 0:
            ids = torch.tensor([[tokenizer.eos_token_id]])
        with torch.inference_mode():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        new = gen[0, ids.shape[1]:].tolist()
        out.append({"completion": tokenizer.decode(new), "token_ids": new})
    return out


def log_lm_pyfunc(model: nn.Module, tokenizer: Any, *, pip_requirements: list[str], name: str = "student") -> str:
    """Log the student as a pickle-free pyfunc in the active run; returns the model URI."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    with tempfile.TemporaryDirectory() as tmp:
        artifacts = write_lm_artifacts(tmp, model, tokenizer)
        example = pd.DataFrame({"prompt": ["def "]})
        signature = infer_signature(example, pd.DataFrame({"completion": ["x"]}), params={"max_new_tokens": 8})
        info = mlflow.pyfunc.log_model(name=name, python_model=CODE, artifacts=artifacts, signature=signature,
                                       input_example=example, pip_requirements=pip_requirements)
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
