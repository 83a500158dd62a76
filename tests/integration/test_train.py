"""The one train loop: losses x target formats, 1 vs 2 workers, early stopping, mixed precision,
checkpoints, and a worker killed for real mid-training.

Single-worker fits run as a `kdflow run` runs them: on a warm Ray actor of the session's Ray (one for the
module, `fit_on`), which runs the same `train_loop` as Ray Train. The 1-vs-2-workers test runs both as real
`TorchTrainer` runs; the kill test is a `kdflow run` with its own Ray. All read soft targets from a real
store on digits.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from orchestrator import stages
from orchestrator.fitting import Slot
from orchestrator.spec import validate
from tasks.kinds import kind_for
from tasks.kinds.classification.data import load_dataset
from tasks.kinds.classification.models import build_model
from tasks.kinds.classification.targets import place_share
from tasks.storage import Storage
from tasks.store.store import SoftTargetStore
from tasks.train.config import LossConfig
from tasks.train.result import FitResult, StopReason
from tasks.train.sources import ShardSource
from tasks.train.step import evaluate, loss_step, train_epoch
from tests.helpers import precompute, quick_teacher, workflow

LOSSES = ("kl", "reverse_kl", "jsd", "mse")


@pytest.fixture(scope="module")
def digits(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """Digits soft targets in both formats (dense float16 logits, top-3), 3 train shards each."""
    data = load_dataset("sklearn:digits")
    teacher = quick_teacher(data.x["train"], data.y["train"])
    storage = Storage(str(tmp_path_factory.mktemp("train-store")))
    splits = {s: (data.x[s], data.y[s]) for s in ("train", "val", "test")}
    meta = {"num_classes": data.num_classes, "num_features": data.num_features}
    store = SoftTargetStore(storage)
    manifests = {
        "logits": precompute(store, "digits-logits", [teacher], splits, shards=3, format="logits", dtype="float16",
                                   top_k=None, ensemble="mean_probs", meta=meta)[0],
        "topk": precompute(store, "digits-top3", [teacher], splits, shards=3, format="topk", dtype="float16",
                                 top_k=3, ensemble="mean_probs", meta=meta)[0],
    }
    warm = Slot(0, label="test warm worker")
    yield SimpleNamespace(storage=storage, manifests=manifests, data=data, fits={}, run_names={}, warm=warm)
    warm.close()


def train(digits: SimpleNamespace, fmt: str = "logits", ray_train: bool = False, **overrides: Any) -> FitResult:
    """The student stage (`stages.train_student`) on the digits store; identical calls share one fit.

    A single-worker fit runs on the module's warm actor, as a `kdflow run`'s does; `ray_train` (or more
    workers) makes it a Ray Train run."""
    key = json.dumps([fmt, ray_train, overrides], sort_keys=True)
    if key not in digits.fits:
        spec = validate(workflow(**{"train.epochs": 3, "student.params": {"hidden": [32]},
                                                   **overrides}))
        run = f"t{len(digits.fits)}-{time.time_ns() % 10**9}"
        digits.fits[key] = stages.train_student(spec, digits.manifests[fmt], digits.storage, run_name=run,
                                                warm=None if ray_train else digits.warm)
        digits.run_names[id(digits.fits[key])] = run
    return digits.fits[key]


def accuracy_on_test(digits: SimpleNamespace, result: FitResult, fmt: str = "logits") -> float:
    model = build_model("mlp", {"hidden": [32]}, digits.data.num_features, digits.data.num_classes)
    model.load_state_dict(result.state_dict)
    test = SoftTargetStore(digits.storage).read(digits.manifests[fmt], "test")
    task = kind_for("classification")
    return evaluate(task, model, test, task.dims(digits.manifests[fmt]), torch.device("cpu"))["accuracy"]


@pytest.mark.parametrize("fmt", ["logits", "topk"])
@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains_with_both_target_formats(digits: SimpleNamespace, loss: str, fmt: str) -> None:
    alpha = 0.7
    r = train(digits, fmt, **{"distill.loss": loss, "distill.alpha": alpha})
    assert [h["epoch"] for h in r.history] == [1, 2, 3]
    for h in r.history:  # each component logged separately, and the total is the mix of them
        assert math.isfinite(h["train_kd"]) and h["train_kd"] > 0
        assert h["train_loss"] == pytest.approx(alpha * h["train_kd"] + (1 - alpha) * h["train_ce"], rel=1e-4)
        assert 0.0 <= h["val_agreement"] <= 1.0
    assert r.history[-1]["train_kd"] < r.history[0]["train_kd"]  # it learns from the teacher
    assert r.history[-1]["val_accuracy"] >= 0.75
    assert r.history[-1]["val_agreement"] >= 0.75
    assert r.samples_per_s > 0 and r.stop_reason is StopReason.COMPLETED
    assert r.checkpoints == 0  # the default policy is time-based (30 s): only the final checkpoint here


@pytest.mark.slow
def test_two_workers_reach_the_one_worker_accuracy_band(digits: SimpleNamespace) -> None:
    runs = {w: train(digits, ray_train=True, **{"train.workers": w, "train.epochs": 10, "train.checkpoint_every": 4})
            for w in (1, 2)}
    assert runs[1].workers == 1 and runs[2].workers == 2
    acc = {w: accuracy_on_test(digits, r) for w, r in runs.items()}
    assert acc[1] >= 0.88 and acc[2] >= 0.88, acc
    assert abs(acc[1] - acc[2]) <= 0.05, acc
    # the 2-worker run is a different run (half the steps per epoch, global batch 2 x 64), not a copy
    assert runs[1].history[-1]["train_loss"] != runs[2].history[-1]["train_loss"]
    for r in runs.values():  # checkpoint_every 4 of 10 epochs: after epochs 4 and 8, then the final one
        assert r.checkpoints == 2
        run_dir = Path(digits.storage.path("checkpoints")) / digits.run_names[id(r)]
        assert len(list(run_dir.glob("checkpoint_*/state.pt"))) == 2  # Ray keeps the newest two


def test_a_worker_reads_only_the_shards_its_share_overlaps(digits: SimpleNamespace,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = digits.manifests["logits"]
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) == 3
    read: list[str] = []
    real = Storage.read_bytes
    monkeypatch.setattr(Storage, "read_bytes", lambda self, path: read.append(path) or real(self, path))
    source = ShardSource(digits.storage, manifest, "train")
    rows = source.load(0, shards[0]["row_stop"] - 5)  # rank 0 of 2..3 workers: within the first shard
    assert len(rows) == shards[0]["row_stop"] - 5
    assert [p.rsplit("/", 1)[-1] for p in read] == [shards[0]["path"].rsplit("/", 1)[-1]]


def test_early_stopping_stops_before_the_last_epoch_on_a_plateau(digits: SimpleNamespace) -> None:
    # a learning rate this small leaves val accuracy flat: a plateau from the first epoch
    r = train(digits, **{"train.epochs": 30, "train.optimizer.lr": 1e-9,
                         "train.early_stopping": {"metric": "val_accuracy", "patience": 2}})
    assert r.stop_reason is StopReason.EARLY_STOPPED
    assert len(r.history) == 3  # of 30: best at epoch 1, then 2 epochs without improvement
    assert r.best_epoch == 1


class TimedPruner:
    """An epoch hook that prunes at `prune_at` and appends, per epoch, when it was asked and when the loop
    waited for its answer (to a file: it runs in the warm actor's process)."""

    def __init__(self, path: Path, prune_at: int) -> None:
        self.path, self.prune_at = path, prune_at

    def ask(self, epoch: int, metrics: dict[str, float]) -> Any:
        asked = time.time()

        def answer() -> bool:
            with open(self.path, "a") as f:
                f.write(json.dumps({"epoch": epoch, "asked": asked, "waited": time.time()}) + "\n")
            return epoch >= self.prune_at

        return answer


def test_a_pruned_fit_ends_at_the_epoch_it_was_pruned_and_trains_while_the_pruner_answers(
        digits: SimpleNamespace, tmp_path: Path) -> None:
    log = tmp_path / "asked.jsonl"
    spec = validate(workflow(**{"train.epochs": 10, "student.params": {"hidden": [32]}}))
    r = stages.train_student(spec, digits.manifests["logits"], digits.storage, run_name=f"pruned-{time.time_ns()}",
                             epoch_hook=TimedPruner(log, prune_at=4), warm=digits.warm)
    assert r.stop_reason is StopReason.PRUNED
    # the epoch trained while epoch 4's answer travelled is dropped: the history ends at epoch 4
    assert [h["epoch"] for h in r.history] == [1, 2, 3, 4]
    asked = [json.loads(line) for line in log.read_text().splitlines()]
    assert [a["epoch"] for a in asked] == [1, 2, 3, 4]  # asked once per epoch, nothing after the prune
    for a, next_epoch in zip(asked[:3], r.history[1:]):  # the next epoch trained before the loop waited
        assert a["waited"] - a["asked"] >= 0.9 * next_epoch["epoch_s"], (a, next_epoch["epoch_s"])


def test_bf16_autocast_trains_through_the_loop_on_cpu(digits: SimpleNamespace) -> None:
    fp32 = train(digits, **{"distill.loss": "kl", "distill.alpha": 0.7})
    bf16 = train(digits, **{"distill.loss": "kl", "distill.alpha": 0.7, "train.precision": "bf16"})
    # same seed, data and order: only the bf16 forward can make the losses differ
    assert [h["train_loss"] for h in bf16.history] != [h["train_loss"] for h in fp32.history]
    assert bf16.history[-1]["train_loss"] == pytest.approx(fp32.history[-1]["train_loss"], rel=0.1)
    assert bf16.history[-1]["val_accuracy"] >= 0.75
    assert all(t.dtype == torch.float32 for t in bf16.state_dict.values())  # autocast leaves weights fp32


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                             ("fp32", torch.float32)])
def test_autocast_and_grad_scaler_in_the_step(digits: SimpleNamespace, precision: str, dtype: torch.dtype) -> None:
    """The step itself: the forward runs in the asked dtype, and fp16 goes through a live GradScaler."""
    rows = SoftTargetStore(digits.storage).read(digits.manifests["topk"], "train")
    share = place_share(rows, digits.data.num_classes, torch.device("cpu"))
    assert share.teacher is not None and share.teacher.dtype == torch.float32  # top-k decoded once
    torch.manual_seed(0)
    model = build_model("mlp", {"hidden": [32]}, digits.data.num_features, digits.data.num_classes)
    seen: list[torch.dtype] = []
    model.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    cfg = LossConfig(kind="kl", temperature=4.0, alpha=0.7, beta=0.5)
    task = kind_for("classification")
    loss, parts = loss_step(task, model, *share.batch(torch.arange(64)), cfg, precision)
    assert seen == [dtype] and loss.dtype == torch.float32 and parts.shape == (3,)

    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    order = torch.randperm(len(share), generator=torch.Generator().manual_seed(0))
    first = train_epoch(task, model, opt, scaler, share, order, 64, cfg, precision)
    for _ in range(2):
        last = train_epoch(task, model, opt, scaler, share, order, 64, cfg, precision)
    assert torch.isfinite(last).all() and last[1] < first[1]  # the KD term fell: the optimizer stepped
    assert scaler.is_enabled() == (precision == "fp16")
    if precision == "fp16":
        assert math.isfinite(scaler.get_scale()) and scaler.get_scale() > 1


# ---------------------------------------------------------------- a worker killed for real
