"""ZeRO partitioning sized to the model: buffer limits, construction under ``zero.Init``, weight loading.

Two things DeepSpeed leaves to its user, both of which decide whether a large model fits:

* **Limits.** ZeRO's buckets and ZeRO-3's fetch limits default to fixed element counts (DeepSpeed:
  ``stage3_max_live_parameters`` and ``stage3_max_reuse_distance`` 1e9, i.e. the whole of any model
  here). With those, after the first step a ZeRO-3 rank keeps every parameter it gathered for the
  forward pass until the backward pass has used it again: the full model, on every rank.
  :func:`zero_limits` derives each limit from the model instead (``"auto"``, the default of every
  ``deepspeed.*`` limit key; an integer in the config wins):

  ===================================  ==============================================================
  reduce / allgather bucket            1/16 of the parameters, at least the largest parameter (a
                                       gradient is bucketed whole), at most 50M elements
  stage3_max_live_parameters           1/10 of the parameters, at least two of the largest module's
                                       parameter sets (the module computing and the next one)
  stage3_max_reuse_distance            = max_live_parameters: a parameter is kept for reuse only
                                       while it fits the live budget
  stage3_prefetch_bucket_size          1/40 of the parameters, at least the largest module's,
                                       at most 50M elements
  stage3_param_persistence_threshold   the largest size (<= 1e5, DeepSpeed's default) such that all
                                       parameters at or below it (kept whole on every rank, gathered
                                       never) add up to at most 1% of the model
  sub_group_size                       1/32 of the parameters, at least the largest parameter: the
                                       ZeRO-3 optimizer steps one sub-group of the rank's partition at
                                       a time, and its fp32 gradient copy and AdamW temporaries are
                                       one sub-group's (DeepSpeed's 1e9 makes them the whole partition)
  ===================================  ==============================================================

* **Construction.** At ZeRO-3, :func:`build_model` builds the model under ``deepspeed.zero.Init``:
  each module's parameters are partitioned as soon as that module is constructed, so no rank ever
  holds more than one module's full parameters. A parent that initialises its children after
  building them (TiTok's and the generators' truncated-normal init) would write into the empty
  placeholders ZeRO leaves behind and silently keep the children's default init; here the
  parameters point at their rank's partition until construction ends, so such element-wise inits
  (normal, truncated normal, constants) land in the partition with the intended distribution. An init
  that needs the full shape (fan-in based) fails loudly on the 1-D partition instead of going wrong.
  :func:`copy_state_into` loads weights one parameter at a time (gathered alone, written by rank 0),
  so loading a checkpoint never gathers the whole model either.

Frozen networks that are not part of an engine (the MaskGIT-VQGAN teacher, perceptual backbones) are
built outside ``zero.Init`` and stay whole on every rank.

* **CPU heaps.** glibc serves allocations below its mmap threshold from heaps that keep freed blocks,
  and raises that threshold (up to 32 MiB) each time a larger block is freed. ZeRO-3 gathers and
  frees every parameter each step, the forward pass allocates and frees activations of a few MiB:
  on a CPU worker the heaps then grow far past the live tensors (measured: 50M parameters, ZeRO-3,
  2 ranks: 1.35 GB above the runtime for 0.50 GB of live tensors, still growing after 5 steps;
  0.61 GB with a fixed 256 KiB threshold). :func:`build_model` fixes the threshold on CPU workers
  for models of 20M parameters or more (:func:`limit_heap_retention`); blocks above it return to the
  OS when freed, at the cost of page faults on reuse (GPU memory is not affected). Tiny models (the
  demo's) keep glibc's default: their heaps retain little, and the page faults cost them most.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)

# DeepSpeed's bucket default order of magnitude; buckets never need to be larger to reach full bandwidth.
MAX_BUCKET = 50_000_000
# DeepSpeed's default stage3_param_persistence_threshold.
MAX_PERSISTENCE_THRESHOLD = 100_000
PERSISTENT_FRACTION = 0.01
# Bucket sizes are rounded up to a multiple of this (DeepSpeed asserts alignment to its NCCL start factor).
BUCKET_ALIGNMENT = 256

LIMIT_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_max_live_parameters",
              "stage3_max_reuse_distance", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
              "sub_group_size")
# Used when a limit is "auto" but no model is at hand (a config built for inspection only).
FALLBACK_LIMITS = {"reduce_bucket_size": MAX_BUCKET, "allgather_bucket_size": MAX_BUCKET,
                   "stage3_max_live_parameters": 1_000_000_000, "stage3_max_reuse_distance": 1_000_000_000,
                   "stage3_prefetch_bucket_size": MAX_BUCKET, "stage3_param_persistence_threshold": 100_000,
                   "sub_group_size": 1_000_000_000}


@dataclass(frozen=True)
class ModelSizes:
    """Element counts of a model's parameters (full sizes, also for a partitioned model)."""

    numels: tuple[int, ...]          # every parameter
    trainable: int
    largest_module: int              # parameters owned directly by one module: what ZeRO-3 gathers at once

    @property
    def total(self) -> int:
        return sum(self.numels)

    @property
    def largest_param(self) -> int:
        return max(self.numels, default=0)

    @classmethod
    def of(cls, model: nn.Module) -> "ModelSizes":
        def numel(p: torch.Tensor) -> int:
            return int(getattr(p, "ds_numel", p.numel()))

        params = list(model.parameters())
        per_module = [sum(numel(p) for p in m.parameters(recurse=False)) for m in model.modules()]
        return cls(tuple(numel(p) for p in params), sum(numel(p) for p in params if p.requires_grad),
                   max(per_module, default=0))


