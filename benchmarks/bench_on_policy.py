"""On-policy distillation against offline KD at equal student optimizer steps (docs/on-policy.md).

Three runs of workflows/on-policy-arithmetic.yaml (generated sums as chat), sharing one trained teacher and one
store entry of soft targets:

    offline      train.epochs = E, offline KD only                       (E x S steps)
    offline+op   train.epochs = E/2, then E/2 x S on-policy steps         (E x S steps)
    on-policy    train.epochs = 0, E x S on-policy steps                  (E x S steps)

(S: optimizer steps per epoch.) Each registered student is judged on the test split's prompts: exact match of
its greedy answer with the reference, and the mean per-token reverse KL(student || teacher) over the
vocabulary on its own samples (temperature 1), as the stage's tracking computes it; wall time is the run's.
Then generation tokens/s of the stage's generator (`sample`: one left-padded batch, KV cache, its answers cut
at EOS) against a plain transformers `generate` on the same left-padded batch.

    .venv/bin/python benchmarks/bench_on_policy.py --conversations 600 --epochs 4 --teacher-epochs 8

Small by default: it runs in minutes on a shared 2-core machine (one seed; RESULTS-on-policy.md says what was
run).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def workflow(args: argparse.Namespace, root: Path, name: str, epochs: int, steps: int | None) -> dict[str, Any]:
    raw = yaml.safe_load((REPO / "workflows" / "on-policy-arithmetic.yaml").read_text())
    raw = copy.deepcopy(raw)
    raw.update(name=f"bench-{name}", seed=args.seed)
    raw["storage"] = {"root": str(root / ".kdflow")}
    raw["tracking"] = {"uri": None, "experiment": "bench-on-policy"}
    raw["data"]["corpus"] = {"conversations": args.conversations}
    raw["teacher"]["train"]["epochs"] = args.teacher_epochs
    raw["train"]["epochs"] = epochs
    raw["registry"] = {"model": f"bench-{name}"}
    raw["distill"].pop("on_policy")
    if steps:
        raw["distill"].update(mode="on_policy", on_policy={
            "steps": steps, "lambda": 1.0, "beta": 1.0, "temperature": 1.0, "max_new_tokens": 6,
            "refresh_every": args.refresh_every, "eval_prompts": 16})
    else:
        raw["distill"]["mode"] = "offline"
    return raw


def judge(result: dict[str, Any], root: Path) -> dict[str, float]:
    """Greedy exact match on the test prompts, and the reverse KL to the teacher on the student's own samples."""
    from tasks.kinds.causal_lm.models import build_lm
    from tasks.kinds.causal_lm.on_policy import Sampling, completion_logits, prompts_of, sample
    from tasks.layout import online_teacher_path
    from tasks.losses import generalized_jsd
    from tasks.storage import Storage
    from tasks.store.store import SoftTargetStore

    storage = Storage(str(root / ".kdflow"))
    store = SoftTargetStore(storage)
    manifest = store.manifest(result["soft_targets"]["cache_key"])
    dims = {"vocab_size": int(manifest["vocab_size"]), "seq_len": int(manifest["seq_len"])}
    eos = int(manifest.get("eos_id", 0))
    test = store.read(manifest, "test")
    held = prompts_of(test.x, test.y, eos)
    reg = result["registry"]
    student = build_lm(f"models:/{reg['model']}/{reg['version']}", {}, dims).eval()
    # written by the on-policy runs' teacher stage (the offline run is judged after them)
    saved = storage.read_torch(online_teacher_path(storage, manifest["teachers"][0]["digest"]))
    teacher = build_lm(saved["model"], saved["params"], dims)
    teacher.load_state_dict(saved["state_dict"])
    teacher.eval()
    out = {}
    for who, model in (("student", student), ("teacher", teacher)):
        greedy = sample(model, [p for p, _ in held], Sampling(0.0, 1.0, 6, eos), 0, dims["seq_len"])
        out[f"{who}_exact_match"] = sum(g == r for g, (_, r) in zip(greedy, held, strict=True)) / len(held)
    own = sample(student, [p for p, _ in held], Sampling(1.0, 1.0, 6, eos), 1, dims["seq_len"])
    pairs = [(p, c) for (p, _), c in zip(held, own, strict=True) if c]
    with torch.no_grad():
        s = torch.log_softmax(completion_logits(student, pairs, eos, torch.device("cpu")), -1)
        t = torch.log_softmax(completion_logits(teacher, pairs, eos, torch.device("cpu")), -1)
    out["reverse_kl_own_samples"] = float(generalized_jsd(s, t, 1.0, 1.0).mean())
    out["test_prompts"] = len(held)
    out["_student"], out["_held"], out["_eos"] = student, held, eos  # type: ignore[assignment]
    return out


