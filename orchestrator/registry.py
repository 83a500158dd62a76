"""The MLflow Model Registry: log the chosen student, register it with its lineage, move aliases behind gates.

Every new version gets `challenger`; the promotion alias (`champion` by default) moves only when every
gate holds. Each gate's rule, value and verdict are tags on the version (`kdflow.gate.<name>` for people,
`kdflow.gates` as JSON for `kdflow promote`). Every alias move - by a run, `promote` or `rollback` - is one
registered-model tag `kdflow.alias_move.<time ns>` holding JSON (actor, time, alias, from, to, reason):
one tag per move, so concurrent writers never overwrite each other's record and any MlflowClient reads it.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from orchestrator import progress
from orchestrator.quiet import no_mlflow_eprint
from orchestrator.spec import Gate, Workflow, gate_metrics
from tasks.errors import UserError
from tasks.kinds import DEFAULT, TaskKind, kind_for
from tasks.storage import Storage

if TYPE_CHECKING:
    from tasks.kinds.base import Champion

PIP_REQUIREMENTS = ["torch", "numpy", "pandas", "safetensors", "kdflow"]
CHALLENGER = "challenger"
MOVE_PREFIX = "kdflow.alias_move."


def prepare_model_logging() -> None:
    """Start, on a thread, the one slow step of the first model log in a process: MLflow checks the model's
    pip requirements against the installed packages, and its first check maps every installed
    distribution to its modules (~1.5 s of a 2 s `register` stage, py-spy). A run starts it once MLflow
    is connected, while its driver waits on the teacher and student. Best effort: MLflow's private helper
    may move, and then the register stage pays it as before."""
    import threading

    def warm() -> None:
        try:
            from mlflow.utils import requirements_utils

            requirements_utils._init_packages_to_modules_map()
        except Exception:  # noqa: BLE001, S110 - an optimisation only
            pass

    threading.Thread(target=warm, name="kdflow-mlflow-requirements", daemon=True).start()


# ---------------------------------------------------------------- alias moves


def actor() -> str:
    """Who moves an alias: KDFLOW_ACTOR (a CI job, a service) or the OS user."""
    if os.environ.get("KDFLOW_ACTOR"):
        return os.environ["KDFLOW_ACTOR"]
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def alias_holder(client: Any, name: str, alias: str) -> int | None:
    import mlflow

    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def history(client: Any, name: str) -> list[dict[str, Any]]:
    """Every recorded alias move of a registered model, oldest first."""
    tags = client.get_registered_model(name).tags or {}
    moves = []
    for key in sorted(k for k in tags if k.startswith(MOVE_PREFIX)):
        try:
            moves.append(json.loads(tags[key]))
        except json.JSONDecodeError:
            continue
    return moves


def move_alias(client: Any, name: str, alias: str, version: int, reason: str, kind: str) -> dict[str, Any] | None:
    """Point `alias` at `version` and record the move; None when the alias already points there."""
    before = alias_holder(client, name, alias)
    if before == version:
        return None
    client.set_registered_model_alias(name, alias, str(version))
    move = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "actor": actor(), "alias": alias,
            "from": before, "to": version, "kind": kind, "reason": reason[:2000]}  # a tag value is bounded
    client.set_registered_model_tag(name, f"{MOVE_PREFIX}{time.time_ns():020d}", json.dumps(move))
    return move


def rollback(client: Any, name: str, alias: str, reason: str) -> dict[str, Any]:
    """Point `alias` back at the version that held it before the current holder (moves replayed as a stack)."""
    current = alias_holder(client, name, alias)
    if current is None:
        raise UserError(f"no version holds @{alias}", where=name)
    chain: list[int | None] = []
    for m in history(client, name):
        if m["alias"] != alias:
            continue
        if m.get("kind") == "rollback" and chain:
            chain.pop()
        else:
            if not chain or chain[-1] != m["from"]:
                chain.append(m["from"])
            chain.append(m["to"])
    chain = [v for v in chain if v is not None]
    if len(chain) < 2 or chain[-1] != current:
        raise UserError(f"no earlier holder of @{alias} is recorded (current: v{current}); "
                        f"use `kdflow promote {name} --version V --alias {alias}`", where=name)
    target = chain[-2]
    move = move_alias(client, name, alias, target, reason or f"rollback from v{current}", "rollback")
    assert move is not None
    return move


# ---------------------------------------------------------------- gates


def version_kind(tags: dict[str, str]) -> TaskKind:
    """The kind of task a registered version was trained for (its kdflow.task tag; versions registered before
    the tag existed are of the default kind)."""
    return kind_for(tags.get("kdflow.task", DEFAULT))


def _champion_value(spec: Workflow, client: Any, alias: str, manifest: dict[str, Any], storage: Storage
                    ) -> tuple[int | None, float | None]:
    """The alias holder's value of the kind's champion metric on this run's test split (its own tag when the
    split is the same); (None, None) when no version holds the alias."""
    import mlflow

    from tasks.evaluation import stream_metrics

    kind = spec.kind
    assert kind.champion is not None
    try:
        holder = client.get_model_version_by_alias(spec.registered_model, alias)
    except mlflow.exceptions.MlflowException:
        return None, None
    tags = holder.tags or {}
    tag = f"kdflow.{kind.champion.tag}"
    if tags.get("kdflow.data_fingerprint") == manifest["data_fingerprint"] and tag in tags:
        return int(holder.version), float(tags[tag])
    model = kind.load_registered(f"models:/{spec.registered_model}/{holder.version}", manifest)
    if model is None:
        return int(holder.version), None
    try:  # shard by shard, as the student's own test metrics
        return int(holder.version), stream_metrics(kind, model, manifest, storage)[kind.champion.metric]
    except RuntimeError:  # a champion for another input layout cannot be compared on this split
        return int(holder.version), None


def _beats(champion: Champion, alias: str, holder: int | None, holder_value: float | None,
           value: float | None) -> dict[str, Any]:
    if holder is None:
        return {"gate": "beats_alias", "rule": f"no worse than @{alias}", "value": None, "passed": True,
                "note": f"no version holds @{alias}"}
    if holder_value is None or value is None:
        return {"gate": "beats_alias", "rule": f"no worse than @{alias} (v{holder})", "value": None, "passed": True,
                "note": "not comparable on this test split"}
    op = ">=" if champion.larger_is_better else "<="
    passed = value >= holder_value if champion.larger_is_better else value <= holder_value
    return {"gate": "beats_alias", "rule": f"{champion.tag} {op} {holder_value:.4f} (@{alias} v{holder})",
            "value": value, "passed": passed}


def check_gates(spec: Workflow, metrics: dict[str, Any], manifest: dict[str, Any], storage: Storage,
                client: Any) -> list[dict[str, Any]]:
    """Each gate of registry.promote.gates with its rule, the run's value and the verdict."""
    assert spec.registry.promote is not None
    gates = spec.registry.promote.gates
    out = [{"gate": metric, "rule": f"{metric} {rule.strip()}", "value": metrics.get(metric),
            "passed": metrics.get(metric) is not None and rule.holds(float(metrics[metric]))}
           for metric, rule in gates.comparisons().items()]
    champion = spec.kind.champion
    if gates.beats_alias and champion is not None:
        holder, value = _champion_value(spec, client, gates.beats_alias, manifest, storage)
        out.append(_beats(champion, gates.beats_alias, holder, value, metrics.get(champion.tag)))
    return out


