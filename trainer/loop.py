"""The per-worker train loop, shared by every stage.

Runs inside each Ray Train worker: join the process group, lay out the global batch over this worker
group (``trainer/batch_layout.py``), build the stage, restore the latest checkpoint if Ray hands one
over (a resumed job, a restart after a failure, a resize of an elastic group), then step until
``trainer.max_steps`` (or ``trainer.stop_at_step``), logging on rank 0 and checkpointing through Ray
Train. The data position is the optimizer step: step ``s`` reads the same samples whatever the
number of workers, so a run resumed on another number of workers goes on exactly where it stopped.

When Ray reports that a node of the run is being preempted (``ray drain-node``, a spot interruption
notice), every worker writes a checkpoint at the next step boundary and then waits: Ray Train
restarts the run from that checkpoint on the workers that remain, and no step is done twice.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
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
from trainer.batch_layout import StepLayout
from trainer.config import to_yaml
from trainer.distributed import WorkerContext, all_reduce_sum, barrier, setup_worker
from trainer.schema import Stage, TrainConfigBase
from trainer.stages.base import StepOutput, TrainStage
from trainer.tracking import RunRef, Tracker

# Peak dense bf16 TFLOP/s by GPU name fragment, for MFU (H100/H200 SXM, A100).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
# After its preemption checkpoint a worker waits this long past the drain deadline for Ray Train to
# restart the group; if that never happens (a drain that was cancelled), it goes on training.
PREEMPTION_WAIT_MARGIN_S = 120.0


class NonFiniteLossError(RuntimeError):
    pass


def build_stage(cfg: TrainConfigBase, ctx: WorkerContext, layout: StepLayout | None = None) -> TrainStage:
    if cfg.stage == Stage.tokenizer:
        from trainer.stages.tokenizer import TokenizerStage

        return TokenizerStage(cfg, ctx, layout)
    from trainer.stages.generator import GeneratorStage

    return GeneratorStage(cfg, ctx, layout)


def step_layout(cfg: TrainConfigBase, world_size: int) -> StepLayout:
    """The layout of this run's steps on ``world_size`` workers (the driver resolved G and L)."""
    tr = cfg.trainer
    if tr.global_batch_size is None or cfg.data.streams is None:
        raise RuntimeError("trainer.global_batch_size and data.streams must be resolved by the driver (launch.py)")
    return StepLayout(global_batch=tr.global_batch_size, streams=cfg.data.streams, world_size=world_size,
                      micro_batch=tr.batch_size_per_worker)


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
    layout = step_layout(cfg, ctx.world_size)
    stage = build_stage(cfg, ctx, layout)
    state = ckpt.TrainState()
    checkpoint = latest_checkpoint(ray.train.get_checkpoint(), cfg.run_dir)
    if checkpoint is not None:
        started = time.perf_counter()
        with checkpoint.as_directory() as directory:
            state = restore(Path(directory), stage, ctx, cfg)
        state.restore_seconds = time.perf_counter() - started
        layout = continue_layout(layout, state)
    TrainLoop(cfg, ctx, stage, layout, state, Tracker(run_ref if ctx.is_main else None), run_ref).run()


def continue_layout(layout: StepLayout, state: ckpt.TrainState) -> StepLayout:
    """The layout that goes on from a checkpoint: same origin, or, after a deliberate change of the
    global batch, an origin where the old layout stopped (each stream continues where it was)."""
    if state.global_batch_size != layout.global_batch:
        old = dataclasses.replace(layout, global_batch=state.global_batch_size, origin_step=state.data_origin_step,
                                  origin_position=state.data_origin_position)
        state.data_origin_step, state.data_origin_position = state.step, old.stream_position(state.step)
    return dataclasses.replace(layout, origin_step=state.data_origin_step, origin_position=state.data_origin_position)


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


def restore(directory: Path, stage: TrainStage, ctx: WorkerContext, cfg: TrainConfigBase) -> ckpt.TrainState:
    state = ckpt.TrainState.from_json((directory / "train_state.json").read_text())
    ckpt.check_resumable(state, cfg, str(directory))
    stage.load(directory)
    ckpt.load_rng(directory / "rng", ctx.rank)
    state.resumed_from = state.step
    if ctx.is_main:
        resized = f", written by {state.world_size} worker(s)" if state.world_size != ctx.world_size else ""
        print(f"[{stage.name}] resumed from step {state.step} ({directory}{resized})", flush=True)
    return state


