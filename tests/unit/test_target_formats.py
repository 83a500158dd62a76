"""Top-k encode/decode with a uniform tail, and storage sizes per format."""

import math

import pytest
import torch

from tasks.losses import LOSSES
from tasks.store.formats import (
    EMPTY_TAIL_LOGMASS,
    bytes_per_row,
    decode_topk,
    encode_topk,
    torch_dtype,
)

NUM_CLASSES = 50


@pytest.fixture
def logits() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return 4.0 * torch.randn(8, NUM_CLASSES, generator=generator, dtype=torch.float64)


def test_encode_keeps_the_exact_top_k_raw_logits_sorted(logits):
    values, indices, tail = encode_topk(logits, 5)
    assert values.dtype == torch.float32 and indices.dtype == torch.int32 and tail.dtype == torch.float32
    assert values.shape == (8, 5) and indices.shape == (8, 5) and tail.shape == (8,)
    expected_values, expected_indices = logits.float().sort(dim=-1, descending=True)
    torch.testing.assert_close(values, expected_values[:, :5], rtol=0, atol=0)
    assert torch.equal(indices.long(), expected_indices[:, :5])


def test_tail_logmass_is_the_logsumexp_of_the_classes_left_out(logits):
    _, indices, tail = encode_topk(logits, 5)
    mask = torch.ones_like(logits, dtype=torch.bool).scatter(-1, indices.long(), False)
    expected = torch.stack([torch.logsumexp(row[keep], dim=0) for row, keep in zip(logits, mask)])
    torch.testing.assert_close(tail, expected.float())


def test_decode_gives_exact_top_k_probabilities_and_tail_mass_at_t1(logits):
    values, indices, tail = encode_topk(logits, 5)
    rebuilt = decode_topk(values, indices, tail, NUM_CLASSES)
    assert rebuilt.dtype == torch.float32 and rebuilt.shape == logits.shape
    p_true = torch.softmax(logits.float(), dim=-1)
    p_rebuilt = torch.softmax(rebuilt, dim=-1)
    top = indices.long()
    torch.testing.assert_close(p_rebuilt.gather(-1, top), p_true.gather(-1, top))
    tail_true = 1.0 - p_true.gather(-1, top).sum(dim=-1)
    tail_rebuilt = 1.0 - p_rebuilt.gather(-1, top).sum(dim=-1)
    torch.testing.assert_close(tail_rebuilt, tail_true, rtol=1e-4, atol=1e-6)


def test_decode_spreads_the_tail_uniformly(logits):
    values, indices, tail = encode_topk(logits, 5)
    rebuilt = decode_topk(values, indices, tail, NUM_CLASSES)
    in_tail = torch.ones_like(rebuilt, dtype=torch.bool).scatter(-1, indices.long(), False)
    expected = (tail - math.log(NUM_CLASSES - 5)).unsqueeze(-1).expand_as(rebuilt)
    torch.testing.assert_close(rebuilt[in_tail], expected[in_tail])


def test_decode_is_approximate_away_from_t1(logits):
    values, indices, tail = encode_topk(logits, 5)
    rebuilt = decode_topk(values, indices, tail, NUM_CLASSES)
    kl_t4 = LOSSES["kl"](rebuilt, logits.float(), 4.0, 0.0)
    assert (kl_t4 > 1e-4).all()


def test_k_equal_to_num_classes_round_trips_exactly(logits):
    values, indices, tail = encode_topk(logits, NUM_CLASSES)
    assert (tail == EMPTY_TAIL_LOGMASS).all()
    rebuilt = decode_topk(values, indices, tail, NUM_CLASSES)
    torch.testing.assert_close(rebuilt, logits.float(), rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 5, NUM_CLASSES])
@pytest.mark.parametrize("loss", ["kl", "reverse_kl", "jsd", "mse"])
def test_every_loss_accepts_decoded_targets(logits, loss, k):
    teacher = decode_topk(*encode_topk(logits, k), NUM_CLASSES)
    student = torch.randn(8, NUM_CLASSES, requires_grad=True)
    out = LOSSES[loss](student, teacher, 2.0, 0.5)
    out.mean().backward()
    assert out.shape == (8,) and torch.isfinite(out).all()
    assert torch.isfinite(student.grad).all()


def test_encode_rejects_k_outside_one_to_num_classes(logits):
    with pytest.raises(ValueError, match="top_k"):
        encode_topk(logits, 0)
    with pytest.raises(ValueError, match="top_k"):
        encode_topk(logits, NUM_CLASSES + 1)


def test_bytes_per_row_counts_the_stored_payload():
    assert bytes_per_row("logits", 100, "float32") == 400
    assert bytes_per_row("logits", 100, "float16") == 200
    assert bytes_per_row("logits", 1000, "bfloat16") == 2000
    assert bytes_per_row("topk", 1000, "float16", top_k=10) == 10 * 2 + 10 * 4 + 4


def test_bytes_per_row_rejects_bad_format_dtype_or_k():
    with pytest.raises(ValueError, match="format"):
        bytes_per_row("sparse", 100, "float32")
    with pytest.raises(ValueError, match="dtype"):
        bytes_per_row("logits", 100, "int8")
    with pytest.raises(ValueError, match="top_k"):
        bytes_per_row("topk", 100, "float16")


def test_dtype_names_map_to_torch_dtypes():
    assert torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="float16"):
        torch_dtype("half")
