"""The stages of a workflow, each with explicit inputs, outputs and cache key.

data -> teachers -> soft targets -> student(s) -> evaluation. Registration lives in registry.py and the
search in search.py; pipeline.py runs them in order and builds the result.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from orchestrator import progress
from orchestrator.errors import UserError
from orchestrator.spec import TeacherSpec, Workflow
from tasks.data import Dataset, load_dataset
from tasks.models import build_model, model_bytes, num_params, weights_digest
from tasks.soft_targets import SoftTargetStore, cache_key, teacher_logits
from tasks.storage import Storage
from tasks.train import ArraySource, FitResult, ShardSource, evaluate, fit


def storage_for(spec: Workflow) -> Storage:
    s3 = spec.storage.s3
    return Storage(spec.storage.root, endpoint_url=s3.endpoint_url if s3 else None,
                   region=s3.region if s3 else None, anon=bool(s3 and s3.anon))


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ---------------------------------------------------------------- data


def load_data(spec: Workflow, storage: Storage) -> Dataset:
    d = spec.data
    with progress.stage("data", d.source):
        data = load_dataset(d.source, features=d.features, label=d.label, val=d.split.val, test=d.split.test,
                            transfer=d.transfer, seed=spec.seed, limit=d.limit, storage=storage)
        progress.info(f"  {data.num_features} features, {data.num_classes} classes, rows: "
                      + ", ".join(f"{k} {data.rows(k)}" for k in data.y) + f", fingerprint {data.fingerprint[:12]}")
    return data


# ---------------------------------------------------------------- teachers


class RawInput(nn.Module):
    """A teacher trained outside kdflow sees the user's raw features, not kdflow's standardized ones."""

    def __init__(self, model: nn.Module, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.from_numpy(mean))
        self.register_buffer("std", torch.from_numpy(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.std + self.mean)


@dataclass
class Teacher:
    model: nn.Module
    origin: str
    digest: str
    trained: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


def _load_external(t: TeacherSpec, where: str, data: Dataset) -> nn.Module:
    if t.model.startswith("models:/"):
        from tasks.served import load_module

        try:
            model = load_module(t.model)  # a kdflow student: rebuilt from safetensors, nothing unpickled
        except Exception as exc:  # noqa: BLE001 - the registry or the model's code: the user's to fix
            raise UserError(f"cannot load {t.model}: {str(exc).splitlines()[0]}", where=f"{where}.model") from None
        return RawInput(model, data.mean, data.std)
    path = t.checkpoint or t.model
    if not os.path.isfile(path):
        raise UserError(f"checkpoint file not found: {path}", where=f"{where}.{'checkpoint' if t.checkpoint else 'model'}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - unpickling a user's file can raise anything
        raise UserError(f"cannot load checkpoint {path}: {exc}", where=where) from None
    if isinstance(obj, nn.Module):
        return RawInput(obj, data.mean, data.std)
    if isinstance(obj, dict):  # a state_dict for the family named in `model`
        model = build_model(t.model, t.params, data.num_features, data.num_classes)
        try:
            model.load_state_dict(obj.get("model", obj))
        except RuntimeError as exc:
            raise UserError(f"checkpoint does not fit {t.model} {t.params}: {str(exc).splitlines()[0]}",
                            where=f"{where}.checkpoint") from None
        return RawInput(model, data.mean, data.std)
    raise UserError(f"{path} holds a {type(obj).__name__}, not a model or state_dict", where=where)


def _teacher_train_config(spec: Workflow, t: TeacherSpec, data: Dataset, storage: Storage) -> dict[str, Any]:
    import ray

    train_x = ray.put(data.x["train"])
    train_y = ray.put(data.y["train"])
    return {
        "label": "teacher", "model": t.model, "params": t.params, "num_features": data.num_features,
        "num_classes": data.num_classes, "seed": spec.seed, "epochs": t.train.epochs,
        "batch_size": t.train.batch_size, "loss": None,
        "optimizer": {"name": "adamw", "lr": t.train.lr, "weight_decay": t.train.weight_decay},
        "data": ArraySource(train_x, train_y),
        "val": ArraySource(ray.put(data.x["val"]), ray.put(data.y["val"])) if data.rows("val") else None,
        "early_stopping": None, "precision": spec.train.precision,
        "checkpoint_every": spec.train.checkpoint_every, "checkpoint_interval_s": spec.train.checkpoint_interval_s,
    }


def load_teachers(spec: Workflow, data: Dataset, storage: Storage) -> list[Teacher]:
    """Each teacher is loaded (checkpoint, factory, registry) or trained once and cached by content."""
    out = []
    for i, t in enumerate(spec.teachers):
        where = f"teacher[{i}]" if isinstance(spec.teacher, list) else "teacher"
        external = t.checkpoint or t.model.startswith("models:/") or t.model.endswith((".pt", ".pth"))
        with progress.stage(f"teacher {i}" if len(spec.teachers) > 1 else "teacher", t.model):
            if external:
                model = _load_external(t, where, data)
                out.append(Teacher(model, t.checkpoint or t.model, weights_digest(model)))
                continue
            build_model(t.model, t.params, data.num_features, data.num_classes)  # fail fast on bad params
            key = digest({"model": t.model, "params": t.params, "train": t.train.model_dump(),
                          "data": data.labeled_fingerprint, "seed": spec.seed})
            path = storage.path("teachers", key, "model.pt")
            if storage.exists(path):
                saved = torch.load(io.BytesIO(storage.read_bytes(path)), weights_only=False)
                progress.info(f"  reusing the trained teacher {storage.uri('teachers', key)}")
                trained = False
            else:
                result = fit(_teacher_train_config(spec, t, data, storage), workers=spec.train.workers,
                             use_gpu=spec.train.use_gpu, cpus_per_worker=spec.train.cpus_per_worker,
                             gpus_per_worker=spec.train.gpus_per_worker, storage=storage,
                             run_name=f"teacher-{key}", max_failures=spec.train.max_failures,
                             placement=spec.train.placement)
                saved = {"state_dict": result.state_dict, "history": result.history}
                buf = io.BytesIO()
                torch.save(saved, buf)
                storage.write_bytes(path, buf.getvalue())
                trained = True
            model = build_model(t.model, t.params, data.num_features, data.num_classes)
            model.load_state_dict(saved["state_dict"])
            model.eval()
            out.append(Teacher(model, storage.uri("teachers", key), weights_digest(model), trained,
                               {"history": saved.get("history", [])}))
    return out


# ---------------------------------------------------------------- soft targets


def soft_target_key(spec: Workflow, data: Dataset, teachers: list[Teacher]) -> str:
    """Teacher weights x data (rows, split, preprocessing) x format, dtype, top_k, ensemble; never temperature."""
    st = spec.soft_targets
    return cache_key([t.digest for t in teachers], data.fingerprint, st.format, st.dtype, st.top_k, st.ensemble)


def soft_targets(spec: Workflow, data: Dataset, teachers: list[Teacher], storage: Storage) -> dict[str, Any]:
    """The store entry for (teachers x data x format); computed by Ray tasks only when missing."""
    st = spec.soft_targets
    key = soft_target_key(spec, data, teachers)
    store = SoftTargetStore(storage)
    with progress.stage("soft targets", f"{st.format}/{st.dtype} key {key}"):
        train_x, train_y = data.x["train"], data.y["train"]
        if "transfer" in data.x:
            # interleave labeled and transfer rows, so every data-parallel worker's contiguous share
            # holds both kinds (appended, the last worker would get nearly all the unlabeled rows)
            order = np.random.default_rng(spec.seed).permutation(len(train_y) + data.rows("transfer"))
            train_x = np.concatenate([train_x, data.x["transfer"]])[order]
            train_y = np.concatenate([train_y, data.y["transfer"]])[order]
        splits = {"train": (train_x, train_y), "val": (data.x["val"], data.y["val"]),
                  "test": (data.x["test"], data.y["test"])}

        def tick(split: str, i: int, n: int, reused: bool) -> None:
            progress.info(f"  shard {split} {i + 1}/{n} {'(already written)' if reused else 'written'}")

        from tasks.soft_targets import ShardFailed

        try:
            manifest = store.precompute(
                key, [t.model for t in teachers], splits, shards=st.shards, format=st.format, dtype=st.dtype,
                top_k=st.top_k, ensemble=st.ensemble, max_retries=st.max_retries, on_shard=tick,
                meta={"num_classes": data.num_classes, "num_features": data.num_features,
                      "data_fingerprint": data.fingerprint, "mean": data.mean.tolist(), "std": data.std.tolist(),
                      "transfer_rows": data.rows("transfer")
                      if "transfer" in data.y else 0,
                      "teachers": [{"origin": t.origin, "digest": t.digest} for t in teachers]})
        except ShardFailed as exc:
            raise StageFailed("soft targets", str(exc)) from None
        if manifest["reused"]:
            progress.info(f"  reusing {store.uri(key)} (no teacher forward)")
    return manifest


class StageFailed(RuntimeError):
    def __init__(self, stage: str, message: str) -> None:
        self.stage = stage
        super().__init__(f"stage {stage} failed: {message}")


# ---------------------------------------------------------------- student


def student_config(spec: Workflow, manifest: dict[str, Any], storage: Storage) -> dict[str, Any]:
    es = spec.train.early_stopping
    return {
        "label": "student", "model": spec.student.model, "params": spec.student.params,
        "num_features": manifest["num_features"], "num_classes": manifest["num_classes"], "seed": spec.seed,
        "epochs": spec.train.epochs, "batch_size": spec.train.batch_size,
        "optimizer": spec.train.optimizer.model_dump(), "precision": spec.train.precision,
        "loss": {"kind": spec.distill.loss, "temperature": spec.distill.temperature, "alpha": spec.distill.alpha,
                 "beta": spec.distill.beta},
        "data": ShardSource(storage, manifest, "train"),
        "val": ShardSource(storage, manifest, "val") if manifest["splits"]["val"]["rows"] else None,
        "early_stopping": {"metric": es.metric, "patience": es.patience, "direction": es.direction} if es else None,
        "checkpoint_every": spec.train.checkpoint_every, "checkpoint_interval_s": spec.train.checkpoint_interval_s,
    }


def train_student(spec: Workflow, manifest: dict[str, Any], storage: Storage, run_name: str,
                  epoch_hook: Any = None) -> FitResult:
    build_model(spec.student.model, spec.student.params, manifest["num_features"], manifest["num_classes"])
    config = student_config(spec, manifest, storage)
    config["epoch_hook"] = epoch_hook
    return fit(config, workers=spec.train.workers, use_gpu=spec.train.use_gpu,
               cpus_per_worker=spec.train.cpus_per_worker, gpus_per_worker=spec.train.gpus_per_worker,
               storage=storage, run_name=run_name, max_failures=spec.train.max_failures,
               placement=spec.train.placement)


def student_model(spec: Workflow, manifest: dict[str, Any], result: FitResult) -> nn.Module:
    model = build_model(spec.student.model, spec.student.params, manifest["num_features"], manifest["num_classes"])
    model.load_state_dict(result.state_dict)
    return model.eval()


# ---------------------------------------------------------------- evaluation


def latency_ms(model: nn.Module, num_features: int, repeats: int = 200) -> float:
    """Median single-row CPU latency: what a caller serving one request at a time waits."""
    x = torch.randn(1, num_features)
    torch.set_num_threads(1)
    with torch.inference_mode():
        for _ in range(20):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def evaluate_test(model: nn.Module, manifest: dict[str, Any], storage: Storage) -> dict[str, Any]:
    test = SoftTargetStore(storage).read(manifest, "test")
    m = evaluate(model, test, manifest["num_classes"], torch.device("cpu"))
    return {"test_accuracy": m["accuracy"], "teacher_agreement": m["agreement"], "num_params": num_params(model),
            "model_bytes": model_bytes(model), "latency_ms": latency_ms(model, manifest["num_features"])}


def teacher_test_accuracy(manifest: dict[str, Any], storage: Storage) -> float:
    """From the stored test-split logits: no teacher forward needed, on reruns too."""
    test = SoftTargetStore(storage).read(manifest, "test")
    pred = teacher_logits(test.targets, manifest["num_classes"]).argmax(-1)
    return float((pred == test.y).float().mean())
