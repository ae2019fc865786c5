"""Measuring memory for the capacity plan (trainer/plan.py) and checking it against a real run.

* :func:`stage_modules`: the modules a stage builds, with its ``requires_grad`` settings (on the meta
  device for counting, on a real device, with cut transformer stacks, for the probe).
* :class:`StoragePeak` / :func:`measure_peak_growth`: the peak bytes of the tensors a pass creates.
* :func:`probe_activations`: the activation probe and its fit (described in trainer/plan.py).
* :func:`measure_runtime_baseline`: a fresh worker runtime's peak RSS.
* :func:`measure_worker`: a Ray Train worker that runs a stage for real and records what each rank
  held (used by tests/trainer/test_plan.py and the benches).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from trainer.partitioning import limit_heap_retention
from trainer.schema import Precision, Stage, TokenizerRecipe, TrainConfigBase

# ----------------------------------------------------------------------------------------------
# What the stage builds (on the meta device for counting, on a real device for the probe)


@dataclass
class StageModules:
    """The modules a stage builds, with the stage's ``requires_grad`` settings."""

    model: nn.Module
    discriminator: nn.Module | None = None
    frozen: dict[str, nn.Module] = field(default_factory=dict)  # outside the engines, whole on every rank


def _tokenizer_modules(cfg, model_cfg) -> StageModules:
    from trainer import models
    from trainer.losses import build_discriminator
    from trainer.losses.perceptual import ConvNeXtLogitLoss, LPIPSVGG16

    recipe = cfg.tokenizer.recipe
    model = models.build_tokenizer(model_cfg)
    if recipe == TokenizerRecipe.decoder_finetune:  # as TokenizerStage.__init__ freezes them
        for frozen in (model.encoder, model.quantize):
            frozen.requires_grad_(False)
        model.latent_tokens.requires_grad_(False)
    out = StageModules(model)
    if recipe == TokenizerRecipe.proxy_codes:
        out.frozen["teacher (MaskGIT-VQGAN)"] = models.build_maskgit_vqgan(model_cfg.pixel_decoder).requires_grad_(False)
        return out
    losses = cfg.tokenizer.losses
    if losses.perceptual_weight > 0:
        if losses.perceptual.lpips_weight > 0:
            out.frozen["LPIPS (VGG16)"] = LPIPSVGG16()
        if losses.perceptual.convnext_weight > 0:
            out.frozen["ConvNeXt-S"] = ConvNeXtLogitLoss()
    if losses.gan_enabled:
        out.discriminator = build_discriminator(cfg.tokenizer.discriminator)
    return out


def stage_modules(cfg: TrainConfigBase, layers: Sequence[int] | None = None) -> StageModules:
    """The stage's modules, built on the current default device; ``layers`` cuts the transformer stacks."""
    from trainer import models

    if cfg.stage == Stage.tokenizer:
        model_cfg = cfg.model
        if layers is not None:
            model_cfg = dataclasses.replace(model_cfg, vit_enc_num_layers=layers[0], vit_dec_num_layers=layers[1])
        return _tokenizer_modules(cfg, model_cfg)
    model_cfg = cfg.model if layers is None else dataclasses.replace(cfg.model, num_hidden_layers=layers[0])
    return StageModules(models.build_generator(model_cfg))


def stack_depths(cfg: TrainConfigBase) -> tuple[tuple[str, int, int, int], ...]:
    """(name, real layers, probe low, probe high) of each transformer stack."""
    if cfg.stage == Stage.tokenizer:
        return (("encoder", cfg.model.encoder_size.num_layers, 1, 2), ("decoder", cfg.model.decoder_size.num_layers, 1, 2))
    low = 2 if cfg.model.model_type == "UViT" else 1  # U-ViT: num_hidden_layers // 2 blocks a side + 1
    return (("transformer", cfg.model.num_hidden_layers, low, 2 * low),)



# ----------------------------------------------------------------------------------------------
# Precision


def param_bytes(cfg: TrainConfigBase) -> int:
    ds = cfg.deepspeed
    return 4 if ds.precision == Precision.fp32 or ds.autocast else 2


# ----------------------------------------------------------------------------------------------
# Activation probe


def _rss() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024


