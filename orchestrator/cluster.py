"""What only works on one machine, refused before any work when the Ray cluster has more than one node.

On a multi-node cluster the driver (a Ray job's entrypoint on the head) and the train workers and
tasks on other nodes share nothing but the network, and the job's working directory on the head is
Ray's to remove when the job ends. So a storage root on local disk, and the embedded sqlite stores
kdflow puts there (MLflow tracking, the Optuna study), cannot work; nor can two nodes on one host
that share one Ray temp dir (docs/operations.md, "Run on a cluster"). `kdflow run` checks the nodes
it joined; `kdflow submit` checks the cluster it is about to send a job to.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from orchestrator.spec import Workflow
from tasks.errors import UserError


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    host: str
    session_dir: str  # the node's Ray session folder (its --temp-dir/session_...)


def ray_nodes() -> list[NodeInfo]:
    """The alive nodes of the cluster this process joined."""
    import ray

    return [NodeInfo(n["NodeID"], n.get("NodeManagerHostname") or n["NodeManagerAddress"],
                     os.path.dirname(os.path.dirname(n.get("ObjectStoreSocketName", ""))))
            for n in ray.nodes() if n.get("Alive")]


def auth_headers() -> dict[str, str]:
    """Ray's token auth (on by default since 2.5x): RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def dashboard_nodes(address: str) -> list[NodeInfo]:
    """The alive nodes as the cluster's dashboard (the Jobs API address) lists them; [] if it cannot say."""
    import requests

    try:
        r = requests.get(f"{address.rstrip('/')}/nodes?view=summary", headers=auth_headers(), timeout=10)
        summary = r.json()["data"]["summary"]
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return []  # an older or trimmed dashboard: the job checks again once it runs
    out = []
    for n in summary:
        raylet = n.get("raylet") or {}
        if raylet.get("state") == "ALIVE":
            out.append(NodeInfo(raylet.get("nodeId", ""), raylet.get("nodeManagerHostname") or n.get("hostname", ""),
                                raylet.get("sessionDir", "")))
    return out


def _local_path(value: str) -> bool:
    return "://" not in value


def check(spec: Workflow, nodes: list[NodeInfo], env: Mapping[str, str]) -> None:
    """Raise a UserError naming the key (or the `ray start` flag) for what cannot work on these nodes.

    `env` is the environment the run sees (the job's: only --forward-env variables, for a submit).
    """
    if len(nodes) < 2:
        return
    n = len(nodes)
    seen: dict[tuple[str, str], str] = {}
    for node in nodes:
        if node.session_dir and (node.host, node.session_dir) in seen:
            # Each node's runtime-env agent unpacks the job's working_dir into <temp>/session_*/
            # runtime_resources and replaces a folder it has not unpacked itself: with one temp dir for
            # two nodes, the second one deletes the folder the job's driver runs in.
            raise UserError(f"nodes {seen[(node.host, node.session_dir)][:8]} and {node.node_id[:8]} on host "
                            f"{node.host} share the Ray temp dir {os.path.dirname(node.session_dir)}; give each "
                            "`ray start` on one host its own --temp-dir", where="ray start --temp-dir")
        seen[(node.host, node.session_dir)] = node.node_id
    root = spec.storage.root
    if _local_path(root):
        raise UserError(f"{root!r} is on local disk, which each of the cluster's {n} nodes sees separately; "
                        "use shared object storage (s3://BUCKET/PATH)", where="storage.root")
    uri = spec.tracking.uri or env.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UserError(f"not set: the embedded sqlite MLflow store would live in the job's working directory "
                        f"on one of the cluster's {n} nodes and go when the job ends; use an MLflow server "
                        "(http://HOST:5000) or a database server (postgresql://...)", where="tracking.uri")
    if uri.startswith(("sqlite", "file:")) or _local_path(uri):
        raise UserError(f"{uri!r} is a store on local disk; on a cluster of {n} nodes use an MLflow server "
                        "(http://HOST:5000) or a database server (postgresql://...)", where="tracking.uri")
    if spec.search is not None:
        storage = spec.search.storage
        if not storage:
            raise UserError(f"not set: the embedded sqlite Optuna study would live in the job's working directory "
                            f"on one of the cluster's {n} nodes; use a database server (postgresql://...) or a "
                            "journal file on storage the head keeps (an absolute path)", where="search.storage")
        path = storage.removeprefix("journal://").removeprefix("sqlite:///")
        if (path != storage or _local_path(storage)) and not os.path.isabs(path):
            raise UserError(f"{storage!r} is a relative path, inside the job's working directory that goes "
                            "when the job ends; use a database server (postgresql://...) or an absolute "
                            "path on storage the head keeps", where="search.storage")


def check_joined(spec: Workflow) -> list[NodeInfo]:
    """In a Ray job (RAY_ADDRESS set): join the cluster and check the workflow against its nodes."""
    if not os.environ.get("RAY_ADDRESS"):
        return []  # a local Ray: one node, this machine
    from orchestrator.runtime import ensure_ray

    ensure_ray()
    nodes = ray_nodes()
    check(spec, nodes, os.environ)
    return nodes

