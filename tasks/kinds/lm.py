"""Causal language models: token rows -> next-token logits; KD per token over the teacher's top-k + tail.

A row is `seq_len` token ids; its label row holds the next token or -1 (masked: padding, prompt). Models
are Hugging Face `transformers` causal LMs built from a config (`llama` or `gpt2`, with layers / width /
heads from `params`, so a search can size them) or read from a local `save_pretrained` directory. Stored
targets are per token: top-k logits, int32 ids and the tail log-mass (exact at T=1), flattened per row
into Parquet list columns by tasks/shards.py; this kind reshapes them to [rows, seq_len, k].
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tasks.data import Dataset
from tasks.errors import UserError
from tasks.fit_config import LossConfig
from tasks.losses import NO_MASS, token_objective
from tasks.shards import TargetBatch
from tasks.storage import Storage

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

        from tasks.lm_data import tokenizer_hash

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
            from tasks.served_lm import registered_dir

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


def teacher_tuple(targets: Mapping[str, torch.Tensor], seq_len: int, vocab: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stored per-row targets as ([n, S, k] values, [n, S, k] ids, [n, S] tail log-mass); dense logits as k = V."""
    if "logits" in targets:
        logits = targets["logits"].float().reshape(-1, seq_len, vocab)
        ids = torch.arange(vocab, dtype=torch.int32).expand_as(logits)
        return logits, ids, torch.full(logits.shape[:2], NO_MASS)
    n = targets["topk_values"].shape[0]
    return (targets["topk_values"].float().reshape(n, seq_len, -1), targets["topk_indices"].reshape(n, seq_len, -1),
            targets["tail_logmass"].float().reshape(n, seq_len))


def global_tokens(mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Real tokens of this step summed over the data-parallel workers, and the number of workers."""
    count = mask.sum().float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            count = count.clone()
            torch.distributed.all_reduce(count)
            return count, float(world)
    return count, 1.0


@dataclass
class LMShare:
    x: torch.Tensor
    y: torch.Tensor
    targets: dict[str, torch.Tensor]
    seq_len: int
    vocab: int
    device: torch.device

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def rows_device(self) -> torch.device:
        return self.x.device

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        x, y = self.x.index_select(0, idx).to(self.device), self.y.index_select(0, idx).to(self.device)
        if not self.targets:
            return x, y, None
        t = teacher_tuple({k: v.index_select(0, idx) for k, v in self.targets.items()}, self.seq_len, self.vocab)
        return x, y, tuple(part.to(self.device) for part in t)


@torch.no_grad()
def lm_counts(model: nn.Module, rows: TargetBatch, seq_len: int, vocab: int, device: torch.device,
              batch: int = 32) -> torch.Tensor:
    """[summed next-token CE, real tokens, correct top-1, agreeing with the teacher's top-1, tokens with a
    teacher] over `rows`: sums, so that workers add theirs and `lm_metrics` divides once."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(5, dtype=torch.float64, device=device)
    for i in range(0, len(rows), batch):
        part = rows.take(slice(i, i + batch))
        logits = model(part.x.to(device)).float()
        y = part.y.to(device).long()
        mask = y >= 0
        ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.clamp(min=0).reshape(-1),
                                         reduction="none").reshape(y.shape)
        pred = logits.argmax(-1)
        counts[0] += (ce * mask).sum()
        counts[1] += mask.sum()
        counts[2] += ((pred == y) & mask).sum()
        if part.targets:
            _, ids, _ = teacher_tuple(part.targets, seq_len, vocab)
            top = ids[..., 0].to(device).long() if "logits" not in part.targets else \
                part.targets["logits"].float().reshape(-1, seq_len, vocab).argmax(-1).to(device)
            counts[3] += ((pred == top) & mask).sum()
            counts[4] += mask.sum()
    model.train(was_training)
    return counts


def lm_metrics(counts: torch.Tensor, with_teacher: bool) -> dict[str, float]:
    ce, tokens, correct, agree, teacher_tokens = counts.tolist()
    loss = ce / max(1.0, tokens)
    out = {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "accuracy": correct / max(1.0, tokens)}
    if with_teacher:
        out["agreement"] = agree / max(1.0, teacher_tokens)
    return out


