"""On-policy distillation on a local Ray: generator actors sample with exactly the weights of the version they
are sent (by object reference), a killed generator is replaced and its batch redone, and a tiny arithmetic
chat run goes end to end (offline KD, then on-policy steps), logging its refreshes to MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tasks.actors import ActorPool
from tasks.kinds.causal_lm.models import build_lm
from tasks.kinds.causal_lm.on_policy import Generator, Sampling, sample

DIMS = {"vocab_size": 40, "seq_len": 24}
PARAMS = {"layers": 1, "width": 16, "heads": 2, "ffn": 32}
GREEDY = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=6, eos=0)
PROMPTS = [[1, 2, 3], [4, 5, 6], [7, 8], [9, 10, 11, 12]]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def weights(seed: int, silent: bool = False) -> dict[str, torch.Tensor]:
    """A student's weights; `silent`: its output layer zeroed, so that it answers EOS (token 0) at once."""
    torch.manual_seed(seed)
    lm = build_lm("llama", PARAMS, DIMS)
    if silent:
        with torch.no_grad():
            lm.lm.lm_head.weight.zero_()
    return {k: v.clone() for k, v in lm.state_dict().items()}


def local(state: dict[str, torch.Tensor], prompts: list[list[int]]) -> list[list[int]]:
    lm = build_lm("llama", PARAMS, DIMS)
    lm.load_state_dict(state)
    return sample(lm.eval(), prompts, GREEDY, seed=0, positions=24)


def test_generators_sample_with_the_newest_weights_and_a_killed_one_is_replaced(ray_session: None) -> None:
    """One pool (an actor's start costs seconds): versions 1, 2, 3 of the weights, each answered with exactly those
    weights; then its actor is killed and the next batch is redone on a fresh one. Every CPU of the cluster is
    held meanwhile, as a search's trials can hold them: an actor with the default `actor_cpus` still starts
    (with 1 CPU each, the stage's actors waited for ever)."""
    import ray

    from tasks.kinds.causal_lm.spec import OnPolicySpec

    @ray.remote
    class Holder:
        def ready(self) -> bool:
            return True

    free = ray.available_resources().get("CPU", 0)
    holder = Holder.options(num_cpus=free).remote() if free else None
    if holder is not None:
        ray.get(holder.ready.remote(), timeout=120)
    pool = ActorPool(Generator, 1, ("llama", PARAMS, DIMS, 1), {"num_cpus": OnPolicySpec().actor_cpus})
    try:
        answers = []
        for version, silent in ((1, False), (2, True), (3, False)):
            state = weights(1, silent)
            [out] = pool.map("generate", [(version, [ray.put(state)], PROMPTS, GREEDY, 0)])
            assert out["version"] == version
            assert out["completions"] == local(state, PROMPTS)
            answers.append(out["completions"])
        assert answers[1] == [[0]] * len(PROMPTS) and answers[0] == answers[2] != answers[1]
        ray.kill(pool.actors[0], no_restart=True)
        state = weights(4)
        chunks = [PROMPTS[:2], PROMPTS[2:]]
        out = pool.map("generate", [(4, [ray.put(state)], c, GREEDY, 0) for c in chunks])
        assert pool.replaced == 1
        assert [m["completions"] for m in out] == [local(state, c) for c in chunks]
        assert [m["version"] for m in out] == [4, 4]
    finally:
        pool.close()
        if holder is not None:
            ray.kill(holder)


@pytest.mark.slow
def test_a_tiny_on_policy_run_goes_end_to_end(ray_session: None, mlflow_server: str, workdir: Path) -> None:
    from mlflow import MlflowClient

    from orchestrator.pipeline import run_workflow
    from orchestrator.spec import validate

    raw = {"name": "t-on-policy", "task": "causal_lm", "seed": 0, "storage": {"root": str(workdir / ".kdflow")},
           "tracking": {"uri": mlflow_server, "experiment": "t-on-policy"},
           "data": {"source": "arithmetic-chat", "corpus": {"conversations": 60}, "split": {"val": 0.15, "test": 0.1},
                    "seq_len": 80, "tokenizer": {"vocab_size": 280}, "chat_template": TEMPLATE, "truncation": "drop"},
           "teacher": {"model": "llama", "params": {"layers": 1, "width": 32, "heads": 2, "ffn": 64},
                       "train": {"epochs": 1, "batch_size": 16}},
           "student": {"model": "llama", "params": {"layers": 1, "width": 16, "heads": 2, "ffn": 32}},
           "soft_targets": {"format": "topk", "top_k": 8, "shards": 1},
           "distill": {"temperature": 1.0, "alpha": 0.5, "mode": "on_policy",
                       "on_policy": {"steps": 3, "refresh_every": 2, "max_new_tokens": 4, "eval_prompts": 4,
                                     "actor_cpus": 0.5, "lambda": 0.7}},
           "train": {"epochs": 1, "batch_size": 8, "workers": 1}, "registry": {"model": "t-on-policy-student"}}
    result = run_workflow(validate(raw))
    steps = [r["step"] for r in result["after_epochs"]]
    assert steps == [0, 2, 3]  # each refresh, and after the last step
    assert all(r["on_policy_reverse_kl"] >= 0 and r["on_policy_teacher_nll"] > 0 for r in result["after_epochs"])
    assert [r["on_policy_weights_version"] for r in result["after_epochs"]] == [0, 2, 3]
    assert result["registry"]["version"] == 1
    # each refresh's training rollouts (steps 0, 2) and held-out ones (0, 2, 3) stored with the teacher's scores
    assert len(list((workdir / ".kdflow" / "rollouts").glob("*.pt"))) == 5
    assert result["after_epochs"][-1]["on_policy_rollouts_reused"] == 0
    client = MlflowClient(result["mlflow"]["tracking_uri"])
    run_id = result["mlflow"]["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "on_policy_reverse_kl")] == [0, 2, 3]
    assert client.get_metric_history(run_id, "on_policy_gen_tokens_per_s")[0].value > 0
    assert "after_epochs_samples.json" in [a.path for a in client.list_artifacts(run_id)]
