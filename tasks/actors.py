"""A pool of long-lived Ray actors of one class that survives their deaths: `map` spreads calls over the
actors, and a call whose actor died (its process killed, its node lost) is redone on a fresh actor built
with the same arguments, up to `max_restarts` times over the pool's life. Kind-agnostic: the on-policy
stage's generators and teacher scorers (tasks/kinds/causal_lm/on_policy.py) are such pools.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def died(exc: BaseException) -> bool:
    """Whether `exc` says the actor is gone (not that the call itself raised)."""
    import ray.exceptions

    return isinstance(exc, ray.exceptions.RayActorError)


class ActorPool:
    """`size` actors of `cls(*args)` with Ray `options`; `replaced` counts the actors started again."""

    def __init__(self, cls: type, size: int, args: Sequence[Any], options: dict[str, Any],
                 max_restarts: int = 3) -> None:
        import ray

        self._remote = ray.remote(cls).options(**options)
        self._args = tuple(args)
        self.actors = [self._remote.remote(*self._args) for _ in range(size)]
        self.max_restarts = max_restarts
        self.replaced = 0

    def _replace(self, i: int, dead: Any) -> None:
        """A fresh actor in slot i, unless another failed call already replaced the dead one."""
        import ray

        if self.actors[i] is not dead:
            return
        if self.replaced >= self.max_restarts:
            raise RuntimeError(f"actor pool: {self.replaced} actors replaced already, giving up")
        self.replaced += 1
        ray.kill(dead, no_restart=True)
        self.actors[i] = self._remote.remote(*self._args)

    def map(self, method: str, items: Sequence[Sequence[Any]]) -> list[Any]:
        """getattr(actor, method)(*item) for every item, item i on actor i % size; results in item order."""
        import ray

        out: list[Any] = [None] * len(items)
        pending: dict[Any, tuple[int, int, Any]] = {}  # ref -> (item, actor slot, the actor called)

        def submit(j: int) -> None:
            i = j % len(self.actors)
            actor = self.actors[i]
            pending[getattr(actor, method).remote(*items[j])] = (j, i, actor)

        for j in range(len(items)):
            submit(j)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            j, i, actor = pending.pop(ready[0])
            try:
                out[j] = ray.get(ready[0])
            except Exception as exc:
                if not died(exc):
                    raise
                self._replace(i, actor)
                submit(j)
        return out

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
