"""Exponential moving average of model weights, correct under every ZeRO stage.

Without ZeRO-3 each rank's parameters are complete and the shadow is a full fp32 copy. Under ZeRO-3
each rank owns one contiguous slice of every flattened parameter (``param.ds_tensor``); the shadow
then holds only that slice, so the EMA costs no communication per step and 1/world of the memory.
:meth:`full_state_dict` all-gathers the slices for an export.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from trainer.engine_state import StateView, zero3_partition


def _local_view(param: torch.nn.Parameter) -> torch.Tensor:
    """The values this rank holds: its ZeRO-3 partition, or the whole parameter."""
    partition = getattr(param, "ds_tensor", None)
    return partition if partition is not None else param.data


class ParamEMA:
    """EMA shadow of a module's parameters (fp32), updated after each optimizer step."""

    def __init__(self, module: torch.nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.names = [name for name, _ in module.named_parameters()]
        self.shadow = {name: _local_view(p).detach().float().clone() for name, p in module.named_parameters()}
        self.sharded = any(hasattr(p, "ds_tensor") for p in module.parameters())

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        # Early averages would otherwise be dominated by the random initialisation.
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        decay = self.current_decay()
        for name, param in module.named_parameters():
            if param.requires_grad:
                self.shadow[name].lerp_(_local_view(param).float(), 1.0 - decay)
        self.num_updates += 1

    def views(self, module: torch.nn.Module, rank: int) -> list[StateView]:
        """The shadow as checkpoint views (key ``ema``), sharded exactly like the parameters: a ZeRO-3
        rank holds and writes its partition's slice; otherwise rank 0 writes the whole shadow and
        every rank reads it whole (see ``trainer/engine_state.py``)."""
        out = []
        for name, param in module.named_parameters():
            shadow = self.shadow[name].view(-1)
            shape = tuple(getattr(param, "ds_shape", param.shape))
            if hasattr(param, "ds_tensor"):
                offset, valid = zero3_partition(param)
                out.append(StateView(name, "ema", offset, shadow[:valid], True, shape))
            else:
                out.append(StateView(name, "ema", 0, shadow, rank == 0, shape))
        return out

    def full_state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Full fp32 EMA weights (plus buffers) in the module's state_dict layout, on every rank.

        Collective under ZeRO-3: every rank must call it.
        """
        return gather_full_state_dict(module, self.shadow)


@torch.no_grad()
def gather_full_state_dict(module: torch.nn.Module,
                           local_values: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The module's full state_dict in fp32 on every rank, from each rank's local parameter views.

    ``local_values`` replaces the parameters' own local views (the EMA shadow does this). Under
    ZeRO-3 the equal-sized, rank-ordered slices are all-gathered and concatenated, which rebuilds
    each flattened parameter; elsewhere the local view is already the whole parameter. Collective
    under ZeRO-3.
    """
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        local = (local_values[name] if local_values is not None else _local_view(param)).float()
        if hasattr(param, "ds_tensor"):
            world = dist.get_world_size()
            gathered = torch.empty(local.numel() * world, dtype=local.dtype, device=local.device)
            dist.all_gather(list(gathered.view(world, -1).unbind(0)), local.contiguous())
            out[name] = gathered[: param.ds_numel].view(param.ds_shape).cpu().clone()
        else:
            out[name] = local.cpu().clone()
    for name, buf in module.named_buffers():
        out[name] = buf.detach().cpu().clone()
    persistent = set(module.state_dict().keys())
    return {k: v for k, v in out.items() if k in persistent}


def export_specs(module: torch.nn.Module) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every entry :func:`iter_full_tensors` yields, in its order: parameters in
    fp32, persistent buffers as they are (the module's ``state_dict`` order)."""
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    specs = []
    for name in module.state_dict(keep_vars=True):
        if name in params:
            specs.append((name, torch.float32, tuple(getattr(params[name], "ds_shape", params[name].shape))))
        elif name in buffers:
            specs.append((name, buffers[name].dtype, tuple(buffers[name].shape)))
    return specs


@torch.no_grad()
def iter_full_tensors(module: torch.nn.Module, local_values: dict[str, torch.Tensor] | None = None,
                      dst: int = 0) -> Iterator[torch.Tensor | None]:
    """The entries of :func:`export_specs`, one at a time: whole on rank ``dst``, None on the others.

    Under ZeRO-3 each parameter's rank-ordered slices are gathered to ``dst`` alone, so no rank ever
    holds more than one whole parameter (an export of L-32 costs rank ``dst`` one layer, not the model).
    ``local_values`` replaces the parameters' local views (the EMA shadow). Collective under ZeRO-3:
    every rank must consume the iterator to its end."""
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    for name, _, _ in export_specs(module):
        if name in buffers:
            yield buffers[name].detach().cpu().clone() if rank == dst else None
            continue
        param = params[name]
        local = (local_values[name] if local_values is not None else _local_view(param)).float()
        if hasattr(param, "ds_tensor"):
            world = dist.get_world_size()
            local = local.contiguous()
            parts = [torch.empty_like(local) for _ in range(world)] if rank == dst else None
            dist.gather(local, parts, dst=dst)
            if rank == dst:
                yield torch.cat(parts)[: param.ds_numel].view(param.ds_shape).cpu()
            else:
                yield None
        else:
            yield local.cpu().clone() if rank == dst else None
