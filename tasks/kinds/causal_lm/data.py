"""Language-model data: documents read, split by document, tokenized and packed into fixed-length rows.

A row is `seq_len` input token ids (x) and `seq_len` next-token labels (y); a label of -1 is masked out of
every loss and metric: padding after the last document, and the prompt's tokens when the source gives
prompt/completion columns. Documents are split train/val/test by a seeded permutation *before* packing, so
no document straddles two splits. The tokenizer is a local directory (`tokenizer.json`) or a byte-level BPE
trained here on the training documents only and kept in the store beside the soft targets. The Dataset's
fingerprint covers the text, the split, the tokenizer's hash, seq_len and the packing scheme, so a change
to any of them is a new soft-target key.

Errors name the `data:` keys (`source`, `text`, `prompt`, `tokenizer.path`, ...); the orchestrator prefixes
them with `data`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.dataset import Dataset, read_table
from tasks.errors import UserError
from tasks.kinds.causal_lm.arithmetic import ARITHMETIC, arithmetic_table
from tasks.kinds.causal_lm.spec import CausalLMData, TokenizerSpec
from tasks.splits import Layout, SplitSource, resolve
from tasks.storage import S3_ERRORS, Storage, describe_s3_error, filesystem_for

STDLIB = "python-stdlib"
PACKING = "concat-eos-v1"  # documents joined with EOS, cut into seq_len + 1 windows, last one padded
EOS = "<|endoftext|>"
IGNORE = -1  # the label of a masked token (padding, prompt)


@dataclass
class Document:
    text: str
    prompt: str = ""  # tokens of the prompt are inputs, never targets


def stdlib_documents(max_bytes: int | None, max_files: int | None) -> list[Document]:
    """The running interpreter's standard-library .py sources (no tests, no site-packages), in a fixed order.

    Files are ordered by the hash of their relative path (not alphabetically, which would take only the
    a*.py modules), then taken until `max_files` or `max_bytes`; the same Python gives the same corpus.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(("site-packages", "dist-packages", "test/", "idlelib/idle_test", "lib2to3/tests")) or \
                "/tests/" in rel or "/test/" in rel:
            continue
        files.append(rel)
    files.sort(key=lambda r: hashlib.sha256(r.encode()).hexdigest())
    docs: list[Document] = []
    total = 0
    for rel in files:
        if max_files is not None and len(docs) >= max_files:
            break
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        if max_bytes is not None and total + len(text) > max_bytes:
            if docs:
                continue  # a smaller file further on may still fit
            text = text[:max_bytes]
        docs.append(Document(text))
        total += len(text)
    return docs


def _read_table(src: SplitSource, storage: Storage | None) -> Any:
    """A Parquet file/folder/glob, a JSON-lines file (local or s3://) or a save_to_disk split as a pyarrow Table."""
    import pyarrow as pa
    import pyarrow.json as pj

    source = src.uri
    if source.endswith((".jsonl", ".json", ".ndjson")):
        fs = filesystem_for(source, storage.s3_options() if storage is not None else {})
        path = source.removeprefix("s3://")
        try:
            if not fs.exists(path):
                raise UserError(f"no such file: {source}", where=src.where)
            with fs.open(path, "rb") as f:
                data = f.read()
            return pj.read_json(io.BytesIO(data))
        except (*S3_ERRORS, pa.ArrowException) as exc:
            raise UserError(f"cannot read JSON lines from {source}: {describe_s3_error(exc)}", where=src.where) from None
    return read_table(src, storage)


def table_documents(data: CausalLMData, storage: Storage | None, src: SplitSource, table: Any = None
                    ) -> list[Document]:
    table = table if table is not None else _read_table(src, storage)
    names = table.column_names

    def column(key: str) -> list[Any]:
        name = getattr(data, key) or ("text" if key == "text" else None)
        if name not in names:
            raise UserError(f"no column {name!r} in {src.uri} (columns: {', '.join(names)})", where=key)
        return table.column(name).to_pylist()

    if data.prompt or data.completion:
        if not (data.prompt and data.completion):
            raise UserError("prompt and completion are set together", where="prompt" if not data.prompt
                            else "completion")
        return [Document(str(c or ""), str(p or "")) for p, c in zip(column("prompt"), column("completion"),
                                                                      strict=True)]
    return [Document(str(t or "")) for t in column("text")]


