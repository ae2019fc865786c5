"""Helpers that run the real trainer (Ray Train + DeepSpeed) in this process."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _dist_harness_fork_server():
    """``dist_harness.run_ranks`` keeps a fork server for the session: stopped here, before the
    session's leftover-process check."""
    yield
    from tests.trainer.dist_harness import stop_fork_server

    stop_fork_server()


@pytest.fixture(scope="module")
def single_process_group():
    """A real world-size-1 gloo process group, as Ray Train would create for one worker; yields the
    worker's device (``setup_worker``)."""
    import torch.distributed as dist

    from trainer.distributed import setup_worker

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield setup_worker(use_gpu=False)


def tokenizer_overrides(shards: Path, output_dir: Path, *extra: str) -> list[str]:
    """The demo tokenizer (image 32, single-stage L2), shrunk further for tests."""
    return ["experiment=demo", f"data.train_shards={shards}", f"output_dir={output_dir}",
            "data.loader_workers=0", "data.shuffle_buffer=16", "trainer.batch_size_per_worker=4",
            "trainer.global_batch_size=null",  # workers x 4 for a new run; a resumed run keeps its own
            "trainer.num_workers=2", "trainer.cpus_per_worker=1", "trainer.log_every=1",
            "trainer.image_log_every=0", "optim.warmup_steps=2", "optim.lr=2e-3", "model.vit_enc_width=64",
            "model.vit_dec_width=64", *extra]


def train_tokenizer(overrides: list[str]):
    """Build the config as trainer/run.py does and run the launcher against the session's Ray."""
    from trainer.config import build_config
    from trainer.launch import launch
    from trainer.schema import TokenizerTrainConfig

    cfg = build_config("tokenizer", TokenizerTrainConfig, overrides)
    assert launch(cfg) == 0
    return cfg


def mlflow_run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]


def metric_by_step(tracking_uri: str, run_id: str, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    return {m.step: m.value for m in MlflowClient(tracking_uri).get_metric_history(run_id, key)}
