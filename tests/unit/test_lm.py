"""Causal language models (task: causal_lm): masks, the top-k + exact-tail targets, per-token losses, the
tokenizer/vocabulary checks, bad input, and one 2-worker run. Models are a few thousand parameters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from orchestrator.spec import validate
from tasks.errors import UserError
from tasks.kinds.causal_lm import CausalLM
from tasks.kinds.causal_lm.data import Document, load_lm_data, pack, save_tokenizer_dir, train_bpe
from tasks.kinds.causal_lm.models import build_lm
from tasks.kinds.causal_lm.objective import (
    student_buckets,
    teacher_buckets,
    token_divergence,
    token_objective,
)
from tasks.kinds.causal_lm.spec import CausalLMData
from tasks.store.shards import decode_rows, encode_rows
from tasks.train.config import OptimizerConfig
from tasks.train.step import schedule_for

KIND = CausalLM()
TEXT = ["def add(a, b):\n    return a + b\n" * 3, "class Point:\n    x: int = 0\n    y: int = 0\n" * 3,
        "import os\nprint(os.getcwd())\n" * 4, "for i in range(10):\n    print(i * i)\n" * 3] * 3


def tokenizer():
    return train_bpe(TEXT, 280)


def lm_workflow(**data: object) -> dict:
    return {"name": "t-lm", "task": "causal_lm", "data": {"seq_len": 16, "tokenizer": {"vocab_size": 270}, **data},
            "teacher": {"model": "llama", "params": {"layers": 1, "width": 16, "heads": 2, "ffn": 32}},
            "student": {"model": "gpt2", "params": {"layers": 1, "width": 8, "heads": 2, "ffn": 16}},
            "soft_targets": {"format": "topk", "top_k": 8}, "distill": {"temperature": 1.0, "alpha": 0.5}}


# ---------------------------------------------------------------- data: packing and masks


def test_packing_masks_prompt_and_padding_by_construction() -> None:
    tok = tokenizer()
    docs = [Document("return a + b", prompt="def add(a, b):"), Document("print(i)", prompt="for i in x:")]
    x, y = pack(docs, tok, seq_len=8)
    prompt_ids = [tok.encode(d.prompt).ids for d in docs]
    text_ids = [tok.encode(d.text).ids for d in docs]
    stream = [t for p, c in zip(prompt_ids, text_ids, strict=True) for t in (*p, *c, 0)]
    target = [t for p, c in zip(prompt_ids, text_ids, strict=True) for t in ([False] * len(p) + [True] * (len(c) + 1))]
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    # every position's label is the next token of the stream, or -1 where that next token is a prompt token or padding
    for pos in range(len(flat_x)):
        nxt = pos + 1  # row r holds stream[8r : 8r + 8] and its labels stream[8r + 1 : 8r + 9]
        if nxt < len(stream):
            assert flat_x[pos] == stream[pos]
            assert flat_y[pos] == (stream[nxt] if target[nxt] else -1)
        else:
            assert flat_y[pos] == -1  # padding past the last document
    assert (y >= 0).sum() == sum(target[1:])  # each completion token and EOS once; the first token has no label


def test_loss_ignores_masked_tokens_exactly() -> None:
    torch.manual_seed(0)
    b, s, v, k = 2, 6, 11, 4
    logits = torch.randn(b, s, v, requires_grad=True)
    labels = torch.randint(0, v, (b, s))
    labels[0, :2] = -1  # prompt
    labels[1, 4:] = -1  # padding
    teacher = torch.randn(b, s, v)
    values, ids = teacher.topk(k, dim=-1)
    tail = torch.logsumexp(teacher.scatter(-1, ids, float("-inf")), dim=-1)
    mask = labels >= 0
    tokens = mask.sum().float()
    total, _ = token_objective(logits, labels, (values, ids.int(), tail), loss="kl", temperature=2.0, alpha=0.3,
                               beta=0.5, tokens=tokens)
    total.backward()
    assert torch.all(logits.grad[~mask] == 0)  # nothing flows from a masked position
    assert torch.all(logits.grad[mask].abs().sum(-1) > 0)
    # by hand: the mean over real tokens of 0.3 * KD + 0.7 * CE
    kd = token_divergence(logits.detach(), values, ids, tail, loss="kl", temperature=2.0, beta=0.5)
    ce = F.cross_entropy(logits.detach().reshape(-1, v), labels.clamp(min=0).reshape(-1), reduction="none").reshape(b, s)
    assert torch.allclose(total.detach(), (0.3 * kd[mask] + 0.7 * ce[mask]).mean(), atol=1e-6)
    # changing the logits at masked positions changes nothing
    moved = logits.detach().clone()
    moved[~mask] += 100 * torch.randn_like(moved[~mask])
    again, _ = token_objective(moved, labels, (values, ids.int(), tail), loss="kl", temperature=2.0, alpha=0.3,
                               beta=0.5, tokens=tokens)
    assert torch.allclose(again, total.detach(), atol=1e-6)


def test_two_workers_normalise_by_global_tokens() -> None:
    """DDP averages the workers' gradients: scale * local sum / global tokens averages every real token once."""
    torch.manual_seed(1)
    v = 7
    logits = torch.randn(4, 5, v)
    labels = torch.randint(0, v, (4, 5))
    labels[2:, 1:] = -1  # the second worker's rows are mostly padding
    whole, _ = token_objective(logits, labels, None, loss=None, temperature=1.0, alpha=0.0, beta=0.0,
                               tokens=(labels >= 0).sum().float())
    tokens = (labels >= 0).sum().float()
    halves = [token_objective(logits[i:i + 2], labels[i:i + 2], None, loss=None, temperature=1.0, alpha=0.0,
                              beta=0.0, tokens=tokens, scale=2.0)[0] for i in (0, 2)]
    assert torch.allclose(sum(halves) / 2, whole, atol=1e-6)
    naive = sum(token_objective(logits[i:i + 2], labels[i:i + 2], None, loss=None, temperature=1.0, alpha=0.0,
                                beta=0.0, tokens=(labels[i:i + 2] >= 0).sum().float())[0] for i in (0, 2)) / 2
    assert not torch.allclose(naive, whole, atol=1e-3)  # a per-worker mean would weigh padding-heavy rows up


