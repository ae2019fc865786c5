"""The per-worker train loop, shared by every stage.

Runs inside each Ray Train worker: join the process group, build the stage, restore the latest
checkpoint if Ray hands one over (a resumed job or a restart after a worker failure), then step until
``trainer.max_steps`` (or ``trainer.stop_at_step``), logging on rank 0 and checkpointing through
Ray Train. The data position is the number of micro-batches consumed, so a resumed run sees exactly
the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster import storage
from trainer import checkpoint as ckpt
from trainer.config import to_yaml
from trainer.distributed import WorkerContext, all_reduce_mean, all_reduce_sum, barrier, setup_worker
from trainer.schema import Stage, TrainConfigBase
from trainer.stages.base import StepOutput, TrainStage
from trainer.tracking import RunRef, Tracker

# Peak dense bf16 TFLOP/s by GPU name fragment, for MFU (H100/H200 SXM, A100).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


class NonFiniteLossError(RuntimeError):
    pass


def build_stage(cfg: TrainConfigBase, ctx: WorkerContext) -> TrainStage:
    if cfg.stage == Stage.tokenizer:
        from trainer.stages.tokenizer import TokenizerStage

        return TokenizerStage(cfg, ctx)
    from trainer.stages.generator import GeneratorStage

    return GeneratorStage(cfg, ctx)


def seed_everything(seed: int, rank: int) -> None:
    """Per-rank seeds for dropout and other model-side randomness (data has its own seeded RNG)."""
    worker_seed = seed * 1000 + rank
    random.seed(worker_seed)
    np.random.seed(worker_seed % 2**32)
    torch.manual_seed(worker_seed)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point of every worker."""
    import ray.train

    cfg: TrainConfigBase = loop_config["cfg"]
    run_ref: RunRef | None = loop_config.get("mlflow")
    ctx = setup_worker(cfg.trainer.use_gpu)
    seed_everything(cfg.seed, ctx.rank)
    stage = build_stage(cfg, ctx)
    state = ckpt.TrainState()
    checkpoint = latest_checkpoint(ray.train.get_checkpoint(), cfg.run_dir)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = restore(Path(directory), stage, ctx)
    TrainLoop(cfg, ctx, stage, state, Tracker(run_ref if ctx.is_main else None), run_ref).run()


def latest_checkpoint(reported, run_dir: str):
    """The newer of Ray's checkpoint and the latest one marked complete in ``run_dir``.

    Ray registers a checkpoint when its controller polls the workers; a worker killed right after
    persisting one leaves it on storage (and marked complete by us) but unknown to Ray, which would
    then restart from an older checkpoint, or from scratch.
    """
    from ray.train import Checkpoint

    reported_step = ckpt.parse_step(reported.path) if reported is not None else None
    complete = ckpt.list_checkpoints(run_dir)
    if complete and (reported_step is None or complete[-1][0] > reported_step):
        fs, path = storage.pyarrow_filesystem(complete[-1][1])
        return Checkpoint(path, filesystem=fs)
    return reported


def restore(directory: Path, stage: TrainStage, ctx: WorkerContext) -> ckpt.TrainState:
    stage.load(directory)
    ckpt.load_rng(directory / "rng", ctx.rank)
    state = ckpt.TrainState.from_json((directory / "train_state.json").read_text())
    state.resumed_from = state.step
    if ctx.is_main:
        print(f"[{stage.name}] resumed from step {state.step} ({directory})", flush=True)
    return state


