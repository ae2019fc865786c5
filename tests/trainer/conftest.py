"""Helpers that run the real trainer (Ray Train + DeepSpeed) in this process."""

from __future__ import annotations

import json
from pathlib import Path


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