def generation_speed(student: Any, prompts: list[list[int]], eos: int, positions: int) -> dict[str, float]:
    """The stage's `sample` (one left-padded batch, KV cache) against a plain left-padded transformers `generate`
    on the same prompts, both at temperature 1 for the same number of new tokens (EOS never stops either)."""
    from tasks.kinds.causal_lm.on_policy import Sampling, sample

    n = 6
    s = Sampling(1.0, 1.0, n, -1)  # no EOS: both write exactly n tokens per prompt
    best: dict[str, float] = {"ours": math.inf, "plain": math.inf}
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    for _ in range(3):
        t0 = time.perf_counter()
        sample(student, prompts, s, 0, positions)
        best["ours"] = min(best["ours"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            student.lm.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                max_new_tokens=n, min_new_tokens=n, pad_token_id=eos, use_cache=True)
        best["plain"] = min(best["plain"], time.perf_counter() - t0)
    tokens = n * len(prompts)
    return {"ours_tokens_per_s": tokens / best["ours"], "plain_generate_tokens_per_s": tokens / best["plain"],
            "ratio": best["plain"] / best["ours"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=4, help="E: the offline-only run's epochs (even)")
    ap.add_argument("--teacher-epochs", type=int, default=8)
    ap.add_argument("--refresh-every", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--root", default=None, help="storage root to use (a previous run's: its teacher and targets reused)")
    args = ap.parse_args()

    from orchestrator.pipeline import run_workflow
    from orchestrator.spec import validate

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="bench-on-policy-"))
    rows: dict[str, dict[str, Any]] = {}
    results: dict[str, dict[str, Any]] = {}
    spe = None
    for name, epochs in (("offline", args.epochs), ("offline+op", args.epochs // 2), ("on-policy", 0)):
        steps = (args.epochs - epochs) * spe if spe else None  # the offline-only run's steps, all told
        t0 = time.perf_counter()
        result = run_workflow(validate(workflow(args, root, name.replace("+", "-"), epochs, steps)))
        wall = time.perf_counter() - t0
        if spe is None:
            from tasks.storage import Storage
            from tasks.store.store import SoftTargetStore

            manifest = SoftTargetStore(Storage(str(root / ".kdflow"))).manifest(result["soft_targets"]["cache_key"])
            train_rows = int(manifest["splits"]["train"]["rows"])
            spe = math.ceil(train_rows / 32)
        offline_steps = epochs * spe
        rows[name] = {"offline_steps": offline_steps, "on_policy_steps": steps or 0, "wall_s": round(wall, 1),
                      "student_stage_s": result["stages"].get("student")}
        results[name] = result
    for name, result in results.items():
        rows[name].update(judge(result, root))
        print(f"{name}: {json.dumps({k: v for k, v in rows[name].items() if not k.startswith('_')})}",
              file=sys.stderr)
    last = rows["on-policy"]
    speed = generation_speed(last["_student"], [p for p, _ in last["_held"]], last["_eos"], 80)
    clean = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in rows.items()}
    print("| run | offline steps | on-policy steps | exact match (greedy, test) | reverse KL on own samples | wall s |")
    print("|---|---|---|---|---|---|")
    for name, r in clean.items():
        print(f"| {name} | {r['offline_steps']} | {r['on_policy_steps']} | {r['student_exact_match']:.3f} | "
              f"{r['reverse_kl_own_samples']:.4f} | {r['wall_s']} |")
    print(f"\nteacher exact match (greedy, test): {clean['offline']['teacher_exact_match']:.3f} on "
          f"{clean['offline']['test_prompts']} prompts")
    print(f"generation: {speed['ours_tokens_per_s']:,.0f} tokens/s (stage's sample) vs "
          f"{speed['plain_generate_tokens_per_s']:,.0f} (plain generate, one left-padded batch): "
          f"ratio {speed['ratio']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": clean, "generation": speed, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