def is_table(src: SplitSource) -> bool:
    """Whether a source names a table (a Parquet file, folder or glob, JSON lines, a save_to_disk split)."""
    source = src.uri
    return source.endswith((".parquet", ".jsonl", ".json", ".ndjson")) or "*" in source or \
        source.startswith("s3://") or os.path.isdir(source) or bool(src.arrow_files)


def read_documents(data: CausalLMData, storage: Storage | None, src: SplitSource | None = None, table: Any = None
                   ) -> list[Document]:
    """The corpus named by `source` (or one given split's, `src`; its `table` when read already), limited by
    `limit` documents; empty or whitespace-only text is refused."""
    src = src or SplitSource("", data.source)
    source = src.uri
    if source == STDLIB:
        docs = stdlib_documents(data.corpus.max_bytes, data.corpus.max_files)
    elif table is not None or is_table(src):
        docs = table_documents(data, storage, src, table)
    else:
        raise UserError(f"unknown LM source {source!r}: the built-in corpora are {STDLIB!r} and {ARITHMETIC!r} "
                        "(conversations), or a Parquet / JSON-lines file (local or s3://)", where=src.where)
    if data.limit:
        docs = docs[: data.limit]
    docs = [d for d in docs if (d.prompt + d.text).strip()]
    if not docs:
        key = "completion" if data.completion else "text"
        raise UserError(f"the corpus {source} holds no text (empty or whitespace only)", where=key)
    return docs


def split_documents(docs: list[Document], *, val: float, test: float, seed: int) -> dict[str, list[Document]]:
    n = len(docs)
    perm = np.random.default_rng(seed).permutation(n)
    n_test, n_val = max(1, round(n * test)) if test > 0 else 0, round(n * val)
    if val > 0:
        n_val = max(1, n_val)
    if n - n_test - n_val < 1:
        raise UserError(f"{n} documents are too few for this split", where="split")
    return {"test": [docs[i] for i in perm[:n_test]], "val": [docs[i] for i in perm[n_test:n_test + n_val]],
            "train": [docs[i] for i in perm[n_test + n_val:]]}


def single_table(data: CausalLMData, layout: Layout, storage: Storage | None) -> Any:
    """The one table a corpus without given splits is read from, read once (None for the built-in stdlib
    corpus, given splits, or a source that names no table)."""
    if layout.given or layout.table is None or data.source == STDLIB:
        return None
    if data.source == ARITHMETIC:
        return arithmetic_table(data.corpus.conversations)
    return _read_table(layout.table, storage) if is_table(layout.table) else None


def split_corpus(data: CausalLMData, seed: int, storage: Storage | None, layout: Layout, table: Any = None
                 ) -> dict[str, list[Document]]:
    """The documents of each split (tasks/splits.py's `layout`): a single corpus (its `table` when read
    already) is split by a seeded permutation of its documents; given splits keep theirs, and without a val
    split its documents are cut from the training split's by the val fraction."""
    if not layout.given:
        docs = read_documents(data, storage, layout.table, table)
        return split_documents(docs, val=data.split.val, test=data.split.test, seed=seed)
    parts = {k: read_documents(data, storage, src) for k, src in layout.sources.items()}
    if layout.carves_val:
        cut = split_documents(parts["train"], val=data.split.val, test=0.0, seed=seed)
        parts["train"], parts["val"] = cut["train"], cut["val"]
    return parts


# ---------------------------------------------------------------- tokenizer


def tokenizer_hash(tok: Any) -> str:
    """The tokenizer's identity for distillation: a hash of its token -> id map (special tokens included).

    Two models can share soft targets exactly when their ids mean the same tokens; a tokenizer re-saved by
    transformers (other post-processing, the same vocabulary) keeps its hash.
    """
    vocab = json.dumps(sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]))
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]


