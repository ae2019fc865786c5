"""Capacity plan of a training run, before launch: what each rank will hold, and whether it fits.

    python trainer/run.py stage=tokenizer experiment=titok_l32 --plan [--gpu-mem 80] [--cpu-mem 12]

Same config keys as the run. Nothing of the model is allocated: parameter counts come from a build
on the meta device (the stage's own model constructors, with its freezing rules); memory follows the
ZeRO arithmetic below; activation memory comes from a measured probe; the runtime's own memory is
measured in a fresh process.

**ZeRO arithmetic** (per rank; N = ``trainer.num_workers``; P / T = all / trainable parameters of an
engine's module; ``b`` = 4 bytes per parameter for fp32 and for bf16/fp16 with ``deepspeed.autocast``
(fp32 parameters, autocast compute), 2 for 16-bit parameters; ``/N`` rounds up), as DeepSpeed 0.19
allocates it:

=============  ==============  =====================  =======================  ========================
ZeRO stage     parameters      gradients              fp32 master              Adam moments (fp32)
=============  ==============  =====================  =======================  ========================
0              P b             T b (+4T if b=2)       0 (4T if b=2)            8T
                               (+T b all-reduce copy)
1              P b             T b + 4T/N             4T/N                     8T/N
2              P b             T b/N + bucket b       4T/N                     8T/N
                               (x2 with overlap_comm)
                               + 4T/N at the step
3              P b/N + Ppers b T b/N + bucket b       4T/N                     8T/N
                               + 4 S at the step
=============  ==============  =====================  =======================  ========================

ZeRO 1-3 keep an fp32 copy of each rank's partition even for fp32 parameters (ZeRO-3 means to reuse
the partition when it is fp32 already, but compares a torch.device with a string, which is never
equal: measured, it copies on CPU; on a GPU the same comparison fails the same way). At ZeRO-3, ``Ppers`` are the parameters under ``stage3_param_persistence_threshold``
(whole on every rank) and a rank also holds, during forward and backward, the parameters it has
gathered: at most ``stage3_max_live_parameters`` plus the largest module's (the ``"auto"`` limits of
trainer/partitioning.py). ``S`` is the ZeRO-3 ``sub_group_size`` (the optimizer steps the partition one sub-group at a time).
The EMA is an fp32 shadow of every parameter of the main engine (P x 4, /N
at ZeRO-3). Frozen networks outside the engines (the MaskGIT-VQGAN teacher of stage 1, the
perceptual backbones of stage 2) are whole fp32 copies on every rank. The optimizer step allocates
temporaries of what it steps at once (ZeRO 1-2: the rank's fp32 partition; ZeRO-3: a sub-group;
ZeRO-0: a parameter): twice its size for torch's single-tensor AdamW (CPU), once for the foreach
version (GPU), none for the fused kernel (``optim.fused``). With
``deepspeed.offload_optimizer`` the master, moments and fp32 gradients live in host memory.

**Phases.** A rank's peak is the largest of: the forward/backward pass (states, ZeRO buffers and
gathered parameters, activations), the optimizer step (states, gradients, step temporaries), the
checkpoint (states plus a bytes copy of the rank's EMA shard, made by safetensors) and the export
(states plus the full fp32 state dict gathered on every rank, plus on rank 0 two more copies while
safetensors serialises it to bytes: measured 3x the export size on rank 0; the export path of
trainer/stages/base.py and trainer/checkpoint.py as they are).

**Activations** are measured, not modelled: the probe runs the stage's forward and backward (its
model, frozen networks, losses and discriminator, at the real widths, image size, token counts,
precision and activation checkpointing) at batch 1 and 2, with each transformer stack cut to 1 and 2
layers (2 and 4 for the U-ViT generator), outside DeepSpeed and with the gradients allocated
beforehand. It measures the growth of peak memory during that pass above the resting state: on a GPU
``torch.cuda.max_memory_allocated``, on a CPU the process's peak RSS (VmHWM, reset through
``/proc/self/clear_refs``, with the worker's heap setting of trainer/partitioning.py). The fit
``fixed + sum_j a_j (L_j - l_j) + B (s + sum_j k_j (L_j - l_j))`` over the six (four) points gives each
stack's per-layer cost, fixed and per sample, and scales to the real depth ``L_j`` and micro-batch
``B``. Planning a GPU run on a machine without one measures on the CPU (said in the output).

**Runtime.** A CPU worker's RSS also holds Python, torch, DeepSpeed (and its communication op), Ray
and the trainer's modules: measured in a fresh process that imports them and joins a one-rank gloo
group, plus a fixed allowance for Ray's core worker (measured in a Ray Train worker, see
``RAY_WORKER_ALLOWANCE``). The probes live in trainer/memory_probe.py.

**Sizes on storage.** Checkpoint: per engine DeepSpeed's model states (P b, once, at ZeRO 0-2; the
module's placeholders at ZeRO-3) and optimizer states (fp32 master + moments, 12 T over all ranks;
ZeRO-0 saves the moments with the model states) plus the EMA (4 P); export: the fp32 state dict.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from trainer.memory_probe import (ActivationFit, measure_runtime_baseline, param_bytes, probe_activations,
                                  stage_modules)
from trainer.partitioning import ModelSizes, zero_limits
from trainer.schema import Precision, Stage, TrainConfigBase

GiB = 2**30
MiB = 2**20
# A Ray Train worker's RSS above a plain process importing the same modules (Ray's core worker and
# the train session). Measured here: 974 MiB in a fresh Ray Train worker after joining its process
# group vs 954 MiB from measure_runtime_baseline.
RAY_WORKER_ALLOWANCE = 32 * MiB
# A GPU holds the CUDA context and kernels outside torch's allocator, and the caching allocator
# fragments: a plan "fits" an accelerator when its peak allocated bytes stay under memory - reserve.
GPU_RESERVE = 2 * GiB


# ----------------------------------------------------------------------------------------------
# Counts


@dataclass(frozen=True)
class EngineShape:
    """One DeepSpeed engine's module: sizes and resolved ZeRO limits."""

    name: str
    params: int
    trainable: int
    persistent: int          # ZeRO-3: parameters at or below the persistence threshold
    largest_module: int
    largest_param: int
    buffer_bytes: int
    limits: dict[str, int]


