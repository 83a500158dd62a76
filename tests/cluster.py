"""A real two-node Ray cluster on one host: a head and a second node joined to it on loopback.

Each node is a `ray start --block` in its own process group, so a test can stop exactly one node
(os.killpg) and nothing else on the machine. A second node on the same host needs its own port for
every per-node service (raylet, object manager, dashboard agent, metrics, runtime-env agent, workers)
and its own --temp-dir: with a shared one both nodes' runtime-env agents would unpack (and delete)
the same working_dir package folder.
Used by tests/test_cluster.py and benchmarks/bench_cluster.py.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


# worker port ranges handed out in this session: a single port is never picked inside one (the OS's
# ephemeral ports overlap them, and `ray start` refuses a node whose ports collide: seen in a CI check,
# node_manager 36311 inside worker_ports 36305-36364), nor a range over another
_RANGES: list[tuple[int, int]] = []
_TAKEN: set[int] = set()  # single ports handed out in this session: no range is picked over one


def _in_a_range(port: int) -> bool:
    return any(lo <= port <= hi for lo, hi in _RANGES)


def free_port() -> int:
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not _in_a_range(port):
            _TAKEN.add(port)
            return port
    raise RuntimeError("no free port outside the worker port ranges")


def free_range(size: int = 60) -> tuple[int, int]:
    """A block of ports nobody listens on now, for one node's workers (two raylets must not share one)."""
    for _ in range(200):
        lo = random.randrange(20000, 40000)
        if any(lo <= hi2 and lo + size - 1 >= lo2 for lo2, hi2 in _RANGES) or \
                any(lo <= p < lo + size for p in _TAKEN):
            continue
        ok = True
        for p in range(lo, lo + size, 7):  # a sample: enough to dodge a range another Ray already uses
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            _RANGES.append((lo, lo + size - 1))
            return lo, lo + size - 1
    raise RuntimeError("no free port range")


def node_ports() -> list[str]:
    lo, hi = free_range()  # first, so that the single ports avoid it
    ports: set[int] = set()
    while len(ports) < 6:
        ports.add(free_port())
    names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "metrics-export-port", "runtime-env-agent-port")
    return [*(f"--{name}={port}" for name, port in zip(names, sorted(ports), strict=True)),
            f"--min-worker-port={lo}", f"--max-worker-port={hi}"]


