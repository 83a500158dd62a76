"""Storage size against fidelity for each teacher-output format.

A randomly initialised MLP teacher (64 -> 256 -> C, GELU) runs on random inputs; its logits are
rescaled so the mean per-row standard deviation is LOGIT_STD, which makes it about as confident
as a trained classifier. Each format stores the logits and rebuilds them; the table gives bytes
per row and the mean KL(softmax_T(full) || softmax_T(rebuilt)) at several temperatures.

Run from the repository root: ``python benchmarks/bench_formats.py`` (table on stdout).
"""

import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.store.formats import TORCH_DTYPES, bytes_per_row, decode_topk, encode_topk

NUM_ROWS = 4096
INPUT_DIM = 64
HIDDEN_DIM = 256
LOGIT_STD = 4.0
CLASS_COUNTS = (100, 1000)
TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
LOGIT_DTYPES = ("float32", "float16", "bfloat16")
TOP_KS = (1, 5, 10, 20, 50)
TOPK_DTYPE = "float16"


def teacher_logits(num_classes: int, generator: torch.Generator) -> Tensor:
    """Logits of a random wide-head MLP teacher, rescaled to a per-row std of LOGIT_STD."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    teacher = nn.Sequential(nn.Linear(INPUT_DIM, HIDDEN_DIM), nn.GELU(), nn.Linear(HIDDEN_DIM, num_classes))
    inputs = torch.randn(NUM_ROWS, INPUT_DIM, generator=generator)
    with torch.no_grad():
        logits = teacher(inputs)
    return logits * (LOGIT_STD / logits.std(dim=-1).mean())


def mean_kl(full: Tensor, rebuilt: Tensor, temperature: float) -> float:
    """Mean over rows of KL(softmax_T(full) || softmax_T(rebuilt)), in float64."""
    log_p = torch.log_softmax(full.double() / temperature, dim=-1)
    log_q = torch.log_softmax(rebuilt.double() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean().item()


def rebuilt_logits(full: Tensor, format: str, dtype: str, top_k: int | None) -> Tensor:
    """What a student would read back after storing ``full`` in the given format."""
    if format == "logits":
        return full.to(TORCH_DTYPES[dtype]).float()
    values, indices, tail_logmass = encode_topk(full, top_k)
    stored_values = values.to(TORCH_DTYPES[dtype]).float()
    return decode_topk(stored_values, indices, tail_logmass, full.shape[1])


def format_kl(value: float) -> str:
    return "0" if value == 0.0 else f"{value:.1e}"


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    formats = [("logits", dtype, None) for dtype in LOGIT_DTYPES]
    formats += [("topk", TOPK_DTYPE, k) for k in TOP_KS]
    header = ["C", "format", "dtype", "k", "bytes/row", "% of float32"]
    header += [f"KL T={t:g}" for t in TEMPERATURES]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for num_classes in CLASS_COUNTS:
        start = time.perf_counter()
        full = teacher_logits(num_classes, generator)
        probs = torch.softmax(full.double(), dim=-1)
        top1 = probs.max(dim=-1).values.mean().item()
        entropy = -(probs * probs.log()).sum(dim=-1).mean().item()
        print(
            f"C={num_classes}: mean top-1 prob {top1:.2f}, mean entropy {entropy:.2f} nats "
            f"(uniform: {torch.log(torch.tensor(float(num_classes))).item():.2f})",
            file=sys.stderr,
        )
        dense_bytes = bytes_per_row("logits", num_classes, "float32", None)
        # Scale for the KL columns: what a student learns from storing nothing at all.
        uniform = [format_kl(mean_kl(full, torch.zeros_like(full), t)) for t in TEMPERATURES]
        print("| " + " | ".join([str(num_classes), "none (uniform)", "-", "-", "0", "0.0", *uniform]) + " |")
        for format, dtype, top_k in formats:
            rebuilt = rebuilt_logits(full, format, dtype, top_k)
            size = bytes_per_row(format, num_classes, dtype, top_k)
            kls = [format_kl(mean_kl(full, rebuilt, t)) for t in TEMPERATURES]
            row = [str(num_classes), format, dtype, "-" if top_k is None else str(top_k), str(size)]
            row += [f"{100 * size / dense_bytes:.1f}", *kls]
            print("| " + " | ".join(row) + " |")
        print(f"C={num_classes}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
