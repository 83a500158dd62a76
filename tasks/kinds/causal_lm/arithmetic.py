"""The built-in conversational corpus (source: arithmetic-chat): generated sums asked and answered, one or two
questions per conversation, every other one with a system turn. Each answer is verifiable (the exact-match
rate of benchmarks/bench_chat.py), and nothing downloads."""

from __future__ import annotations

from typing import Any

import numpy as np

ARITHMETIC = "arithmetic-chat"
SYSTEM = "Answer with the number only."


def conversation(a: int, b: int, c: int, turns: int, system: bool) -> list[dict[str, str]]:
    out = [{"role": "system", "content": SYSTEM}] if system else []
    out += [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": str(a + b)}]
    if turns > 1:
        out += [{"role": "user", "content": f"And plus {c}?"}, {"role": "assistant", "content": str(a + b + c)}]
    return out


def arithmetic_conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """`n` conversations, the same for the same (n, seed)."""
    rng = np.random.default_rng(seed)
    nums = rng.integers(0, 100, size=(n, 3))
    turns = rng.integers(1, 3, size=n)
    return [conversation(int(a), int(b), int(c), int(t), bool(i % 2)) for i, ((a, b, c), t) in
            enumerate(zip(nums, turns, strict=True))]


def arithmetic_table(n: int) -> Any:
    """The corpus as a table with a `messages` column, as a user's Parquet file of conversations reads."""
    import pyarrow as pa

    return pa.table({"messages": arithmetic_conversations(n)})
