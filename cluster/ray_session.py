"""The driver's connection to Ray: the cluster named by ``RAY_ADDRESS``, else a fresh local instance.

Every entry point that runs Ray work (``trainer/run.py``, ``data_prep/shard.py``, ``evals/run.py``)
calls :func:`connect_ray` once. ``ray job submit`` and ``python -m cluster.local up`` set
``RAY_ADDRESS``; without it Ray starts a private instance for this process (``address="local"``).
Plain ``ray.init()`` is avoided on purpose: it joins whatever cluster a stale
``/tmp/ray/ray_current_cluster`` file points at, which may be someone else's or long dead.

A local instance ends with the process that started it, and nothing of it outlives the process:
:func:`shutdown_ray` (registered at exit by :func:`connect_ray`, callable earlier) stops it in an
order that leaves no Ray process talking to a GCS that is gone:

1. Ray Train's actors of finished runs exit first. The controller is kept alive by the SIGINT
   handler ``DataParallelTrainer.fit()`` installs (its closure holds the controller's handle), so
   :func:`train_controller_released` restores the previous handler after ``fit()``. The detached
   ``PlacementGroupCleaner`` asks the state API every second whether the controller lives, and its
   loop survives only ``RayStateApiException``: one still polling when the GCS and the dashboard
   go away dies of ``RpcError: Timed out while waiting for GCS``, a traceback on the console after
   a run that succeeded. So :func:`shutdown_ray` waits until no Ray Train actor is alive.
2. ``ray.shutdown()`` stops the raylet, the GCS, the dashboard and Ray's helper processes.
3. Workers are meant to notice their raylet's end by themselves; one that does not runs on (the
   test suite once left a ``ray::TrainController`` alive for half an hour, re-parented to init),
   and so does anything a worker started in the background. Every process of the instance (the
   raylet's descendants, and any process whose environment names the raylet, which finds those
   re-parented to init) still alive a few seconds later is killed.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import time
from typing import Iterator

# What a worker on another node needs to reach the same services. Credentials are deliberately
# absent: on a cluster they come from the node's instance profile (or its own credential chain),
# and they must never travel in a runtime_env (it is visible in the dashboard and job records).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",  # object store
    "MLFLOW_TRACKING_URI",                                                         # tracking server
    "DS_ACCELERATOR",                                                              # cpu on CPU-only nodes
    "TITOK_S3_MULTIPART_THRESHOLD", "TITOK_S3_MULTIPART_CHUNKSIZE",                # storage tuning
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",                                      # read by the controller
)


# Worker settings of ours, unless the user sets them. Ray Train 2.60 routes a worker's print() through
# its logger *and* tees it to stdout once anything wraps sys.stdout (DeepSpeed, MLflow do), so every
# progress line would reach the driver twice.
WORKER_ENV_DEFAULTS = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def forwarded_env() -> dict[str, str]:
    """The :data:`FORWARDED_ENV` variables set in this process, plus :data:`WORKER_ENV_DEFAULTS`.

    Under ``ray job submit --runtime-env-json '{"env_vars": ...}'`` the job's variables already reach
    every worker, and ``ray.init`` refuses (ValueError) a runtime_env naming any of them again: those
    are left out.
    """
    env = {k: os.environ.get(k, v) for k, v in WORKER_ENV_DEFAULTS.items()}
    env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")  # set by Ray's job supervisor
    job_vars = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {k: v for k, v in env.items() if k not in job_vars}


# Ray's variable for the state API's address; it takes precedence over RAY_ADDRESS there.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def _free_local_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def connect_ray(num_cpus: int | None = None) -> float:
    """Connect to ``RAY_ADDRESS`` or start a local Ray; returns the seconds it took (0 if already connected).

    ``num_cpus`` sizes a local instance (default: the machine's cores); an existing cluster has its
    own resources, so it is ignored there. The local instance lives only as long as this process
    (start one with ``python -m cluster.local up`` to keep a cluster up between commands).
    """
    import ray

    if ray.is_initialized():
        return 0.0
    start = time.time()
    address = os.environ.get("RAY_ADDRESS") or "local"
    env_vars = forwarded_env()
    local = {}
    if address == "local":
        # The local instance keeps its dashboard (on 127.0.0.1): Ray Train's controller asks the state
        # API whether it is alive when a run ends, and without it every fit() waits out a 12 s timeout.
        # Its workers are told where that API is: left to find it themselves (no RAY_ADDRESS), they
        # look for running GCS processes and give up when the machine has two Ray instances (Ray
        # Train's PlacementGroupCleaner then dies with a ConnectionError traceback).
        port = _free_local_port()
        env_vars = {**env_vars, API_SERVER_ENV: f"http://127.0.0.1:{port}"}
        local = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
                 "num_cpus": num_cpus}
    ray.init(address=address, runtime_env={"env_vars": env_vars} if env_vars else None,
             log_to_driver=True, configure_logging=False, **local)
    if address == "local":
        global _STARTED_LOCAL, _LOCAL_API_SERVER
        _STARTED_LOCAL, _LOCAL_API_SERVER = True, env_vars[API_SERVER_ENV]
        # atexit runs last-registered first: this orderly shutdown comes before Ray's own at-exit one.
        atexit.register(shutdown_ray)
    return time.time() - start


# ----------------------------------------------------------------------------------------------
# Ending a local instance

# Whether this process started the local instance it is connected to (then it also ends it),
# and that instance's state API (the dashboard's HTTP address).
_STARTED_LOCAL = False
_LOCAL_API_SERVER: str | None = None
# Ray Train's actors that poll the GCS on their own until they exit.
TRAIN_ACTORS = ("TrainController", "PlacementGroupCleaner", "RayTrainWorker", "PreemptionWatcher", "DatasetManager")
TRAIN_ACTORS_GRACE_S = 15.0   # for a run's actors to exit after fit() (normally well under a second)
PROCESS_GRACE_S = 10.0        # for the instance's processes to exit after ray.shutdown()


@contextlib.contextmanager
def train_controller_released() -> Iterator[None]:
    """Wrap ``TorchTrainer.fit()``: on leaving, SIGINT's handler is the one from before, however fit() ended.

    fit() installs a handler that is a closure over the run's controller: as long as it is installed,
    the controller actor (and the actors it owns) stays alive, polling, although its run is over."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is not previous:
            signal.signal(signal.SIGINT, previous)


def _alive_train_actors() -> list[str]:
    from ray.util.state import list_actors

    actors = list_actors(address=_LOCAL_API_SERVER, filters=[("state", "=", "ALIVE")], limit=1000, timeout=5,
                         raise_on_missing_output=False)
    return [a.class_name for a in actors if a.class_name in TRAIN_ACTORS]


def _wait_for_train_actors(timeout_s: float) -> list[str]:
    """Poll the state API until no Ray Train actor is alive; returns the ones still alive at the end."""
    deadline = time.monotonic() + timeout_s
    alive: list[str] = []
    while True:
        try:
            alive = _alive_train_actors()
        except Exception:  # noqa: BLE001 - no dashboard to ask: go on with the shutdown
            return []
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.25)


