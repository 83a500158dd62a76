"""The MLflow Model Registry: log the chosen student, register it with its lineage, promote it behind gates."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from orchestrator import progress
from orchestrator.configs import task_for
from orchestrator.spec import Gate, Workflow
from tasks.errors import UserError
from tasks.soft_targets import SoftTargetStore
from tasks.storage import Storage
from tasks.train import evaluate

PIP_REQUIREMENTS = ["torch", "numpy", "kdflow"]


def log_student(served: nn.Module, example: np.ndarray) -> str:
    """Log the student as its task kind serves it (classification: taking raw features); returns the model URI."""
    import mlflow

    info = mlflow.pytorch.log_model(served, name="student", input_example=example,
                                    pip_requirements=PIP_REQUIREMENTS, serialization_format="pickle")
    return info.model_uri


def _champion_accuracy(spec: Workflow, client: Any, name: str, alias: str, manifest: dict[str, Any], storage: Storage) -> tuple[
        int | None, float | None]:
    """The alias holder's test accuracy on this run's test split (its own tag when the split is the same)."""
    import mlflow

    try:
        holder = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None, None
    tags = holder.tags or {}
    if tags.get("kdflow.data_fingerprint") == manifest["data_fingerprint"] and "kdflow.test_accuracy" in tags:
        return int(holder.version), float(tags["kdflow.test_accuracy"])
    task = task_for(spec)
    served = mlflow.pytorch.load_model(f"models:/{name}/{holder.version}", map_location="cpu")
    model = task.from_serving(served, manifest)  # the registered model takes the user's raw input
    if model is None:
        return int(holder.version), None
    test = SoftTargetStore(storage).read(manifest, "test")
    try:
        acc = evaluate(task, model, test, task.dims(manifest), torch.device("cpu"))["accuracy"]
    except RuntimeError:  # a champion for another feature layout cannot be compared on this split
        return int(holder.version), None
    return int(holder.version), acc


def check_gates(spec: Workflow, metrics: dict[str, Any], manifest: dict[str, Any], storage: Storage,
                client: Any) -> dict[str, dict[str, Any]]:
    assert spec.registry.promote is not None
    gates = spec.registry.promote.gates
    out: dict[str, dict[str, Any]] = {}
    for name in ("retention", "num_params", "test_accuracy", "latency_ms"):
        rule = getattr(gates, name)
        if rule is not None:
            out[name] = {"rule": rule, "value": metrics[name], "passed": Gate(rule).holds(metrics[name])}
    if gates.beats_alias:
        version, acc = _champion_accuracy(spec, client, spec.registered_model, gates.beats_alias, manifest, storage)
        if version is None:
            out["beats_alias"] = {"rule": f"no worse than @{gates.beats_alias}", "value": None, "passed": True,
                                  "note": "no current holder"}
        else:
            passed = acc is None or metrics["test_accuracy"] >= acc
            out["beats_alias"] = {"rule": f"test_accuracy >= @{gates.beats_alias} (v{version})", "value": acc,
                                  "passed": passed}
    return out


def register(spec: Workflow, model_uri: str, run_id: str, metrics: dict[str, Any], manifest: dict[str, Any],
             storage: Storage, lineage: dict[str, str]) -> dict[str, Any]:
    """A new version of registry.model with lineage tags; the alias moves only when every gate holds."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    name = spec.registered_model
    gates = check_gates(spec, metrics, manifest, storage, client) if spec.registry.promote else {}
    try:
        mv = mlflow.register_model(model_uri, name, tags={
            **lineage,
            "kdflow.test_accuracy": f"{metrics['test_accuracy']:.6f}",
            "kdflow.retention": f"{metrics['retention']:.6f}",
            "kdflow.num_params": str(metrics["num_params"]),
        })
    except mlflow.exceptions.MlflowException as exc:
        raise UserError(f"cannot register {name!r}: {exc.message}", where="registry.model") from None
    for gate, res in gates.items():
        client.set_model_version_tag(name, mv.version, f"kdflow.gate.{gate}",
                                     f"{'pass' if res['passed'] else 'FAIL'} {res['rule']} (value {res['value']})")
    promoted = bool(spec.registry.promote) and all(g["passed"] for g in gates.values())
    if promoted:
        alias = spec.registry.promote.alias  # type: ignore[union-attr]
        client.set_registered_model_alias(name, alias, mv.version)
        progress.info(f"  promoted {name} v{mv.version} to @{alias}")
    elif spec.registry.promote:
        failed = [g for g, r in gates.items() if not r["passed"]]
        progress.info(f"  {name} v{mv.version} registered, not promoted: gates failed: {', '.join(failed)}")
    aliases = sorted(client.get_model_version(name, mv.version).aliases)
    return {"model": name, "version": int(mv.version), "aliases": aliases, "promoted": promoted,
            "gates": gates, "run_id": run_id}
