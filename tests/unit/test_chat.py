"""Chat models: conversations rendered with a chat template (a tokenizer directory's, or the workflow's), the
loss and stored targets on the assistant's tokens only, bad conversations named by row and key, and the
request forms the served model reads (prompts, a `prompt` column, conversations) with generation through
the KV cache. Models are a few thousand parameters; no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tasks.errors import UserError
from tasks.kinds.causal_lm import CausalLM
from tasks.kinds.causal_lm.data import EOS, load_lm_data, save_tokenizer_dir, train_bpe
from tasks.kinds.causal_lm.generation import BadRequest, GenerationParams, Prompt, generate_one, read_request
from tasks.kinds.causal_lm.spec import CausalLMData

# A ChatML-like template: each turn's header, its content, EOS; the generation prompt opens the assistant's.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}" + EOS + "\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def arithmetic(n: int, seed: int = 0, system: bool = True) -> list[list[dict[str, str]]]:
    """Conversations with verifiable answers: one or two user questions, each answered."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b, c = (int(v) for v in rng.integers(0, 50, 3))
        turns = [{"role": "system", "content": "Answer with the number."}] if system and i % 2 else []
        turns += [{"role": "user", "content": f"{a} + {b} = ?"}, {"role": "assistant", "content": str(a + b)}]
        if i % 3 == 0:
            turns += [{"role": "user", "content": f"and + {c}?"}, {"role": "assistant", "content": str(a + b + c)}]
        out.append(turns)
    return out


def write_chat(path: Path, convs: list, column: str = "messages") -> str:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({column: c}) + "\n" for c in convs))
    else:
        pq.write_table(pa.table({column: convs}), path)
    return str(path)


def tokenizer_dir(folder: Path, template: str | None = TEMPLATE) -> str:
    """A tokenizer directory as transformers saves one (tokenizer.json, tokenizer_config.json with the
    template), built offline."""
    texts = [f"<|user|>\n{a} + {b} = ?\n<|assistant|>\n{a + b}\n" for a in range(30) for b in range(0, 30, 7)]
    save_tokenizer_dir(train_bpe(texts, 300), folder, template)
    return str(folder)


def chat_data(tmp_path: Path, **keys: object) -> CausalLMData:
    opts = {"source": write_chat(tmp_path / "chat.parquet", arithmetic(20)), "seq_len": 96,
            "tokenizer": {"path": tokenizer_dir(tmp_path / "tok")}, "split": {"val": 0.2, "test": 0.2}, **keys}
    return CausalLMData(**opts)


def assistant_tokens(fast: object, convs: list) -> int:
    """How many tokens the assistant says in these conversations, counted from its contents and the EOS that
    closes each of its turns (plus the newline after it)."""
    n = 0
    for conv in convs:
        for m in conv:
            if m["role"] == "assistant":
                n += len(fast(m["content"] + EOS + "\n", add_special_tokens=False).input_ids)
    return n


