"""The one place that knows DeepSpeed and torch.distributed.

Models stay plain ``nn.Module``s; a stage hands one here with its parameter groups and gets back a
DeepSpeed engine built from the config (ZeRO stage, precision, optimizer, LR schedule, clipping,
accumulation). Everything else in the trainer talks to engines through ``forward``/``backward``/
``step`` and the small collective helpers below.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist

from trainer.partitioning import ModelSizes, zero_limits
from trainer.schema import DeepSpeedConfig, OptimConfig, Precision, TrainConfigBase

_DTYPES = {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_worker(use_gpu: bool) -> WorkerContext:
    """Join the process group Ray Train created and pick this worker's device."""
    if not use_gpu:
        # DeepSpeed's accelerator probe otherwise warns and may pick a GPU runtime that is absent.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        skip_unused_cpu_comm_op()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_gpu:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return WorkerContext(rank, world, local_rank, device)


def skip_unused_cpu_comm_op() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce op for the CPU accelerator.

    DeepSpeed builds that op (C++, JIT, through ninja) whenever a process group starts on the CPU and no
    build is cached for this exact install path: 30 to 60 s on a fresh machine, a fresh clone or a moved
    venv, which was the first minute of every first demo and CI run. Its only user is DeepSpeed's
    ``inference_all_reduce``; training's collectives go through torch.distributed (gloo). DeepSpeed reads
    which ops it may build from one cached dict, ``deepspeed.ops.__compatible_ops__``; the op is marked
    unavailable there. A DeepSpeed without that dict is left as it is (it builds the op, as before).
    """
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def compute_dtype(ds: DeepSpeedConfig) -> torch.dtype:
    return _DTYPES[ds.precision]


def input_dtype(ds: DeepSpeedConfig) -> torch.dtype:
    """dtype of float inputs fed to an engine: low precision only when the params themselves are."""
    if ds.precision == Precision.fp32 or ds.autocast:
        return torch.float32
    return compute_dtype(ds)


def deepspeed_config(cfg: TrainConfigBase, optim: OptimConfig | None = None, sizes: ModelSizes | None = None,
                     accumulation: int = 1) -> dict:
    """The DeepSpeed config dict for one engine (the ZeRO config is built here and only here).

    ``sizes`` (of the engine's model) resolve the "auto" ZeRO limits (trainer/partitioning.py).
    ``accumulation`` is the number of micro-batches per optimizer step on this worker group
    (``trainer.batch_layout.StepLayout.accumulation``): it follows the worker count, the global batch
    does not. Without ZeRO the optimizer is passed in by :func:`build_engine`, not named here."""
    ds, tr = cfg.deepspeed, cfg.trainer
    optim = optim or cfg.optim
    use_gpu = tr.use_gpu
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage > 0:
        limits = zero_limits(ds, sizes)
        zero.update({
            "overlap_comm": bool(ds.overlap_comm and use_gpu),
            "contiguous_gradients": True,
            "reduce_bucket_size": limits["reduce_bucket_size"],
        })
        if ds.zero_stage in (1, 2):
            zero.update({"allgather_bucket_size": limits["allgather_bucket_size"], "reduce_scatter": True})
        if ds.zero_stage == 3:
            zero.update({key: limits[key] for key in ("stage3_max_live_parameters", "stage3_max_reuse_distance",
                                                      "stage3_prefetch_bucket_size",
                                                      "stage3_param_persistence_threshold", "sub_group_size")})
        if ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
        if ds.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
        if ds.zero_stage == 3:
            # Exports gather EMA weights ourselves; keep 16-bit consolidation off the save path.
            zero["stage3_gather_16bit_weights_on_model_save"] = False
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tr.batch_size_per_worker,
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                # torch's AdamW on CPU (no op build); DeepSpeed's fused CUDA kernel when asked on GPU.
                "torch_adam": not (optim.fused and use_gpu),
                "adam_w_mode": True,
            },
        },
        "gradient_clipping": float(tr.grad_clip),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if ds.precision != Precision.fp32:
        if ds.autocast:
            # fp32 parameters, low-precision matmuls/convs: the authors' (accelerate) mixed precision.
            config["torch_autocast"] = {"enabled": True, "dtype": str(compute_dtype(ds)).replace("torch.", "")}
        elif ds.precision == Precision.bf16:
            # A step whose gradients are not finite is skipped (as fp16's loss scaler does), not applied.
            config["bf16"] = {"enabled": True, "check_grad_overflow": True}
        else:
            config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if ds.zero_stage == 0:
        del config["optimizer"]  # build_engine passes a SkipNonFiniteAdamW with the same settings
    return config


def lr_at(optim: OptimConfig, step: int, total_steps: int) -> float:
    """LR of optimizer step ``step`` (1-based): linear warm-up to ``lr``, then cosine to ``end_lr``.

    (DeepSpeed's WarmupCosineLR would spend the first two steps at LR 0, hence our own schedule.)
    """
    warmup = min(optim.warmup_steps, total_steps)
    if step <= warmup:
        return optim.lr * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return optim.end_lr + (optim.lr - optim.end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler_factory(optim: OptimConfig, total_steps: int):
    """A callable DeepSpeed gives its optimizer to; the LambdaLR's state is saved in checkpoints."""

    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        # LambdaLR evaluates the factor at the count of steps taken, for the step about to be taken.
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda taken: lr_at(optim, taken + 1, total_steps) / optim.lr)

    return make


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, norms, embeddings and learned tokens (1-D or named so)."""
    no_decay_names = ("embedding", "embed", "token", "pos_embed", "norm", "ln_")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim < 2 or leaf == "bias" or any(k in name for k in no_decay_names):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class SkipNonFiniteAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not all finite, and says so in ``overflow``.

    DeepSpeed's ZeRO and bf16 optimizers skip such steps themselves (``overflow``); without ZeRO the
    engine steps a plain torch optimizer, so this one does the same. The engine reads ``overflow`` to
    count the step as skipped and to leave the LR schedule where it is. Gradients are all-reduced
    before the step, so every rank takes the same decision."""

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.overflow = bool(grads) and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        if self.overflow:
            return None
        return super().step(closure)


def build_engine(model: torch.nn.Module, cfg: TrainConfigBase, optim: OptimConfig | None = None,
                 groups: Iterable[dict] | None = None, accumulation: int = 1):
    """Wrap a model in a DeepSpeed engine with its optimizer and LR schedule."""
    import deepspeed

    optim = optim or cfg.optim
    groups = list(groups) if groups is not None else param_groups(model, optim.weight_decay)
    config = deepspeed_config(cfg, optim, ModelSizes.of(model), accumulation)
    optimizer = None
    if cfg.deepspeed.zero_stage == 0:
        fused = bool(optim.fused and cfg.trainer.use_gpu)
        optimizer = SkipNonFiniteAdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                       weight_decay=optim.weight_decay, fused=fused or None)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=None if optimizer else groups,
                                           optimizer=optimizer, config=config,
                                           lr_scheduler=lr_scheduler_factory(optim, cfg.trainer.max_steps))
    return engine


# ----------------------------------------------------------------------------------------------
# Collectives (no-ops in a single process)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_true(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` holds on every rank (all ranks must take the same branch)."""
    if not _initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0.5)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if _initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of scalar metrics across ranks (one collective for all of them)."""
    if not _initialized() or not values:
        return dict(values)
    keys = sorted(values)
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    packed /= dist.get_world_size()
    return dict(zip(keys, packed.tolist()))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not _initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier() -> None:
    if _initialized():
        dist.barrier()


def is_zero3(engine) -> bool:
    return getattr(engine, "zero_optimization_stage", lambda: 0)() == 3


def gathered_params(engine, params: list[torch.nn.Parameter]):
    """Context manager giving full parameter values on every rank (a no-op outside ZeRO-3)."""
    import contextlib

    if not is_zero3(engine):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