class Node:
    def __init__(self, proc: subprocess.Popen, temp: Path, log: Path) -> None:
        self.proc, self.temp, self.log = proc, temp, log

    def kill(self) -> None:
        """SIGKILL the node's whole process group: raylet, its workers, its agents (a lost machine)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # `ray start --block` stops its node's processes on SIGTERM
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=60)
        self.kill()  # whatever is left in the group


class TwoNodes:
    """Head (jobs API on `address`, GCS on `gcs`) plus one worker node; `stop()` ends both."""

    def __init__(self, root: Path, cpus: int = 4, env: dict[str, str] | None = None,
                 shared_temp: bool = False) -> None:
        self.root = root  # logs; the temp dirs go under a short path (Ray's socket paths must fit 107 bytes)
        self.temp = Path(tempfile.mkdtemp(prefix="kd2n-", dir="/tmp"))
        self.shared_temp = shared_temp  # only to show what goes wrong without a temp dir per node
        self.cpus = cpus
        inherited = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        self.env = {**inherited, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
        self.nodes: list[Node] = []
        self.address = ""
        self.gcs = ""

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Node:
        temp = self.temp / ("head" if self.shared_temp else name)
        temp.mkdir(parents=True, exist_ok=True)
        log = self.root / f"{name}.log"
        proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", *args, *node_ports(),
                                 f"--num-cpus={self.cpus}", f"--temp-dir={temp}", "--disable-usage-stats"],
                                env={**self.env, **(env or {})}, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(proc, temp, log)
        self.nodes.append(node)
        return node

    def start(self, timeout: float = 300) -> TwoNodes:
        import requests

        port, dash = free_port(), free_port()
        head = self._start("head", ["--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                                    f"--ray-client-server-port={free_port()}"])
        self.address, self.gcs = f"http://127.0.0.1:{dash}", f"127.0.0.1:{port}"
        from orchestrator.cluster import auth_headers

        # the jobs API answers before `ray start` has finished starting the head's other processes; a node
        # joining then competes with them for the CPU, so wait for the head's own "started" line as well
        self._wait(lambda: requests.get(f"{self.address}/api/version", headers=auth_headers(), timeout=2).ok
                   and "Ray runtime started" in head.log.read_text(), head, timeout)
        self._join(timeout)
        return self

    def _join(self, timeout: float, attempts: int = 3) -> None:
        """Start the second node; start it again if `ray start` gives up on it.

        `ray start` waits a fixed 30 s for its raylet to register with the GCS and exits 1 past that
        ("The current node timed out during startup"). On a loaded 2-core machine the first RPC alone
        can take that long (or its first node-info RPC passes its deadline), so that failure is retried on
        fresh ports, as is a port another component
        took (`free_port` avoids the worker ranges, so this should not happen); any other exit is raised.
        Checked by freezing the head's GCS (SIGSTOP, 40 s) as the node joins: two attempts timed out, the
        third joined, and the cluster had its two nodes alive.
        """
        for attempt in range(1, attempts + 1):
            # a joining node authenticates with the cluster's token (~/.ray/auth_token, written by the head),
            # and only tries to when told: RAY_AUTH_MODE=token
            node = self._start("worker", [f"--address={self.gcs}", "--node-ip-address=127.0.0.1"],
                               {"RAY_AUTH_MODE": "token"})
            try:
                self._wait(lambda: len(self.alive_nodes()) == 2, node, timeout)
                return
            except RuntimeError:
                log = node.log.read_text()
                transient = ("timed out during startup", "used by other components", "Deadline Exceeded")
                if attempt == attempts or not any(t in log for t in transient):
                    raise
                node.log.rename(node.log.with_suffix(f".attempt{attempt}.log"))
                node.stop()
                self.nodes.remove(node)
                shutil.rmtree(node.temp, ignore_errors=True)
                time.sleep(5)  # let the GCS mark the half-joined node dead before the next one registers

    def _wait(self, ready, node: Node, timeout: float) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {node.proc.returncode}: {node.log.read_text()[-2000:]}")
            with contextlib.suppress(Exception):
                if ready():
                    return
            time.sleep(0.5)
        raise TimeoutError(f"node not ready within {timeout}s: {node.log.read_text()[-2000:]}")

    def alive_nodes(self) -> list[dict]:  # type: ignore[type-arg]
        import requests

        from orchestrator.cluster import auth_headers

        r = requests.get(f"{self.address}/nodes?view=summary", headers=auth_headers(), timeout=5)
        summary = r.json()["data"]["summary"]
        return [n for n in summary if n.get("raylet", {}).get("state") == "ALIVE"]

    @property
    def worker(self) -> Node:
        return self.nodes[1]

    def restart_worker(self, timeout: float = 300) -> None:
        """The second node lost (SIGKILL of its whole process group, as a machine that dies) and a new one
        joined in its place, on fresh ports and a fresh temp dir."""
        node = self.nodes.pop(1)
        node.kill()
        shutil.rmtree(node.temp, ignore_errors=True)
        deadline = time.monotonic() + 60
        while len(self.alive_nodes()) > 1 and time.monotonic() < deadline:  # the GCS sees it gone
            time.sleep(1)
        self._join(timeout)

    def stop(self) -> None:
        """The cluster thrown away: each node's process group killed (a graceful stop of a head that lost a
        node took ~30 s of the cluster tests' teardown), then the temp dirs removed."""
        for node in reversed(self.nodes):
            node.kill()
        shutil.rmtree(self.temp, ignore_errors=True)
