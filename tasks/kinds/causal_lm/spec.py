"""task causal_lm: its sections of the workflow (documents packed into token rows, Hugging Face causal LMs)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.kinds.base import KindSpec
from tasks.sections import DataSpec, DistillSpec, ModelSpec, SoftTargetSpec, Strict, TeacherSpec

# the losses with a per-token form over each position's top-k + tail buckets (objective.py)
TOKEN_LOSSES = ("kl", "reverse_kl", "jsd")


class TokenizerSpec(Strict):
    """A local tokenizer directory (tokenizer.json), or a byte-level BPE trained on the training documents
    with this vocabulary size (kept in the store, reused by reruns)."""

    path: str | None = None
    vocab_size: int = Field(512, ge=260, description="BPE vocabulary: 256 bytes + EOS + merges")


class CorpusSpec(Strict):
    """The built-in corpora: python-stdlib (a deterministic subset of the interpreter's stdlib) and
    arithmetic-chat (generated conversations with verifiable answers)."""

    max_bytes: int | None = Field(2_000_000, ge=1000)
    max_files: int | None = Field(None, ge=1)
    conversations: int = Field(2000, ge=10, description="arithmetic-chat: how many conversations")


class CausalLMData(DataSpec):
    source: str = Field("python-stdlib", description="python-stdlib, arithmetic-chat (conversations), or a Parquet / "
                                                     "JSON-lines file (local or s3://)")
    limit: int | None = Field(None, ge=1, description="use only the first N documents, for quick tries")
    text: str | None = Field(None, description="the text column (default 'text')")
    prompt: str | None = Field(None, description="prompt column: its tokens are inputs, never targets")
    completion: str | None = Field(None, description="completion column (with prompt)")
    messages: str | None = Field(None, description="a column of conversations ([{role, content}] lists; a source "
                                                   "with a 'messages' column and no text column uses it)")
    chat_template: str | None = Field(None, description="a Jinja chat template (default: the tokenizer directory's)")
    truncation: Literal["drop", "truncate"] | None = Field(
        None, description="a conversation longer than seq_len + 1 tokens: drop it, or truncate it (default: an error)")
    seq_len: int = Field(128, ge=2, description="tokens per packed row")
    tokenizer: TokenizerSpec = TokenizerSpec()
    corpus: CorpusSpec = CorpusSpec()

    @model_validator(mode="after")
    def _one_layout(self) -> CausalLMData:
        if self.messages and (self.text or self.prompt or self.completion):
            raise ValueError("messages (conversations) is set alone, without text or prompt/completion")
        return self


class CausalLMModel(ModelSpec):
    model: str = Field(description="llama | gpt2 (built from params: layers, width, heads, ffn, dropout), a local "
                                   "save_pretrained directory, or models:/NAME@ALIAS")


class CausalLMTeacher(TeacherSpec):
    model: str = Field(description="llama | gpt2 (built from params), a local save_pretrained directory, or "
                                   "models:/NAME@ALIAS (its tokenizer must be the workflow's)")


class CausalLMDistill(DistillSpec):
    """`loss`: kl, reverse_kl, jsd, or 'package.module:function', called per token on the k + 1 bucket
    log-probabilities (the teacher's top-k and its tail) at T = 1 as fn(student [N, k+1], teacher [N, k+1],
    1.0) -> [N]; kdflow applies the temperature's T^2, alpha, the mask and the reduction."""

    baseline: bool = Field(False, description="also train the student on next-token CE alone (no KD), to compare")

    @classmethod
    def check_loss(cls, name: str) -> None:
        if ":" not in name and name not in TOKEN_LOSSES:
            raise ValueError(f"{name!r} has no per-token form for causal_lm; use one of {', '.join(TOKEN_LOSSES)}, "
                             "or 'package.module:function'")
        super().check_loss(name)


SPEC = KindSpec(data=CausalLMData, teacher=CausalLMTeacher, distill=CausalLMDistill, soft_targets=SoftTargetSpec,
                student=CausalLMModel, teacher_default=None, student_default=None)
