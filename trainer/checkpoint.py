"""Checkpoint and export layout of a run directory (local or s3://).

    <run_dir>/config.yaml                      resolved config of the run (secrets masked)
    <run_dir>/mlflow_run.json                  the MLflow run every attempt of this run logs to
    <run_dir>/checkpoints/step_<9 digits>/     train state, managed by Ray Train (keep last K)
        model/, discriminator/                 engine state in a world-size-free layout (engine_state.py):
            rank<r>.safetensors                this rank's fragments: fp32 weights, Adam moments, EMA
            engine.json                        Adam step, LR schedule, engine counters (rank 0)
        ema.json                               EMA update count
        rng/rank<r>.pt                         RNG states (dropout etc.) for an exact resume
        stage_state.safetensors                stage extras (e.g. LeCam EMA of the discriminator)
        train_state.json                       step (= data position), global batch, streams, counters
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
from dataclasses import dataclass, field, fields
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
    """What the loop needs besides engines to continue exactly where it stopped.

    The data position is ``step`` itself: step ``s`` reads the same samples on any number of workers
    (``trainer/batch_layout.py``), given the run's ``global_batch_size`` and ``streams``."""

    step: int = 0                  # optimizer steps taken (skipped non-finite ones included)
    samples_seen: int = 0          # global, all ranks
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    resumed_from: int | None = None
    gpu_seconds: float = 0.0       # accumulated accelerator time of all workers
    world_size: int | None = None  # workers that wrote the checkpoint (informational: any count resumes)
    global_batch_size: int | None = None
    streams: int | None = None
    # Stream position at ``data_origin_step`` (moves only when the global batch is changed deliberately).
    data_origin_step: int = 0
    data_origin_position: int = 0
    restore_seconds: float | None = field(default=None, metadata={"transient": True})

    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("transient")}
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        data = json.loads(text)
        if "global_batch_size" not in data:
            raise ValueError("the checkpoint predates resizable checkpoints (no global batch size recorded); "
                             "start a new run (output_dir) or use an older version of this code to finish it")
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def check_resumable(state: TrainState, cfg: Any, where: str) -> None:
    """Refuse a checkpoint whose run invariants differ from the config (the driver checks the run's
    config first; this guards a checkpoint handed over by other means)."""
    tr = cfg.trainer
    if state.global_batch_size != tr.global_batch_size and not tr.allow_global_batch_change:
        raise ValueError(f"checkpoint {where} has global batch {state.global_batch_size}, the run "
                         f"{tr.global_batch_size} (set trainer.allow_global_batch_change=true to change it)")
    if state.streams != cfg.data.streams:
        raise ValueError(f"checkpoint {where} reads its data in {state.streams} streams, the config says "
                         f"{cfg.data.streams}: the data order would change")


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


def write_export_stream(run_dir: str, step: int, specs: list, tensors, config_json: dict,
                        meta: dict[str, Any]) -> str:
    """:func:`write_export` for weights that arrive one tensor at a time (``specs``: name, dtype,
    shape in order): the file is written as they come, so the writer never holds the whole model.
    Consumes ``tensors`` to its end in every case (it may drive collectives). Returns the URL."""
    from trainer.tensor_files import write_safetensors_stream

    url = storage.join(run_dir, EXPORTS, step_name(step))
    if is_complete(url):
        for _ in tensors:
            pass
        return url
    with storage.open_write(storage.join(url, "model.safetensors")) as out:
        write_safetensors_stream(out, specs, tensors, {"format": "pt"})
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
