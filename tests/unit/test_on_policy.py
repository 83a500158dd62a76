"""On-policy distillation's pieces without Ray: its settings (bad keys exit 2 naming them), the prompts a row
gives, generation stopping at EOS, and the loss being GKD's per-token divergence on the student's samples."""

from __future__ import annotations

import pytest
import torch

from orchestrator.spec import validate
from tasks.errors import UserError
from tasks.kinds.causal_lm.models import build_lm
from tasks.kinds.causal_lm.on_policy import Sampling, completion_logits, on_policy_loss, prompts_of, sample
from tests.unit.test_lm import lm_workflow

DIMS = {"vocab_size": 40, "seq_len": 24}


def on_policy_workflow(**on_policy: object) -> dict:
    raw = lm_workflow(source="arithmetic-chat")
    raw["distill"].update(mode="on_policy", on_policy=on_policy)
    return raw


def test_on_policy_settings_are_read_and_bad_keys_are_named() -> None:
    spec = validate(on_policy_workflow(steps=3, refresh_every=2, **{"lambda": 0.25}))
    op = spec.distill.on_policy
    assert (op.steps, op.refresh_every, op.lambda_, op.beta) == (3, 2, 0.25, 1.0)
    assert spec.kind.teacher_in_loop(spec)
    plan = spec.kind.after_epochs(spec, {"eos_id": 5})
    assert plan.steps == 3 and plan.sampling.eos == 5 and plan.lambda_ == 0.25
    with pytest.raises(UserError, match=r"distill\.on_policy\.refresh_evry: unknown key"):
        validate(on_policy_workflow(refresh_evry=2))
    with pytest.raises(UserError, match=r"distill\.on_policy\.lambda"):
        validate(on_policy_workflow(**{"lambda": 1.5}))
    raw = lm_workflow(source="arithmetic-chat")
    raw["distill"]["on_policy"] = {"steps": 2}  # settings without the mode
    with pytest.raises(UserError, match="mode: on_policy"):
        validate(raw)
    offline = validate(lm_workflow(source="arithmetic-chat"))
    assert not offline.kind.teacher_in_loop(offline) and offline.kind.after_epochs(offline, {}) is None


def test_a_rows_prompt_ends_where_its_first_answer_begins() -> None:
    # row 0: tokens 10 11 12 | answer 13 14 EOS(0) then more targets after the EOS (the template's newline);
    # row 1: no target at all (left out)
    x = torch.tensor([[10, 11, 12, 13, 14, 0, 7, 9], [1, 2, 3, 4, 5, 6, 7, 8]])
    y = torch.tensor([[-1, -1, 13, 14, 0, 7, -1, -1], [-1] * 8])
    assert prompts_of(x, y, eos=0) == [([10, 11, 12], [13, 14, 0])]


def test_generation_is_batched_left_padded_and_stops_at_eos() -> None:
    torch.manual_seed(0)
    lm = build_lm("llama", {"layers": 1, "width": 16, "heads": 2, "ffn": 32}, DIMS).eval()
    prompts = [[1, 2, 3], [4, 5], [1, 2, 3]]
    greedy = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=5, eos=0)
    out = sample(lm, prompts, greedy, seed=0, positions=24)
    assert out[0] == out[2] and all(1 <= len(c) <= 5 for c in out)
    for p, c in zip(prompts, out, strict=True):  # each answer is the model's own greedy continuation
        ids = torch.tensor([p + c])
        pred = lm(ids)[0, len(p) - 1:-1].argmax(-1).tolist()
        assert pred == c
    # a model whose every logit is equal picks token 0 (EOS) greedily: each answer is that EOS alone
    with torch.no_grad():
        lm.lm.lm_head.weight.zero_()
    assert sample(lm, prompts, greedy, seed=0, positions=24) == [[0], [0], [0]]
    # sampled answers: as long as max_new_tokens at most, reproducible from the seed
    hot = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=4, eos=-1)
    lm2 = build_lm("llama", {"layers": 1, "width": 16, "heads": 2, "ffn": 32}, DIMS).eval()
    a, b = sample(lm2, prompts, hot, seed=3, positions=24), sample(lm2, prompts, hot, seed=3, positions=24)
    assert a == b and all(len(c) == 4 for c in a)