def fmt_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def gate_line(g: dict[str, Any]) -> str:
    return f"{'pass' if g['passed'] else 'FAIL'} {g['rule']} (value {fmt_value(g['value'])})" + (
        f" [{g['note']}]" if g.get("note") else "")


def failed_reason(failed: list[dict[str, Any]]) -> str:
    return "; ".join(f"gate {g['gate']} failed: {g['rule']}, value {fmt_value(g['value'])}" for g in failed)


def register(spec: Workflow, model_uri: str, run_id: str, metrics: dict[str, Any], manifest: dict[str, Any],
             storage: Storage, lineage: dict[str, str]) -> dict[str, Any]:
    """A new version of registry.model with lineage tags, set as challenger; the alias moves only if every gate holds."""
    from mlflow import MlflowClient

    client = MlflowClient()
    name = spec.registered_model
    promote = spec.registry.promote
    gates = check_gates(spec, metrics, manifest, storage, client) if promote else []
    tags = {**lineage, **{f"kdflow.{m}": fmt_tag(metrics[m]) for m in gate_metrics(spec.kind)
                          if metrics.get(m) is not None}}
    if promote:
        tags["kdflow.gates"] = json.dumps({"alias": promote.alias, "gates": gates}, default=str)
        tags.update({f"kdflow.gate.{g['gate']}": gate_line(g) for g in gates})
    version = registered_version(client, name, model_uri, run_id, tags)
    move_alias(client, name, CHALLENGER, version, f"registered by run {run_id}", "run")
    promoted = False
    if promote:
        failed = [g for g in gates if not g["passed"]]
        if failed:
            note = f"not promoted to @{promote.alias}: {failed_reason(failed)}"
            progress.info(f"  {name} v{version} registered, {note}")
        else:
            moved = move_alias(client, name, promote.alias, version,
                               "gates passed: " + ", ".join(g["gate"] for g in gates) if gates else "no gates",
                               "run")
            promoted = moved is not None
            note = f"promoted to @{promote.alias}"
            progress.info(f"  promoted {name} v{version} to @{promote.alias}")
        client.set_model_version_tag(name, str(version), "kdflow.promotion", note)
    aliases = sorted(client.get_model_version(name, str(version)).aliases)
    return {"model": name, "version": version, "aliases": aliases, "promoted": promoted,
            "gates": {g["gate"]: g for g in gates}, "run_id": run_id}


