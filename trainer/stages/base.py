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

from trainer import engine_state
from trainer.batch_layout import StepLayout
from trainer.distributed import WorkerContext, input_dtype
from trainer.ema import ParamEMA, export_specs, gather_full_state_dict, iter_full_tensors
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

    def __init__(self, cfg: TrainConfigBase, ctx: WorkerContext, layout: StepLayout | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx
        # Without a layout (benches, probes that feed batches themselves): one micro-batch per step.
        self.layout = layout or StepLayout(global_batch=cfg.trainer.batch_size_per_worker * ctx.world_size, streams=1,
                                           world_size=ctx.world_size, micro_batch=cfg.trainer.batch_size_per_worker)
        self.device = ctx.device
        self.input_dtype = input_dtype(cfg.deepspeed)
        self.engines: dict[str, Any] = {}
        self.ema: ParamEMA | None = None

    # --- hooks for subclasses -----------------------------------------------------------------
    def batches(self, layout: StepLayout, start_step: int) -> Iterator[Any]:
        """This rank's micro-batches of every step from ``start_step`` on, ``layout.accumulation`` per
        step, in order (see ``trainer/batch_layout.py``). Each batch carries ``step``, ``micro``,
        ``padding`` and ``keys`` (or ``rows``)."""
        raise NotImplementedError

    def train_step(self, batch: Any, step: int, weight: float) -> StepOutput:
        """Forward, backward and ``engine.step()`` of one micro-batch; ``weight`` scales its mean loss
        (``StepLayout.loss_weight``: 1 when the layout is even, 0 for a padding micro-batch)."""
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

    def step_engine(self, engine, loss: torch.Tensor, weight: float = 1.0) -> bool:
        """Backward and ``engine.step()`` of one micro-batch; returns whether its loss is finite here.

        Every micro-batch goes through backward, so that all ranks stay in step through the
        accumulation window. A non-finite loss makes non-finite gradients, and the optimizer skips
        that whole step at the window's end (DeepSpeed's overflow check, ``SkipNonFiniteAdamW``
        without ZeRO): ``engine.was_step_applied()`` then says False on every rank."""
        engine.backward(loss if weight == 1.0 else loss * weight)
        engine.step()
        return bool(torch.isfinite(loss.detach()).all())

    def batch_keys(self, batch: Any) -> list[str]:
        """The sample keys of a micro-batch (for the sample-key audit)."""
        return list(batch.keys)

    def step_applied(self) -> bool:
        """Whether the optimizer step that just ended changed the weights (False: skipped, non-finite)."""
        return bool(self.main_engine.was_step_applied())

    def lr(self) -> float:
        return float(self.main_engine.get_lr()[0])

    def grad_norm(self) -> float | None:
        norm = self.main_engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def export_stream(self) -> tuple[list[tuple[str, torch.dtype, tuple[int, ...]]], Iterator[torch.Tensor | None]]:
        """(specs, tensors) of the export: the EMA if enabled, else the live weights, one tensor at a time,
        whole on rank 0 and None elsewhere (``trainer.ema.iter_full_tensors``). Collective: every rank
        consumes the iterator."""
        module = self.main_engine.module
        shadow = self.ema.shadow if self.ema is not None else None
        return export_specs(module), iter_full_tensors(module, shadow)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights to export: the EMA if enabled, else the live weights (collective)."""
        module = self.main_engine.module
        if self.ema is not None:
            return self.ema.full_state_dict(module)
        return gather_full_state_dict(module)

    def save(self, directory: Path) -> None:
        """Every rank writes its fragments of every engine into ``directory`` (Ray Train merges the
        ranks' directories); the layout loads on any number of workers (``trainer/engine_state.py``)."""
        from safetensors.torch import save_file

        for name, engine in self.engines.items():
            extra = self.ema.views(engine.module, self.ctx.rank) if (self.ema is not None and name == "model") else []
            engine_state.save_engine(engine, directory / name, self.ctx.rank, extra)
        extra_state = self.stage_state()
        if self.ctx.is_main:
            if self.ema is not None:
                (directory / "ema.json").write_text(json.dumps({"num_updates": self.ema.num_updates}))
            if extra_state:
                save_file({k: v.detach().cpu().contiguous() for k, v in extra_state.items()},
                          str(directory / "stage_state.safetensors"))

    def load(self, directory: Path) -> None:
        """Restore every engine (and the EMA) from ``directory``, written at any world size."""
        from safetensors.torch import load_file

        for name, engine in self.engines.items():
            if not (directory / name).is_dir():
                raise engine_state.CheckpointError(f"checkpoint {directory} has no '{name}' engine state")
            extra = self.ema.views(engine.module, self.ctx.rank) if (self.ema is not None and name == "model") else []
            engine_state.load_engine(engine, directory / name, self.ctx.rank, extra)
        if self.ema is not None:
            ema_file = directory / "ema.json"
            if not ema_file.exists():
                raise engine_state.CheckpointError(f"checkpoint {directory} has no EMA but trainer.ema_decay is set")
            self.ema.num_updates = int(json.loads(ema_file.read_text())["num_updates"])
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