@dataclass
class _Meter:
    """Sample-weighted sums of per-micro-batch metrics over one log interval (this rank)."""

    sums: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)
    code_counts: torch.Tensor | None = None

    def add(self, out: StepOutput) -> None:
        for key, value in out.metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value * out.samples
            self.weights[key] = self.weights.get(key, 0.0) + out.samples
        self.samples += out.samples
        if out.code_counts is not None:
            counts = out.code_counts.detach().to(torch.float64)
            self.code_counts = counts if self.code_counts is None else self.code_counts + counts

    def global_means(self, device: torch.device, keys: list[str]) -> tuple[dict[str, float], int]:
        """(per-sample means over every rank's micro-batches, samples of all ranks); collective.

        ``keys`` must be the same list on every rank (metric names can differ by recipe phase only
        between steps, never between ranks)."""
        packed = torch.tensor([self.sums.get(k, 0.0) for k in keys] + [self.weights.get(k, 0.0) for k in keys]
                              + [float(self.samples)], dtype=torch.float64, device=device)
        all_reduce_sum(packed)
        n = len(keys)
        means = {k: packed[i].item() / packed[n + i].item() for i, k in enumerate(keys) if packed[n + i].item() > 0}
        return means, int(packed[-1].item())


class TrainLoop:
    def __init__(self, cfg: TrainConfigBase, ctx: WorkerContext, stage: TrainStage, layout: StepLayout,
                 state: ckpt.TrainState, tracker: Tracker, run_ref: RunRef | None) -> None:
        self.cfg, self.ctx, self.stage, self.layout, self.state = cfg, ctx, stage, layout, state
        self.tracker, self.run_ref = tracker, run_ref
        self.run_dir = cfg.run_dir
        tr = cfg.trainer
        self.stop_step = min(tr.max_steps, tr.stop_at_step or tr.max_steps)
        self.meter = _Meter()
        self.step_times: list[float] = []
        self.last_checkpoint: str | None = None
        self.last_checkpoint_step: int | None = state.resumed_from
        self.flops_per_sample = stage.flops_per_sample()
        self.peak_flops = _peak_flops() if tr.use_gpu else None
        self.micro_sizes = [len(r) for r in layout.micro_batches(ctx.rank)]
        self.keys_file = self._open_keys_file() if tr.record_sample_keys else None

    def run(self) -> None:
        state, tr, layout = self.state, self.cfg.trainer, self.layout
        if self.ctx.is_main:
            print(f"[{self.stage.name}] {self.ctx.world_size} worker(s), global batch {layout.global_batch} = "
                  f"{self.ctx.world_size} x {layout.accumulation} micro-batch(es) of <= {layout.micro_batch}"
                  f"{'' if layout.even else ' (uneven split, loss-weighted)'}, params {self.stage.describe()}, "
                  f"steps {state.step} -> {self.stop_step}", flush=True)
        if state.step >= self.stop_step:
            return
        last_micro = layout.accumulation - 1
        step_keys: list[str] = []
        step_started = time.perf_counter()
        for batch in self.stage.batches(layout, start_step=state.step):
            if batch.step != state.step:
                raise RuntimeError(f"the data stream is at step {batch.step}, the loop at step {state.step}")
            weight = 0.0 if batch.padding else layout.loss_weight(self.micro_sizes[batch.micro])
            out = self.stage.train_step(batch, state.step, weight)
            if not batch.padding:
                self.meter.add(out)
                if self.keys_file is not None:
                    step_keys.extend(self.stage.batch_keys(batch))
            if batch.micro < last_micro:
                continue
            # The accumulation window is complete: the engine has taken (or skipped) optimizer step `state.step`.
            state.step += 1
            if self.stage.main_engine.global_steps != state.step:
                raise RuntimeError(f"engine at step {self.stage.main_engine.global_steps}, loop at {state.step}: "
                                   "the accumulation windows are out of step")
            state.samples_seen += layout.global_batch
            applied = self.stage.step_applied()
            if applied:
                self.stage.after_optimizer_step()
            self._count_nonfinite(applied)
            if self.keys_file is not None:
                self._record_keys(step_keys)
                step_keys = []
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
            # No checkpoint inside a run of skipped (non-finite) steps: the last good one stays the newest.
            due = state.step % tr.checkpoint_every == 0 and state.nonfinite_in_row == 0
            if due or state.step == self.stop_step:
                self._checkpoint(export=state.step % export_every == 0 or state.step == self.stop_step)
            elif state.step % export_every == 0:
                self._export()
            if state.step >= self.stop_step:
                break
            if state.step % tr.preemption_check_every == 0:
                self._handle_preemption()
        if self.ctx.is_main:
            print(f"[{self.stage.name}] done at step {state.step}; checkpoint {self.last_checkpoint}", flush=True)

    # --- pieces ---------------------------------------------------------------------------------
    def _count_nonfinite(self, applied: bool) -> None:
        state = self.state
        if applied:
            state.nonfinite_in_row = 0
            return
        state.nonfinite_in_row += 1
        state.nonfinite_total += 1
        if self.ctx.is_main:
            print(f"[{self.stage.name}] non-finite loss at step {state.step} (gradients not finite): "
                  f"skipped ({state.nonfinite_in_row} in a row)", flush=True)
        if state.nonfinite_in_row >= self.cfg.trainer.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{state.nonfinite_in_row} non-finite losses in a row at step {state.step}; aborting. "
                f"Last good checkpoint: {self.last_checkpoint or 'none'} (lower optim.lr, check the data, or "
                f"raise trainer.max_nonfinite_steps)")

    def _log(self) -> None:
        keys = sorted(self.meter.sums)
        keys = sorted(set().union(*_gather_keys(keys)))
        means, samples = self.meter.global_means(self.device, keys)
        elapsed = time.perf_counter() - self.meter.started
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
        metrics["perf/workers"] = float(self.ctx.world_size)
        recent = self.step_times[-self.cfg.trainer.log_every:]
        step_time = sum(recent) / max(len(recent), 1)
        metrics["perf/step_time_s"] = step_time
        if self.state.restore_seconds is not None:
            metrics["perf/restore_s"] = self.state.restore_seconds
            self.state.restore_seconds = None
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
                  f"{images_per_s:.1f} img/s | lr {metrics['train/lr']:.2e} | {self.ctx.world_size} worker(s) | "
                  f"ETA {_hms(eta_s)}", flush=True)
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
        self.state.world_size = self.ctx.world_size
        self.state.global_batch_size = self.layout.global_batch
        self.state.streams = self.layout.streams
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
        self.last_checkpoint, self.last_checkpoint_step = url, step
        if export:
            self._export()

    def _export(self) -> None:
        specs, tensors = self.stage.export_stream()  # collective under ZeRO-3: every rank drains it
        if self.ctx.is_main:
            meta = {"stage": self.stage.name, "run_name": self.cfg.run_name,
                    "mlflow_run_id": self.run_ref.run_id if self.run_ref else None,
                    "mlflow_tracking_uri": self.run_ref.tracking_uri if self.run_ref else None,
                    "ema": self.stage.ema is not None}
            url = ckpt.write_export_stream(self.run_dir, self.state.step, specs, tensors, self.stage.export_config(),
                                           meta)
            self.tracker.set_tag("export", url)
        else:
            for _ in tensors:
                pass
        barrier()

    def _handle_preemption(self) -> None:
        """On a drain notice for any node of the run: checkpoint at this step boundary (every rank takes
        the same decision: ``get_preemption_info`` agrees across workers), then wait to be restarted."""
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None:
            return
        deadline_s = (info.deadline_ms / 1000.0 - time.time()) if info.deadline_ms else None
        if self.ctx.is_main:
            when = f"deadline in {deadline_s:.0f} s" if deadline_s is not None else "no deadline given"
            print(f"[{self.stage.name}] node(s) {', '.join(n[:12] for n in info.preempted_node_ids)} (ranks "
                  f"{info.preempted_ranks}) being preempted, {when}: checkpoint at step {self.state.step}",
                  flush=True)
        if self.last_checkpoint_step != self.state.step:
            self._checkpoint(export=False)
        if self.ctx.is_main:
            print(f"[{self.stage.name}] preemption checkpoint {self.last_checkpoint} written; waiting for Ray Train "
                  "to restart the run on the remaining workers", flush=True)
        # Ray Train tears the group down at the deadline and restarts it from this checkpoint: training
        # on meanwhile would only make steps to redo.
        wait_until = time.time() + max(0.0, deadline_s or 0.0) + PREEMPTION_WAIT_MARGIN_S
        while time.time() < wait_until:
            time.sleep(1.0)
        if self.ctx.is_main:
            print(f"[{self.stage.name}] no restart came {PREEMPTION_WAIT_MARGIN_S:.0f} s after the preemption "
                  "deadline; training goes on", flush=True)

    # --- sample-key audit -------------------------------------------------------------------------
    def _open_keys_file(self):
        if storage.is_remote(self.run_dir):
            raise ValueError("trainer.record_sample_keys needs a local output_dir")
        folder = Path(self.run_dir) / "sample_keys"
        folder.mkdir(parents=True, exist_ok=True)
        return open(folder / f"rank{self.ctx.rank}-of{self.ctx.world_size}-pid{os.getpid()}.jsonl", "a")

    def _record_keys(self, keys: list[str]) -> None:
        self.keys_file.write(json.dumps({"step": self.state.step, "rank": self.ctx.rank,
                                         "world_size": self.ctx.world_size, "keys": keys}) + "\n")
        self.keys_file.flush()


def _gather_keys(keys: list[str]) -> list[list[str]]:
    """Every rank's metric names (they match on every rank but a padding-only one, which has none)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [keys]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, keys)
    return gathered


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