def test_the_loss_is_the_per_token_reverse_kl_on_the_samples_and_pulls_towards_the_teacher() -> None:
    torch.manual_seed(0)
    student = build_lm("gpt2", {"layers": 1, "width": 8, "heads": 2, "ffn": 16}, DIMS)
    teacher = build_lm("llama", {"layers": 1, "width": 16, "heads": 2, "ffn": 32}, DIMS).eval()
    pairs = [([1, 2, 3], [7, 8, 0]), ([4, 5], [9, 0])]
    with torch.no_grad():
        t = torch.log_softmax(completion_logits(teacher, pairs, 0, torch.device("cpu")), -1)
    teacher_parts = list(torch.split(t, [3, 2]))
    loss = on_policy_loss(student, pairs, teacher_parts, beta=1.0, eos=0, device=torch.device("cpu"))
    s = torch.log_softmax(completion_logits(student, pairs, 0, torch.device("cpu")), -1)
    exact = (s.exp() * (s - t)).sum(-1).mean()  # KL(student || teacher) per token, averaged over the 5 tokens
    assert torch.allclose(loss, exact, atol=1e-5)
    forward = on_policy_loss(student, pairs, teacher_parts, beta=0.0, eos=0, device=torch.device("cpu"))
    assert torch.allclose(forward, (t.exp() * (t - s)).sum(-1).mean(), atol=1e-5)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    before = float(loss.detach())
    for _ in range(5):
        opt.zero_grad()
        on_policy_loss(student, pairs, teacher_parts, beta=1.0, eos=0, device=torch.device("cpu")).backward()
        opt.step()
    assert float(on_policy_loss(student, pairs, teacher_parts, 1.0, 0, torch.device("cpu")).detach()) < before


def test_no_offline_epochs_only_with_the_on_policy_stage() -> None:
    raw = on_policy_workflow(steps=2)
    raw["train"] = {"epochs": 0}
    assert validate(raw).train.epochs == 0  # on-policy instead of offline KD
    offline = lm_workflow(source="arithmetic-chat")
    offline["train"] = {"epochs": 0}
    with pytest.raises(UserError, match=r"train\.epochs: 0 trains nothing"):
        validate(offline)
    raw["search"] = {"trials": 2, "space": {"distill.on_policy.lambda": {"type": "float", "low": 0.1, "high": 1.0}}}
    with pytest.raises(UserError, match=r"train\.epochs: 0 trains nothing a search can judge"):
        validate(raw)
    raw["train"] = {"epochs": 1}
    assert validate(raw).search.space["distill.on_policy.lambda"].high == 1.0  # searched as any other key


def test_rollouts_are_stored_by_weights_prompts_sampling_and_teachers_and_reused(tmp_path) -> None:
    from tasks.kinds.causal_lm.on_policy import Rollouts, rollout_key, stored_rollouts
    from tasks.storage import Storage

    storage = Storage(str(tmp_path))
    torch.manual_seed(0)
    state = build_lm("llama", {"layers": 1, "width": 16, "heads": 2, "ffn": 32}, DIMS).state_dict()
    s = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=4, eos=0)
    key = rollout_key(state, [[1, 2]], s, 7, ["teachers/online/abc.pt"])
    made = []

    def make() -> Rollouts:
        made.append(1)
        return Rollouts(3, [([1, 2], [5, 0])], [torch.randn(2, 40)], 100.0, 200.0)

    first, reused = stored_rollouts(storage, key, make)
    again, reused_again = stored_rollouts(storage, key, make)
    assert (reused, reused_again, len(made)) == (False, True, 1)  # generated and scored once
    assert again.pairs == first.pairs and again.version == 3 and torch.equal(again.teacher[0], first.teacher[0])
    # anything the rollouts depend on changes the key: the weights, the prompts, the sampling, the seed, the teachers
    changed = {k: v.clone() for k, v in state.items()}
    next(iter(changed.values())).view(-1)[0] += 1e-3
    others = [rollout_key(changed, [[1, 2]], s, 7, ["teachers/online/abc.pt"]),
              rollout_key(state, [[1, 3]], s, 7, ["teachers/online/abc.pt"]),
              rollout_key(state, [[1, 2]], Sampling(0.5, 1.0, 4, 0), 7, ["teachers/online/abc.pt"]),
              rollout_key(state, [[1, 2]], s, 8, ["teachers/online/abc.pt"]),
              rollout_key(state, [[1, 2]], s, 7, ["teachers/online/def.pt"])]
    assert len({key, *others}) == 6
