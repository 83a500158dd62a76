"""Soft-target formats for causal LMs at equal student steps: full logits, top-k at k = 8 and 32, sampled at
N = 12 (ids + counts, the unbiased estimate), against the same student with no KD.

Two corpora: the generated conversations (`arithmetic-chat`, the chat template of workflows/chat-arithmetic.yaml,
targets on the assistant's tokens only; verifiable answers) and the standard-library source (`python-stdlib`,
packed text). Per corpus a teacher is trained once (a plain loop, kdflow's objective with CE only), its
next-token distributions on the training rows stored as kdflow stores them (tasks/store/shards.py, Parquet
zstd, masked positions zeroed) and decoded back; then each student trains the same steps from the same
seed with kdflow's objective (alpha 0.5, T 1, forward KL), and is scored on the test split:

- bytes/token: the stored shard's bytes per target token (the rows' token ids and labels included);
- gap closed: (ppl no-KD - ppl student) / (ppl no-KD - ppl teacher), test perplexity per target token;
- ECE: expected calibration error of the student's next-token top-1 probability (15 equal-width bins);
- exact match (chat): the student's greedy answer to each assistant turn, given the conversation before it
  rendered with the generation prompt, equals the answer.

Run from the repository root: ``python benchmarks/bench_chat.py [--small]`` (table on stdout, markdown).
``--small`` is the size for a shared machine (a few minutes); the default is larger.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.kinds.causal_lm import CausalLM
from tasks.kinds.causal_lm.data import load_lm_data
from tasks.kinds.causal_lm.objective import token_objective
from tasks.kinds.causal_lm.spec import CausalLMData
from tasks.kinds.causal_lm.targets import teacher_tuple
from tasks.store.shards import decode_rows, encode_rows

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
FORMATS = (("full logits", "logits", None), ("top-8", "topk", 8), ("top-32", "topk", 32), ("sampled 12", "sampled", 12))
KIND = CausalLM()


@dataclass
class Size:
    conversations: int
    stdlib_bytes: int
    teacher: dict[str, int]
    student: dict[str, int]
    teacher_steps: int
    student_steps: int
    batch: int = 32


SMALL = Size(600, 60_000, {"layers": 2, "width": 64, "heads": 4, "ffn": 192},
             {"layers": 1, "width": 32, "heads": 4, "ffn": 96}, 300, 150)
MEDIUM = Size(2000, 200_000, {"layers": 2, "width": 64, "heads": 4, "ffn": 192},
              {"layers": 1, "width": 32, "heads": 4, "ffn": 96}, 1200, 600)
LARGE = Size(4000, 400_000, {"layers": 4, "width": 128, "heads": 4, "ffn": 384},
             {"layers": 2, "width": 64, "heads": 4, "ffn": 192}, 3000, 1500)


def corpus(name: str, size: Size) -> Any:
    if name == "chat":
        data = CausalLMData(source="arithmetic-chat", corpus={"conversations": size.conversations}, seq_len=80,
                            chat_template=TEMPLATE, tokenizer={"vocab_size": 300}, split={"val": 0.1, "test": 0.1})
    else:
        data = CausalLMData(source="python-stdlib", corpus={"max_bytes": size.stdlib_bytes}, seq_len=64,
                            tokenizer={"vocab_size": 320}, split={"val": 0.1, "test": 0.1})
    return load_lm_data(data, seed=0, storage=None)


def fit(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, teacher: Any, steps: int, batch: int) -> None:
    """kdflow's objective (alpha 0.5, T 1, forward KL; CE only without a teacher), AdamW, cosine."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(0)
    xt, yt = torch.from_numpy(np.array(x)).long(), torch.from_numpy(np.array(y)).long()
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(yt), (batch,), generator=gen)
        t = None if teacher is None else tuple(part[idx] for part in teacher)
        total, _ = token_objective(model(xt[idx]), yt[idx], t, loss=None if t is None else "kl", temperature=1.0,
                                   alpha=0.5, beta=0.5, tokens=(yt[idx] >= 0).sum().float())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        sched.step()
    model.eval()


@torch.no_grad()
def scores(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, bins: int = 15) -> tuple[float, float]:
    """Test perplexity per target token and the ECE of the top-1 next-token probability."""
    logits = model(torch.from_numpy(x).long()).float()
    yt = torch.from_numpy(y).long()
    mask = yt >= 0
    logp = torch.log_softmax(logits, -1)[mask]
    target = yt[mask]
    ppl = float(torch.exp(-logp.gather(-1, target[:, None]).mean()))
    conf, pred = logp.exp().max(-1)
    right = (pred == target).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges.tolist()):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += float(inside.float().mean() * (conf[inside].mean() - right[inside].mean()).abs())
    return ppl, ece


