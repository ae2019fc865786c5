"""Checkpoints of DeepSpeed engines that load on any number of workers, under any ZeRO stage.

DeepSpeed's own ``save_checkpoint`` writes each rank's optimizer partition in the layout of that
world size, and refuses to load it at another (``ZeRORuntimeException: ... DP world size of 2 but the
current world size is 1``). We write the state in a layout that does not depend on the world size,
and read it into any engine:

* Every trainable parameter is a flat vector of ``numel`` values with three fp32 **keys**:
  ``param`` (the fp32 master weights), ``exp_avg`` and ``exp_avg_sq`` (AdamW's moments); frozen
  parameters have ``param`` only, and a stage may add its own keys (the EMA adds ``ema``).
* Each rank writes the **fragments** it holds, as they lie in memory: its ZeRO-3 partition
  (``[r * P, (r + 1) * P)``), its ZeRO-1/2 share of the flat fp32 buffer (an arbitrary
  sub-range of each parameter), or, for state every rank holds whole, rank 0 writes it once.
  Fragment files are ``rank<r>.safetensors``; the header metadata maps each stored tensor to
  (parameter, key, offset). Nothing is gathered or copied to save: no rank ever holds more than
  what it trains with, and the checkpoint costs exactly the bytes of the state (16 bytes per
  trainable parameter with AdamW, 20 with the EMA), the same as DeepSpeed's own format.
* Loading, each rank asks for the ranges *its* engine holds now (the same enumeration as saving,
  under the new world size) and reads only those byte ranges from the memory-mapped fragment
  files, whichever ranks wrote them. Then the 16-bit / partitioned working copies are refreshed
  from the fp32 values, and the scalars (Adam's step, the LR schedule, the engine's counters, a
  loss scaler) are restored from ``engine.json``.

The same code path serves a same-size resume, so the usual resume tests exercise it too. The
optimizer must be Adam-like (``exp_avg``/``exp_avg_sq``): ours is AdamW.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from trainer.tensor_files import write_safetensors

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
FRAGMENTS_KEY = "titok_fragments"
ENGINE_FILE = "engine.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into this engine (missing or inconsistent state)."""