# ---------------------------------------------------------------- soft targets: top-k + exact tail


def stored(teacher: torch.Tensor, k: int, dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher logits [n, S, V] through a real shard (encode, Parquet bytes, decode) as the kind reads them."""
    n, s, v = teacher.shape
    x = np.zeros((n, s), np.int64)
    data = encode_rows(np.arange(n), x, np.zeros((n, s), np.int64), teacher, "topk", dtype, k)
    rows = decode_rows(data, dtype)
    assert rows.targets["topk_values"].shape == (n, s * k) and rows.targets["tail_logmass"].shape == (n, s)
    share = KIND.place(rows, {"seq_len": s, "vocab_size": v}, torch.device("cpu"))
    _, _, t = share.batch(torch.arange(n))
    return t


def test_topk_round_trip_with_the_whole_vocabulary_is_the_teacher() -> None:
    torch.manual_seed(2)
    teacher = 3 * torch.randn(2, 4, 9)
    values, ids, tail = stored(teacher, k=9)
    log_p = teacher_buckets(values, tail, 9, 1.0)
    exact = F.log_softmax(teacher, -1).gather(-1, ids.long())
    assert torch.allclose(log_p[..., :9], exact, atol=1e-5)
    assert torch.all(log_p[..., 9].exp() < 1e-30)  # no tail left
    # and the student sees the same buckets: KL to itself over the buckets is zero
    assert token_divergence(teacher, values, ids, tail, loss="kl", temperature=1.0, beta=0.5).abs().max() < 1e-5


def test_topk_tail_mass_is_exact_at_t1() -> None:
    torch.manual_seed(3)
    teacher = 2 * torch.randn(3, 5, 40)
    values, ids, tail = stored(teacher, k=6)
    p = F.softmax(teacher, -1)
    log_p = teacher_buckets(values, tail, 40, 1.0)
    assert torch.allclose(log_p[..., :6].exp(), p.gather(-1, ids.long()), atol=1e-6)
    assert torch.allclose(log_p[..., 6].exp(), 1 - p.gather(-1, ids.long()).sum(-1), atol=1e-6)
    # the student's buckets are its own full distribution coarsened: top-k probabilities and the rest
    q = student_buckets(teacher, ids, 1.0).exp()
    assert torch.allclose(q[..., :6], p.gather(-1, ids.long()), atol=1e-6)


def test_losses_against_a_hand_computation() -> None:
    """V = 4, k = 2, T = 2: buckets {a, b, tail}; the tail is uniform for the teacher at T != 1."""
    t = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])
    s = torch.tensor([[[0.5, 1.5, -0.5, 0.2]]])
    values, ids = t.topk(2, -1)
    tail = torch.logsumexp(t[..., 2:], -1)
    temp = 2.0
    # teacher at T: top-2 logits / T, tail = log(2) + (tail - log 2) / T
    tb = np.array([2.0 / temp, 1.0 / temp, math.log(2) + (float(tail) - math.log(2)) / temp])
    p = np.exp(tb) / np.exp(tb).sum()
    sq = np.exp(s.numpy()[0, 0] / temp)
    q = np.array([sq[0], sq[1], sq[2] + sq[3]]) / sq.sum()
    kl = temp**2 * float((p * np.log(p / q)).sum())
    rkl = temp**2 * float((q * np.log(q / p)).sum())
    m = 0.5 * p + 0.5 * q
    jsd = temp**2 * float(0.5 * (p * np.log(p / m)).sum() + 0.5 * (q * np.log(q / m)).sum())
    for loss, want in (("kl", kl), ("reverse_kl", rkl), ("jsd", jsd)):
        got = token_divergence(s, values, ids.int(), tail, loss=loss, temperature=temp, beta=0.5)
        assert got.shape == (1, 1)
        assert abs(float(got) - want) < 1e-5, loss


def test_a_users_loss_is_called_per_token_on_the_bucket_log_probabilities(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """distill.loss: "module:function" for causal_lm: fn(student [N, k+1], teacher [N, k+1], 1.0) per token on the
    top-k + tail buckets' log-probabilities at T; kdflow applies T^2. A KL written by hand equals the built-in."""
    from tasks.losses import resolve_loss

    (tmp_path / "token_losses.py").write_text(
        "def bucket_kl(student, teacher, temperature):\n"
        "    return (teacher.exp() * (teacher - student)).sum(-1) / temperature\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        torch.manual_seed(0)
        t, s = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
        values, ids = t.topk(4, -1)
        tail = torch.logsumexp(t.scatter(-1, ids, -1e4), -1)
        mine = token_divergence(s, values, ids.int(), tail, loss="token_losses:bucket_kl", temperature=2.0, beta=0.5)
        builtin = token_divergence(s, values, ids.int(), tail, loss="kl", temperature=2.0, beta=0.5)
        assert mine.shape == (2, 3) and torch.allclose(mine, builtin, atol=1e-6)
    finally:
        resolve_loss.cache_clear()


def test_schedule_warms_up_then_decays_and_is_off_by_default() -> None:
    plain = OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.0, momentum=0.9, schedule="constant",
                            warmup_steps=0, grad_clip=None)
    assert schedule_for(plain, 1, 10, 5) is None
    cfg = OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.0, momentum=0.9, schedule="cosine", warmup_steps=4,
                          grad_clip=None)
    sched = schedule_for(cfg, 1, 10, 5)
    assert [sched.factor(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert sched.factor(4) == pytest.approx(1.0) and sched.factor(27) == pytest.approx(0.5)
    assert sched.factor(50) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- models, tokenizer and vocabulary checks


def test_pretrained_directory_checks_tokenizer_vocabulary_and_positions(tmp_path: Path) -> None:
    tok = tokenizer()
    from tasks.kinds.causal_lm.data import tokenizer_hash

    dims = {"vocab_size": tok.get_vocab_size(), "seq_len": 16, "tokenizer_hash": tokenizer_hash(tok)}
    padded = build_lm("llama", {"layers": 1, "width": 8, "heads": 2, "ffn": 16},
                      {**dims, "vocab_size": dims["vocab_size"] + 5})  # embedding rows past the tokenizer's
    padded.lm.save_pretrained(tmp_path / "padded")
    save_tokenizer_dir(tok, tmp_path / "padded")
    model = build_lm(str(tmp_path / "padded"), {}, dims)
    assert model(torch.zeros(1, 16, dtype=torch.long)).shape == (1, 16, dims["vocab_size"])  # padded rows cut off

    small = build_lm("llama", {"layers": 1, "width": 8, "heads": 2, "ffn": 16}, {**dims, "vocab_size": 200})
    small.lm.save_pretrained(tmp_path / "small")
    with pytest.raises(UserError, match="smaller than the tokenizer"):
        build_lm(str(tmp_path / "small"), {}, dims)
    with pytest.raises(UserError, match="over the model's 16 positions"):
        build_lm(str(tmp_path / "padded"), {}, {**dims, "seq_len": 32})
    save_tokenizer_dir(train_bpe(TEXT[:2], 265), tmp_path / "padded")  # another tokenizer beside the weights
    with pytest.raises(UserError, match="not the workflow's") as exc:
        build_lm(str(tmp_path / "padded"), {}, dims)
    assert exc.value.where == "model" and dims["tokenizer_hash"] in str(exc.value)


# ---------------------------------------------------------------- bad input names its key


@pytest.mark.parametrize("raw, named", [
    (lm_workflow(features=["a"]), "data.features"),
    (lm_workflow(label="y"), "data.label"),
    ({**lm_workflow(), "distill": {"loss": "mse"}}, "distill.loss"),
    ({"name": "c", "data": {"seq_len": 64}}, "data.seq_len"),
    ({"name": "c", "data": {"tokenizer": {"vocab_size": 300}}}, "data.tokenizer"),
    ({"name": "c", "distill": {"baseline": True}}, "distill.baseline"),
])
def test_keys_of_the_other_task_kind_are_refused(raw: dict, named: str) -> None:
    with pytest.raises(UserError, match=named.replace(".", r"\.")):
        validate(raw)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_data_names_its_key(tmp_path: Path) -> None:
    from orchestrator.stages import load_data
    from tasks.storage import Storage

    storage = Storage(str(tmp_path / "store"))
    docs = write_jsonl(tmp_path / "d.jsonl", [{"body": t} for t in TEXT])
    cases = [
        (lm_workflow(source=docs), "data.text", "no column 'text'"),
        (lm_workflow(source=write_jsonl(tmp_path / "e.jsonl", [{"text": "  \n"}] * 5)), "data.text", "no text"),
        (lm_workflow(source=docs, text="body", tokenizer={"path": str(tmp_path / "nope")}), "data.tokenizer.path",
         "no tokenizer.json"),
        (lm_workflow(source=docs, prompt="body"), "data.completion", "set together"),
        ({**lm_workflow(source=docs, text="body"), "soft_targets": {"format": "topk", "top_k": 5000}},
         "soft_targets.top_k", "larger than"),
    ]
    for raw, where, says in cases:
        with pytest.raises(UserError, match=says) as exc:
            load_data(validate(raw), storage)
        assert exc.value.where == where, (where, exc.value)


def test_prompt_completion_parquet_and_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "pc.parquet"
    pq.write_table(pa.table({"q": ["def f(x):"] * 12, "a": [f"    return x + {i}" for i in range(12)]}), path)
    opts = {"source": str(path), "prompt": "q", "completion": "a", "seq_len": 8, "tokenizer": {"vocab_size": 270},
            "split": {"val": 0.2, "test": 0.2}}
    one = load_lm_data(CausalLMData(**opts), seed=0, storage=None)
    assert one.documents == {"train": 8, "val": 2, "test": 2}
    assert load_lm_data(CausalLMData(**opts), seed=0, storage=None).fingerprint == one.fingerprint
    assert load_lm_data(CausalLMData(**{**opts, "seq_len": 16}), seed=0, storage=None).fingerprint != one.fingerprint
    masked = load_lm_data(CausalLMData(**{**opts, "prompt": None, "completion": None, "text": "a"}), seed=0,
                          storage=None)
    assert masked.fingerprint != one.fingerprint and (one.y["train"] < 0).mean() > (masked.y["train"] < 0).mean()


# ---------------------------------------------------------------- a precompute killed for real


# ---------------------------------------------------------------- one whole run, two workers