def train_bpe(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE over `texts` with one special token, EOS (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer_dir(path: str) -> Any:
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise UserError(f"no tokenizer.json in {path} (a tokenizer directory, e.g. save_pretrained output)",
                        where="tokenizer.path")
    return Tokenizer.from_file(str(file))


def _bpe_path(spec: TokenizerSpec, train_docs: list[Document], storage: Storage) -> str:
    """Where the BPE trained on these documents with this vocabulary is kept in the store."""
    h = hashlib.sha256(f"bpe-v1|{spec.vocab_size}|".encode())
    for d in train_docs:
        h.update(d.prompt.encode())
        h.update(b"\0")
        h.update(d.text.encode())
        h.update(b"\1")
    return storage.path("tokenizers", h.hexdigest()[:20], "tokenizer.json")


def get_tokenizer(spec: TokenizerSpec, train_docs: list[Document], storage: Storage | None, *, keep: bool = True
                  ) -> Any:
    """A local tokenizer directory, or a BPE trained on the training documents, cached in the store by
    (training text, vocab size) so reruns and searches reuse the very same one (`keep` False: the caller
    keeps it with `keep_tokenizer` once its rows are known to be good)."""
    if spec.path:
        return load_tokenizer_dir(spec.path)
    if storage is not None:
        path = _bpe_path(spec, train_docs, storage)
        if storage.exists(path):
            from tokenizers import Tokenizer

            return Tokenizer.from_str(storage.read_bytes(path).decode())
    tok = train_bpe([d.prompt + d.text for d in train_docs], spec.vocab_size)
    if keep:
        keep_tokenizer(spec, train_docs, tok, storage)
    return tok


def keep_tokenizer(spec: TokenizerSpec, train_docs: list[Document], tok: Any, storage: Storage | None) -> None:
    if storage is not None and not spec.path:
        path = _bpe_path(spec, train_docs, storage)
        if not storage.exists(path):
            storage.write_bytes(path, tok.to_str().encode())


# ---------------------------------------------------------------- packing


def pack(docs: list[Document], tok: Any, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [N, seq_len] and labels [N, seq_len]: documents joined, each followed by EOS, cut into
    windows of seq_len + 1 (x = window[:-1], y = window[1:]); prompt tokens and padding get label -1."""
    eos = tok.token_to_id(EOS)
    eos = 0 if eos is None else eos
    ids: list[int] = []
    keep: list[bool] = []  # whether this token may be a target
    prompts = [d.prompt for d in docs]
    texts = [d.text for d in docs]
    enc_p = tok.encode_batch(prompts) if any(prompts) else None
    enc_t = tok.encode_batch(texts)
    for i in range(len(docs)):
        p = enc_p[i].ids if enc_p is not None else []
        t = enc_t[i].ids
        ids.extend(p)
        keep.extend([False] * len(p))
        ids.extend(t)
        keep.extend([True] * len(t))
        ids.append(eos)
        keep.append(True)
    window = seq_len + 1
    n = max(1, int(np.ceil((len(ids) - 1) / seq_len)))
    total = n * seq_len + 1
    arr = np.full(total, eos, dtype=np.int64)
    ok = np.zeros(total, dtype=bool)
    arr[:len(ids)] = ids[:total]
    ok[:len(keep)] = keep[:total]
    x = np.lib.stride_tricks.sliding_window_view(arr, window)[::seq_len][:n]
    m = np.lib.stride_tricks.sliding_window_view(ok, window)[::seq_len][:n]
    y = np.where(m[:, 1:], x[:, 1:], IGNORE)
    return np.ascontiguousarray(x[:, :-1]), np.ascontiguousarray(y)


@dataclass(kw_only=True)
class TokenRows(Dataset):
    """Documents packed into rows: x token ids and y next-token labels [N, seq_len] (-1: masked), and the
    tokenizer every model of the run shares."""

    tokenizer: Any
    tokenizer_hash: str
    vocab_size: int
    seq_len: int
    documents: dict[str, int]  # documents per split (before packing)
    chat_template: str | None = None  # conversations were rendered with it (chat.py); the served model keeps it


def load_lm_data(data: CausalLMData, *, seed: int, storage: Storage | None) -> TokenRows:
    """Read, split by document, tokenize and pack; the fingerprint covers the packed rows, the tokenizer's
    hash, seq_len and the packing scheme."""
    seq_len = data.seq_len
    layout = resolve(data.source, data.splits, storage)
    table = single_table(data, layout, storage)
    if table is not None:
        from tasks.kinds.causal_lm.chat import messages_column

        if (column := messages_column(data, table.column_names)) is not None:
            return load_chat_data(data, table, column, seed=seed, storage=storage)
    if data.messages:
        raise UserError("conversations are read from one table: a Parquet / JSON-lines source (local or s3://) "
                        f"or {ARITHMETIC!r}; not from {data.source!r} or given splits (yet)", where="messages")
    parts = split_corpus(data, seed, storage, layout, table)
    tok = get_tokenizer(data.tokenizer, parts["train"], storage)
    th = tokenizer_hash(tok)
    xs, ys = {}, {}
    h = hashlib.sha256(f"{PACKING}|seq_len={seq_len}|tokenizer={th}|seed={seed}|{layout.identity()}".encode())
    for name in ("train", "val", "test"):
        xs[name], ys[name] = pack(parts[name], tok, seq_len) if parts[name] else (
            np.zeros((0, seq_len), np.int64), np.zeros((0, seq_len), np.int64))
        h.update(name.encode())
        h.update(xs[name].tobytes())
        h.update(ys[name].tobytes())
    if int((ys["train"] >= 0).sum()) == 0:
        raise UserError("the training split has no target tokens", where="completion" if data.completion else "text")
    return TokenRows(arrays=(xs, ys), fingerprint=h.hexdigest(), labeled_fingerprint=h.hexdigest(), tokenizer=tok,
                     tokenizer_hash=th, vocab_size=tok.get_vocab_size(), seq_len=seq_len,
                     documents={k: len(v) for k, v in parts.items()},
                     sources={k: (layout.sources.get(k) or layout.sources["train"]).uri if layout.given
                              else data.source for k in ("train", "val", "test")},
                     columns=dict.fromkeys([data.prompt, data.completion] if data.prompt else [data.text or "text"],
                                           "string"))


def load_chat_data(data: CausalLMData, table: Any, column: str, *, seed: int, storage: Storage | None
                   ) -> TokenRows:
    """Conversations split by conversation, rendered with the chat template, one per row, targets on the
    assistant's tokens only (chat.py); the fingerprint covers the template, the tokenizer and the rows. The
    trained BPE (if any) is kept only once every row is good: bad input writes nothing."""
    from tasks.kinds.causal_lm import chat

    convs = chat.read_conversations(table, column, data.limit)
    parts = split_documents(convs, val=data.split.val, test=data.split.test, seed=seed)  # type: ignore[arg-type]
    tok_docs: list[Document] = []
    if not data.tokenizer.path:  # the BPE learns the rendered text, template markup included
        plain = chat.chat_tokenizer(data, train_bpe([], 260), EOS)
        tok_docs = [Document(chat.render(plain, c)[0]) for c in parts["train"]]
    tok = get_tokenizer(data.tokenizer, tok_docs, storage, keep=False)
    fast = chat.chat_tokenizer(data, tok, EOS)
    eos = fast.eos_token_id if fast.eos_token_id is not None else 0
    th = tokenizer_hash(tok)
    h = hashlib.sha256(f"{chat.PACKING}|seq_len={data.seq_len}|tokenizer={th}|seed={seed}|truncation="
                       f"{data.truncation}|template={chat.template_hash(fast.chat_template)}|".encode())
    xs, ys = {}, {}
    for name in ("train", "val", "test"):
        xs[name], ys[name] = chat.rows_of(parts[name], fast, data.seq_len, data.truncation, eos)  # type: ignore
        h.update(name.encode())
        h.update(xs[name].tobytes())
        h.update(ys[name].tobytes())
    if int((ys["train"] >= 0).sum()) == 0:
        raise UserError("the training split has no assistant tokens left", where="truncation")
    keep_tokenizer(data.tokenizer, tok_docs, tok, storage)
    return TokenRows(arrays=(xs, ys), fingerprint=h.hexdigest(), labeled_fingerprint=h.hexdigest(), tokenizer=tok,
                     tokenizer_hash=th, vocab_size=tok.get_vocab_size(), seq_len=data.seq_len,
                     documents={k: len(v) for k, v in parts.items()}, chat_template=fast.chat_template,
                     sources=dict.fromkeys(("train", "val", "test"), data.source))


def save_tokenizer_dir(tok: Any, folder: str | Path, chat_template: str | None = None) -> None:
    """A transformers-loadable tokenizer directory (PreTrainedTokenizerFast, with the chat template conversations
    were rendered with) beside a model."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS)
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(folder))
    Path(folder, "kdflow_tokenizer.json").write_text(json.dumps({"hash": tokenizer_hash(tok)}))
