"""Checkpoint and export layout of a run directory (local or s3://).

    <run_dir>/config.yaml                      resolved config of the run (secrets masked)
    <run_dir>/mlflow_run.json                  the MLflow run every attempt of this run logs to
    <run_dir>/checkpoints/step_<9 digits>/     train state, managed by Ray Train (keep last K)
        model/, discriminator/                 DeepSpeed engine checkpoints (optimizer, scheduler)
        ema/rank<r>.safetensors                EMA shadow (one file per rank under ZeRO-3)
        rng/rank<r>.pt                         RNG states (dropout etc.) for an exact resume
        stage_state.safetensors                stage extras (e.g. LeCam EMA of the discriminator)
        train_state.json                       step, data position, counters
        COMPLETE                               written last, after every rank's files are stored
    <run_dir>/exports/step_<9 digits>/         EMA weights in the authors' hub format
        config.json, model.safetensors, meta.json, COMPLETE

A directory without ``COMPLETE`` is incomplete and every reader ignores it.
"""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster import storage

MARKER = "COMPLETE"
CHECKPOINTS = "checkpoints"
EXPORTS = "exports"


def step_name(step: int) -> str:
    return f"step_{step:09d}"


def parse_step(name: str) -> int | None:
    name = name.rstrip("/").rsplit("/", 1)[-1]
    if name.startswith("step_") and name[5:].isdigit():
        return int(name[5:])
    return None


@dataclass
class TrainState:
    """What the loop needs besides engines to continue exactly where it stopped."""

    step: int = 0                  # optimizer steps taken
    micro_batches: int = 0         # micro-batches consumed: the data position
    samples_seen: int = 0          # global, all ranks
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    resumed_from: int | None = None
    gpu_seconds: float = 0.0       # accumulated accelerator time of all workers

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class ExportInfo:
    url: str
    step: int
    meta: dict[str, Any] = field(default_factory=dict)


def _complete_step_dirs(root: str) -> list[tuple[int, str]]:
    """(step, url) of every ``step_*`` directory under ``root`` holding the marker."""
    found: dict[int, str] = {}
    marker_suffix = "/" + MARKER if storage.is_remote(root) else os.sep + MARKER
    for info in storage.list_files(root):
        if info.url.endswith(marker_suffix):
            directory = info.url[: -len(marker_suffix)]
            step = parse_step(directory)
            if step is not None:
                found[step] = directory
    return sorted(found.items())


def list_exports(run_dir: str) -> list[ExportInfo]:
    """Complete exports of a run, oldest first."""
    out = []
    for step, url in _complete_step_dirs(storage.join(run_dir, EXPORTS)):
        meta_url = storage.join(url, "meta.json")
        meta = json.loads(storage.read_text(meta_url)) if storage.exists(meta_url) else {}
        out.append(ExportInfo(url, step, meta))
    return out


def latest_export(run_dir: str) -> ExportInfo | None:
    exports = list_exports(run_dir)
    return exports[-1] if exports else None


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Complete train-state checkpoints of a run as (step, url), oldest first."""
    return _complete_step_dirs(storage.join(run_dir, CHECKPOINTS))


def mark_complete(directory: str) -> None:
    storage.write_bytes(storage.join(directory, MARKER), b"")


def is_complete(directory: str) -> bool:
    return storage.exists(storage.join(directory, MARKER))


def write_export(run_dir: str, step: int, state_dict: dict[str, torch.Tensor], config_json: dict,
                 meta: dict[str, Any]) -> str:
    """Write an export (rank 0): weights, config, meta, then the marker. Returns its URL."""
    from safetensors.torch import save

    url = storage.join(run_dir, EXPORTS, step_name(step))
    if is_complete(url):
        return url
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    storage.write_bytes(storage.join(url, "model.safetensors"), save(tensors, metadata={"format": "pt"}))
    storage.write_text(storage.join(url, "config.json"), json.dumps(config_json, indent=2))
    storage.write_text(storage.join(url, "meta.json"), json.dumps({"step": step, **meta}, indent=2))
    mark_complete(url)
    return url


# ----------------------------------------------------------------------------------------------
# Per-rank pieces of a train-state checkpoint (written into a local dir that Ray Train persists)


def save_rng(directory: Path, rank: int) -> None:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.tensor(np.frombuffer(_pickle_numpy_state(), dtype=np.uint8)),
        "python": torch.tensor(np.frombuffer(json.dumps(_python_state()).encode(), dtype=np.uint8)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / f"rank{rank}.pt")


def load_rng(directory: Path, rank: int) -> bool:
    path = directory / f"rank{rank}.pt"
    if not path.exists():
        return False
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np.random.set_state(_unpickle_numpy_state(state["numpy"].numpy().tobytes()))
    py = json.loads(state["python"].numpy().tobytes().decode())
    random.setstate((py[0], tuple(py[1]), py[2]))
    return True


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _pickle_numpy_state() -> bytes:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    buf = io.BytesIO()
    np.savez(buf, keys=keys, meta=np.array([pos, has_gauss], dtype=np.int64), gauss=np.array([gauss]))
    return buf.getvalue()


def _unpickle_numpy_state(blob: bytes) -> tuple:
    data = np.load(io.BytesIO(blob))
    pos, has_gauss = (int(x) for x in data["meta"])
    return ("MT19937", data["keys"], pos, has_gauss, float(data["gauss"][0]))