def test_only_assistant_tokens_are_targets_and_the_template_enters_the_key(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    data = chat_data(tmp_path, split={"val": 0.1, "test": 0.1})
    rows = load_lm_data(data, seed=0, storage=None)
    assert rows.chat_template == TEMPLATE and sum(rows.documents.values()) == 20
    fast = PreTrainedTokenizerFast.from_pretrained(data.tokenizer.path)
    convs = arithmetic(20)
    targets = sum(int((y >= 0).sum()) for y in rows.y.values())
    assert targets == assistant_tokens(fast, convs)  # every assistant token, and nothing else
    for name in ("train", "val", "test"):  # each target is the assistant's text, never a header or the user's
        for x, y in zip(rows.x[name], rows.y[name], strict=True):
            said = fast.decode([int(t) for t in y if t >= 0])
            assert set(said.replace(EOS, "")) <= set("0123456789\n"), said
            assert x[0] != rows.tokenizer.token_to_id(EOS)  # one conversation per row, from its start
    meta = CausalLM().manifest_meta(rows)
    assert meta["chat_template"] and meta["tokens"]["train"] == int((rows.y["train"] >= 0).sum())
    summary = CausalLM().targets_summary({**meta, "bytes": 1000 * targets, "rows": 20})
    assert summary["bytes_per_target_token"] == 1000 and summary["bytes_per_token"] == 1000 * targets / (20 * 96)

    other = load_lm_data(chat_data(tmp_path, chat_template=TEMPLATE.replace("|>\n", "|> ")), seed=0, storage=None)
    assert other.fingerprint != rows.fingerprint  # another template, another store key
    assert load_lm_data(data, seed=0, storage=None).fingerprint == rows.fingerprint


def test_jsonl_conversations_with_a_template_from_the_workflow_and_a_trained_bpe(tmp_path: Path) -> None:
    from tasks.storage import Storage

    storage = Storage(str(tmp_path / "store"))
    opts = {"source": write_chat(tmp_path / "c.jsonl", arithmetic(12), column="conv"), "messages": "conv",
            "chat_template": TEMPLATE, "seq_len": 96, "tokenizer": {"vocab_size": 300}}
    rows = load_lm_data(CausalLMData(**opts), seed=0, storage=storage)
    assert rows.chat_template == TEMPLATE and int((rows.y["train"] >= 0).sum()) > 0
    assert storage.ls(storage.path("tokenizers"))  # the BPE learned the rendered text and is kept
    with pytest.raises(UserError, match="no chat template") as exc:
        load_lm_data(CausalLMData(**{**opts, "chat_template": None}), seed=0, storage=None)
    assert exc.value.where == "chat_template"


def test_bad_conversations_name_the_row_and_key_and_write_nothing(tmp_path: Path) -> None:
    from tasks.storage import Storage

    good = arithmetic(10)
    no_answer = [*good[:4], [{"role": "user", "content": "hi"}], *good[4:]]
    bad_role = [*good[:6], [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}], *good[6:]]
    long = [*good[:2], [{"role": "user", "content": "1 + 2 = ? " * 60}, {"role": "assistant", "content": "3"}],
            *good[2:]]
    cases = [(no_answer, {}, "messages", "row 4: no assistant turn"),
             (bad_role, {}, "messages", "row 6, message 1: unknown role 'bot'"),
             (long, {}, "truncation", "row 2: the conversation is"),
             (good, {"tokenizer": {"path": tokenizer_dir(tmp_path / "bare", None)}}, "chat_template", "no chat template")]
    for i, (convs, keys, where, says) in enumerate(cases):
        root = tmp_path / f"store{i}"
        opts = {"source": write_chat(tmp_path / f"bad{i}.parquet", convs), "seq_len": 96,
                "tokenizer": {"vocab_size": 300}, "chat_template": TEMPLATE, **keys}
        if "tokenizer" in keys:
            opts.pop("chat_template")
        with pytest.raises(UserError, match=says.replace("(", r"\(")) as exc:
            load_lm_data(CausalLMData(**opts), seed=0, storage=Storage(str(root)))
        assert exc.value.where == where, (where, exc.value)
        assert not root.exists() or not any(p.is_file() for p in root.rglob("*")), says  # nothing written
    opts = {"source": str(tmp_path / "bad2.parquet"), "seq_len": 96, "tokenizer": {"vocab_size": 300},
            "chat_template": TEMPLATE}
    dropped = load_lm_data(CausalLMData(**opts, truncation="drop"), seed=0, storage=None)
    cut = load_lm_data(CausalLMData(**opts, truncation="truncate"), seed=0, storage=None)
    assert sum(dropped.documents.values()) == 11 and dropped.fingerprint != cut.fingerprint
    assert sum(len(y) for y in dropped.y.values()) == 10 and sum(len(y) for y in cut.y.values()) == 11


def test_a_workflows_bad_conversation_names_its_yaml_key(tmp_path: Path) -> None:
    """Through the driver's data stage, as `kdflow run` reports it (exit 2): the key under `data`."""
    from orchestrator.spec import validate
    from orchestrator.stages import load_data
    from tasks.storage import Storage
    from tests.unit.test_lm import lm_workflow

    convs = [*arithmetic(6), [{"role": "user", "content": "hi"}]]
    raw = lm_workflow(source=write_chat(tmp_path / "c.parquet", convs), chat_template=TEMPLATE, seq_len=96)
    with pytest.raises(UserError, match="row 6: no assistant turn") as exc:
        load_data(validate(raw), Storage(str(tmp_path / "store")))
    assert exc.value.where == "data.messages"
    with pytest.raises(UserError, match="conversations are read from one table") as exc:
        load_data(validate(lm_workflow(messages="messages")), Storage(str(tmp_path / "store")))
    assert exc.value.where == "data.messages"