@dataclass(frozen=True)
class Counts:
    engines: tuple[EngineShape, ...]
    frozen_networks: dict[str, int]
    ema: int                 # parameters the EMA shadows (every parameter of the main engine)
    export_bytes: int        # the exported fp32 state dict

    @property
    def trainable(self) -> int:
        return sum(e.trainable for e in self.engines)

    @property
    def frozen(self) -> int:
        """Frozen parameters, inside the engines (stage 2's encoder) and in frozen networks."""
        return sum(e.params - e.trainable for e in self.engines) + sum(self.frozen_networks.values())


def _engine_shape(name: str, module: nn.Module, cfg: TrainConfigBase) -> EngineShape:
    sizes = ModelSizes.of(module)
    limits = zero_limits(cfg.deepspeed, sizes)
    threshold = limits["stage3_param_persistence_threshold"]
    persistent = sum(n for n in sizes.numels if n <= threshold) if cfg.deepspeed.zero_stage == 3 else 0
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return EngineShape(name, sizes.total, sizes.trainable, persistent, sizes.largest_module, sizes.largest_param,
                       buffers, limits)


def count(cfg: TrainConfigBase) -> Counts:
    """Parameter counts of the stage's modules, built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        mods = stage_modules(cfg)
    engines = [_engine_shape("model", mods.model, cfg)]
    if mods.discriminator is not None:
        engines.append(_engine_shape("discriminator", mods.discriminator, cfg))
    persistent_keys = set(mods.model.state_dict().keys())
    export = sum(4 * p.numel() for n, p in mods.model.named_parameters() if n in persistent_keys)
    export += sum(b.numel() * b.element_size() for n, b in mods.model.named_buffers() if n in persistent_keys)
    frozen = {name: sum(p.numel() for p in m.parameters()) for name, m in mods.frozen.items()}
    return Counts(tuple(engines), frozen, engines[0].params, export)


# ----------------------------------------------------------------------------------------------
# ZeRO arithmetic


def _per_rank(n: int, world: int) -> int:
    return -(-n // world)


@dataclass(frozen=True)
class EngineMemory:
    """Bytes one rank holds for one engine (see the table in the module docstring)."""

    params: int
    grads: int               # at the optimizer step: buffers, full gradients, the step's fp32 copy
    grad_buffers: int        # held through forward/backward (ZeRO 2-3 partition and buckets)
    master: int
    moments: int
    ema: int
    gathered: int            # ZeRO-3: full parameters fetched during forward/backward
    step_transient: int      # optimizer step temporaries


def stepped_at_once(e: EngineShape, stage: int, T_rank: int) -> int:
    """Elements the optimizer steps in one call: a parameter (ZeRO-0, unflattened), a ZeRO-3 sub-group
    of the rank's partition, or the whole flat partition (ZeRO 1-2; two parameter groups, the larger
    is nearly all of it)."""
    if stage == 0:
        return max(e.largest_param, 1)
    if stage == 3:
        return min(T_rank, max(e.limits["sub_group_size"], e.largest_param))
    return T_rank


def engine_memory(e: EngineShape, cfg: TrainConfigBase, world: int, with_ema: bool) -> EngineMemory:
    """The ZeRO arithmetic of the module docstring for one engine on one rank."""
    ds, stage = cfg.deepspeed, cfg.deepspeed.zero_stage
    b = param_bytes(cfg)
    P, T = e.params, e.trainable
    T_rank = T if stage == 0 else _per_rank(T, world)
    bucket = e.limits["reduce_bucket_size"]
    overlap = 2 if (ds.overlap_comm and cfg.trainer.use_gpu) else 1
    gathered = 0
    if stage == 0:
        # Several ranks: the gradients are all-reduced as one flat copy (DeepSpeed's 5e8-element buffer).
        allreduce = min(T, 500_000_000) * b if world > 1 else 0
        params, master = P * b, (0 if b == 4 else 4 * T)
        buffers, grads = 0, T * b + (4 * T if b == 2 else 0) + allreduce
    elif stage == 1:
        params, master = P * b, 4 * T_rank
        buffers, grads = 0, T * b + 4 * T_rank
    else:
        # The step flattens (and converts) the rank's gradient partition into an fp32 copy, at ZeRO-3
        # one sub-group at a time.
        params = P * b if stage == 2 else _per_rank(P, world) * b + e.persistent * b
        buffers = T_rank * b + (overlap if stage == 2 else 1) * bucket * b
        grads = buffers + 4 * stepped_at_once(e, stage, T_rank)
        master = 4 * T_rank  # ZeRO-3: a copy even of fp32 partitions (DeepSpeed 0.19 compares a device with a str)
    if stage == 3:
        live = e.limits["stage3_max_live_parameters"] + e.largest_module
        gathered = min(P - e.persistent, live) * b
    ema = 0
    if with_ema and cfg.trainer.ema_decay is not None:
        ema = 4 * (_per_rank(P, world) if stage == 3 else P)
    if cfg.optim.fused and cfg.trainer.use_gpu:
        copies = 0
    else:
        copies = 1 if cfg.trainer.use_gpu else 2
    return EngineMemory(params, grads, buffers, master, 8 * T_rank, ema, gathered, copies * 4 * stepped_at_once(e, stage, T_rank))


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass
class Line:
    name: str
    bytes: int
    note: str = ""
    host: bool = False   # held in host memory on a GPU run (runtime, offloaded optimizer)


@dataclass
class Plan:
    """Everything ``--plan`` prints; per-rank figures in bytes."""

    cfg: TrainConfigBase
    world: int
    micro_batch: int
    counts: Counts
    memory: dict[str, EngineMemory]
    activation: ActivationFit | None
    runtime: int
    lines: list[Line]
    phases: dict[str, int]           # phase -> per-rank bytes (without the runtime)
    checkpoint_bytes: dict[str, int]
    export_bytes: int
    memory_limit: int | None         # per rank, the limit the fit is checked against
    limit_source: str = ""

    @property
    def on_gpu(self) -> bool:
        return self.cfg.trainer.use_gpu

    @property
    def peak(self) -> int:
        """Peak per rank: host RSS on a CPU run (runtime included), allocated device memory on a GPU run."""
        return max(self.phases.values()) + (0 if self.on_gpu else self.runtime)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def train_peak(self) -> int:
        """Peak of the training phases (forward/backward and optimizer step), runtime included on CPU."""
        return max(self.phases["forward/backward"], self.phases["optimizer step"]) + (0 if self.on_gpu else self.runtime)

    def fits(self) -> bool | None:
        return None if self.memory_limit is None else self.peak <= self.memory_limit

    def largest_micro_batch(self) -> int | None:
        """The largest micro-batch whose plan fits ``memory_limit`` (0: none does), None without a limit
        or without an activation measurement."""
        if self.memory_limit is None or self.activation is None:
            return None
        others = max(v for k, v in self.phases.items() if k != "forward/backward")
        base = 0 if self.on_gpu else self.runtime
        if others + base > self.memory_limit:
            return 0
        act_now = self.activation.bytes_at(self.micro_batch)
        without = self.phases["forward/backward"] - act_now + base
        room = self.memory_limit - without - self.activation.bytes_at(0)
        return max(0, int(room // self.activation.bytes_per_sample))


def make_plan(cfg: TrainConfigBase, *, gpu_mem_gib: float | None = None, cpu_mem_gib: float | None = None,
              activation: ActivationFit | None = None, runtime: int | None = None,
              measure: bool = True) -> Plan:
    """The capacity plan of ``cfg`` (``measure=False`` skips the probes: activations and runtime 0)."""
    world, tr = cfg.trainer.min_workers, cfg.trainer  # an elastic group at its smallest holds the most per rank
    counts = count(cfg)
    memory = {e.name: engine_memory(e, cfg, world, with_ema=e.name == "model") for e in counts.engines}
    if activation is None and measure:
        activation = probe_activations(cfg)
    if runtime is None:
        runtime = (measure_runtime_baseline() + RAY_WORKER_ALLOWANCE) if measure else 0
    b = param_bytes(cfg)
    stage = cfg.deepspeed.zero_stage
    offload = cfg.deepspeed.offload_optimizer
    total = {f: sum(getattr(m, f) for m in memory.values()) for f in EngineMemory.__dataclass_fields__}
    frozen_bytes = 4 * sum(counts.frozen_networks.values())
    buffers = sum(e.buffer_bytes for e in counts.engines)
    ring = 0
    if cfg.stage == Stage.tokenizer and cfg.data.loader_workers:
        ring = cfg.data.loader_workers * 5 * tr.batch_size_per_worker * cfg.data.image_size ** 2 * 3
    act = activation.bytes_at(tr.batch_size_per_worker) if activation is not None else 0
    precision = {4: "fp32", 2: "16-bit"}[b]
    lines = [
        Line("params", total["params"], f"{precision} parameters" + (", ZeRO-3 partition + persistent" if stage == 3 else "")),
        Line("grads", total["grads"], "gradients and ZeRO gradient buckets"),
        Line("optimizer", total["master"] + total["moments"], "fp32 master partition + Adam moments", host=offload),
        Line("EMA", total["ema"], "fp32 shadow" + (" (partition)" if stage == 3 else "")),
        Line("frozen networks", frozen_bytes, ", ".join(counts.frozen_networks) or "none"),
        Line("buffers", buffers, "module buffers"),
    ]
    if stage == 3:
        lines.append(Line("ZeRO-3 gathered", total["gathered"], "full parameters fetched in forward/backward"))
    if ring:
        lines.append(Line("data ring", ring, "shared-memory batch ring of the loader workers", host=True))
    lines.append(Line(f"activations @ {tr.batch_size_per_worker}", act,
                      "not measured" if activation is None else f"probe on {activation.device}"))
    lines.append(Line("optimizer step temporaries", total["step_transient"], "AdamW temporaries of the fp32 partition",
                      host=offload))
    steady = (total["params"] + total["master"] + total["moments"] + total["ema"] + frozen_bytes + buffers + ring)
    z_persistent_grads = total["grad_buffers"]
    phases = {
        "forward/backward": steady + z_persistent_grads + total["gathered"] + act,
        "optimizer step": steady + total["grads"] + total["step_transient"],
        "checkpoint": steady + z_persistent_grads + total["ema"],
        "export (rank 0)": steady + z_persistent_grads + 3 * counts.export_bytes,
    }
    if tr.use_gpu:  # on a GPU run the runtime, the data ring and an offloaded optimizer are host memory
        host_only = ring + ((total["master"] + total["moments"] + total["step_transient"]) if offload else 0)
        phases = {k: v - host_only for k, v in phases.items()}
    limit, source = None, ""
    if tr.use_gpu and gpu_mem_gib is not None:
        limit, source = int(gpu_mem_gib * GiB) - GPU_RESERVE, f"{gpu_mem_gib:g} GiB accelerator - {GPU_RESERVE // GiB} GiB reserve"
    elif not tr.use_gpu:
        if cpu_mem_gib is None:
            machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            limit, source = machine // world, f"this machine's {machine / GiB:.0f} GiB RAM / {world} worker(s)"
        else:
            limit, source = int(cpu_mem_gib * GiB), f"{cpu_mem_gib:g} GiB per worker"
    return Plan(cfg, world, tr.batch_size_per_worker, counts, memory, activation, runtime, lines, phases,
                checkpoint_sizes(cfg, counts), counts.export_bytes, limit, source)


def checkpoint_sizes(cfg: TrainConfigBase, counts: Counts) -> dict[str, int]:
    """Bytes on storage of one train-state checkpoint, all ranks together, by part."""
    b = param_bytes(cfg)
    out = {}
    for e in counts.engines:
        # trainer/engine_state.py: a trainable parameter is stored once as its fp32 value plus Adam's
        # two fp32 moments, whatever the ZeRO stage; a frozen one in its own precision.
        out[f"{e.name} (engine state)"] = 12 * e.trainable + b * (e.params - e.trainable)
    if cfg.trainer.ema_decay is not None:
        out["EMA"] = 4 * counts.ema
    return out


# ----------------------------------------------------------------------------------------------
# Output and command line


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def render(plan: Plan) -> str:
    """The plan as text (what ``--plan`` prints)."""
    cfg, c = plan.cfg, plan.counts
    ds = cfg.deepspeed
    mode = ds.precision.value + (" autocast (fp32 params)" if ds.precision != Precision.fp32 and ds.autocast else "")
    where = "GPU" if plan.on_gpu else "CPU"
    recipe = f" recipe={cfg.tokenizer.recipe.value}" if cfg.stage == Stage.tokenizer else ""
    out = [f"Capacity plan: stage={cfg.stage.value} experiment={cfg.experiment}{recipe}; {plan.world} worker(s) "
           f"on {where}, ZeRO-{ds.zero_stage}, {mode}" + (", optimizer offload" if ds.offload_optimizer else "") +
           f"; micro-batch {plan.micro_batch}", ""]
    frozen = ", ".join(f"{k} {_millions(v)}" for k, v in c.frozen_networks.items())
    out.append(f"parameters: trainable {_millions(c.trainable)} ({c.trainable:,}), frozen {_millions(c.frozen)}"
               f"{' (' + frozen + ')' if frozen else ''}, EMA {_millions(c.ema) if cfg.trainer.ema_decay is not None else 'off'}")
    for e in c.engines:
        out.append(f"  engine {e.name}: {e.params:,} params ({e.trainable:,} trainable)")
    if ds.zero_stage:
        limits = c.engines[0].limits
        keys = ["reduce_bucket_size"] + (["allgather_bucket_size"] if ds.zero_stage < 3 else
                                         ["stage3_max_live_parameters", "stage3_max_reuse_distance",
                                          "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                                          "sub_group_size"])
        shown = ", ".join(f"{k} {limits[k]:,}" + ("" if ds.limit(k) is not None else " (auto)") for k in keys)
        out.append(f"  ZeRO limits of the model engine: {shown}")
    out += ["", f"per rank{'':26s}{'GiB':>8}"]
    if not plan.on_gpu:
        out.append(f"  {'runtime (Python/torch/DS/Ray)':32s}{_gib(plan.runtime):>8}  measured in a fresh process "
                   f"+ {RAY_WORKER_ALLOWANCE // MiB} MiB Ray worker allowance")
    for line in plan.lines:
        tag = " [host]" if plan.on_gpu and line.host else ""
        out.append(f"  {line.name:32s}{_gib(line.bytes):>8}  {line.note}{tag}")
    if plan.activation is not None:
        a = plan.activation
        out.append(f"  (activations: {a.bytes_per_sample / MiB:.1f} MiB per sample + {a.bytes_at(0) / MiB:.1f} MiB "
                   f"fixed, from {len(a.points)} probe passes on {a.device} in {a.seconds:.0f} s"
                   + ("; a GPU run planned on the CPU" if plan.on_gpu and a.device == "cpu" else "") + ")")
    base = 0 if plan.on_gpu else plan.runtime
    out.append("")
    out.append("phase peaks per rank (GiB" + (", device memory" if plan.on_gpu else ", RSS with the runtime") + "): " +
               ", ".join(f"{k} {_gib(v + base)}" for k, v in plan.phases.items()))
    out.append(f"peak per rank: {_gib(plan.peak)} GiB ({plan.peak_phase}); training phases {_gib(plan.train_peak)} GiB")
    if plan.memory_limit is not None:
        verdict = "fits" if plan.fits() else "does NOT fit"
        out.append(f"limit: {_gib(plan.memory_limit)} GiB ({plan.limit_source}): {verdict}")
        largest = plan.largest_micro_batch()
        if largest is not None:
            out.append(f"largest micro-batch that fits: {largest}")
    elif plan.on_gpu:
        out.append("fit: give --gpu-mem <GiB per accelerator> to check it")
    ckpt = sum(plan.checkpoint_bytes.values())
    parts = ", ".join(f"{k} {_gib(v)}" for k, v in plan.checkpoint_bytes.items())
    out.append(f"checkpoint: {_gib(ckpt)} GiB ({parts}); export: {_gib(plan.export_bytes)} GiB (fp32 state dict)")
    return "\n".join(out)


@dataclass
class PlanOptions:
    gpu_mem_gib: float | None = None
    cpu_mem_gib: float | None = None


def pop_plan_args(argv: list[str]) -> tuple[PlanOptions | None, list[str]]:
    """Take ``--plan``, ``--gpu-mem G`` and ``--cpu-mem G`` out of ``argv``; (None, argv) without ``--plan``.

    Raises ConfigError for a bad value or a memory option without ``--plan``.
    """
    from trainer.config import ConfigError

    options, rest, wants_plan, i = PlanOptions(), [], False, 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if arg == "--plan":
            wants_plan = True
        elif name in ("--gpu-mem", "--cpu-mem"):
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            try:
                gib = float(value)
                if not gib > 0:
                    raise ValueError
            except ValueError:
                raise ConfigError(name, f"{value!r} is not a memory size in GiB (a number > 0)") from None
            setattr(options, "gpu_mem_gib" if name == "--gpu-mem" else "cpu_mem_gib", gib)
        else:
            rest.append(arg)
        i += 1
    if not wants_plan:
        if options.gpu_mem_gib is not None or options.cpu_mem_gib is not None:
            raise ConfigError("--gpu-mem/--cpu-mem", "only apply with --plan")
        return None, rest
    return options, rest


def print_plan(cfg: TrainConfigBase, options: PlanOptions) -> int:
    """Entry of ``trainer/run.py --plan``: print the plan; exit 0 when it fits (or no limit applies), 1 when not."""
    plan = make_plan(cfg, gpu_mem_gib=options.gpu_mem_gib, cpu_mem_gib=options.cpu_mem_gib)
    print(render(plan), flush=True)
    return 0 if plan.fits() in (None, True) else 1


