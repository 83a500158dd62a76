"""Conversations as causal-LM rows: a column of `[{role, content}, ...]` lists rendered with a chat template,
one conversation per row (padded), the loss and the stored soft targets on the assistant's tokens only.

The template is the tokenizer directory's own (`chat_template` in tokenizer_config.json or
chat_template.jinja, read by transformers) or `data.chat_template`; it is applied as transformers applies it
(`apply_chat_template`). Which characters are the assistant's is found from the template itself: the
assistant turn i spans from the end of `render(turns[:i], add_generation_prompt=True)` to the end of
`render(turns[:i + 1])`, so its closing markup (the end-of-turn token) is a target too, and the role
headers, the user's and the system's turns never are. A token is the assistant's when its first character
is. No `{% generation %}` markers are needed, only that a conversation's prefix renders as the start of
the whole (true of the usual templates; a template that breaks it is refused).

Errors name the `data:` key and the row (its position in the source, from 0).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.errors import UserError
from tasks.kinds.causal_lm.spec import CausalLMData

ROLES = ("system", "user", "assistant")
PACKING = "chat-pad-v1"  # one conversation per row, padded with EOS (label -1): no row holds two


@dataclass
class Conversation:
    row: int  # its position in the source
    messages: list[dict[str, str]]


def messages_column(data: CausalLMData, names: list[str]) -> str | None:
    """The conversations' column: `data.messages`, or a `messages` column when no text/prompt key is set and
    the source has no `text` column."""
    if data.messages:
        return data.messages
    if not (data.text or data.prompt or data.completion) and "messages" in names and "text" not in names:
        return "messages"
    return None


def check_conversation(row: int, value: Any) -> Conversation:
    """A conversation with known roles and at least one assistant turn, or a UserError naming the row."""
    if not isinstance(value, list) or not value:
        raise UserError(f"row {row}: a conversation is a non-empty list of {{role, content}} messages, got "
                        f"{type(value).__name__}", where="messages")
    turns = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m.get("content") is None:
            raise UserError(f"row {row}, message {i}: needs 'role' and 'content'", where="messages")
        if m["role"] not in ROLES:
            raise UserError(f"row {row}, message {i}: unknown role {m['role']!r} (one of {', '.join(ROLES)})",
                            where="messages")
        turns.append({"role": m["role"], "content": str(m["content"])})
    if not any(t["role"] == "assistant" for t in turns):
        raise UserError(f"row {row}: no assistant turn (nothing to train on)", where="messages")
    return Conversation(row, turns)


def read_conversations(table: Any, column: str, limit: int | None) -> list[Conversation]:
    if column not in table.column_names:
        raise UserError(f"no column {column!r} (columns: {', '.join(table.column_names)})", where="messages")
    values = table.column(column).to_pylist()
    if limit:
        values = values[:limit]
    return [check_conversation(i, v) for i, v in enumerate(values)]


def chat_tokenizer(data: CausalLMData, tok: Any, eos: str) -> Any:
    """The transformers tokenizer conversations are rendered with: the tokenizer directory's (its template,
    its special tokens) or the trained BPE wrapped; `data.chat_template` replaces its template."""
    from transformers import PreTrainedTokenizerFast

    from tasks.kinds.causal_lm.hf import quiet_transformers

    quiet_transformers()
    if data.tokenizer.path:
        fast = PreTrainedTokenizerFast.from_pretrained(data.tokenizer.path, local_files_only=True)
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, unk_token=eos,
                                       pad_token=eos)
    if data.chat_template:
        fast.chat_template = data.chat_template
    if not getattr(fast, "chat_template", None):
        has = (f"the tokenizer directory {data.tokenizer.path} has none (tokenizer_config.json's chat_template or "
               "chat_template.jinja)") if data.tokenizer.path else "a BPE trained here has none"
        raise UserError(f"no chat template to render the conversations with: {has}; give one as data.chat_template",
                        where="chat_template")
    return fast


def render(fast: Any, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character spans of its assistant turns."""
    from jinja2 import TemplateError

    def text(turns: list[dict[str, str]], prompt: bool) -> str:
        try:
            return fast.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt)
        except (TemplateError, ValueError, TypeError) as exc:  # jinja's errors, the template's raise_exception
            raise UserError(f"row {conv.row}: the chat template fails: {exc}", where="chat_template") from None

    whole = text(conv.messages, False)
    spans = []
    for i, turn in enumerate(conv.messages):
        if turn["role"] != "assistant":
            continue
        start, end = text(conv.messages[:i], True), text(conv.messages[:i + 1], False)
        if not (whole.startswith(start) and whole.startswith(end) and len(start) <= len(end)):
            raise UserError(f"row {conv.row}: the chat template does not render a conversation's first turns as "
                            "the start of the whole, so the assistant's tokens cannot be told", where="chat_template")
        spans.append((len(start), len(end)))
    return whole, spans


def encode(fast: Any, conv: Conversation) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is the assistant's."""
    whole, spans = render(fast, conv)
    enc = fast.backend_tokenizer.encode(whole, add_special_tokens=False)
    mine = [any(a <= s < b for a, b in spans) for s, _ in enc.offsets]
    return list(enc.ids), mine


def rows_of(convs: list[Conversation], fast: Any, seq_len: int, truncation: str | None, eos: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids x [N, seq_len] and labels y [N, seq_len]: one conversation per row, EOS padding; y holds the
    next token where that token is the assistant's, -1 elsewhere."""
    window = seq_len + 1
    xs, ys = [], []
    for conv in convs:
        ids, mine = encode(fast, conv)
        if len(ids) > window:
            if truncation is None:
                raise UserError(f"row {conv.row}: the conversation is {len(ids)} tokens, longer than seq_len + 1 = "
                                f"{window}; raise seq_len or set data.truncation (drop | truncate)",
                                where="truncation")
            if truncation == "drop":
                continue
            ids, mine = ids[:window], mine[:window]
        pad = window - len(ids)
        arr = np.array(ids + [eos] * pad, dtype=np.int64)
        ok = np.array(mine + [False] * pad, dtype=bool)
        xs.append(arr[:-1])
        ys.append(np.where(ok[1:], arr[1:], -1))
    if not xs:
        return np.zeros((0, seq_len), np.int64), np.zeros((0, seq_len), np.int64)
    return np.stack(xs), np.stack(ys)


def template_hash(template: str) -> str:
    return hashlib.sha256(template.encode()).hexdigest()[:16]
