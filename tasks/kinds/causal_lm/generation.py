"""What a registered causal LM answers: the request forms MLflow's own text-generation flavours take, read
into prompts, and the generation (KV cache, greedy or sampled) behind the pyfunc (pyfunc.py).

A request is one of:
- a list of strings (or one string): each a prompt continued as it is;
- a DataFrame with a `prompt` column (a `messages` column instead: one conversation per row);
- chat requests: a list of conversations, each a list of `{role, content}` messages, or one conversation
  (a list of messages), or `{"messages": [...]}` as OpenAI's chat API sends it. A conversation is rendered
  with the model's stored chat template (transformers' `apply_chat_template`, with the assistant's
  generation prompt) and its answer stops at the end-of-sequence token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
DEFAULTS: dict[str, Any] = {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0}


class BadRequest(ValueError):
    """A request the model cannot read; the message says what it takes."""


@dataclass(frozen=True)
class Prompt:
    """One prompt: its text, and whether it is a rendered conversation (the answer then ends at EOS)."""

    text: str
    chat: bool = False


@dataclass(frozen=True)
class GenerationParams:
    """MLflow inference params: tokens to add, sampling temperature (0: greedy) and nucleus mass."""

    max_new_tokens: int = DEFAULTS["max_new_tokens"]
    temperature: float = DEFAULTS["temperature"]
    top_p: float = DEFAULTS["top_p"]

    @classmethod
    def of(cls, params: Mapping[str, Any] | None) -> GenerationParams:
        p = {**DEFAULTS, **{k: v for k, v in (params or {}).items() if v is not None}}
        out = cls(int(p["max_new_tokens"]), float(p["temperature"]), float(p["top_p"]))
        if out.max_new_tokens < 1 or out.temperature < 0 or not 0 < out.top_p <= 1:
            raise BadRequest(f"params: max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1 (got {p})")
        return out


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """A conversation as a list of {role, content} dicts with known roles."""
    if not isinstance(messages, list | tuple) or not messages:
        raise BadRequest(f"{where}: a conversation is a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise BadRequest(f"{where}, message {i}: needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise BadRequest(f"{where}, message {i}: unknown role {m['role']!r} (one of {', '.join(ROLES)})")
        out.append({"role": str(m["role"]), "content": str(m["content"] or "")})
    return out


def _is_message(item: Any) -> bool:
    return isinstance(item, Mapping) and "role" in item


def _items(model_input: Any) -> list[Any]:
    """The request as a list of items, each a prompt string or a conversation."""
    import numpy as np
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "prompt" in model_input.columns:
            return [str(p) for p in model_input["prompt"]]
        if "messages" in model_input.columns:
            return list(model_input["messages"])
        if len(model_input.columns) == 1:  # a list of strings after MLflow made it a one-column frame
            return list(model_input.iloc[:, 0])
        raise BadRequest(f"a DataFrame needs a 'prompt' (or 'messages') column, got {list(model_input.columns)}")
    if isinstance(model_input, pd.Series | np.ndarray):
        model_input = model_input.tolist()
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, Mapping):
        if "messages" in model_input:
            return [model_input["messages"]]
        if "prompt" in model_input:
            p = model_input["prompt"]
            return [p] if isinstance(p, str) else list(p)
        raise BadRequest("a dict request needs 'messages' (one conversation) or 'prompt'")
    if isinstance(model_input, list | tuple):
        if model_input and all(_is_message(m) for m in model_input):
            return [list(model_input)]  # one conversation
        return [m["messages"] if isinstance(m, Mapping) and "messages" in m else m for m in model_input]
    raise BadRequest(f"cannot read a request of type {type(model_input).__name__}: a list of strings, a DataFrame "
                     "with a 'prompt' column, or a list of conversations")


def read_request(model_input: Any, tokenizer: Any) -> list[Prompt]:
    """Every form a request takes as prompts; conversations rendered with the tokenizer's chat template."""
    prompts = []
    for i, item in enumerate(_items(model_input)):
        if hasattr(item, "tolist"):
            item = item.tolist()
        if isinstance(item, str):
            prompts.append(Prompt(item))
            continue
        messages = check_messages(item, f"request {i}")
        if not getattr(tokenizer, "chat_template", None):
            raise BadRequest("this model has no chat template: send prompts (strings) instead of conversations")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(Prompt(text, chat=True))
    return prompts


def generate_one(model: Any, tokenizer: Any, prompt: Prompt, params: GenerationParams) -> list[int]:
    """The new token ids for one prompt (the prompt keeps its last tokens when prompt + continuation would run
    past the model's positions); transformers' generate with its KV cache."""
    import torch

    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 1024)
    n = min(params.max_new_tokens, positions - 1)
    ids = tokenizer(prompt.text, return_tensors="pt", add_special_tokens=False).input_ids[:, -(positions - n):]
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]])
    sample = params.temperature > 0
    options: dict[str, Any] = {"do_sample": sample, "use_cache": True, "max_new_tokens": n,
                               "pad_token_id": tokenizer.eos_token_id}
    if sample:
        options.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
    if not prompt.chat:  # a plain continuation runs its full length; a chat answer ends at EOS
        options["min_new_tokens"] = n
    with torch.inference_mode():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), **options)
    new = gen[0, ids.shape[1]:].tolist()
    if prompt.chat and tokenizer.eos_token_id in new:
        new = new[:new.index(tokenizer.eos_token_id)]
    return new
