"""Progress on stderr: stages with their timings, shards, trials. Results never go here."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)
# (stage, seconds) of every stage that finished in this process, in order: the run's closing summary.
TIMINGS: list[tuple[str, float]] = []

# The innermost stage an exception left (None until one fails): the CLI names it in its one-line error.
failed_stage: str | None = None


def info(msg: str) -> None:
    console.print(msg)


@contextmanager
def stage(name: str, detail: str = "") -> Iterator[None]:
    t0 = time.perf_counter()
    console.print(f"[bold cyan]▶ {name}[/]" + (f" [dim]{detail}[/]" if detail else ""))
    try:
        yield
    except BaseException:
        global failed_stage
        failed_stage = failed_stage or name
        console.print(f"[bold red]✗ {name}[/] after {time.perf_counter() - t0:.1f}s")
        raise
    TIMINGS.append((name, time.perf_counter() - t0))
    console.print(f"[green]✓ {name}[/] [dim]{TIMINGS[-1][1]:.1f}s[/]")