@torch.no_grad()
def exact_match(model: torch.nn.Module, data: Any, conversations: list[list[dict[str, str]]]) -> float:
    """Greedy answers to every assistant turn of `conversations`, rendered with the generation prompt."""
    from transformers import PreTrainedTokenizerFast

    from tasks.kinds.causal_lm.data import EOS
    from tasks.kinds.causal_lm.generation import GenerationParams, Prompt, generate_one

    fast = PreTrainedTokenizerFast(tokenizer_object=data.tokenizer, eos_token=EOS, pad_token=EOS)
    fast.chat_template = data.chat_template
    lm = model.lm
    right = total = 0
    for conv in conversations:
        for i, turn in enumerate(conv):
            if turn["role"] != "assistant":
                continue
            text = fast.apply_chat_template(conv[:i], tokenize=False, add_generation_prompt=True)
            new = generate_one(lm, fast, Prompt(text, chat=True), GenerationParams(max_new_tokens=6))
            right += fast.decode(new).strip() == turn["content"]
            total += 1
    return right / max(1, total)


def stored(logits: torch.Tensor, x: np.ndarray, y: np.ndarray, fmt: str, k: int | None, seq: int, vocab: int
           ) -> tuple[tuple[torch.Tensor, ...], float]:
    """The teacher's outputs as stored in `fmt` and decoded for the loss; bytes per target token."""
    data = encode_rows(np.arange(len(y)), x, y, logits, fmt, "float16", k)
    rows = decode_rows(data, "float16")
    return teacher_tuple(rows.targets, seq, vocab), len(data) / max(1, int((y >= 0).sum()))


def run_corpus(name: str, size: Size) -> list[str]:
    data = corpus(name, size)
    dims = {"vocab_size": data.vocab_size, "seq_len": data.seq_len}
    xtr, ytr, xte, yte = data.x["train"], data.y["train"], data.x["test"], data.y["test"]
    torch.manual_seed(0)
    teacher = KIND.build_model("llama", size.teacher, dims)
    fit(teacher, xtr, ytr, None, size.teacher_steps, size.batch)
    with torch.no_grad():
        logits = torch.cat([teacher(torch.from_numpy(xtr[i:i + 64]).long()).float() for i in range(0, len(xtr), 64)])
    tests: list[list[dict[str, str]]] = []
    if name == "chat":
        from tasks.kinds.causal_lm.arithmetic import arithmetic_conversations

        tests = arithmetic_conversations(size.conversations + 200)[size.conversations:]  # never seen in training

    def student(target: Any) -> tuple[float, float, float]:
        torch.manual_seed(1)
        model = KIND.build_model("llama", size.student, dims)
        fit(model, xtr, ytr, target, size.student_steps, size.batch)
        ppl, ece = scores(model, xte, yte)
        return ppl, ece, exact_match(model, data, tests) if tests else float("nan")

    t_ppl, t_ece = scores(teacher, xte, yte)
    t_em = exact_match(teacher, data, tests) if tests else float("nan")
    base = student(None)
    lines = [f"| {name} | teacher | | {t_ppl:.3f} | | {t_ece:.3f} | {t_em:.3f} |",
             f"| {name} | no KD | | {base[0]:.3f} | 0 | {base[1]:.3f} | {base[2]:.3f} |"]
    for label, fmt, k in FORMATS:
        target, per_token = stored(logits, xtr, ytr, fmt, k, data.seq_len, data.vocab_size)
        ppl, ece, em = student(target)
        gap = f"{(base[0] - ppl) / (base[0] - t_ppl):.2f}" if base[0] > t_ppl else "n/a (teacher no better)"
        lines.append(f"| {name} | {label} | {per_token:.1f} | {ppl:.3f} | {gap} | {ece:.3f} | {em:.3f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="sizes for a shared machine (minutes)")
    ap.add_argument("--medium", action="store_true", help="between --small and the default")
    ap.add_argument("--corpus", choices=("chat", "stdlib", "both"), default="both")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared machine's 2 threads spin on "
                    "each other: 0.26 s per teacher step at 1 thread, 3.4 s at 2, load 8)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = SMALL if args.small else MEDIUM if args.medium else LARGE
    t0 = time.perf_counter()
    lines = ["| corpus | targets | bytes/token | test ppl | gap closed | ECE | exact match |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in (("chat", "stdlib") if args.corpus == "both" else (args.corpus,)):
        lines += run_corpus(name, size)
    print("\n".join(lines))
    print(f"\n{time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} torch threads, size {size}")


if __name__ == "__main__":
    main()
