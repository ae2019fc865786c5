"""The driver's connection to Ray: the cluster named by ``RAY_ADDRESS``, else a fresh local instance.

Every entry point that runs Ray work (``trainer/run.py``, ``data_prep/shard.py``, ``evals/run.py``)
calls :func:`connect_ray` once. ``ray job submit`` and ``python -m cluster.local up`` set
``RAY_ADDRESS``; without it Ray starts a private instance for this process (``address="local"``).
Plain ``ray.init()`` is avoided on purpose: it joins whatever cluster a stale
``/tmp/ray/ray_current_cluster`` file points at, which may be someone else's or long dead.
"""

from __future__ import annotations

import json
import os
import time

# What a worker on another node needs to reach the same services. Credentials are deliberately
# absent: on a cluster they come from the node's instance profile (or its own credential chain),
# and they must never travel in a runtime_env (it is visible in the dashboard and job records).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",  # object store
    "MLFLOW_TRACKING_URI",                                                         # tracking server
    "DS_ACCELERATOR",                                                              # cpu on CPU-only nodes
    "TITOK_S3_MULTIPART_THRESHOLD", "TITOK_S3_MULTIPART_CHUNKSIZE",                # storage tuning
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
    # The local instance keeps its dashboard (on 127.0.0.1): Ray Train's controller asks the state API
    # whether it is alive when a run ends, and without it every fit() waits out a 12 s timeout.
    local = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "num_cpus": num_cpus} \
        if address == "local" else {}
    ray.init(address=address, runtime_env={"env_vars": env_vars} if env_vars else None,
             log_to_driver=True, configure_logging=False, **local)
    return time.time() - start


__all__ = ["FORWARDED_ENV", "forwarded_env", "connect_ray"]