def test_messages_and_text_keys_are_one_layout() -> None:
    with pytest.raises(ValueError, match="messages"):
        CausalLMData(source="x.parquet", messages="m", text="t")


# ---------------------------------------------------------------- what the served model reads


class Tok:
    """The tokenizer surface read_request needs: a chat template that transformers would apply."""

    def __init__(self, template: str | None) -> None:
        from transformers import PreTrainedTokenizerFast

        self.fast = PreTrainedTokenizerFast(tokenizer_object=train_bpe(["ab cd"], 260), eos_token=EOS)
        self.fast.chat_template = template
        self.chat_template = template

    def apply_chat_template(self, *args: object, **kw: object) -> str:
        return self.fast.apply_chat_template(*args, **kw)


def test_every_request_form_becomes_prompts() -> None:
    tok = Tok(TEMPLATE)
    chat = [{"role": "user", "content": "1 + 2 = ?"}]
    rendered = f"<|user|>\n1 + 2 = ?{EOS}\n<|assistant|>\n"
    assert read_request(["def main(", "x"], tok) == [Prompt("def main("), Prompt("x")]
    assert read_request("def main(", tok) == [Prompt("def main(")]
    assert read_request(pd.DataFrame({"prompt": ["a", "b"]}), tok) == [Prompt("a"), Prompt("b")]
    assert read_request(pd.DataFrame({0: ["a"]}), tok) == [Prompt("a")]
    assert read_request(np.array(["a"]), tok) == [Prompt("a")]
    assert read_request([chat, chat], tok) == [Prompt(rendered, chat=True)] * 2
    assert read_request(chat, tok) == [Prompt(rendered, chat=True)]
    assert read_request({"messages": chat}, tok) == [Prompt(rendered, chat=True)]
    assert read_request(pd.DataFrame({"messages": [chat]}), tok) == [Prompt(rendered, chat=True)]
    for bad, says in [([[{"role": "bot", "content": "x"}]], "unknown role"), (pd.DataFrame({"a": [1], "b": [2]}),
                      "'prompt'"), ({"x": 1}, "messages"), (3, "cannot read")]:
        with pytest.raises(BadRequest, match=says):
            read_request(bad, tok)
    with pytest.raises(BadRequest, match="no chat template"):
        read_request([chat], Tok(None))
    with pytest.raises(BadRequest, match="top_p"):
        GenerationParams.of({"top_p": 0})


def test_generation_uses_the_kv_cache_and_matches_a_plain_greedy_loop() -> None:
    from transformers import PreTrainedTokenizerFast

    from tasks.kinds.causal_lm.models import build_lm

    bpe = train_bpe(["def main(): return 1\n" * 5], 270)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)
    torch.manual_seed(0)
    lm = build_lm("llama", {"layers": 1, "width": 16, "heads": 2, "ffn": 32},
                  {"vocab_size": bpe.get_vocab_size(), "seq_len": 32}).lm.eval()
    lengths: list[int] = []
    lm.register_forward_pre_hook(lambda m, a, kw: lengths.append((kw.get("input_ids") if "input_ids" in kw
                                                                   else a[0]).shape[1]), with_kwargs=True)
    prompt = fast("def main(", add_special_tokens=False).input_ids
    new = generate_one(lm, fast, Prompt("def main("), GenerationParams(max_new_tokens=6))
    assert lengths == [len(prompt)] + [1] * 5  # after the prompt, one new token per step: the cache holds the rest
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):  # the same tokens without a cache, argmax by hand
            ids.append(int(lm(torch.tensor([ids])).logits[0, -1].argmax()))
    assert new == ids[len(prompt):]
    torch.manual_seed(1)
    sampled = generate_one(lm, fast, Prompt("def main("), GenerationParams(max_new_tokens=6, temperature=5.0))
    assert len(sampled) == 6 and sampled != new