def _hwm() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class StoragePeak(TorchDispatchMode):
    """Peak of the summed bytes of the tensor storages that ops inside the mode create, alive at once.

    Every op's outputs are recorded unless they alias one of its inputs (in-place ops and views of
    tensors that existed before); a weak reference per storage tells when it is freed. Backward
    passes on the CPU run in the calling thread, so they are seen too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0
        self.marked = 0

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def mark(self) -> None:
        """Record the bytes alive now (in ``marked``); the first call counts."""
        if not self.marked:
            self._sweep()
            self.marked = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size and key not in inputs and key not in self.live:
                self.live[key] = (StorageWeakRef(storage), size)
                self.current += size
        self.peak = max(self.peak, self.current)
        return out


@dataclass(frozen=True)
class PassMemory:
    """Memory of one probe pass, in bytes above the resting state."""

    peak: int          # the largest total at any moment
    saved: int         # alive when the backward pass starts: activations saved for it, loss outputs


def measure_peak_growth(run: Callable[[Callable[[], None]], None], device: torch.device) -> PassMemory:
    """Run ``run(mark)`` (which calls ``mark()`` right before its first backward pass) and measure it.

    CUDA: the caching allocator's peak and the allocated bytes at the mark, above what was allocated
    before. CPU: :class:`StoragePeak`, exact and repeatable where the process's RSS moves by megabytes
    with heap reuse.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        at_mark: list[int] = []

        def cuda_mark() -> None:
            torch.cuda.synchronize(device)
            at_mark.append(torch.cuda.memory_allocated(device) - base)

        run(cuda_mark)
        torch.cuda.synchronize(device)
        return PassMemory(torch.cuda.max_memory_allocated(device) - base, at_mark[0] if at_mark else 0)
    with StoragePeak() as tracker:
        run(tracker.mark)
    return PassMemory(tracker.peak, tracker.marked)


def _autocast(cfg: TrainConfigBase, device: torch.device):
    import contextlib

    from trainer.distributed import compute_dtype

    ds = cfg.deepspeed
    if ds.precision == Precision.fp32 or not ds.autocast:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype(ds))


ProbeStep = Callable[[int, Callable[[], None]], None]


def probe_step(cfg: TrainConfigBase, mods: StageModules, device: torch.device) -> ProbeStep:
    """``step(batch, mark)``: one forward + backward of the stage's computation (the stage's modules and
    loss functions, as its ``train_step`` calls them), calling ``mark()`` before the first backward."""
    import torch.nn.functional as F

    from trainer.distributed import input_dtype

    dtype = input_dtype(cfg.deepspeed)
    if cfg.stage == Stage.generator:
        from trainer.stages.generator import masked_token_loss, random_masking, sample_generators

        g = cfg.model
        generator = torch.Generator().manual_seed(0)

        def generator_step(batch: int, mark: Callable[[], None]) -> None:
            tokens = torch.randint(0, g.codebook_size, (batch, g.image_seq_len), generator=generator).to(device)
            labels = torch.randint(0, g.condition_num_classes, (batch,), generator=generator).to(device)
            masked, mask = random_masking(tokens, g.codebook_size, sample_generators(0, torch.arange(batch)))
            drop = (torch.rand(batch, generator=generator) < g.class_label_dropout).to(device)
            with _autocast(cfg, device):
                logits = mods.model(masked, labels, drop)
            loss, _ = masked_token_loss(logits, tokens, mask, cfg.generator.label_smoothing,
                                        cfg.generator.loss_weight_unmasked_token)
            mark()
            loss.backward()

        return generator_step

    size = cfg.model.image_size
    if cfg.tokenizer.recipe == TokenizerRecipe.proxy_codes:
        teacher = mods.frozen["teacher (MaskGIT-VQGAN)"]

        def proxy_step(batch: int, mark: Callable[[], None]) -> None:
            images = torch.rand(batch, 3, size, size, device=device).to(dtype)
            with torch.no_grad(), _autocast(cfg, device):
                codes = teacher.encode_to_codes(images)
            with _autocast(cfg, device):
                logits, aux = mods.model(images)
            loss = F.cross_entropy(logits.float(), codes) + aux["quantizer_loss"]
            mark()
            loss.backward()

        return proxy_step

    from trainer.losses.perceptual import PerceptualLoss
    from trainer.losses.pixel import TokenizerPixelLoss

    losses = cfg.tokenizer.losses
    perceptual = None
    if losses.perceptual_weight > 0:
        perceptual = PerceptualLoss(losses.perceptual.lpips_weight, losses.perceptual.convnext_weight,
                                    mods.frozen.get("LPIPS (VGG16)"), mods.frozen.get("ConvNeXt-S"))
    pixel_loss = TokenizerPixelLoss(losses, perceptual).to(device)
    step = losses.discriminator_start  # the adversarial terms active: the larger pass

    def pixel_step(batch: int, mark: Callable[[], None]) -> None:
        images = torch.rand(batch, 3, size, size, device=device).to(dtype)
        with _autocast(cfg, device):
            reconstructions, aux = mods.model(images)
        loss, _ = pixel_loss.generator_loss(images, reconstructions, aux, step, mods.discriminator)
        mark()
        loss.backward()
        if mods.discriminator is not None:
            d_loss, _ = pixel_loss.discriminator_loss(images, reconstructions.detach(), step, mods.discriminator)
            d_loss.backward()

    return pixel_step


