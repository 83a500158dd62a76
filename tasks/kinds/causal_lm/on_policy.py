"""On-policy distillation for causal LMs (distill.mode: on_policy; docs/on-policy.md).

After the offline epochs, the student's worker runs `steps` more optimizer steps. Every `refresh_every`
steps it puts its newest weights in Ray's object store (`ray.put`, never a file) and a pool of generator
actors samples completions of training prompts with them (one left-padded batch, the KV cache of
transformers' `generate`, temperature / top_p, at most `max_new_tokens`, stopping at EOS); a pool of teacher
actors, each of which loaded the teachers once, returns the teacher's log-probabilities over the whole
vocabulary at every sampled position. The student is then pushed towards the teacher on its own samples
with GKD's per-token generalized JSD (beta 1: the exact per-token reverse KL(student || teacher) over the
vocabulary, mode seeking; Agarwal et al. 2024), averaged over the completions' tokens. A share `lambda` of
the steps are such on-policy steps, the rest offline batches of the stored targets (GKD's lambda).

At every refresh (and after the last step) rank 0 judges the student on held-out (val) prompts: its
samples' mean per-token reverse KL to the teacher, the teacher's NLL of those samples, their exact match
with the reference answer, and the generation and scoring tokens/s; the records travel in the fit's
checkpoint to the driver, which logs them to MLflow with a table of sample generations.

A generator or teacher actor that dies is replaced and its batch redone (tasks/actors.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tasks.actors import ActorPool
from tasks.errors import UserError
from tasks.losses import generalized_jsd

Pair = tuple[list[int], list[int]]  # (prompt ids, completion ids)
SAMPLES_PER_REFRESH = 4  # generations kept per refresh for the driver's table


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_new_tokens: int
    eos: int


@dataclass(frozen=True)
class OnPolicyPlan:
    """distill.on_policy as the worker reads it (tasks/kinds/causal_lm/spec.py: OnPolicySpec)."""

    steps: int
    lambda_: float
    beta: float
    refresh_every: int
    lr: float | None
    eval_prompts: int
    generators: int
    teachers: int
    actor_cpus: float
    actor_gpus: float
    sampling: Sampling
    keep_rollouts: bool


def plan_of(on_policy: Any, eos: int) -> OnPolicyPlan:
    p = on_policy
    return OnPolicyPlan(p.steps, p.lambda_, p.beta, p.refresh_every, p.lr, p.eval_prompts, p.generators, p.teachers,
                        p.actor_cpus, p.actor_gpus, Sampling(p.temperature, p.top_p, p.max_new_tokens, eos),
                        p.keep_rollouts)


# ---------------------------------------------------------------- prompts


def prompts_of(x: Tensor, y: Tensor, eos: int) -> list[Pair]:
    """Each row's prompt (its tokens up to the first target's position: what predicts the first answer token)
    and its reference answer (the first run of target tokens, up to its first EOS, as a generation stops);
    rows without a target are left out."""
    out = []
    for xi, yi in zip(x.tolist(), y.tolist(), strict=True):
        t0 = next((t for t, v in enumerate(yi) if v >= 0), None)
        if t0 is None or t0 == 0:
            continue
        end = t0
        while end < len(yi) and yi[end] >= 0 and (end == t0 or yi[end - 1] != eos):
            end += 1
        out.append((xi[:t0 + 1], yi[t0:end]))
    return out


# ---------------------------------------------------------------- generation and scoring


def sample(lm: nn.Module, prompts: list[list[int]], s: Sampling, seed: int, positions: int,
           device: torch.device | None = None) -> list[list[int]]:
    """Completions of `prompts` by `lm` (a CausalLM): one batch, left-padded with an attention mask (transformers
    derives each row's positions from it), transformers' `generate` with its KV cache; each answer cut after its
    first EOS (kept: it ends the answer). Prompts and answers fit in `positions` (longer prompts keep their end)."""
    torch.manual_seed(seed)
    if not prompts:
        return []
    width = min(max(len(p) for p in prompts), positions - 1)
    n = min(s.max_new_tokens, positions - width)
    rows = [p[-width:] for p in prompts]
    pad = max(s.eos, 0)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], dtype=torch.long)
    options: dict[str, Any] = {"do_sample": s.temperature > 0, "use_cache": True, "max_new_tokens": n,
                               "eos_token_id": s.eos, "pad_token_id": pad}
    if s.temperature > 0:
        options.update(temperature=s.temperature, top_p=s.top_p, top_k=0)
    with torch.inference_mode():
        gen = lm.lm.generate(ids.to(device or "cpu"), attention_mask=mask.to(device or "cpu"), **options)
    out = []
    for row in gen[:, width:].tolist():
        out.append(row[:row.index(s.eos) + 1] if s.eos in row else row)
    return out


def completion_logits(model: nn.Module, pairs: list[Pair], eos: int, device: torch.device) -> Tensor:
    """The model's logits at every completion token's position, [tokens, V] in order (pairs right-padded with
    EOS into one batch: a causal model's earlier positions never see the padding)."""
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), eos, dtype=torch.long)
    rows, cols = [], []
    for b, (p, c) in enumerate(pairs):
        ids[b, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        rows += [b] * len(c)
        cols += range(len(p) - 1, len(p) - 1 + len(c))
    logits = model(ids.to(device)).float()
    return logits[torch.tensor(rows, dtype=torch.long, device=logits.device),
                  torch.tensor(cols, dtype=torch.long, device=logits.device)]


def actor_device() -> torch.device:
    """The GPU Ray gave this actor (on_policy.actor_gpus), else the CPU."""
    import ray

    return torch.device("cuda") if torch.cuda.is_available() and ray.get_gpu_ids() else torch.device("cpu")


class Generator:
    """A generator actor: the student's architecture built once; the weights of a version loaded when a call
    brings a newer one (by object reference: `state` is [ref], fetched only then)."""

    def __init__(self, model: str, params: dict[str, Any], dims: dict[str, Any], threads: int) -> None:
        from tasks.kinds.causal_lm.hf import quiet_transformers
        from tasks.kinds.causal_lm.models import build_lm

        torch.set_num_threads(threads)
        quiet_transformers()
        self.device = actor_device()
        self.lm = build_lm(model, params, dims).eval().to(self.device)
        self.positions = int(dims["seq_len"])
        self.version: int | None = None

    def generate(self, version: int, state: list[Any], prompts: list[list[int]], sampling: Sampling,
                 seed: int) -> dict[str, Any]:
        if version != self.version:
            import ray

            self.lm.load_state_dict(ray.get(state[0]))
            self.version = version
        t0 = time.perf_counter()
        completions = sample(self.lm, prompts, sampling, seed, self.positions, self.device)
        return {"version": self.version, "completions": completions, "seconds": time.perf_counter() - t0,
                "tokens": sum(len(c) for c in completions)}


class Scorer:
    """A teacher actor: the teachers loaded once (their recipe and weights on storage, as an online teacher's);
    `score` gives the (ensembled) teacher's log-probabilities over the vocabulary at every completion token."""

    def __init__(self, storage: Any, paths: list[str], rule: str, dims: dict[str, Any], eos: int,
                 threads: int) -> None:
        from tasks.kinds.causal_lm.models import build_lm

        torch.set_num_threads(threads)
        self.device = actor_device()
        self.teachers = []
        for path in paths:
            saved = storage.read_torch(path)
            model = build_lm(saved["model"], saved["params"], dims)
            model.load_state_dict(saved["state_dict"])
            self.teachers.append(model.eval().to(self.device))
        self.rule, self.eos = rule, eos

    def score(self, pairs: list[Pair]) -> dict[str, Any]:
        from tasks.models import ensemble

        t0 = time.perf_counter()
        with torch.inference_mode():
            outs = [completion_logits(t, pairs, self.eos, self.device) for t in self.teachers]
            logp = torch.log_softmax(ensemble(outs, self.rule), dim=-1).cpu()
        return {"logp": logp, "seconds": time.perf_counter() - t0, "tokens": int(logp.shape[0])}


@dataclass
class Rollouts:
    """Completions of one refresh with the teacher's log-probabilities [tokens, V], and what they cost."""

    version: int
    pairs: list[Pair]
    teacher: list[Tensor]  # per pair, [len(completion), V]
    gen_tokens_per_s: float
    score_tokens_per_s: float


def split(items: list[Any], parts: int) -> list[list[Any]]:
    step = -(-len(items) // max(1, parts))
    return [items[i:i + step] for i in range(0, len(items), step)] or [[]]


class Pools:
    """The rank's generator and teacher pools."""

    def __init__(self, plan: OnPolicyPlan, cfg: Any) -> None:
        options = {"num_cpus": plan.actor_cpus, "num_gpus": plan.actor_gpus}
        threads = max(1, int(plan.actor_cpus))
        online = cfg.online_teacher
        self.gen = ActorPool(Generator, plan.generators, (cfg.model, cfg.params, cfg.dims, threads), options)
        self.teach = ActorPool(Scorer, plan.teachers, (online.storage, online.paths, online.rule, cfg.dims,
                                                       plan.sampling.eos, threads), options)

    def rollouts(self, version: int, state: Any, prompts: list[list[int]], s: Sampling, seed: int) -> Rollouts:
        chunks = split(prompts, len(self.gen.actors))
        made = self.gen.map("generate", [(version, [state], c, s, seed + i) for i, c in enumerate(chunks)])
        if any(m["version"] != version for m in made):
            raise RuntimeError(f"a generator answered with weights {[m['version'] for m in made]}, not {version}")
        pairs = [(p, c) for chunk, m in zip(chunks, made, strict=True) for p, c in zip(chunk, m["completions"],
                                                                                      strict=True)]
        keep = [i for i, (_, c) in enumerate(pairs) if c]
        pairs = [pairs[i] for i in keep]
        scored = self.teach.map("score", [(part,) for part in split(pairs, len(self.teach.actors))]) if pairs else []
        teacher = []
        for part, sc in zip(split(pairs, len(self.teach.actors)), scored, strict=False):
            teacher += list(torch.split(sc["logp"], [len(c) for _, c in part]))
        gen_s = max(m["seconds"] for m in made)
        score_s = max((sc["seconds"] for sc in scored), default=0.0)
        return Rollouts(version, pairs, teacher, sum(m["tokens"] for m in made) / max(gen_s, 1e-9),
                        sum(sc["tokens"] for sc in scored) / max(score_s, 1e-9))

    def close(self) -> None:
        self.gen.close()
        self.teach.close()


# ---------------------------------------------------------------- stored rollouts


def rollout_key(state: dict[str, Tensor], prompts: list[list[int]], s: Sampling, seed: int,
                teachers: list[str]) -> str:
    """What a refresh's rollouts and scores are a function of: the student's weights (their bytes), the prompts,
    the sampling settings and seed, and the teachers (their stored files, named by their weights' digest)."""
    h = hashlib.sha256(b"on-policy-rollouts-v1")
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    h.update(json.dumps([prompts, dataclasses.asdict(s), seed, sorted(teachers)]).encode())
    return h.hexdigest()[:32]


def stored_rollouts(storage: Any, key: str, make: Callable[[], Rollouts]) -> tuple[Rollouts, bool]:
    """The rollouts stored under `key`, else `make()`'s, stored there; and whether they were reused."""
    from tasks.layout import rollouts_path

    path = rollouts_path(storage, key)
    if storage.exists(path):
        saved = storage.read_torch(path)
        return Rollouts(saved["version"], saved["pairs"], list(saved["teacher"]), saved["gen_tokens_per_s"],
                        saved["score_tokens_per_s"]), True
    r = make()
    storage.write_torch(path, {"version": r.version, "pairs": r.pairs, "teacher": r.teacher,
                               "gen_tokens_per_s": r.gen_tokens_per_s, "score_tokens_per_s": r.score_tokens_per_s})
    return r, False


# ---------------------------------------------------------------- the student's side


def on_policy_loss(model: nn.Module, pairs: list[Pair], teacher: list[Tensor], beta: float, eos: int,
                   device: torch.device) -> Tensor:
    """GKD's generalized JSD(beta) per completion token over the full vocabulary, summed over this step's tokens
    on every worker and divided by their number (beta 1: the reverse KL(student || teacher))."""
    from tasks.kinds.causal_lm.objective import global_tokens

    s = completion_logits(model, pairs, eos, device)
    t = torch.cat(teacher).to(device)
    per = generalized_jsd(s, t, 1.0, beta)
    tokens, scale = global_tokens(torch.ones(per.shape[0], device=device))
    return scale * per.sum() / tokens.clamp(min=1.0)


@torch.no_grad()
def judge(model: nn.Module, r: Rollouts, refs: list[list[int]], eos: int, device: torch.device) -> dict[str, float]:
    """The held-out samples' mean per-token reverse KL to the teacher (exact, over the vocabulary), the teacher's
    NLL of the sampled tokens, and exact match of the completion with the reference answer."""
    was = model.training
    model.eval()
    s = torch.log_softmax(completion_logits(model, r.pairs, eos, device), dim=-1) if r.pairs else None
    model.train(was)
    if s is None:
        return {"reverse_kl": float("nan"), "teacher_nll": float("nan"), "exact_match": 0.0}
    t = torch.cat(r.teacher).to(device)
    rkl = generalized_jsd(s, t, 1.0, 1.0)
    ids = torch.tensor([tok for _, c in r.pairs for tok in c], dtype=torch.long, device=device)
    nll = -t.gather(1, ids[:, None]).squeeze(1)
    done = {tuple(p): c for p, c in r.pairs}
    exact = [done.get(tuple(p)) == ref for p, ref in refs]  # type: ignore[arg-type]
    return {"reverse_kl": float(rkl.mean()), "teacher_nll": float(nll.mean()),
            "exact_match": float(np.mean(exact)) if exact else 0.0}


@dataclass
class Snapshot:
    """The student's weights at one refresh (`version`: the optimizer step), on the CPU; put in Ray's object store
    (what generators load a new version from) only when a generator needs them."""

    version: int
    state: dict[str, Tensor]
    _ref: Any = None

    @classmethod
    def of(cls, model: nn.Module, version: int) -> Snapshot:
        return cls(version, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})

    def ref(self) -> Any:
        if self._ref is None:
            import ray

            self._ref = ray.put(self.state)
        return self._ref


@dataclass
class Stage:
    """One worker's on-policy stage: its prompts, pools, rollouts and records."""

    w: Any  # tasks.train.loop.Worker
    plan: OnPolicyPlan
    prompts: list[Pair]
    held: list[Pair]
    rng: np.random.Generator
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    pools: Pools | None = None  # started when a refresh's rollouts are not stored already
    reused: int = 0  # refreshes' rollouts read back from storage

    def rollouts(self, snap: Snapshot, prompts: list[list[int]], seed: int) -> Rollouts:
        """Rollouts of `prompts` by the weights `snap` and the teacher's scores: stored ones when `keep_rollouts`
        finds them, else generated and scored by the actor pools (and stored)."""
        def make() -> Rollouts:
            if self.pools is None:
                self.pools = Pools(self.plan, self.w.cfg)
            return self.pools.rollouts(snap.version, snap.ref(), prompts, self.plan.sampling, seed)

        if not self.plan.keep_rollouts:
            return make()
        online = self.w.cfg.online_teacher
        key = rollout_key(snap.state, prompts, self.plan.sampling, seed, list(online.paths))
        r, reused = stored_rollouts(online.storage, key, make)
        self.reused += int(reused)
        return r

    def refresh(self, step: int) -> Rollouts:
        """New rollouts of training prompts from the newest weights; rank 0 judges held-out prompts with them."""
        w, plan = self.w, self.plan
        snap = Snapshot.of(w.core, step)
        picks = self.rng.choice(len(self.prompts), size=plan.refresh_every * w.cfg.batch_size)
        seed = w.cfg.seed * 1_000_003 + step * 101 + w.rank
        batch = self.rollouts(snap, [self.prompts[i][0] for i in picks], seed)
        if w.rank == 0 and self.held:
            self.record(snap, seed)
        return batch

    def record(self, snap: Snapshot, seed: int) -> None:
        w, step = self.w, snap.version
        r = self.rollouts(snap, [p for p, _ in self.held], seed + 7)
        m = judge(w.core, r, self.held, self.plan.sampling.eos, w.device)
        refs = {tuple(p): ref for p, ref in self.held}
        numbers = {**m, "gen_tokens_per_s": r.gen_tokens_per_s, "score_tokens_per_s": r.score_tokens_per_s,
                   "rollouts_reused": float(self.reused),
                   **({"train_loss": float(np.mean(self.losses))} if self.losses else {})}
        rec: dict[str, Any] = {"step": step, "on_policy_weights_version": r.version,
                               **{f"on_policy_{k}": v for k, v in numbers.items()},
                               "samples": [{"prompt": p, "completion": c, "reference": refs[tuple(p)]}
                                           for p, c in r.pairs[:SAMPLES_PER_REFRESH]]}
        self.losses = []
        self.records.append(rec)
        w.log(f"on-policy step {step}/{self.plan.steps}: reverse KL {m['reverse_kl']:.4f} teacher NLL "
              f"{m['teacher_nll']:.4f} exact match {m['exact_match']:.3f} ({r.gen_tokens_per_s:,.0f} generated, "
              f"{r.score_tokens_per_s:,.0f} scored tokens/s)")

    def step(self, batch: Rollouts, k: int) -> None:
        """One optimizer step: on the student's samples (a share `lambda` of the steps), else an offline batch."""
        w, plan, cfg = self.w, self.plan, self.w.cfg
        w.model.train()
        w.opt.zero_grad(set_to_none=True)
        part = slice(k * cfg.batch_size, (k + 1) * cfg.batch_size)
        if self.rng.random() < plan.lambda_ and batch.pairs[part]:
            loss = on_policy_loss(w.model, batch.pairs[part], batch.teacher[part], plan.beta, plan.sampling.eos,
                                  w.device)
        else:
            from tasks.kinds.causal_lm.objective import objective

            idx = torch.as_tensor(self.rng.integers(len(w.share), size=cfg.batch_size))
            x, y, t = w.share.batch(idx.to(w.share.rows_device))
            loss, _ = objective(w.model(x), y, t, cfg.loss)
        loss.backward()
        if cfg.optimizer.grad_clip is not None:
            nn.utils.clip_grad_norm_(w.model.parameters(), cfg.optimizer.grad_clip)
        w.opt.step()
        self.losses.append(float(loss.detach()))


def run_on_policy(w: Any, plan: OnPolicyPlan) -> list[dict[str, Any]]:
    """The on-policy stage on worker `w` (after its offline epochs); the records of its refreshes."""
    eos = plan.sampling.eos
    prompts = prompts_of(w.share.x, w.share.y, eos)
    if not prompts:
        raise UserError("on_policy needs prompts: the data's rows have no prompt part (use prompt/completion "
                        "columns or conversations)", where="distill.mode")
    held = prompts_of(w.val_rows.x, w.val_rows.y, eos)[:plan.eval_prompts] if w.val_rows is not None else []
    for group in w.opt.param_groups:  # a constant rate: the offline schedule may have decayed to 0
        group["lr"] = plan.lr or w.cfg.optimizer.lr
    stage = Stage(w, plan, prompts, held, np.random.default_rng(w.cfg.seed + 17))
    try:
        batch = None
        for step in range(plan.steps):
            if step % plan.refresh_every == 0:
                batch = stage.refresh(step)
            assert batch is not None
            stage.step(batch, step % plan.refresh_every)
        if w.rank == 0 and held:
            stage.record(Snapshot.of(w.core, plan.steps), w.cfg.seed + plan.steps)
    finally:
        if stage.pools is not None:
            stage.pools.close()
    return stage.records
