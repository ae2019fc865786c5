"""Driver side of ``trainer/run.py``: connect to Ray and run a Ray Train ``TorchTrainer``.

The driver owns what must happen once per job: the run directory and its resolved config, the MLflow
run (created once, re-opened on resume), the Ray Train wiring (scaling, storage, checkpoint keeping,
failure restarts). The workers run :func:`trainer.loop.train_worker`.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from cluster import storage
from cluster.local import apply_service_env
from cluster.ray_session import connect_ray, train_controller_released
from trainer.config import EXIT_CONFIG_ERROR, ConfigError, to_yaml
from trainer.schema import TrainConfigBase


def absolute_run_dir(cfg: TrainConfigBase) -> str:
    run_dir = cfg.run_dir
    return run_dir if storage.is_remote(run_dir) else str(Path(run_dir).resolve())


def launch(cfg: TrainConfigBase) -> int:
    """Train until ``trainer.max_steps``; resumes from the latest checkpoint under ``output_dir``."""
    from trainer.preflight import check_training
    from trainer.resume import previous_run_config, resolve_run

    apply_service_env()
    cfg.output_dir = absolute_run_dir(cfg)
    try:
        # The run's invariants, global batch and worker count, before anything is written
        # (trainer/resume.py); then inputs and output: before MLflow, Ray or any weights (trainer/preflight.py).
        notices = resolve_run(cfg, previous_run_config(cfg.output_dir))
        check_training(cfg)
    except ConfigError as err:
        print(str(err), file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR
    for notice in notices:
        print(f"note: {notice}", flush=True)

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainer import tracking
    from trainer.loop import train_worker

    run_dir = cfg.output_dir
    storage.ensure_bucket(run_dir)
    storage.write_text(storage.join(run_dir, "config.yaml"), to_yaml(cfg))

    run_ref = None
    if cfg.mlflow.enabled:
        tracking_uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
        run_ref = tracking.open_run(cfg, run_dir, tracking_uri, cfg.mlflow.experiment,
                                    tags={"run_name": cfg.run_name, "stage": cfg.stage.value,
                                          "experiment": cfg.experiment or "", "output_dir": run_dir})
        print(f"MLflow run {run_ref.run_id} at {tracking_uri}", flush=True)

    connect_ray()
    fs, path = storage.pyarrow_filesystem(run_dir)
    tr = cfg.trainer
    resources = {"CPU": tr.cpus_per_worker, **({"GPU": 1} if tr.use_gpu else {})}
    if tr.elastic:
        scaling = ScalingConfig(num_workers=(tr.min_workers, tr.max_workers), use_gpu=tr.use_gpu,
                                resources_per_worker=resources,
                                elastic_resize_monitor_interval_s=tr.elastic_resize_interval_s)
    else:
        scaling = ScalingConfig(num_workers=tr.num_workers, use_gpu=tr.use_gpu, resources_per_worker=resources)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg, "mlflow": run_ref},
        scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if tr.use_gpu else "gloo"),
        run_config=RunConfig(
            name="checkpoints",
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=tr.keep_checkpoints),
            # A lost node is a worker-group failure: an elastic group retries on what is left.
            # Preemptions (drain notices) have their own, unlimited, budget (max_preemption_failures).
            failure_config=FailureConfig(max_failures=tr.effective_max_failures),
        ),
    )
    started = time.time()
    status = "FAILED"
    try:
        # fit()'s SIGINT handler holds the run's controller: SIGINT is given back when fit() returns, so
        # that the controller and its helpers exit now, not when Ray shuts down (cluster/ray_session.py).
        with train_controller_released():
            result = trainer.fit()
        status = "FINISHED"
    except Exception as err:  # noqa: BLE001 - Ray wraps the workers' errors; show the root cause
        print(f"\ntraining failed: {root_cause(err)}\n(the full traceback is above; the run dir {run_dir} keeps "
              "every complete checkpoint, and re-running the same command resumes from the latest)",
              file=sys.stderr, flush=True)
        return 1
    finally:
        if run_ref is not None:
            tracking.finish_run(run_ref, status)
    print(f"done in {time.time() - started:.0f}s; run dir {run_dir}; last checkpoint "
          f"{result.checkpoint.path if result.checkpoint else None}", flush=True)
    return 0


def root_cause(err: BaseException) -> str:
    """The last ``SomeError: message`` line of a (Ray-wrapped) worker traceback, else ``str(err)``."""
    lines = [line.strip() for line in str(err).splitlines()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*:", line)]
    return causes[-1] if causes else (lines[0] if lines else type(err).__name__)