def registered_version(client: Any, name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> int:
    """The version of `name` that run `run_id` registers: exactly one, whatever happened before. A run
    resumed after its driver died at this step, or a create call MLflow retried after the server had done
    it but the reply was lost, finds the version already there; a second one made by such a retry is
    deleted, so a run never leaves two versions."""
    import mlflow

    from orchestrator.mlflow_http import outage

    def mine() -> list[int]:
        try:
            found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        except mlflow.exceptions.MlflowException as exc:  # no such registered model yet, or no server
            gone = outage(exc, mlflow.get_tracking_uri())
            if gone is not None:
                raise gone from None
            return []
        return sorted(int(v.version) for v in found)

    versions = mine()
    if not versions:
        try:
            with no_mlflow_eprint():
                mlflow.register_model(model_uri, name, tags=tags)
        except mlflow.exceptions.MlflowException as exc:  # the server gone is not the model name's fault
            raise outage(exc, mlflow.get_tracking_uri()) or UserError(
                f"cannot register {name!r}: {exc.message}", where="registry.model") from None
        versions = mine()
    for extra in versions[1:]:
        client.delete_model_version(name, str(extra))
    return versions[0]


def fmt_tag(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------- promote (the CLI's)


def recheck_gates(client: Any, name: str, version: int, alias: str) -> list[dict[str, Any]]:
    """The version's recorded gates, re-evaluated now: comparisons on its recorded metrics, beats_alias on
    the alias's current holder (by their recorded values of the kind's champion metric when both saw the
    same data)."""
    mv = client.get_model_version(name, str(version))
    tags = mv.tags or {}
    recorded = json.loads(tags["kdflow.gates"]) if "kdflow.gates" in tags else {"gates": []}
    out = []
    for g in recorded["gates"]:
        if g["gate"] != "beats_alias":
            metric, _, rule = g["rule"].partition(" ")
            value = float(tags[f"kdflow.{metric}"]) if f"kdflow.{metric}" in tags else g["value"]
            out.append({"gate": g["gate"], "rule": g["rule"], "value": value,
                        "passed": value is not None and Gate(rule).holds(float(value))})
        else:
            out.append(_recheck_beats(client, name, version, alias, tags, g))
    return out


def _recheck_beats(client: Any, name: str, version: int, alias: str, tags: dict[str, str],
                   recorded: dict[str, Any]) -> dict[str, Any]:
    champion = version_kind(tags).champion
    if champion is None:
        return recorded
    tag = f"kdflow.{champion.tag}"
    holder = alias_holder(client, name, alias)
    value = float(tags[tag]) if tag in tags else None
    if holder is None or holder == version:
        return _beats(champion, alias, None if holder is None else holder, value, value)
    htags = client.get_model_version(name, str(holder)).tags or {}
    same = htags.get("kdflow.data_fingerprint") == tags.get("kdflow.data_fingerprint")
    hvalue = float(htags[tag]) if same and tag in htags else None
    return _beats(champion, alias, holder, hvalue, value) if hvalue is not None else recorded


def promote(client: Any, name: str, version: int, alias: str, force: bool, reason: str | None) -> dict[str, Any]:
    """Move `alias` to `version` when its recorded gates hold now; --force needs a reason and records it."""
    import mlflow

    try:
        client.get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException:
        raise UserError(f"no version {version}", where=name) from None
    if force and not (reason and reason.strip()):
        raise UserError("--force needs --reason \"why\": a forced move is recorded with its reason", where="--reason")
    gates = recheck_gates(client, name, version, alias)
    failed = [g for g in gates if not g["passed"]]
    if failed and not force:
        raise UserError(f"not promoted: {failed_reason(failed)} (override with --force --reason \"...\")",
                        where=f"{name} v{version}")
    if force:
        why = f"forced: {reason}" + (f" (overriding {failed_reason(failed)})" if failed else "")
    else:
        why = (reason + "; " if reason else "") + ("gates passed: " + ", ".join(g["gate"] for g in gates)
                                                    if gates else "no gates recorded")
    move = move_alias(client, name, alias, version, why, "promote")
    return {"model": name, "alias": alias, "version": version, "moved": move is not None, "move": move,
            "gates": gates}


# ---------------------------------------------------------------- lineage


def kdflow_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdflow")
    except PackageNotFoundError:
        return "unknown"


def git_commit(path: str | None) -> str | None:
    """The commit of the git repository holding `path` (with '+dirty' when the file has local changes)."""
    import subprocess

    if not path or not os.path.exists(path):
        return None
    folder = os.path.dirname(os.path.abspath(path))
    try:
        head = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", folder, "status", "--porcelain", "--", os.path.abspath(path)],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def teacher_registry_versions(teachers: list[Any]) -> list[str]:
    """'name/version' for each teacher that came from models:/ (an alias resolved to its version now)."""
    from mlflow import MlflowClient

    out = []
    for t in teachers:
        if not t.origin.startswith("models:/"):
            continue
        ref = t.origin.removeprefix("models:/")
        if "@" in ref:
            name, alias = ref.split("@", 1)
            holder = alias_holder(MlflowClient(), name, alias)
            out.append(f"{name}/{holder}" if holder is not None else ref)
        else:
            out.append(ref)
    return out


def teacher_origins(teachers: list[Any]) -> list[str]:
    """Where each teacher came from, a registered one as `models:/NAME/VERSION` (its alias resolved now)."""
    registry = iter(teacher_registry_versions(teachers))
    return [f"models:/{next(registry)}" if t.origin.startswith("models:/") else t.origin for t in teachers]


def lineage_extras(spec: Workflow, source: str | None, teachers: list[Any]) -> dict[str, str]:
    """Lineage beyond the stage keys: the resolved workflow (artifact + hash), kdflow version, git commit,
    teacher digests in full and their registry versions."""
    import hashlib

    import mlflow
    import yaml

    resolved = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    mlflow.log_text(resolved, "workflow.resolved.yaml")
    out = {"kdflow.workflow.sha256": hashlib.sha256(resolved.encode()).hexdigest(),
           "kdflow.workflow.artifact": "workflow.resolved.yaml", "kdflow.version": kdflow_version(),
           "kdflow.teacher.digests": ",".join(t.digest for t in teachers)}
    if source:
        out["kdflow.workflow.file"] = os.path.abspath(source)
    commit = git_commit(source)
    if commit:
        out["kdflow.workflow.git_commit"] = commit
    registry = teacher_registry_versions(teachers)
    if registry:
        out["kdflow.teacher.registry"] = ",".join(registry)
    return out
