"""Starting or joining Ray: a local instance by default, the cluster inside a submitted job."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from orchestrator.spec import TrainSpec, Workflow

LOCAL_MIN_CPUS = 8

T = TypeVar("T")


def ensure_ray(dashboard: bool = True) -> None:
    """Join the cluster when RAY_ADDRESS says so (as in a Ray job), else start a quiet local Ray.

    Locally Ray gets at least LOCAL_MIN_CPUS logical CPUs: on a 2-core box, 2 train workers would
    otherwise take every CPU and leave none for the tasks they wait on (see docs/architecture.md).
    `dashboard=False` starts a local Ray without its dashboard (fewer processes, a faster start), for a
    run that starts no Ray Train run: Train's controller and cleaner ask the dashboard's State API.
    """
    import ray

    if ray.is_initialized():
        return
    # Ray Train's controller takes a worker's report once per health-check poll (2 s by default), and
    # a report waits for it: poll faster so a short run does not spend seconds per checkpoint waiting.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"],
           "PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p and os.path.isdir(p))}
    # OpenMP's wait policy is PyTorch's default unless the user set one. kdflow set PASSIVE (threads sleep
    # between parallel regions) for a while: it helped 2 torch threads on a 2-core machine overloaded by other
    # jobs, but on a machine the run has to itself it made a small MLP train 2-5x slower than plain PyTorch
    # (0.35x; benchmarks/RESULTS-train.md, 2026-11-30). OMP_WAIT_POLICY=PASSIVE in the environment brings it back.
    if os.environ.get("OMP_WAIT_POLICY"):
        env["OMP_WAIT_POLICY"] = os.environ["OMP_WAIT_POLICY"]
    from orchestrator.quiet import filter_ray_worker_logs, quiet_ray_start

    quiet_ray_start()
    if os.environ.get("RAY_ADDRESS"):
        # Ray's own INFO line for a join ("Connected to Ray cluster. View the dashboard at ...") carries
        # terminal colour codes wherever stderr goes: kdflow says it in its own words
        context = ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, logging_level="WARNING",
                           runtime_env=_joined_env(env))
        from rich.markup import escape

        from orchestrator import progress

        url = getattr(context, "dashboard_url", None)
        progress.info("  [dim]" + escape(f"joined the Ray cluster at {os.environ['RAY_ADDRESS']}"
                                         + (f"; dashboard http://{url}" if url else "")) + "[/]")
    else:
        _start_local(env, dashboard)
    filter_ray_worker_logs()


def _joined_env(env: dict[str, str]) -> dict[str, Any] | None:
    """What a joined cluster's workers get from this run: RAY_ADDRESS (the GCS address), so that Ray Train's
    PlacementGroupCleaner, which asks the State API, finds this cluster and not "multiple active Ray instances"
    when another Ray runs on the same machine (it printed a traceback into successful runs), and Train's
    health-check interval. A key the job's own runtime_env already sets is left to it (Ray refuses to merge
    two values of one variable)."""
    address = os.environ["RAY_ADDRESS"]
    wanted = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]}
    if ":" in address and "://" not in address:  # a GCS host:port, not "auto" nor a ray:// client address
        wanted["RAY_ADDRESS"] = address
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "")
    wanted = {k: v for k, v in wanted.items() if f'"{k}"' not in job}
    return {"env_vars": wanted} if wanted else None


def in_background(fn: Callable[[], T]) -> Future[T]:
    """`fn` (Ray's start, the run's warm actors) on a thread while the driver goes on (MLflow's import and
    store); its result or error comes through the returned future.

    A local Ray's processes die with the thread that started them (Ray ties them to it with the kernel's
    parent-death signal), so a thread that started one stays, idle, for the rest of the process. It is a
    daemon: an exit does not wait for it, and Ray's own exit hook stops the cluster first. Ray's SIGTERM
    handler (which only the main thread may set) is set here, as `ray.init` would have; what Ray imports
    is imported here first, so the two threads never wait on each other's imports."""
    import signal
    import threading

    import ray

    from orchestrator.quiet import quiet_ray_start
    from tasks.ray_internals import import_start_modules

    import_start_modules()

    if threading.current_thread() is threading.main_thread() and not ray.is_initialized():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    quiet_ray_start()
    future: Future[T] = Future()

    def run() -> None:
        was = ray.is_initialized()
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(exc)
        if not was and ray.is_initialized():
            threading.Event().wait()  # this thread's life is the local Ray's

    threading.Thread(target=run, name="kdflow-ray-start", daemon=True).start()
    return future


