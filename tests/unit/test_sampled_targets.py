"""Sampled soft targets (soft_targets.format: sampled): N teacher draws per token stored as ids with counts,
decoded into an estimate whose mean over draws is the teacher's distribution; their own store key, stable
for equal inputs; the per-token losses (kl, reverse_kl, jsd) train on them as on top-k and dense logits."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from orchestrator.spec import validate
from tasks.kinds.causal_lm.objective import token_divergence
from tasks.kinds.causal_lm.targets import decode_targets, teacher_tuple
from tasks.store.formats import decode_sampled, encode_sampled
from tasks.store.shards import decode_rows, encode_rows
from tasks.store.store import cache_key
from tests.unit.test_lm import lm_workflow


def test_the_estimate_is_unbiased_its_mean_over_draws_is_the_teacher() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 2
    p = torch.softmax(logits, -1)
    draws, n = 4000, 12
    ids, counts = encode_sampled(logits.repeat(draws, 1), n, seed=1)  # each row its own N draws
    assert ids.dtype == torch.int32 and counts.dtype == torch.uint8
    assert (counts.sum(-1) == n).all() and (counts[:, 1:] <= counts[:, :-1]).all()  # most drawn first
    est = decode_sampled(ids, counts, 40).reshape(draws, 3, 40)
    assert torch.allclose(est.sum(-1), torch.ones(draws, 3))
    mean = est.mean(0)
    sd = (p * (1 - p) / (n * draws)).sqrt()
    assert ((mean - p).abs() <= 5 * sd + 1e-4).all(), (mean - p).abs().max()
    # a single draw set is far from the teacher; the mean of many is close: the estimate, not a copy
    assert (est[0] - p).abs().max() > 10 * (mean - p).abs().max()


def test_keys_differ_between_formats_and_stay_stable() -> None:
    keys = {f: cache_key(["t1"], "fp", f, "float16", 12, "mean_probs") for f in ("logits", "topk", "sampled")}
    assert len(set(keys.values())) == 3
    assert cache_key(["t1"], "fp", "sampled", "float16", 12, "mean_probs") == keys["sampled"]
    assert cache_key(["t1"], "fp", "sampled", "float16", 16, "mean_probs") != keys["sampled"]
    # the keys entries had before sampled existed are the same (a store stays valid)
    before = json.dumps({"v": 1, "teachers": ["t1"], "data": "fp", "format": "topk", "dtype": "float16", "top_k": 12,
                         "ensemble": None}, sort_keys=True)
    assert keys["topk"] == hashlib.sha256(before.encode()).hexdigest()[:20]
    torch.manual_seed(0)
    seq, vocab, rows = 6, 50, 4
    x = np.arange(rows * seq).reshape(rows, seq) % vocab
    y = np.where(np.arange(seq) % 3 == 0, -1, x)  # every third position is masked
    logits = torch.randn(rows, seq, vocab)
    one = encode_rows(np.arange(rows), x, y, logits, "sampled", "float16", 12)
    assert encode_rows(np.arange(rows), x, y, logits, "sampled", "float16", 12) == one  # equal inputs, equal bytes
    back = decode_rows(one, "float16")
    counts = back.targets["sample_counts"].reshape(rows, seq, -1)
    assert (counts.sum(-1)[torch.from_numpy(y >= 0)] == 12).all()
    assert (counts.sum(-1)[torch.from_numpy(y < 0)] == 0).all()  # nothing stored for a masked token
    dense = decode_targets(back.targets, seq, vocab)
    assert dense.shape == (rows, seq, vocab)


def test_the_losses_train_on_each_format() -> None:
    torch.manual_seed(0)
    rows, seq, vocab = 2, 5, 30
    x = np.zeros((rows, seq), dtype=np.int64)
    y = np.ones((rows, seq), dtype=np.int64)
    teacher = torch.randn(rows, seq, vocab) * 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only spins (60 s instead of 2 on a loaded box)
    try:
        for fmt, k in (("logits", None), ("topk", 8), ("sampled", 12)):
            stored = decode_rows(encode_rows(np.arange(rows), x, y, teacher, fmt, "float32", k), "float32").targets
            values, ids, tail = teacher_tuple(stored, seq, vocab)
            for loss in ("kl", "reverse_kl", "jsd"):
                student = torch.zeros(rows, seq, vocab, requires_grad=True)
                opt = torch.optim.Adam([student], lr=0.3)
                first = None
                for _ in range(30):
                    d = token_divergence(student, values, ids, tail, loss=loss, temperature=1.0, beta=0.5).mean()
                    assert torch.isfinite(d), (fmt, loss)
                    first = float(d) if first is None else first
                    opt.zero_grad()
                    d.backward()
                    opt.step()
                assert float(d) < 0.5 * first, (fmt, loss, first, float(d))
                agree = (student.argmax(-1) == teacher.argmax(-1)).float().mean()
                assert agree > 0.6, (fmt, loss, agree)
    finally:
        torch.set_num_threads(threads)


def test_sampled_needs_samples_and_is_for_causal_lm() -> None:
    raw = lm_workflow()
    raw["soft_targets"] = {"format": "sampled", "samples": 12}
    assert validate(raw).soft_targets.kept == 12
    with pytest.raises(Exception, match="needs samples"):
        validate({**raw, "soft_targets": {"format": "sampled"}})
    for task in ("classification", "image_classification"):
        with pytest.raises(Exception, match="sampled is stored per token"):
            validate({"name": "c", "task": task, "data": {"source": "sklearn:digits"},
                      "soft_targets": {"format": "sampled", "samples": 4}})
