"""task causal_lm: its sections of the workflow (documents packed into token rows, Hugging Face causal LMs)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

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


class OnPolicySpec(Strict):
    """distill.on_policy (docs/on-policy.md): after the offline epochs, `steps` optimizer steps on the student's
    own samples, graded token by token by the teacher (GKD's generalized JSD over the full vocabulary at every
    sampled position; beta 1 is the reverse KL)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True, serialize_by_alias=True)

    steps: int = Field(50, ge=1, description="on-policy optimizer steps after the offline epochs")
    lambda_: float = Field(1.0, ge=0, le=1, alias="lambda",
                           description="GKD's lambda: the share of steps on the student's samples (the rest: offline "
                                       "batches of stored targets)")
    beta: float = Field(1.0, ge=0, le=1, description="generalized JSD weight: 1 reverse KL (mode seeking), 0 forward "
                                                     "KL, between: JSD")
    temperature: float = Field(1.0, ge=0, description="sampling temperature (0: greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus mass of the sampling")
    max_new_tokens: int = Field(16, ge=1, description="tokens the student writes per prompt, at most")
    refresh_every: int = Field(1, ge=1, description="optimizer steps between rollouts from the newest weights")
    lr: float | None = Field(None, gt=0, description="constant learning rate of the stage (default train.optimizer.lr)")
    eval_prompts: int = Field(32, ge=1, description="held-out (val) prompts judged at every refresh")
    generators: int = Field(1, ge=1, description="Ray actors generating with the student's newest weights")
    teachers: int = Field(1, ge=1, description="Ray actors scoring the samples (each loads the teachers once)")
    actor_cpus: float = Field(0.0, ge=0, description="CPUs Ray reserves per generator or teacher actor. 0: none; "
                              "they run on the CPUs of the student's worker, which waits while they work, so "
                              "trials that hold every CPU of a search never wait for a free one")
    actor_gpus: float = Field(0.0, ge=0, description="GPUs per generator or teacher actor (on a cluster)")
    keep_rollouts: bool = Field(True, description="store each refresh's rollouts and teacher scores under the storage "
                                                  "root, keyed by the weights, prompts, sampling and teachers: a "
                                                  "rerun or a trial that reaches the same weights reuses them")


class CausalLMDistill(DistillSpec):
    """`loss`: kl, reverse_kl, jsd, or 'package.module:function', called per token on the k + 1 bucket
    log-probabilities (the teacher's top-k and its tail) at T = 1 as fn(student [N, k+1], teacher [N, k+1],
    1.0) -> [N]; kdflow applies the temperature's T^2, alpha, the mask and the reduction."""

    baseline: bool = Field(False, description="also train the student on next-token CE alone (no KD), to compare")
    mode: Literal["offline", "on_policy"] = Field(
        "offline", description="on_policy: after the offline epochs, train on the student's own samples (on_policy)")
    on_policy: OnPolicySpec | None = Field(None, description="the on-policy stage's settings (mode: on_policy)")

    @model_validator(mode="after")
    def _on_policy(self) -> CausalLMDistill:
        if self.on_policy is not None and self.mode != "on_policy":
            raise ValueError("on_policy: its settings are read with mode: on_policy only")
        if self.mode == "on_policy" and self.on_policy is None:
            self.on_policy = OnPolicySpec()
        return self

    @classmethod
    def check_loss(cls, name: str) -> None:
        if ":" not in name and name not in TOKEN_LOSSES:
            raise ValueError(f"{name!r} has no per-token form for causal_lm; use one of {', '.join(TOKEN_LOSSES)}, "
                             "or 'package.module:function'")
        super().check_loss(name)


SPEC = KindSpec(data=CausalLMData, teacher=CausalLMTeacher, distill=CausalLMDistill, soft_targets=SoftTargetSpec,
                student=CausalLMModel, teacher_default=None, student_default=None)