@dataclass
class StateView:
    """One rank's slice of one key of one parameter: ``values`` are elements ``[offset, offset + n)``
    of the flattened parameter. ``save``: this rank writes it (each element is written by exactly one
    rank); views with ``save=False`` are only filled when loading (e.g. a 16-bit working copy)."""

    name: str
    key: str
    offset: int
    values: torch.Tensor      # 1-D view into live memory
    save: bool
    shape: tuple[int, ...]    # shape of the whole parameter

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.data.view(-1)


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that holds the state (DeepSpeed's ZeRO / bf16 wrappers keep it as ``.optimizer``)."""
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _state_tensors(engine) -> list[tuple[torch.Tensor, dict]]:
    """(tensor the optimizer steps, its param group) for every tensor that holds optimizer state.

    ZeRO-3 hands its flat fp32 sub-groups to the torch optimizer only for the duration of a step
    (its param groups are empty otherwise); the other wrappers keep them in the param groups."""
    optimizer = base_optimizer(engine)
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if flats is not None:
        group_of = getattr(engine.optimizer, "sub_group_to_group_id", {})
        return [(flat, optimizer.param_groups[group_of.get(i, 0)]) for i, flat in enumerate(flats)]
    return [(param, group) for group in optimizer.param_groups for param in group["params"]]


def ensure_optimizer_state(engine) -> None:
    """Create Adam's state for tensors that have none yet (torch creates it at the first step).

    Loading a checkpoint into a fresh engine must write the moments somewhere; the layout is torch
    AdamW's (``step`` a float tensor, on the device only for fused/capturable groups) and DeepSpeed
    FusedAdam's (moments per tensor, ``step`` on the group)."""
    optimizer = base_optimizer(engine)
    for tensor, group in _state_tensors(engine):
        state = optimizer.state[tensor]
        if "exp_avg" in state:
            continue
        on_device = group.get("fused") or group.get("capturable")
        state["step"] = torch.tensor(0.0, dtype=torch.float32, device=tensor.device if on_device else "cpu")
        state["exp_avg"] = torch.zeros_like(tensor, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(tensor, memory_format=torch.preserve_format)


def zero3_partition(param) -> tuple[int, int]:
    """(offset of this rank's ZeRO-3 partition in the flat parameter, its valid length)."""
    import torch.distributed as dist

    size = param.ds_tensor.ds_numel
    group = getattr(param, "ds_process_group", None)
    rank = dist.get_rank(group=group) if dist.is_initialized() else 0
    offset = rank * size
    return offset, max(0, min(size, param.ds_numel - offset))


def _zero3_fp32(engine, param, key: str | None) -> torch.Tensor:
    """A view of this rank's fp32 partition of ``param`` (master weights, or an optimizer state)."""
    optimizer = engine.optimizer
    # The public safe_get_local_* helpers return `.to(device)` of it, a copy when the optimizer is
    # offloaded; loading must write into the real buffer.
    fp32, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    return fp32


def engine_views(engine, rank: int) -> Iterator[StateView]:
    """Every piece of model and optimizer state this rank holds, as views (see the module doc)."""
    optimizer = base_optimizer(engine)
    for name, param in engine.module.named_parameters():
        shape = tuple(getattr(param, "ds_shape", param.shape))
        if hasattr(param, "ds_id"):                                   # ZeRO-3: partitioned
            offset, valid = zero3_partition(param)
            lp = param.ds_tensor.data.view(-1)[:valid]
            if param.requires_grad:
                yield StateView(name, "param", offset, _zero3_fp32(engine, param, None)[:valid], True, shape)
                for key in MOMENT_KEYS:
                    yield StateView(name, key, offset, _zero3_fp32(engine, param, key)[:valid], True, shape)
                yield StateView(name, "param", offset, lp, False, shape)
            else:
                yield StateView(name, "param", offset, lp, True, shape)
        elif getattr(param, "_hp_mapping", None) is not None:        # ZeRO-1/2, bf16: a flat fp32 share
            mapping = param._hp_mapping
            start, count = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
            yield StateView(name, "param", start, mapping.hp_fragment.data.view(-1), True, shape)
            flat = optimizer.param_groups[mapping.param_group_index]["params"][0]
            state = optimizer.state[flat]
            hp_start = mapping.hp_fragment_address.start
            for key in MOMENT_KEYS:
                yield StateView(name, key, start, state[key].data.view(-1).narrow(0, hp_start, count), True, shape)
            yield StateView(name, "param", 0, _flat(param), False, shape)
        elif hasattr(param, "_hp_mapping"):                           # ZeRO-1/2: held by other ranks
            yield StateView(name, "param", 0, _flat(param), False, shape)
        else:                                                         # whole on every rank
            yield StateView(name, "param", 0, _flat(param), rank == 0, shape)
            state = optimizer.state.get(param, {}) if param.requires_grad else {}
            for key in MOMENT_KEYS:
                if key in state:
                    yield StateView(name, key, 0, state[key].data.view(-1), rank == 0, shape)


def _optimizer_step(optimizer: torch.optim.Optimizer) -> float:
    """Adam's step count (the same for every tensor: all are stepped together)."""
    for group in optimizer.param_groups:
        if "step" in group:
            return float(group["step"])
    for state in optimizer.state.values():
        if "step" in state:
            return float(state["step"])
    return 0.0


def _set_optimizer_step(optimizer: torch.optim.Optimizer, step: float) -> None:
    for group in optimizer.param_groups:
        if "step" in group:
            group["step"] = type(group["step"])(step)
    for state in optimizer.state.values():
        if "step" in state:
            if torch.is_tensor(state["step"]):
                state["step"].fill_(step)
            else:
                state["step"] = type(state["step"])(step)


def _loss_scaler_state(engine) -> dict[str, float]:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None:
        return {}
    return {k: float(v) for k, v in vars(scaler).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and (k.startswith("cur_") or k == "last_overflow_iter")}


def engine_scalars(engine) -> dict[str, Any]:
    """Everything besides tensors that an engine needs to continue: counters, Adam's step, schedule."""
    scheduler = engine.lr_scheduler
    return {
        "global_steps": int(engine.global_steps),
        "global_samples": int(engine.global_samples),
        "skipped_steps": int(engine.skipped_steps),
        "optimizer_step": _optimizer_step(base_optimizer(engine)),
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"} if scheduler else None,
        "loss_scaler": _loss_scaler_state(engine),
        "zero_stage": int(engine.zero_optimization_stage()),
        "world_size": int(engine.world_size),
    }


def write_fragments(path: Path, views: Iterable[StateView], metadata: dict[str, str] | None = None) -> int:
    """Write the ``save`` views into one fragment file; returns its size in bytes."""
    tensors, index = [], {}
    for view in views:
        if not view.save or view.values.numel() == 0:
            continue
        tensor_name = f"{view.name}::{view.key}::{view.offset}"
        tensors.append((tensor_name, view.values))
        index[tensor_name] = [view.name, view.key, view.offset, list(view.shape)]
    return write_safetensors(path, tensors, {**(metadata or {}), FRAGMENTS_KEY: json.dumps(index)})


class FragmentReader:
    """The fragments of every rank file in a directory, readable by (parameter, key, range)."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        files = sorted(self.directory.glob("rank*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.directory} holds no fragment files (rank*.safetensors)")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        # (name, key) -> [(handle index, tensor name, offset, length)], sorted by offset
        self.index: dict[tuple[str, str], list[tuple[int, str, int, int]]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for h, handle in enumerate(self._handles):
            meta = json.loads((handle.metadata() or {}).get(FRAGMENTS_KEY, "{}"))
            for tensor_name, (name, key, offset, shape) in meta.items():
                length = handle.get_slice(tensor_name).get_shape()[0]
                self.index.setdefault((name, key), []).append((h, tensor_name, offset, length))
                self.shapes[name] = tuple(shape)
        for fragments in self.index.values():
            fragments.sort(key=lambda f: f[2])

    def has(self, name: str, key: str) -> bool:
        return (name, key) in self.index

    def read(self, name: str, key: str, start: int, length: int) -> torch.Tensor:
        """Elements ``[start, start + length)`` of a key, assembled from whichever files hold them."""
        fragments = self.index.get((name, key))
        if fragments is None:
            raise CheckpointError(f"checkpoint {self.directory} has no '{key}' for parameter {name}")
        total = math.prod(self.shapes.get(name, ()))
        if name in self.shapes and start + length > total:
            raise CheckpointError(f"parameter {name} has {total} elements in the checkpoint, "
                                  f"the model asks for {start + length} (another model size?)")
        out: torch.Tensor | None = None
        covered = 0
        for h, tensor_name, offset, size in fragments:
            lo, hi = max(start, offset), min(start + length, offset + size)
            if lo >= hi:
                continue
            piece = self._handles[h].get_slice(tensor_name)[lo - offset:hi - offset]
            if out is None:
                out = torch.empty(length, dtype=piece.dtype)
            out[lo - start:hi - start] = piece
            covered += hi - lo
        if covered != length or out is None:
            if length == 0:
                return torch.empty(0)
            raise CheckpointError(f"checkpoint {self.directory} covers {covered} of the {length} elements "
                                  f"[{start}, {start + length}) of {name}/{key} (fragment files missing?)")
        return out

    def fill(self, view: StateView) -> None:
        n = view.values.numel()
        if n:
            view.values.copy_(self.read(view.name, view.key, view.offset, n).to(view.values.dtype))


def consolidated_state_dict(directory: Path, key: str = "param") -> dict[str, torch.Tensor]:
    """Whole tensors of one key (``param``: the fp32 weights; ``ema``, ``exp_avg``, ...) from an engine
    checkpoint directory, in the module's parameter names and shapes (the counterpart of DeepSpeed's
    ``zero_to_fp32`` for this layout; holds the whole model in memory)."""
    reader = FragmentReader(directory)
    out = {}
    for (name, stored_key) in reader.index:
        if stored_key == key:
            shape = reader.shapes[name]
            out[name] = reader.read(name, key, 0, math.prod(shape)).view(shape)
    return out


def save_engine(engine, directory: Path, rank: int, extra_views: Iterable[StateView] = ()) -> None:
    """Write this rank's fragments of ``engine`` (plus ``extra_views``, e.g. the EMA) into ``directory``;
    rank 0 also writes ``engine.json``. Every rank of the engine's group must call it (no collective)."""
    directory.mkdir(parents=True, exist_ok=True)
    # An engine that has not stepped yet (stage 2's discriminator before its start step) has no Adam
    # state; the zeros torch would create at its first step are what its checkpoint holds.
    ensure_optimizer_state(engine)
    views = list(engine_views(engine, rank)) + list(extra_views)
    write_fragments(directory / f"rank{rank}.safetensors", views)
    if rank == 0:
        (directory / ENGINE_FILE).write_text(json.dumps(engine_scalars(engine), indent=2))


def load_engine(engine, directory: Path, rank: int, extra_views: Iterable[StateView] = ()) -> dict[str, Any]:
    """Fill ``engine`` (and ``extra_views``) from a directory written by :func:`save_engine` at any
    world size. Returns the saved scalars."""
    scalars_file = directory / ENGINE_FILE
    if not scalars_file.exists():
        raise CheckpointError(f"{directory} has no {ENGINE_FILE}: not a checkpoint of this version")
    scalars = json.loads(scalars_file.read_text())
    optimizer = base_optimizer(engine)
    ensure_optimizer_state(engine)
    reader = FragmentReader(directory)
    with torch.no_grad():
        for view in list(engine_views(engine, rank)) + list(extra_views):
            reader.fill(view)
    _set_optimizer_step(optimizer, scalars["optimizer_step"])
    # ZeRO-1/2 link their per-parameter views of the moments only after the first step; the state
    # exists now, so link them (what step() would do) and the fragment getters work at once.
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()
    _restore_scalars(engine, scalars)
    return scalars


def _restore_scalars(engine, scalars: dict[str, Any]) -> None:
    engine.global_steps = scalars["global_steps"]
    engine.global_samples = scalars["global_samples"]
    engine.skipped_steps = scalars["skipped_steps"]
    scheduler = engine.lr_scheduler
    if scheduler is not None and scalars.get("scheduler"):
        state = scheduler.state_dict()
        state.update(scalars["scheduler"])
        scheduler.load_state_dict(state)
        for group, lr in zip(engine.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for key, value in (scalars.get("loss_scaler") or {}).items():
        if scaler is not None and hasattr(scaler, key):
            setattr(scaler, key, type(getattr(scaler, key))(value))
