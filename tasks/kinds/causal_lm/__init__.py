"""task causal_lm: token rows -> next-token logits; per-token KD over the teacher's top-k + tail, mixed with
next-token cross-entropy.

    spec.py       its workflow sections (data: text or prompt/completion columns, seq_len, tokenizer, corpus)
    data.py       documents read, split by document, tokenized, packed into seq_len rows (TokenRows)
    models.py     transformers causal LMs: llama / gpt2 from params, save_pretrained directories, registered
    targets.py    per-token top-k + tail (or dense) targets reshaped for a batch; the teachers as one module
    objective.py  per-token KD + CE over real tokens; perplexity, accuracy, agreement
    report.py     test perplexities of teacher, KD student and the no-KD baseline (a Variant)
    serving.py    a save_pretrained directory with its tokenizer; the pyfunc (pyfunc.py) generates text
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tasks.errors import UserError
from tasks.kinds.base import Finished, Report, Share, TaskKind, Variant
from tasks.kinds.causal_lm.spec import SPEC

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from tasks.dataset import Dataset
    from tasks.sections import DataSpec, DistillSpec, ModelSpec, TeacherSpec
    from tasks.storage import Storage
    from tasks.store.shards import TargetBatch
    from tasks.train.config import LossConfig

EPOCH_METRICS = ("val_perplexity", "val_loss", "val_accuracy", "val_agreement", "train_loss", "train_kd", "train_ce",
                 "samples_per_s")


class CausalLM(TaskKind):
    """Token ids [N, S] -> logits [N, S, V]; a row's label row holds the next tokens (-1: prompt, padding)."""

    name = "causal_lm"
    spec = SPEC
    best_by = ("val_perplexity", False)
    epoch_metrics = EPOCH_METRICS
    gate_metrics = ("perplexity", "perplexity_ratio", "teacher_perplexity", "baseline_perplexity", "tokens_per_s",
                    "test_accuracy", "teacher_agreement")
    headline = (("perplexity", "perplexity"), ("perplexity_ratio", "ppl ratio"), ("num_params", "params"),
                ("tokens_per_s", "tokens/s"))

    # ------------------------------------------------ data

    def load_data(self, data: DataSpec, *, seed: int, storage: Storage | None) -> Dataset:
        from tasks.kinds.causal_lm.data import load_lm_data

        return load_lm_data(data, seed=seed, storage=storage)  # type: ignore[arg-type]

    def describe(self, data: Any) -> str:
        return f"{data.seq_len} tokens per row, vocabulary {data.vocab_size} (tokenizer {data.tokenizer_hash})"

    def manifest_meta(self, data: Any) -> dict[str, Any]:
        from tasks.kinds.causal_lm.chat import template_hash

        template = getattr(data, "chat_template", None)
        from tasks.kinds.causal_lm.data import EOS

        eos = data.tokenizer.token_to_id(EOS) if hasattr(data.tokenizer, "token_to_id") else None
        return {"seq_len": data.seq_len, "vocab_size": data.vocab_size, "tokenizer_hash": data.tokenizer_hash,
                "eos_id": 0 if eos is None else int(eos),
                "chat_template": template_hash(template) if template else None,
                "tokens": {k: int((v >= 0).sum()) for k, v in data.y.items()}}

    def dims(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"vocab_size": int(meta["vocab_size"]), "seq_len": int(meta["seq_len"])}
        if meta.get("tokenizer_hash"):
            out["tokenizer_hash"] = meta["tokenizer_hash"]
        return out

    def target_width(self, dims: Mapping[str, Any]) -> int:
        return int(dims["vocab_size"])

    # ------------------------------------------------ models

    def check_name(self, name: str) -> None:
        from tasks.kinds.causal_lm.models import ARCHITECTURES

        if name not in ARCHITECTURES and not os.path.isdir(name) and not name.startswith("models:/"):
            raise UserError(f"unknown causal LM {name!r}: {', '.join(ARCHITECTURES)} (built from params), a "
                            "local save_pretrained directory or models:/NAME@ALIAS")

    def build_model(self, name: str, params: Mapping[str, Any], dims: Mapping[str, Any]) -> nn.Module:
        from tasks.kinds.causal_lm.models import build_lm

        return build_lm(name, params, dims)

    def external_teacher(self, teacher: TeacherSpec) -> bool:
        return teacher.model.startswith("models:/") or os.path.isdir(teacher.model)

    def load_teacher(self, teacher: TeacherSpec, data: Dataset) -> nn.Module:
        """A save_pretrained directory or a registered causal LM, checked against the run's tokenizer."""
        from tasks.kinds.causal_lm.models import build_lm

        try:
            return build_lm(teacher.model, teacher.params, self.dims(self.manifest_meta(data)))
        except UserError as exc:
            raise UserError(exc.message, where=exc.where or "model") from None

    # ------------------------------------------------ targets

    def teacher_outputs(self, teachers: list[nn.Module], x: np.ndarray, rule: str) -> torch.Tensor:
        """Logits [n, S, V] at T=1 (ensembles per token)."""
        import torch

        from tasks.models import teacher_forward

        return teacher_forward(teachers, x, rule, batch=16, dtype=torch.long)

    def decode_targets(self, targets: Mapping[str, torch.Tensor], dims: Mapping[str, Any]) -> torch.Tensor:
        from tasks.kinds.causal_lm.targets import decode_targets

        return decode_targets(targets, int(dims["seq_len"]), int(dims["vocab_size"]))

    def place(self, rows: TargetBatch, dims: Mapping[str, Any], device: torch.device) -> Share:
        from tasks.kinds.causal_lm.targets import LMShare

        return LMShare(rows.x.long(), rows.y.long(), dict(rows.targets), int(dims["seq_len"]), int(dims["vocab_size"]),
                       device)

    def teacher_in_loop(self, workflow: Any) -> bool:
        """On-policy distillation needs the teachers while the student trains (on actors of their own)."""
        return bool(workflow.distill.mode == "on_policy")

    def after_epochs(self, workflow: Any, manifest: Mapping[str, Any]) -> Any:
        from tasks.kinds.causal_lm.on_policy import plan_of

        d = workflow.distill
        return plan_of(d.on_policy, int(manifest.get("eos_id", 0))) if d.mode == "on_policy" else None

    def run_after_epochs(self, worker: Any, plan: Any) -> list[dict[str, Any]]:
        from tasks.kinds.causal_lm.on_policy import run_on_policy

        return run_on_policy(worker, plan)

    def render_ids(self, data: Any, ids: list[int]) -> str:
        return str(data.tokenizer.decode(list(ids), skip_special_tokens=False))

    # ------------------------------------------------ objective

    def objective(self, logits: torch.Tensor, y: torch.Tensor, teacher: Any, loss: LossConfig | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        from tasks.kinds.causal_lm.objective import objective

        return objective(logits, y, teacher, loss)

    def eval_counts(self, model: nn.Module, rows: TargetBatch, dims: Mapping[str, Any],
                    device: torch.device) -> torch.Tensor:
        from tasks.kinds.causal_lm.objective import lm_counts

        return lm_counts(model, rows, int(dims["seq_len"]), int(dims["vocab_size"]), device)

    def metrics(self, counts: torch.Tensor, with_teacher: bool) -> dict[str, float]:
        from tasks.kinds.causal_lm.objective import lm_metrics

        return lm_metrics(counts, with_teacher)

    def epoch_summary(self, metrics: Mapping[str, float], dims: Mapping[str, Any]) -> str:
        from tasks.kinds.causal_lm.objective import epoch_summary

        return epoch_summary(metrics, int(dims["seq_len"]))

    # ------------------------------------------------ report

    def variants(self, distill: DistillSpec) -> list[Variant]:
        from tasks.kinds.causal_lm.report import variants

        return variants(distill)  # type: ignore[arg-type]

    def report(self, done: Finished) -> Report:
        from tasks.kinds.causal_lm.report import report

        return report(self, done)

    def summary_table(self, teacher: Mapping[str, Any], student: Mapping[str, Any]
                      ) -> tuple[list[str], list[list[str]]]:
        from tasks.kinds.causal_lm.report import summary_table

        return summary_table(teacher, student)

    def targets_summary(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Per token: the sequence length, the tokenizer, and the stored bytes per token position and per target
        token (what a conversation's assistant says: the rest stores nothing)."""
        targets = sum((manifest.get("tokens") or {}).values())
        return {"seq_len": manifest["seq_len"], "tokenizer_hash": manifest["tokenizer_hash"],
                "bytes_per_token": manifest["bytes"] / max(1, manifest["rows"] * manifest["seq_len"]),
                **({"bytes_per_target_token": manifest["bytes"] / targets} if targets else {})}

    def rate(self, student: Mapping[str, Any]) -> str:
        return f"{student['tokens_per_s']:,.0f} tokens/s"

    # ------------------------------------------------ serving

    def log_model(self, model: nn.Module, student: ModelSpec, data: Any, manifest: Mapping[str, Any],
                  pip_requirements: list[str]) -> str:
        """The student with its tokenizer (transformers directory, safetensors) as a pyfunc that generates."""
        from tasks.kinds.causal_lm.serving import log_lm_pyfunc

        return log_lm_pyfunc(model, data.tokenizer, chat_template=getattr(data, "chat_template", None),
                             pip_requirements=[*pip_requirements, "transformers", "tokenizers", "jinja2"])

    def lineage(self, manifest: Mapping[str, Any]) -> dict[str, str]:
        tags = {"kdflow.tokenizer": str(manifest.get("tokenizer_hash"))}
        if manifest.get("chat_template"):
            tags["kdflow.chat_template"] = str(manifest["chat_template"])
        return tags

    def load_registered(self, uri: str, manifest: Mapping[str, Any]) -> nn.Module | None:
        from tasks.kinds.causal_lm.models import build_lm

        return build_lm(uri, {}, self.dims(manifest))