@dataclass
class _Meter:
    """Sums of per-micro-batch metrics over one log interval (this rank)."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)
    code_counts: torch.Tensor | None = None

    def add(self, out: StepOutput) -> None:
        for key, value in out.metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1
        self.samples += out.samples
        if out.code_counts is not None:
            counts = out.code_counts.detach().to(torch.float64)
            self.code_counts = counts if self.code_counts is None else self.code_counts + counts

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


class TrainLoop:
    def __init__(self, cfg: TrainConfigBase, ctx: WorkerContext, stage: TrainStage, state: ckpt.TrainState,
                 tracker: Tracker, run_ref: RunRef | None) -> None:
        self.cfg, self.ctx, self.stage, self.state, self.tracker, self.run_ref = cfg, ctx, stage, state, tracker, run_ref
        self.run_dir = cfg.run_dir
        tr = cfg.trainer
        self.stop_step = min(tr.max_steps, tr.stop_at_step or tr.max_steps)
        self.meter = _Meter()
        self.step_times: list[float] = []
        self.last_checkpoint: str | None = None
        self.flops_per_sample = stage.flops_per_sample()
        self.peak_flops = _peak_flops() if tr.use_gpu else None

    def run(self) -> None:
        state, tr = self.state, self.cfg.trainer
        if self.ctx.is_main:
            print(f"[{self.stage.name}] {self.ctx.world_size} worker(s), params {self.stage.describe()}, "
                  f"steps {state.step} -> {self.stop_step}", flush=True)
        if state.step >= self.stop_step:
            return
        batches = self.stage.batches(start_micro_batch=state.micro_batches)
        step_started = time.perf_counter()
        for batch in batches:
            state.micro_batches += 1
            out = self.stage.train_step(batch, state.step)
            state.samples_seen += out.samples * self.ctx.world_size
            self._count_nonfinite(out)
            self.meter.add(out)
            if self.stage.main_engine.global_steps <= state.step:
                continue  # inside a gradient-accumulation window, or the micro-batch was skipped
            state.step = self.stage.main_engine.global_steps
            self.stage.after_optimizer_step()
            now = time.perf_counter()
            self.step_times.append(now - step_started)
            if tr.use_gpu:
                state.gpu_seconds += (now - step_started) * self.ctx.world_size
            step_started = now
            if state.step % tr.log_every == 0 or state.step == self.stop_step:
                self._log()
            if tr.image_log_every and state.step % tr.image_log_every == 0:
                self._log_preview(batch)
            export_every = tr.export_every or tr.checkpoint_every
            if state.step % tr.checkpoint_every == 0 or state.step == self.stop_step:
                self._checkpoint(export=state.step % export_every == 0 or state.step == self.stop_step)
            elif state.step % export_every == 0:
                self._export()
            if state.step >= self.stop_step:
                break
        if self.ctx.is_main:
            print(f"[{self.stage.name}] done at step {state.step}; checkpoint {self.last_checkpoint}", flush=True)

    # --- pieces ---------------------------------------------------------------------------------
    def _count_nonfinite(self, out: StepOutput) -> None:
        state = self.state
        if out.finite:
            state.nonfinite_in_row = 0
            return
        state.nonfinite_in_row += 1
        state.nonfinite_total += 1
        if self.ctx.is_main:
            print(f"[{self.stage.name}] non-finite loss at step {state.step} (micro-batch {state.micro_batches}): "
                  f"skipped ({state.nonfinite_in_row} in a row)", flush=True)
        if state.nonfinite_in_row >= self.cfg.trainer.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{state.nonfinite_in_row} non-finite losses in a row at step {state.step}; aborting. "
                f"Last good checkpoint: {self.last_checkpoint or 'none'} (lower optim.lr, check the data, or "
                f"raise trainer.max_nonfinite_steps)")

    def _log(self) -> None:
        means = all_reduce_mean(self.meter.means(), self.device)
        elapsed = time.perf_counter() - self.meter.started
        samples = self.meter.samples * self.ctx.world_size
        metrics = {f"train/{k}": v for k, v in means.items()}
        metrics["train/lr"] = self.stage.lr()
        grad_norm = self.stage.grad_norm()
        if grad_norm is not None:
            metrics["train/grad_norm"] = grad_norm
        metrics["train/nonfinite_steps"] = float(self.state.nonfinite_total)
        if self.meter.code_counts is not None:
            metrics.update(_codebook_metrics(all_reduce_sum(self.meter.code_counts.to(self.device))))
        images_per_s = samples / max(elapsed, 1e-9)
        metrics["perf/images_per_s"] = images_per_s
        recent = self.step_times[-self.cfg.trainer.log_every:]
        step_time = sum(recent) / max(len(recent), 1)
        metrics["perf/step_time_s"] = step_time
        if self.cfg.trainer.use_gpu and torch.cuda.is_available():
            metrics["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            metrics["perf/gpu_hours"] = self.state.gpu_seconds / 3600.0
            if self.flops_per_sample and self.peak_flops:
                metrics["perf/mfu"] = self.flops_per_sample * images_per_s / (self.peak_flops * self.ctx.world_size)
        self.tracker.log_metrics(metrics, self.state.step)
        if self.ctx.is_main:
            eta_s = step_time * (self.stop_step - self.state.step)
            loss = means.get("loss", float("nan"))
            print(f"[{self.stage.name}] step {self.state.step}/{self.cfg.trainer.max_steps} | loss {loss:.4f} | "
                  f"{images_per_s:.1f} img/s | lr {metrics['train/lr']:.2e} | ETA {_hms(eta_s)}", flush=True)
        self.meter = _Meter()

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def _log_preview(self, batch: Any) -> None:
        image = self.stage.preview(batch, self.state.step)
        if image is not None and self.ctx.is_main:
            self.tracker.log_image(image, f"previews/step_{self.state.step:09d}.png")

    def _checkpoint(self, export: bool) -> None:
        import ray.train
        from ray.train import Checkpoint

        step = self.state.step
        with tempfile.TemporaryDirectory(prefix="titok-ckpt-") as tmp:
            directory = Path(tmp)
            self.stage.save(directory)
            ckpt.save_rng(directory / "rng", self.ctx.rank)
            if self.ctx.is_main:
                (directory / "train_state.json").write_text(self.state.to_json())
                (directory / "config.yaml").write_text(to_yaml(self.cfg))
            ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=ckpt.step_name(step))
        # report() returns once every rank's files are persisted: now the directory is complete.
        url = storage.join(self.run_dir, ckpt.CHECKPOINTS, ckpt.step_name(step))
        if self.ctx.is_main:
            ckpt.mark_complete(url)
            self.tracker.set_tag("checkpoint", url)
        self.last_checkpoint = url
        if export:
            self._export()

    def _export(self) -> None:
        state_dict = self.stage.export_state_dict()  # collective under ZeRO-3
        if self.ctx.is_main:
            meta = {"stage": self.stage.name, "run_name": self.cfg.run_name,
                    "mlflow_run_id": self.run_ref.run_id if self.run_ref else None,
                    "mlflow_tracking_uri": self.run_ref.tracking_uri if self.run_ref else None,
                    "ema": self.stage.ema is not None}
            url = ckpt.write_export(self.run_dir, self.state.step, state_dict, self.stage.export_config(), meta)
            self.tracker.set_tag("export", url)
        barrier()


def _codebook_metrics(counts: torch.Tensor) -> dict[str, float]:
    total = counts.sum()
    if total <= 0:
        return {}
    probs = counts / total
    nonzero = probs[probs > 0]
    entropy = float(-(nonzero * nonzero.log()).sum())
    return {"train/codebook_usage": float((counts > 0).double().mean()),
            "train/codebook_entropy": entropy,
            "train/codebook_perplexity": math.exp(entropy)}


def _peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