def lm_dataset(options: Mapping[str, Any], *, seed: int, storage: Storage | None) -> Dataset:
    """The packed corpus as the pipeline's Dataset: x token ids and y labels [N, seq_len]; `num_classes`
    is the vocabulary and `num_features` the sequence length; the tokenizer rides in `extra`."""
    from tasks.lm_data import load_lm_data

    d = load_lm_data(options, seed=seed, storage=storage)
    return Dataset(arrays=(d.x, d.y), num_classes=d.vocab_size, mean=np.zeros(d.seq_len, np.float32),
                   std=np.ones(d.seq_len, np.float32), fingerprint=d.fingerprint, labeled_fingerprint=d.fingerprint,
                   extra={"tokenizer": d.tokenizer, "documents": d.documents,
                          "meta": {"task": "causal_lm", "seq_len": d.seq_len, "vocab_size": d.vocab_size,
                                   "tokenizer_hash": d.tokenizer_hash,
                                   "tokens": {k: int((v >= 0).sum()) for k, v in d.y.items()}}})


class CausalLMKind:
    """Token ids [N, S] -> logits [N, S, V]; per-token KD over top-k + tail mixed with next-token CE."""

    name = "causal_lm"
    best_by = ("val_perplexity", False)

    def load_data(self, options: Mapping[str, Any], *, seed: int, storage: Storage | None) -> Dataset:
        return lm_dataset(options, seed=seed, storage=storage)

    def dims(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"vocab_size": int(meta.get("vocab_size", meta.get("num_classes"))),
                               "seq_len": int(meta.get("seq_len", meta.get("num_features")))}
        if meta.get("tokenizer_hash"):
            out["tokenizer_hash"] = meta["tokenizer_hash"]
        return out

    def check_name(self, name: str) -> None:
        if name not in ARCHITECTURES and not os.path.isdir(name) and not name.startswith("models:/"):
            raise UserError(f"unknown causal LM {name!r}: {', '.join(ARCHITECTURES)} (built from params), a "
                            "local save_pretrained directory or models:/NAME@ALIAS")

    def build_model(self, name: str, params: Mapping[str, Any], dims: Mapping[str, Any]) -> nn.Module:
        return build_lm(name, params, dims)

    def teacher_outputs(self, teachers: list[nn.Module], x: np.ndarray, rule: str, batch: int = 16) -> torch.Tensor:
        """Logits [n, S, V] at T=1 (ensembles: mean logits or log of the mean probability, per token)."""
        for t in teachers:
            t.eval()
        outs = []
        with torch.inference_mode():
            for i in range(0, len(x), batch):
                xb = torch.from_numpy(np.array(x[i:i + batch])).long()
                per = [t(xb).float() for t in teachers]
                if len(per) == 1:
                    outs.append(per[0])
                elif rule == "mean_logits":
                    outs.append(torch.stack(per).mean(0))
                else:
                    outs.append(torch.logsumexp(torch.log_softmax(torch.stack(per), -1), 0) - float(np.log(len(per))))
        return torch.cat(outs) if outs else torch.zeros(0)

    def decode_targets(self, targets: Mapping[str, torch.Tensor], dims: Mapping[str, Any]) -> torch.Tensor:
        """Dense [n, S, V] logits rebuilt with a uniform tail (small vocabularies and tests only)."""
        from tasks.target_formats import decode_topk

        if "logits" in targets:
            return targets["logits"].float().reshape(-1, dims["seq_len"], dims["vocab_size"])
        v, i, t = teacher_tuple(targets, dims["seq_len"], dims["vocab_size"])
        n, s, k = v.shape
        return decode_topk(v.reshape(-1, k), i.reshape(-1, k), t.reshape(-1), dims["vocab_size"]).reshape(n, s, -1)

    def place(self, rows: TargetBatch, dims: Mapping[str, Any], device: torch.device) -> LMShare:
        return LMShare(rows.x.long(), rows.y.long(), dict(rows.targets), int(dims["seq_len"]), int(dims["vocab_size"]),
                       device)

    def objective(self, logits: torch.Tensor, y: torch.Tensor, teacher: Any, loss: LossConfig | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, scale = global_tokens(y >= 0)
        if loss is None:
            total, parts = token_objective(logits, y, None, loss=None, temperature=1.0, alpha=0.0, beta=0.0,
                                           tokens=tokens, scale=scale)
        else:
            total, parts = token_objective(logits, y, teacher, loss=loss.kind, temperature=loss.temperature,
                                           alpha=loss.alpha, beta=loss.beta, tokens=tokens, scale=scale)
        return total, torch.stack((parts["total"], parts["kd"], parts["ce"]))

    def eval_counts(self, model: nn.Module, rows: TargetBatch, dims: Mapping[str, Any],
                    device: torch.device) -> torch.Tensor:
        return lm_counts(model, rows, int(dims["seq_len"]), int(dims["vocab_size"]), device)

    def metrics(self, counts: torch.Tensor, with_teacher: bool) -> dict[str, float]:
        return lm_metrics(counts, with_teacher)

    def serving_inputs(self, meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {}

    def from_serving(self, served: nn.Module, meta: Mapping[str, Any]) -> nn.Module | None:
        return served
