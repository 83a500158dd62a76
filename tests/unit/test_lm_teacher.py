"""A registered causal LM as the next workflow's teacher: `teacher.model: models:/NAME@ALIAS` loads its
weights and checks its tokenizer, vocabulary and positions like a local directory does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tasks.errors import UserError
from tasks.kinds.causal_lm import CausalLM
from tasks.kinds.causal_lm.data import tokenizer_hash, train_bpe
from tasks.kinds.causal_lm.models import build_lm
from tests.unit.test_lm import TEXT, tokenizer

TINY = {"layers": 1, "width": 8, "heads": 2, "ffn": 16}


def test_a_registered_lm_loads_as_a_teacher_and_its_tokenizer_is_checked(tmp_path: Path) -> None:
    import mlflow

    from tasks.kinds.causal_lm.serving import log_lm_pyfunc

    tok = tokenizer()
    dims = {"vocab_size": tok.get_vocab_size(), "seq_len": 16, "tokenizer_hash": tokenizer_hash(tok)}
    torch.manual_seed(0)
    original = build_lm("llama", TINY, dims)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # artifacts under tmp_path: with a sqlite store and no location MLflow writes them to ./mlruns, which
    # left a model in the repository's root after every test run
    mlflow.set_experiment(experiment_id=mlflow.create_experiment(
        "lm-teacher", artifact_location=(tmp_path / "artifacts").as_uri()))
    with mlflow.start_run():
        uri = log_lm_pyfunc(original, tok, pip_requirements=["torch", "transformers"])
    version = mlflow.register_model(uri, "lm-teacher").version
    mlflow.MlflowClient().set_registered_model_alias("lm-teacher", "champion", version)

    CausalLM().check_name("models:/lm-teacher@champion")  # preflight lets it through
    teacher = build_lm("models:/lm-teacher@champion", {}, dims)
    ids = torch.randint(0, dims["vocab_size"], (2, 16))
    with torch.no_grad():
        assert torch.allclose(teacher(ids), original(ids), atol=1e-5)  # the same weights, back from the registry

    other = train_bpe(TEXT[:2], 265)
    with pytest.raises(UserError, match="not the workflow's") as exc:
        build_lm("models:/lm-teacher@champion", {}, {**dims, "tokenizer_hash": tokenizer_hash(other)})
    assert exc.value.where == "model"
    with pytest.raises(UserError, match="over the model's 16 positions"):
        build_lm("models:/lm-teacher@champion", {}, {**dims, "seq_len": 32})
    with pytest.raises(UserError, match="cannot load models:/lm-teacher@nobody") as exc:
        build_lm("models:/lm-teacher@nobody", {}, dims)
    assert exc.value.where == "model"