def warm_enabled() -> bool:
    """KDFLOW_WARM=0 sends every fit through Ray Train and every shard through a Ray task: the paths before
    warm actors, which benchmarks compare in one run."""
    return os.environ.get("KDFLOW_WARM", "1") != "0"


def uses_ray_train(train: TrainSpec) -> bool:
    """Whether this run may start a Ray Train run (whose controller needs Ray's dashboard): not when every
    fit is single-worker on CPUs on a warm actor (orchestrator/fitting.py decides where a fit runs)."""
    return not warm_enabled() or train.workers != 1 or train.use_gpu


class RayStart:
    """A local Ray's start on a thread, begun before the driver imports torch and MLflow and reads the data,
    then the run's warm actors (`then`), started by the same thread once the driver has imported what they
    need (two threads importing torch's modules at once can see each other's half-made modules).

    `begin` is the CLI's: Ray's start (5-8 s here, its processes importing beside the driver's imports) is
    then off the run's critical path. A run that fails before it needs Ray (a data mistake) waits for the
    start to finish (`abandon`) so that Ray's exit hook stops a whole node, not one half-started."""

    def __init__(self, dashboard: bool) -> None:
        self._go = threading.Event()
        self._then: Callable[[], Any] | None = None
        self.future: Future[Any] = in_background(lambda: self._run(dashboard))

    def _run(self, dashboard: bool) -> Any:
        ensure_ray(dashboard=dashboard)
        self._go.wait()
        return self._then() if self._then is not None else None

    @classmethod
    def begin(cls, spec: Workflow) -> RayStart | None:
        """Start a local Ray now; None where that is not this process's to do early (a Ray job joins its
        cluster in the run's cluster check; a Ray already up is used as it is)."""
        import ray

        if os.environ.get("RAY_ADDRESS") or ray.is_initialized():
            return None
        return cls(uses_ray_train(spec.train))

    def then(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the start's thread once Ray is up; its result (or Ray's start error) comes through
        `future`. Called once."""
        self._then = fn
        self._go.set()
        return self.future

    def abandon(self) -> Any:
        """The run failed before it needed Ray: let the start finish, and return what `then`'s function
        returned, for the caller to stop (None if it failed: its error is dropped)."""
        self._go.set()
        try:
            return self.future.result()
        except BaseException:  # noqa: BLE001 - the run's own error is the one reported
            return None


def stop_ray() -> None:
    """Disconnect from Ray, stopping a local Ray this process started. Ray stops a local node's processes
    one after another, giving each a second to exit after SIGTERM; its autoscaler monitor used the whole
    second every time (1.02 of a 1.47 s shutdown here), so a local head's is killed first (best effort:
    `tasks.ray_internals.stop_local_monitor`)."""
    import ray

    if not ray.is_initialized():
        return
    if not os.environ.get("RAY_ADDRESS"):
        from tasks.ray_internals import stop_local_monitor

        stop_local_monitor()
    ray.shutdown()


def _start_local(env: dict[str, str], dashboard: bool = True) -> None:
    import ray

    # Ray's own helpers inside workers (Train's PlacementGroupCleaner asks the State API) find "their"
    # cluster by RAY_ADDRESS, else by looking for GCS processes: with two local Rays on the machine (two
    # `kdflow run` at once) that fails with "Found multiple active Ray instances". So the GCS gets a
    # port chosen here, and the workers get its address.
    port = _free_port()
    from ray.util import get_node_ip_address

    env["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"
    # With a fixed GCS port Ray waits only ~20 s for its GCS (port 0 gets 120 s): give it the same budget,
    # a loaded machine needs it.
    start_env = {"RAY_GCS_SERVER_PORT": str(port),
                 "RAY_gcs_server_port_wait_time_s": os.environ.get("RAY_gcs_server_port_wait_time_s", "120")}
    saved = {k: os.environ.get(k) for k in start_env}
    os.environ.update(start_env)
    try:
        # address="local": never attach to a cluster a `ray start` left on this machine by accident
        # A run whose stages all go to its warm actors (no dashboard) gets no pre-started idle workers either:
        # Ray starts one per CPU as the driver connects, each a Python process importing Ray, and none of
        # them would run anything (the actors get processes of their own); on 2 cores they took the CPU the
        # driver's imports and the actors' start needed (benchmarks/RESULTS-warm.md, `make demo`'s start).
        ray.init(address="local", num_cpus=max(LOCAL_MIN_CPUS, os.cpu_count() or 1), log_to_driver=True,
                 configure_logging=True, logging_level="WARNING", runtime_env={"env_vars": env},
                 include_dashboard=None if dashboard else False,
                 _system_config=None if dashboard else {"enable_worker_prestart": False})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])
