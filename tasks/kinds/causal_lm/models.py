"""Causal LMs' models: Hugging Face `transformers` causal LMs built from a config (`llama` or `gpt2`, with
layers / width / heads from `params`, so a search can size them), read from a local `save_pretrained`
directory, or a registered kdflow student; each checked against the run's tokenizer and sequence length."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tasks.errors import UserError

ARCHITECTURES = ("llama", "gpt2")


PARAMS = {"layers", "width", "heads", "ffn", "dropout"}


class CausalLM(nn.Module):
    """A transformers causal LM taking token ids [B, S] and giving logits [B, S, vocab] (rows past the
    tokenizer's vocabulary, padding of the embedding, are cut off)."""

    def __init__(self, lm: nn.Module, vocab: int) -> None:
        super().__init__()
        self.lm = lm
        self.vocab = vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=x.long(), use_cache=False).logits[..., : self.vocab]


def hf_config(name: str, params: Mapping[str, Any], vocab: int, seq_len: int) -> Any:
    unknown = set(params) - PARAMS
    if unknown:
        raise UserError(f"unknown {name} params {sorted(unknown)}; known: {', '.join(sorted(PARAMS))}", where="params")
    width, layers, heads = int(params.get("width", 64)), int(params.get("layers", 2)), int(params.get("heads", 4))
    if width % heads:
        raise UserError(f"width {width} is not a multiple of heads {heads}", where="params")
    dropout = float(params.get("dropout", 0.0))
    if name == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=int(params.get("ffn", 4 * width)),
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                           max_position_embeddings=seq_len, tie_word_embeddings=True, attention_dropout=dropout,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0)
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=heads, n_positions=seq_len,
                      n_inner=int(params.get("ffn", 4 * width)), resid_pdrop=dropout, embd_pdrop=dropout,
                      attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)


def positions(config: Any) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def load_pretrained(path: str, dims: Mapping[str, Any]) -> nn.Module:
    """A local save_pretrained directory, checked against the run's tokenizer, vocabulary and seq_len."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isdir(path):
        raise UserError(f"no such model directory: {path}", where="model")
    tok_file = os.path.join(path, "tokenizer.json")
    if dims.get("tokenizer_hash") and os.path.isfile(tok_file):
        from tokenizers import Tokenizer

        from tasks.kinds.causal_lm.data import tokenizer_hash

        theirs = tokenizer_hash(Tokenizer.from_file(tok_file))
        if theirs != dims["tokenizer_hash"]:
            raise UserError(f"the model's tokenizer (hash {theirs}) is not the workflow's (data.tokenizer, hash "
                            f"{dims['tokenizer_hash']}); teacher and student must share one", where="model")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    vocab = int(dims["vocab_size"])
    if int(config.vocab_size) < vocab:
        raise UserError(f"the model's vocabulary ({config.vocab_size}) is smaller than the tokenizer's ({vocab})",
                        where="model")
    if positions(config) is not None and positions(config) < int(dims["seq_len"]):
        raise UserError(f"data.seq_len {dims['seq_len']} is over the model's {positions(config)} positions",
                        where="model")
    return CausalLM(AutoModelForCausalLM.from_pretrained(path, local_files_only=True), vocab)


def build_lm(name: str, params: Mapping[str, Any], dims: Mapping[str, Any]) -> nn.Module:
    if name not in ARCHITECTURES:
        if name.startswith("models:/"):  # a registered causal LM (a kdflow student): its directory, checked alike
            from tasks.kinds.causal_lm.serving import registered_dir

            try:
                path = registered_dir(name)
            except Exception as exc:  # noqa: BLE001 - the registry's or the download's error: the user's to fix
                raise UserError(f"cannot load {name}: {str(exc).splitlines()[0]}", where="model") from None
            return load_pretrained(str(path), dims)
        if os.path.isdir(name) or "/" in name:
            return load_pretrained(name, dims)
        raise UserError(f"unknown causal LM {name!r}: {', '.join(ARCHITECTURES)} (built from params), a "
                        "local save_pretrained directory or models:/NAME@ALIAS", where="model")
    from transformers import AutoModelForCausalLM

    config = hf_config(name, params, int(dims["vocab_size"]), int(dims["seq_len"]))
    return CausalLM(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa"), int(dims["vocab_size"]))