def local_instance_pids() -> set[int]:
    """PIDs of the local Ray instance this process started: its raylet, GCS, dashboard and helper
    processes, their descendants (workers, dashboard modules) and the processes whose environment
    names its raylet (workers already re-parented to init). Empty when there is no local instance."""
    import psutil
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return set()
    roots = [info.process.pid for infos in node.all_processes.values() for info in infos]
    raylets = [info.process.pid for info in node.all_processes.get("raylet", [])]
    pids = set(roots)
    for pid in roots:
        try:
            pids.update(child.pid for child in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            continue
    pids.update(_processes_of_raylets(raylets))
    pids.discard(os.getpid())
    return pids


def _processes_of_raylets(raylet_pids: list[int]) -> set[int]:
    """Processes whose environment says a raylet in ``raylet_pids`` started them (Ray sets RAY_RAYLET_PID)."""
    import psutil

    wanted = {str(pid) for pid in raylet_pids}
    found = set()
    if not wanted:
        return found
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RAY_RAYLET_PID") in wanted:
                found.add(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


def _live(pids: set[int]) -> set[int]:
    import psutil

    live = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                live.add(pid)
        except psutil.Error:
            continue
    return live


def shutdown_ray() -> None:
    """Disconnect from Ray; a local instance this process started is stopped completely (module
    docstring: Ray Train's actors first, then Ray, then whatever of it is left, by pid)."""
    import ray

    global _STARTED_LOCAL
    if not ray.is_initialized():
        return
    if not _STARTED_LOCAL:  # a cluster that others use: only leave it
        ray.shutdown()
        return
    _STARTED_LOCAL = False
    _wait_for_train_actors(TRAIN_ACTORS_GRACE_S)
    node = getattr(ray._private.worker, "_global_node", None)
    raylets = [info.process.pid for info in node.all_processes.get("raylet", [])] if node else []
    pids = local_instance_pids()
    ray.shutdown(wait_for_processes=True)
    deadline = time.monotonic() + PROCESS_GRACE_S
    while (left := _live(pids | _processes_of_raylets(raylets))) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


__all__ = ["FORWARDED_ENV", "TRAIN_ACTORS", "forwarded_env", "connect_ray", "train_controller_released",
           "local_instance_pids", "shutdown_ray"]

