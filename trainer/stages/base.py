"""What every training stage shares: engines, EMA, checkpoint pieces, the finite-loss guard.

A stage (tokenizer, generator) subclasses :class:`TrainStage` and supplies only what differs: the
models it builds, its data stream, its step (losses, which engines step when) and a preview image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from trainer.distributed import WorkerContext, all_true, input_dtype
from trainer.ema import ParamEMA, gather_full_state_dict
from trainer.schema import TrainConfigBase


@dataclass
class StepOutput:
    """One micro-batch's result: scalar metrics (already floats) and whether its loss was finite."""

    metrics: dict[str, float] = field(default_factory=dict)
    finite: bool = True
    samples: int = 0
    # Token-id histogram of this micro-batch (tokenizer stages), summed over a log interval.
    code_counts: torch.Tensor | None = None


class TrainStage:
    """Base class; subclasses set ``self.engines`` (main engine first) and implement the hooks."""

    name = "stage"

    def __init__(self, cfg: TrainConfigBase, ctx: WorkerContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.device = ctx.device
        self.input_dtype = input_dtype(cfg.deepspeed)
        self.engines: dict[str, Any] = {}
        self.ema: ParamEMA | None = None

    # --- hooks for subclasses -----------------------------------------------------------------
    def batches(self, start_micro_batch: int) -> Iterator[Any]:
        raise NotImplementedError

    def train_step(self, batch: Any, step: int) -> StepOutput:
        raise NotImplementedError

    def preview(self, batch: Any, step: int) -> np.ndarray | None:
        """A uint8 HxWx3 image for MLflow (called on every rank: forward passes may be collective)."""
        return None

    def export_config(self) -> dict:
        """The authors'-format config.json of the exported model."""
        raise NotImplementedError

    def stage_state(self) -> dict[str, torch.Tensor]:
        """Extra tensors to checkpoint (rank 0's copy is saved), e.g. LeCam EMA buffers."""
        return {}

    def load_stage_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def flops_per_sample(self) -> float | None:
        """Training FLOPs per sample (forward + backward), for MFU; None when unknown."""
        return None

    # --- shared machinery ---------------------------------------------------------------------
    @property
    def main_engine(self):
        return next(iter(self.engines.values()))

    def init_ema(self) -> None:
        decay = self.cfg.trainer.ema_decay
        self.ema = ParamEMA(self.main_engine.module, decay) if decay is not None else None

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.update(self.main_engine.module)

    def step_engine(self, engine, loss: torch.Tensor) -> bool:
        """Backward and step if the loss is finite on every rank; otherwise skip on all ranks."""
        finite = all_true(bool(torch.isfinite(loss.detach()).all()), self.device)
        if finite:
            engine.backward(loss)
            engine.step()
        return finite

    def lr(self) -> float:
        return float(self.main_engine.get_lr()[0])

    def grad_norm(self) -> float | None:
        norm = self.main_engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights to export: the EMA if enabled, else the live weights (collective)."""
        module = self.main_engine.module
        if self.ema is not None:
            return self.ema.full_state_dict(module)
        return gather_full_state_dict(module)

    def save(self, directory: Path) -> None:
        """Every rank writes its pieces into ``directory`` (Ray Train merges the ranks' dirs)."""
        for name, engine in self.engines.items():
            engine.save_checkpoint(str(directory / name), tag="state")
        from safetensors.torch import save_file

        if self.ema is not None and (self.ema.sharded or self.ctx.is_main):
            (directory / "ema").mkdir(parents=True, exist_ok=True)
            save_file(self.ema.state_dict(), str(directory / "ema" / f"rank{self.ctx.rank}.safetensors"))
        extra = self.stage_state()
        if extra and self.ctx.is_main:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()},
                      str(directory / "stage_state.safetensors"))

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        for name, engine in self.engines.items():
            path, _ = engine.load_checkpoint(str(directory / name), tag="state", load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"checkpoint {directory} has no '{name}' engine state")
        if self.ema is not None:
            rank = self.ctx.rank if self.ema.sharded else 0
            ema_file = directory / "ema" / f"rank{rank}.safetensors"
            if ema_file.exists():
                self.ema.load_state_dict(load_file(str(ema_file)))
        extra_file = directory / "stage_state.safetensors"
        if extra_file.exists():
            self.load_stage_state(load_file(str(extra_file)))

    def describe(self) -> dict[str, Any]:
        """Parameter counts for the log."""
        out = {}
        for name, engine in self.engines.items():
            params = list(engine.module.parameters())
            numel = sum(getattr(p, "ds_numel", p.numel()) for p in params)
            trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad)
            out[name] = {"params": numel, "trainable": trainable}
        return out


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())