@dataclass(frozen=True)
class ActivationFit:
    """Activation memory per rank as measured by the probe and scaled (see trainer/plan.py's docstring).

    ``saved`` (alive when backward starts) is linear in the batch and in each stack's depth:
    ``fixed + sum_j a_j n_j + B (per_sample + sum_j k_j n_j)`` with ``n_j`` the layers beyond the probe's.
    The peak is ``saved`` plus an excess measured at probe depth: the backward pass's temporaries of
    one block, a loss, or a gradient (depth-independent), taken as ``excess(1) + (B - 1) x max(0,
    excess(2) - excess(1))``, the largest over the probe's depths.
    """

    fixed: float
    per_sample: float
    per_layer: tuple[tuple[float, float], ...]   # per stack: (fixed, per sample) bytes per extra layer
    excess: tuple[float, float]                  # (at batch 1, growth per extra sample)
    extra_layers: tuple[int, ...]                # per stack: real layers - probe low
    device: str
    points: tuple[tuple[int, tuple[int, ...], int, int], ...]   # (batch, layers, peak, saved) measured
    seconds: float

    def saved_at(self, batch: int) -> float:
        fixed = self.fixed + sum(a * n for (a, _), n in zip(self.per_layer, self.extra_layers))
        per_sample = self.per_sample + sum(k * n for (_, k), n in zip(self.per_layer, self.extra_layers))
        return max(0.0, fixed) + batch * max(0.0, per_sample)

    def bytes_at(self, batch: int) -> int:
        if batch <= 0:
            return int(self.saved_at(0))
        return int(self.saved_at(batch) + self.excess[0] + (batch - 1) * self.excess[1])

    @property
    def bytes_per_sample(self) -> float:
        return max(1.0, self.saved_at(1) - self.saved_at(0) + self.excess[1])


def probe_device(cfg: TrainConfigBase) -> torch.device:
    return torch.device("cuda") if cfg.trainer.use_gpu and torch.cuda.is_available() else torch.device("cpu")


def build_probe_modules(cfg: TrainConfigBase, layers: tuple[int, ...], device: torch.device) -> StageModules:
    """The stage's modules with cut stacks on ``device``, engines' parameters in their dtype, gradients
    allocated (the plan counts them separately, and a second backward pass adds into them)."""
    from trainer.distributed import compute_dtype

    with torch.device(device):
        torch.manual_seed(0)
        mods = stage_modules(cfg, layers)
    for module in (m for m in (mods.model, mods.discriminator) if m is not None):
        if param_bytes(cfg) == 2:  # DeepSpeed's bf16/fp16 modes keep the engines' parameters in 16 bit
            module.to(compute_dtype(cfg.deepspeed))
        module.train()
        if cfg.trainer.activation_checkpointing and hasattr(module, "set_grad_checkpointing"):
            module.set_grad_checkpointing(True)
        for p in module.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    for module in mods.frozen.values():
        module.eval()
    return mods