def persistence_threshold(numels: tuple[int, ...], fraction: float = PERSISTENT_FRACTION,
                          cap: int = MAX_PERSISTENCE_THRESHOLD) -> int:
    """Largest threshold t <= cap with sum(n for n in numels if n <= t) <= fraction * total."""
    budget, used, threshold = fraction * sum(numels), 0, 0
    for n in sorted(numels):
        if n > cap or used + n > budget:
            break
        used += n
        threshold = n
    return threshold


def _clamp(value: int, low: int, high: int) -> int:
    """``value`` within [low, high] (low wins), rounded to a multiple of BUCKET_ALIGNMENT that stays >= low."""
    value = max(low, min(value, high))
    aligned = value // BUCKET_ALIGNMENT * BUCKET_ALIGNMENT
    return aligned if aligned >= low else aligned + BUCKET_ALIGNMENT


def auto_limits(sizes: ModelSizes) -> dict[str, int]:
    """Every limit of :data:`LIMIT_KEYS` derived from the model (the table in the module docstring)."""
    total = max(sizes.total, 1)
    bucket = _clamp(total // 16, sizes.largest_param, MAX_BUCKET)
    live = max(total // 10, 2 * sizes.largest_module)
    return {
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "stage3_max_live_parameters": live,
        "stage3_max_reuse_distance": live,
        "stage3_prefetch_bucket_size": _clamp(total // 40, sizes.largest_module, MAX_BUCKET),
        "stage3_param_persistence_threshold": persistence_threshold(sizes.numels),
        "sub_group_size": max(total // 32, sizes.largest_param),
    }


def zero_limits(ds_cfg, sizes: ModelSizes | None) -> dict[str, int]:
    """The resolved limits of a ``deepspeed`` config section: explicit integers win, ``"auto"`` is
    derived from ``sizes`` (or DeepSpeed-like fixed values when no model is given)."""
    derived = auto_limits(sizes) if sizes is not None else FALLBACK_LIMITS
    out = {}
    for key in LIMIT_KEYS:
        value = ds_cfg.limit(key)
        out[key] = derived[key] if value is None else value
    return out


# ----------------------------------------------------------------------------------------------
# Construction and loading


def param_dtype(cfg) -> torch.dtype:
    """dtype the engine keeps parameters in: fp32, unless 16-bit without autocast."""
    from trainer.distributed import compute_dtype
    from trainer.schema import Precision

    ds = cfg.deepspeed
    return torch.float32 if ds.precision == Precision.fp32 or ds.autocast else compute_dtype(ds)


def _init_class():
    import deepspeed

    class PartitionWritableInit(deepspeed.zero.Init):
        """``zero.Init`` whose parameters alias their partition until the outermost ``with`` exits."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.exposed: list[nn.Parameter] = []

        def _set_dtype(self, ds_config, dtype) -> None:
            # DeepSpeed (0.19) reads `dtype or fp16 if fp16_supported else bf16 if ...`: on an
            # accelerator without fp16 (a CPU without AVX512-FP16, e.g. AMD EPYC) the dtype we pass is
            # ignored and fp32 runs got bf16 parameters ("Input type (float) and bias type (BFloat16)").
            if dtype is not None:
                self.dtype = dtype
            else:
                super()._set_dtype(ds_config, dtype)

        def _post_init_method(self, module: nn.Module) -> None:
            super()._post_init_method(module)
            for param in module.parameters(recurse=False):
                partition = getattr(param, "ds_tensor", None)
                if partition is not None and param.data.numel() == 0:
                    param.data = partition.data  # shares storage: writes land in the partition
                    self.exposed.append(param)

        def __exit__(self, *exc) -> None:
            try:
                return super().__exit__(*exc)
            finally:
                for param in self.exposed:  # back to ZeRO's empty placeholder
                    param.data = torch.empty(0, dtype=param.dtype, device=param.device)
                self.exposed.clear()

    return PartitionWritableInit


HEAP_MMAP_THRESHOLD = 256 * 1024
# Smaller models keep the dynamic threshold: what their heaps retain is a few MB, while a fixed
# threshold makes every activation above it fresh pages (the demo's 0.8M-parameter tokenizer: a
# page fault per 4 KiB of every activation, +70% a step).
HEAP_LIMIT_MIN_PARAMS = 20_000_000


def limit_heap_retention(threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold so freed blocks >= ``threshold`` go back to the OS (see the module
    docstring); returns whether it took effect (False off glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3  # <malloc.h> M_MMAP_THRESHOLD; setting it also disables the dynamic raise
    done = bool(libc.mallopt(m_mmap_threshold, int(threshold)))
    libc.malloc_trim(0)
    return done


def build_model(cfg, build: Callable[[], M]) -> M:
    """``build()`` as is, or at ZeRO-3 under ``zero.Init`` with the config's limits for this model.

    The sizes that "auto" limits need come from a build on the meta device first (no memory). On CPU
    workers, for models of ``HEAP_LIMIT_MIN_PARAMS`` or more, the heap's retention is limited first
    (:func:`limit_heap_retention`).
    """
    with torch.device("meta"):
        sizes = ModelSizes.of(build())
    if not cfg.trainer.use_gpu and sizes.total >= HEAP_LIMIT_MIN_PARAMS:
        limit_heap_retention()
    if cfg.deepspeed.zero_stage != 3:
        return build()
    from trainer.distributed import deepspeed_config

    config = deepspeed_config(cfg, sizes=sizes)
    remote = "cpu" if cfg.deepspeed.offload_param else None
    with _init_class()(config_dict_or_path=config, dtype=param_dtype(cfg), remote_device=remote):
        return build()


def is_partitioned(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], modifier_rank: int | None = 0) -> Iterator[None]:
    """Full values of ``params`` inside the block (a no-op for parameters ZeRO-3 does not partition).

    With ``modifier_rank``, that rank's values are written back to every rank's partition on exit.
    """
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def _full_shape(param: nn.Parameter) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)


@torch.no_grad()
def copy_state_into(module: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """``module.load_state_dict(state, strict=False)`` that also works on a ZeRO-3 partitioned module.

    Each parameter is gathered alone, written by rank 0 and re-partitioned, so no rank holds more
    than one full parameter beyond its partition. Returns (missing keys, unexpected keys); a shape
    mismatch raises ValueError. Collective when the module is partitioned: every rank must call it.
    """
    own_params = dict(module.named_parameters())
    own_buffers = {k: v for k, v in module.named_buffers()}
    expected = set(module.state_dict().keys())
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(v.shape)} != {tuple(_full_shape(own_params[k]))}" for k, v in state.items()
             if k in own_params and tuple(v.shape) != tuple(_full_shape(own_params[k]))]
    wrong += [f"{k} {tuple(v.shape)} != {tuple(own_buffers[k].shape)}" for k, v in state.items()
              if k in own_buffers and v.shape != own_buffers[k].shape]
    if wrong:
        raise ValueError(f"weights do not fit the model: {wrong[:4]}{' ...' if len(wrong) > 4 else ''}")
    for name, param in own_params.items():
        if name not in state:
            continue
        if hasattr(param, "ds_id"):
            with gathered([param], modifier_rank=0):
                param.data.copy_(state[name].reshape(param.data.shape))
        else:
            param.copy_(state[name])
    for name, buffer in own_buffers.items():
        if name in state and name in expected:
            buffer.copy_(state[name])
    return missing, unexpected