def probe_activations(cfg: TrainConfigBase, device: torch.device | None = None) -> ActivationFit:
    """Measure the stage's forward + backward at batch 1 and 2 on cut stacks, and fit (see ActivationFit)."""
    device = device or probe_device(cfg)
    started = time.perf_counter()
    stacks = stack_depths(cfg)
    low = tuple(s[2] for s in stacks)
    configs = [low] + [tuple(s[3] if j == i else s[2] for j, s in enumerate(stacks)) for i in range(len(stacks))]
    measured: dict[tuple[int, tuple[int, ...]], PassMemory] = {}
    for layers in configs:
        mods = build_probe_modules(cfg, layers, device)
        step = probe_step(cfg, mods, device)
        step(2, lambda: None)  # warm-up: lazily created state (thread pools, kernels, autocast paths)
        for batch in (1, 2):
            measured[(batch, layers)] = measure_peak_growth(lambda mark: step(batch, mark), device)
        del mods, step
        gc.collect()
    saved = {key: m.saved for key, m in measured.items()}
    per_sample = saved[(2, low)] - saved[(1, low)]
    fixed = saved[(1, low)] - per_sample
    per_layer = []
    for i, (_, _, lo, hi) in enumerate(stacks):
        layers = configs[i + 1]
        span = hi - lo
        k = (saved[(2, layers)] - saved[(1, layers)] - per_sample) / span
        a = (saved[(1, layers)] - saved[(1, low)]) / span - k
        per_layer.append((a, k))
    excess_1 = max(measured[(1, c)].peak - saved[(1, c)] for c in configs)
    growth = max(0.0, max(measured[(2, c)].peak - saved[(2, c)] - (measured[(1, c)].peak - saved[(1, c)])
                          for c in configs))
    extra = tuple(s[1] - s[2] for s in stacks)
    points = tuple((b, layers, m.peak, m.saved) for (b, layers), m in sorted(measured.items()))
    return ActivationFit(float(fixed), float(per_sample), tuple(per_layer), (float(excess_1), growth), extra,
                         device.type, points, time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------
# Runtime baseline

_RUNTIME_PROBE = r"""
import os, re, socket, sys
sys.path.insert(0, {repo!r})
os.environ.setdefault("DS_ACCELERATOR", "cpu")
from trainer.partitioning import limit_heap_retention
limit_heap_retention()
import torch, deepspeed, ray, ray.train, ray.train.torch
import trainer.loop, trainer.stages.tokenizer, trainer.stages.generator
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
from trainer.distributed import setup_worker
setup_worker(False)
print("VmHWM", re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
"""


def measure_runtime_baseline(timeout: float = 300.0) -> int:
    """Peak RSS of a fresh process holding a worker's runtime (module docstring), in bytes."""
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([sys.executable, "-c", _RUNTIME_PROBE.format(repo=repo)], capture_output=True, text=True,
                         timeout=timeout, env=env)
    match = re.search(r"^VmHWM (\d+)$", out.stdout, re.M)
    if out.returncode != 0 or not match:
        raise RuntimeError(f"runtime probe failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
    return int(match.group(1)) * 1024


# ----------------------------------------------------------------------------------------------
# Checking a plan against what a real run holds (tests/trainer/test_plan.py, bench/)


def held_bytes(engine) -> dict[str, int]:
    """Bytes an engine holds on this rank: parameters (ZeRO-3: partition + whole persistent ones), the
    optimizer's fp32 master copies not shared with them, and the optimizer state. Counted per storage,
    so views into DeepSpeed's flat buffers count once."""
    seen: set[int] = set()

    def total(tensors) -> int:
        size = 0
        for t in tensors:
            if not torch.is_tensor(t) or not t.numel():
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                size += storage.nbytes()
        return size

    params = total(t for p in engine.module.parameters() for t in (getattr(p, "ds_tensor", None), p))
    wrapper = optimizer = engine.optimizer
    while hasattr(optimizer, "optimizer"):  # ZeRO wrappers hold the torch optimizer that steps
        optimizer = optimizer.optimizer
    # The fp32 partitions the ZeRO wrappers step (ZeRO-3 leaves the inner param groups empty).
    masters = (getattr(wrapper, "fp32_partitioned_groups_flat", None)
               or getattr(wrapper, "single_partition_of_fp32_groups", None)
               or getattr(wrapper, "fp32_groups_flat_partition", None)
               or [p for group in optimizer.param_groups for p in group["params"]])
    master = total(masters)
    state = total(v for s in optimizer.state.values() for v in s.values())
    return {"params": params, "master": master, "state": state}


def live_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage reachable from Python (what the process holds beyond its heaps'
    free blocks and C++-only buffers)."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and obj.device.type == "cpu" and obj.numel():
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, AttributeError):  # tensors without storage (meta, sparse, functional wrappers)
            continue
    return sum(seen.values())


def _peak_rss() -> int:
    return _hwm()


def _random_batch(cfg: TrainConfigBase, generator: torch.Generator):
    batch = cfg.trainer.batch_size_per_worker
    if cfg.stage == Stage.generator:
        m = cfg.model
        return (torch.randint(0, m.codebook_size, (batch, m.image_seq_len), generator=generator),
                torch.randint(0, m.condition_num_classes, (batch,), generator=generator))
    size = cfg.model.image_size
    return torch.rand(batch, 3, size, size, generator=generator), torch.zeros(batch, dtype=torch.long)


def measure_worker(config: dict) -> None:
    """A Ray Train worker that runs a stage for real and records what each rank held.

    ``config``: ``cfgs`` (training configs, run one after the other in this process), ``steps``,
    ``out`` (a directory: one JSON per config and rank). Per config: the heaps are trimmed and the
    peak RSS reset, the stage is built (``trainer.loop.build_stage``: zero.Init, engines, EMA,
    frozen networks), ``steps`` optimizer steps run on random batches, then a checkpoint
    (``stage.save``) and an export (``export_state_dict`` + ``write_export`` on rank 0) are written
    under ``out``. Recorded: RSS before, peak RSS after the steps and after checkpoint + export,
    :func:`held_bytes` of each engine, EMA bytes, parameter counts, bytes written, seconds per step.
    """
    import json
    import shutil

    from trainer import checkpoint as ckpt
    from trainer.distributed import setup_worker
    from trainer.loop import build_stage, seed_everything

    out = Path(config["out"])
    ctx = None
    for index, cfg in enumerate(config["cfgs"]):
        if ctx is None:
            ctx = setup_worker(cfg.trainer.use_gpu)
        gc.collect()
        limit_heap_retention()
        rss_before = _rss()
        _reset_hwm()
        seed_everything(cfg.seed, ctx.rank)
        stage = build_stage(cfg, ctx)
        rss_built, live_built = _rss(), live_tensor_bytes()
        generator = torch.Generator().manual_seed(ctx.rank)
        started = None
        for step in range(config["steps"]):
            if step == 1:
                started = time.perf_counter()
            stage.train_step(_random_batch(cfg, generator), step)
            stage.after_optimizer_step()
        seconds = (time.perf_counter() - started) / max(1, config["steps"] - 1) if started else None
        train_peak, rss_trained, live_trained = _peak_rss(), _rss(), live_tensor_bytes()
        held = {name: held_bytes(engine) for name, engine in stage.engines.items()}
        ema = sum(t.numel() * t.element_size() for t in stage.ema.shadow.values()) if stage.ema else 0
        work = out / f"cfg{index}"
        ckpt_dir = work / f"checkpoint-rank{ctx.rank}"
        stage.save(ckpt_dir)
        checkpoint_bytes = sum(f.stat().st_size for f in ckpt_dir.rglob("*") if f.is_file())
        checkpoint_peak = _peak_rss()
        state = stage.export_state_dict()
        export_bytes = sum(t.numel() * t.element_size() for t in state.values())
        written = 0
        if ctx.is_main:
            url = ckpt.write_export(str(work / "run"), 1, state, stage.export_config(), {})
            written = sum(f.stat().st_size for f in Path(url).rglob("*.safetensors"))
        del state
        record = {"rank": ctx.rank, "rss_before": rss_before, "rss_built": rss_built, "rss_trained": rss_trained,
                  "train_peak": train_peak, "checkpoint_peak": checkpoint_peak, "peak": _peak_rss(),
                  "live_built": live_built, "live_trained": live_trained,
                  "held": held, "ema": ema, "describe": stage.describe(), "checkpoint_bytes": checkpoint_bytes,
                  "export_bytes": export_bytes, "export_file_bytes": written, "seconds_per_step": seconds,
                  "frozen": {"teacher": sum(p.numel() for p in stage.teacher.parameters())
                             if getattr(stage, "teacher", None) is not None else 0}}
        (out / f"cfg{index}-rank{ctx.rank}.json").write_text(json.dumps(record))
        del stage
        gc.collect()
        from trainer.distributed import barrier

        barrier()
        if ctx.is_main:
            shutil.rmtree(work, ignore_errors=True)

