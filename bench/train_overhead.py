"""Cost of the training framework: steady-state images/s of the full Ray Train + DeepSpeed path against a
plain single-process PyTorch loop on the same model and data, in the same run; and the memory each rank
holds under ZeRO 0/1/2/3.

    python bench/train_overhead.py [--rounds 2] [--steps 60] [--warmup 10] [--parts overhead,zero,preemption,loader]

Overhead (1 worker, ZeRO-0, fp32, CPU). Each round runs both paths on the same TiTok (single-stage
recipe, L2 + quantizer loss), the same seed and the same demo shards; the order alternates between
rounds (plain, Ray; Ray, plain; ...) so drifting machine load hits both alike.

* ``ray``: ``trainer.launch.launch(cfg)`` for real (TorchTrainer, ``train_worker``, ``TokenizerStage``,
  DeepSpeed engine, MLflow logging to a temporary SQLite store, checkpoint + export at the end). Step
  times are the loop's own ``perf/step_time_s`` (mean over each ``--log-every`` window; a window pays
  for the previous window's logging), read back from MLflow.
* ``plain``: ``build_tokenizer`` + ``build_pixel_loss`` + ``torch.optim.AdamW`` (same groups, LR
  schedule and grad clipping), batches from ``trainer.data.step_batches``, torch threads set to what a
  Ray worker gets (``trainer.cpus_per_worker``; the worker's own count is recorded and printed).

The EMA is off in both (a model feature, not framework cost). Windows ending at or before ``--warmup``
steps are dropped; the median window gives each path's step time (the best window is printed too).
Target: Ray + DeepSpeed step time <= 1.10 x plain. The loss of the last window is printed for both
paths: same weights, batches and optimizer, so it must agree.

Machines are shared: during the timed windows of each run the bench also reports the cores used by
the driver, the Ray train worker, its other processes (loader workers, Ray's daemons and actors) and
by everything else on the machine, and warns when other users took more than a quarter of a core.
Ray starts its workers at niceness 15 (``RAY_worker_niceness``), so under foreign load the Ray path
loses far more than the plain loop: compare figures from quiet runs only.

Loader (``--parts loader``): the plain loop fed by the reader, by the reader with a decoded cache
(``data.decoded_cache_mb``, ``--cache-mb``), and by batches already in memory (the floor: no reading
or decoding), taking turns in blocks of ``--log-every`` steps. At the demo's size:

    python bench/train_overhead.py --parts loader --steps 600 --warmup 100 --log-every 25 \
        --image-size 32 --patch 8 --width 96 --layers 2 --batch 32

Preemption checks: the Ray path with ``trainer.preemption_check_every=1`` (the default: a barrier of all
workers through Ray each step) against no checks, alternating; prints the cost per step.

ZeRO memory (2 Ray workers, gloo, fp32): for each stage, a fresh worker group builds the engine with
``trainer.distributed.build_engine``, takes a few steps, and reports what the rank holds: parameters
(ZeRO-3: its ``ds_tensor`` partition), the fp32 master copy the ZeRO optimizers keep, Adam state, and
the process's peak RSS. Parameter + optimizer bytes must fall as the stage rises.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

MB = 2**20


# --- setup ---------------------------------------------------------------------------------------


def make_shards(root: Path, images: int, val_per_class: int = 0, min_size: int = 64, max_size: int = 128) -> str:
    """Demo JPEGs (as data_prep.make_demo_data draws them) sharded by the shard.py task code: ``images``
    training images over the 6 classes, and ``val_per_class`` validation images a class."""
    from data_prep import manifest
    from data_prep.make_demo_data import make_demo_tree
    from data_prep.shard_plan import fingerprint, plan_shards
    from data_prep.shard_writer import ShardOptions, ensure_shard
    from data_prep.sources import list_split

    classes = 6
    tree = make_demo_tree(root / "tree", classes=classes, train_per_class=max(1, images // classes),
                          val_per_class=val_per_class, min_size=min_size, max_size=max_size, quirks=False)
    for split in ("train", "val") if val_per_class else ("train",):
        listing = list_split(str(tree.root), split)
        specs = plan_shards(listing.items, split, 0, 40)
        options = ShardOptions(output=str(root / "shards"), split=split, fingerprint=fingerprint(listing.items, {}))
        for spec in specs:
            ensure_shard(spec, options)
        manifest.write_manifests(str(root / "shards"), split, len(specs), [])
    return str(root / "shards")


def tokenizer_config(args: argparse.Namespace, shards: str, *extra: str):
    from trainer.config import build_config
    from trainer.schema import TokenizerTrainConfig

    width, layers, heads = args.width, args.layers, max(1, args.width // 64)
    return build_config("tokenizer", TokenizerTrainConfig, [
        "experiment=demo", f"data.train_shards={shards}", f"data.image_size={args.image_size}",
        f"model.image_size={args.image_size}", f"model.patch_size={args.patch}",
        *(f"model.vit_{side}_{key}={value}" for side in ("enc", "dec")
          for key, value in (("width", width), ("num_layers", layers), ("num_heads", heads))),
        f"trainer.batch_size_per_worker={args.batch}", f"trainer.max_steps={args.steps}",
        f"trainer.log_every={args.log_every}", f"trainer.checkpoint_every={args.steps}", "trainer.image_log_every=0",
        # The EMA is a model feature, not framework cost: off in both paths.
        "trainer.ema_decay=null", "trainer.num_workers=1", f"trainer.cpus_per_worker={args.cpus}",
        "deepspeed.zero_stage=0", "deepspeed.precision=fp32", *extra])


def windows(step_times: list[float], every: int) -> dict[int, float]:
    """Mean step time of each log window, keyed by its last step (as the loop logs perf/step_time_s)."""
    return {end: statistics.fmean(step_times[end - every:end])
            for end in range(every, len(step_times) + 1, every)}


class CpuMeter:
    """Where the machine's CPU went while a run was in its steady state.

    A thread samples every 0.5 s the CPU seconds of this bench's process tree (driver, loader workers,
    every Ray process it started) and of the whole machine; :meth:`usage` reports average cores per
    kind of process between two wall-clock times (the first and last timed window of a run).
    """

    def __init__(self) -> None:
        import threading

        import psutil

        self.psutil, self.me = psutil, psutil.Process()
        self.samples: list[tuple[float, float, dict[int, tuple[str, float]]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        tree = {}
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                # The name is read every time: Ray renames a pre-started idle worker that becomes an actor.
                tree[proc.pid] = (" ".join(proc.cmdline()[:1]) or proc.name(), times.user + times.system)
            except self.psutil.Error:
                pass
        times = self.psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        self.samples.append((time.time(), busy, tree))

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            self._sample()

    def __enter__(self) -> "CpuMeter":
        self._sample()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._sample()

    def usage(self, start: float, end: float) -> dict[str, float]:
        """Average cores between two time.time() stamps: driver, Ray train worker, the rest of this
        bench's processes (loader workers, Ray daemons and actors), other users of the machine."""
        first = max((s for s in self.samples if s[0] <= start), key=lambda s: s[0], default=self.samples[0])
        last = min((s for s in self.samples if s[0] >= end), key=lambda s: s[0], default=self.samples[-1])
        wall = max(last[0] - first[0], 1e-9)
        used = {pid: (name, cpu - first[2].get(pid, (name, 0.0))[1]) for pid, (name, cpu) in last[2].items()}
        own = sum(cpu for _, cpu in used.values())
        driver = used.get(self.me.pid, ("", 0.0))[1]
        worker = sum(cpu for name, cpu in used.values() if "RayTrainWorker" in name)
        rest = sorted(((cpu, name) for pid, (name, cpu) in used.items()
                       if pid != self.me.pid and "RayTrainWorker" not in name), reverse=True)
        return {"driver": driver / wall, "train worker": worker / wall,
                "others of ours": (own - driver - worker) / wall, "other users": max(0.0, last[1] - first[1] - own) / wall,
                "top": ", ".join(f"{name} {cpu / wall:.2f}" for cpu, name in rest[:3] if cpu / wall >= 0.01)}


def describe_usage(u: dict[str, float]) -> str:
    text = f"cores busy: driver {u['driver']:.2f}"
    if u["train worker"]:
        text += f", Ray train worker {u['train worker']:.2f}"
    text += f", our other processes {u['others of ours']:.2f}"
    return text + (f" ({u['top']})" if u["top"] else "") + f", other users {u['other users']:.2f}"


# --- the two paths -------------------------------------------------------------------------------


class PlainLoop:
    """The tokenizer's training step without Ray or DeepSpeed: ``build_tokenizer`` + ``build_pixel_loss``
    + ``torch.optim.AdamW`` (the trainer's parameter groups, LR schedule and grad clipping), batches from
    ``trainer.data.step_batches`` in the layout the driver gives a new run on one worker, torch threads
    set to ``trainer.cpus_per_worker``. Also used by ``bench/tokenizer_curve.py``."""

    def __init__(self, cfg) -> None:
        from trainer.batch_layout import StepLayout, default_streams
        from trainer.data import step_batches
        from trainer.distributed import lr_scheduler_factory, param_groups
        from trainer.losses import build_pixel_loss
        from trainer.loop import seed_everything
        from trainer.models import build_tokenizer

        self.cfg = cfg
        torch.set_num_threads(int(cfg.trainer.cpus_per_worker))
        seed_everything(cfg.seed, 0)  # what train_worker does before building the stage: the same weights
        self.model = build_tokenizer(cfg.model).train()
        self.loss_fn = build_pixel_loss(cfg.tokenizer.losses)
        optim = cfg.optim
        self.optimizer = torch.optim.AdamW(param_groups(self.model, optim.weight_decay), lr=optim.lr,
                                           betas=tuple(optim.betas), eps=optim.eps)
        self.scheduler = lr_scheduler_factory(optim, cfg.trainer.max_steps)(self.optimizer)
        data = cfg.data
        micro = cfg.trainer.batch_size_per_worker
        global_batch = cfg.trainer.global_batch_size or micro
        layout = StepLayout(global_batch, data.streams or default_streams(global_batch, max(1, data.loader_workers)),
                            1, micro)
        if layout.accumulation != 1:
            raise SystemExit(f"the plain loop takes one micro-batch a step; global batch {global_batch} > {micro}")
        self.batches = step_batches(data.train_shards, layout, 0, image_size=data.image_size,
                                    num_workers=data.loader_workers, seed=cfg.seed, shuffle_buffer=data.shuffle_buffer,
                                    decoded_cache_mb=data.decoded_cache_mb)

    def step(self, step: int) -> torch.Tensor:
        """One optimizer step on the next batch; its loss (detached)."""
        images = next(self.batches).images
        reconstructions, aux = self.model(images)
        loss, _ = self.loss_fn.generator_loss(images, reconstructions, aux, step, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def close(self) -> None:
        self.batches.close()  # stop the loader workers before anything else runs


def plain_run(cfg, steps: int) -> tuple[dict[int, float], dict[int, float], dict[int, float]]:
    """A plain loop: per-window mean step time and mean loss, and the wall-clock time of each step's end."""
    loop = PlainLoop(cfg)
    times, losses, stamps = [], [], []
    started = time.perf_counter()
    for step in range(steps):
        losses.append(loop.step(step))
        now = time.perf_counter()
        times.append(now - started)
        stamps.append(time.time())
        started = now
    loop.close()
    every = cfg.trainer.log_every
    return windows(times, every), windows([float(v) for v in losses], every), dict(enumerate(stamps, start=1))


def instrumented_train_worker(loop_config: dict[str, Any]) -> None:
    """trainer.loop.train_worker, plus a note of the threads this Ray worker runs with."""
    import os

    import torch

    from trainer import loop

    seen = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch_threads_at_start": torch.get_num_threads(),
            "cpu_affinity": len(os.sched_getaffinity(0)), "nice": os.nice(0)}
    loop.train_worker(loop_config)  # in the worker process this is the real, unpatched function
    seen.update(torch_threads_after_run=torch.get_num_threads(), interop_threads=torch.get_num_interop_threads())
    Path(loop_config["cfg"].output_dir, "worker_threads.json").write_text(json.dumps(seen))


def ray_run(cfg) -> tuple[dict[int, float], dict[int, float], dict[int, float], dict]:
    """launch(cfg) for real: per-window step time and loss as the loop logged them, when each was logged,
    and the worker's threads."""
    from mlflow.tracking import MlflowClient

    from trainer import launch, loop

    original = loop.train_worker
    loop.train_worker = instrumented_train_worker  # launch() imports it when called
    try:
        launch.launch(cfg)
    finally:
        loop.train_worker = original
    run = json.loads(Path(cfg.output_dir, "mlflow_run.json").read_text())
    client = MlflowClient(run["tracking_uri"])

    step_time = client.get_metric_history(run["run_id"], "perf/step_time_s")
    loss = client.get_metric_history(run["run_id"], "train/loss")
    threads = json.loads(Path(cfg.output_dir, "worker_threads.json").read_text())
    return ({m.step: m.value for m in step_time}, {m.step: m.value for m in loss},
            {m.step: m.timestamp / 1000 for m in step_time}, threads)


def overhead(args: argparse.Namespace, work: Path) -> None:
    from cluster.ray_session import connect_ray

    shards = make_shards(work / "data", args.images)
    tracking_uri = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    (work / "mlflow").mkdir(parents=True, exist_ok=True)
    connect_ray()  # Ray's daemons run during both paths alike
    step_times: dict[str, list[float]] = {"plain": [], "ray": []}
    per_round: dict[str, list[float]] = {"plain": [], "ray": []}
    last_loss: dict[str, float] = {}
    threads: dict = {}
    foreign = 0.0
    for r in range(args.rounds):
        order = ("plain", "ray") if r % 2 == 0 else ("ray", "plain")
        for path in order:
            cfg = tokenizer_config(args, shards, f"output_dir={work / f'run-{r}'}",
                                   f"mlflow.tracking_uri={tracking_uri}", "mlflow.experiment=bench-train-overhead")
            with CpuMeter() as cpu:
                if path == "plain":
                    times, losses, stamps = plain_run(cfg, args.steps)
                else:
                    times, losses, stamps, threads = ray_run(cfg)
            usage = cpu.usage(stamps[args.warmup], stamps[args.steps])  # the timed windows only
            foreign = max(foreign, usage["other users"])
            kept = [t for end, t in sorted(times.items()) if end > args.warmup]
            step_times[path] += kept
            per_round[path].append(statistics.median(kept))
            last_loss[path] = losses[max(losses)]
            print(f"round {r + 1}/{args.rounds} {path:>5}: median step {per_round[path][-1]:.3f} s over "
                  f"{len(kept)} windows of {args.log_every} steps; {describe_usage(usage)}", flush=True)

    from trainer.models import build_tokenizer

    params = sum(p.numel() for p in build_tokenizer(cfg.model).parameters())
    plain_s, ray_s = statistics.median(step_times["plain"]), statistics.median(step_times["ray"])
    print(f"\nTiTok {params / 1e6:.2f}M params, {args.image_size}px / patch {args.patch}, width {args.width} x "
          f"{args.layers} layers, batch {args.batch}, fp32, CPU; {args.steps} steps/run, first {args.warmup} "
          f"dropped, {args.rounds} round(s)")
    print(f"torch threads: plain loop {torch.get_num_threads()}; Ray worker {threads.get('torch_threads_at_start')} "
          f"at start, {threads.get('torch_threads_after_run')} after the run (OMP_NUM_THREADS="
          f"{threads.get('OMP_NUM_THREADS')}, interop {threads.get('interop_threads')}, "
          f"{threads.get('cpu_affinity')} CPUs in affinity); niceness: plain loop {os.nice(0)}, Ray worker "
          f"{threads.get('nice')}")
    plain_min, ray_min = min(step_times["plain"]), min(step_times["ray"])
    print(f"{'path':<18}{'step s (median)':>16}{'img/s':>9}{'ratio':>7}{'best window s':>15}{'per-round median s':>24}")
    for name, path, value in (("plain PyTorch", "plain", plain_s), ("Ray + DeepSpeed", "ray", ray_s)):
        rounds = " ".join(f"{t:.3f}" for t in per_round[path])
        print(f"{name:<18}{value:16.3f}{args.batch / value:9.1f}{plain_s / value:7.3f}{min(step_times[path]):15.3f}"
              f"{rounds:>24}")
    extra = ray_s / plain_s - 1
    print(f"overhead: {100 * extra:+.1f}% step time (median windows; best windows: "
          f"{100 * (ray_min / plain_min - 1):+.1f}%; target <= 10%: {'PASS' if extra <= 0.10 else 'FAIL'}); "
          f"plain step >= 0.2 s: {'yes' if plain_s >= 0.2 else 'NO (raise --width/--layers/--batch)'}")
    if foreign > 0.25:
        print(f"WARNING: other processes kept up to {foreign:.2f} of {os.cpu_count()} cores busy during a run: "
              f"the figures above are not reliable, re-run on a quiet machine")
    print(f"loss, last window: plain {last_loss['plain']:.5f}, Ray + DeepSpeed {last_loss['ray']:.5f} "
          f"(same weights, data and optimizer: should agree closely)")


def preemption_checks(args: argparse.Namespace, work: Path) -> None:
    """Step time of the Ray path with a preemption check every step (the default) against none."""
    from cluster.ray_session import connect_ray

    shards = make_shards(work / "data-preempt", args.images)
    tracking_uri = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    (work / "mlflow").mkdir(parents=True, exist_ok=True)
    connect_ray()
    kept: dict[str, list[float]] = {"every step": [], "never": []}
    for r in range(args.rounds):
        order = ("every step", "never") if r % 2 == 0 else ("never", "every step")
        for name in order:
            every = 1 if name == "every step" else 10**9
            cfg = tokenizer_config(args, shards, f"output_dir={work / f'preempt-{r}-{every}'}",
                                   f"mlflow.tracking_uri={tracking_uri}", "mlflow.experiment=bench-preemption",
                                   f"trainer.preemption_check_every={every}")
            times, _, _, _ = ray_run(cfg)
            windows_kept = [t for end, t in sorted(times.items()) if end > args.warmup]
            kept[name] += windows_kept
            print(f"round {r + 1}/{args.rounds} preemption check {name:>10}: median step "
                  f"{statistics.median(windows_kept):.3f} s", flush=True)
    every_s, never_s = statistics.median(kept["every step"]), statistics.median(kept["never"])
    print(f"\npreemption check every step: {every_s:.3f} s/step vs {never_s:.3f} without: "
          f"{100 * (every_s / never_s - 1):+.1f}% ({1000 * (every_s - never_s):+.1f} ms per step)")


def loader_cost(args: argparse.Namespace, work: Path) -> None:
    """What feeding the model costs a training step, in the plain loop: batches from the reader as
    configured, from the reader with a decoded cache (``data.decoded_cache_mb``), and the same kind of
    batches already in memory (no reading, decoding or hand-over at all: the floor). The three loops
    take turns, ``--log-every`` steps each, so a drifting machine slows them alike."""
    shards = make_shards(work / "data-loader", args.images)
    variants = {"reader": 0.0, "reader + decoded cache": args.cache_mb, "batches in memory": 0.0}
    loops = {name: PlainLoop(tokenizer_config(args, shards, f"data.decoded_cache_mb={mb}"))
             for name, mb in variants.items()}
    floor = loops["batches in memory"]
    held = [next(floor.batches) for _ in range(20)]
    floor.close()
    floor.batches = itertools.cycle(held)  # type: ignore[assignment]
    kept: dict[str, list[float]] = {name: [] for name in loops}
    last_loss: dict[str, float] = {}
    for block in range(args.steps // args.log_every):
        for name, loop in loops.items():
            started = time.perf_counter()
            for i in range(args.log_every):
                loss = loop.step(block * args.log_every + i)
            if (block + 1) * args.log_every > args.warmup:
                kept[name].append((time.perf_counter() - started) / args.log_every)
            last_loss[name] = float(loss)
    for name, loop in loops.items():
        if loop is not floor:
            loop.close()
    base = statistics.median(kept["reader"])
    print(f"\nwhat a step's data costs: plain loop, {args.image_size}px / patch {args.patch}, width {args.width} x "
          f"{args.layers} layers, batch {args.batch}, {args.cpus} threads, {args.images} images, "
          f"{loops['reader'].cfg.data.loader_workers} loader worker(s); "
          f"{len(kept['reader'])} blocks of {args.log_every} steps each, taking turns")
    print(f"{'batches from':<24}{'step s (median)':>16}{'x reader':>10}")
    for name, times in kept.items():
        print(f"{name:<24}{statistics.median(times):>16.4f}{statistics.median(times) / base:>10.3f}")
    same = last_loss["reader"] == last_loss["reader + decoded cache"]
    print(f"loss after {args.steps} steps: reader {last_loss['reader']:.6f}, with the decoded cache "
          f"{last_loss['reader + decoded cache']:.6f} (the same batches: must be equal): {'PASS' if same else 'FAIL'}")


# --- ZeRO memory ---------------------------------------------------------------------------------


def held_bytes(engine) -> dict[str, int]:
    """Bytes this rank holds: parameters (ZeRO-3: its partition), the optimizer's own fp32 copies of
    them, and its state. Counted per storage, so views into DeepSpeed's flat buffers count once."""
    seen: set[int] = set()

    def total(tensors) -> int:
        size = 0
        for t in tensors:
            storage = t.untyped_storage()
            if t.numel() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                size += storage.nbytes()
        return size

    # ZeRO-3: the rank's partition, plus the full values of parameters it keeps gathered (those under
    # stage3_param_persistence_threshold); partitioned ones are empty between forward passes.
    params = total(t for p in engine.module.parameters() for t in (getattr(p, "ds_tensor", p), p))
    optimizer = engine.optimizer
    while hasattr(optimizer, "optimizer"):  # ZeRO wrappers hold the torch optimizer that steps
        optimizer = optimizer.optimizer
    master = total(p for group in optimizer.param_groups for p in group["params"])
    state = total(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return {"params": params, "master": master, "state": state}


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage Python can reach (what the process holds beyond the allocator's
    free lists and C++-only buffers)."""
    import gc

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if torch.is_tensor(obj) and obj.device.type == "cpu" and obj.numel():
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def zero_worker(config: dict[str, Any]) -> None:
    """One rank: build the engine at the configured ZeRO stage, step, write what it holds."""
    import resource

    import torch

    from trainer.distributed import build_engine, setup_worker
    from trainer.losses import build_pixel_loss
    from trainer.models import build_tokenizer

    cfg = config["cfg"]
    ctx = setup_worker(False)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.manual_seed(0)
    engine = build_engine(build_tokenizer(cfg.model), cfg)
    loss_fn = build_pixel_loss(cfg.tokenizer.losses)
    generator = torch.Generator().manual_seed(ctx.rank)
    size = cfg.model.image_size
    for step in range(config["steps"]):
        images = torch.rand(cfg.trainer.batch_size_per_worker, 3, size, size, generator=generator)
        reconstructions, aux = engine(images)
        loss, _ = loss_fn.generator_loss(images, reconstructions, aux, step, None)
        engine.backward(loss)
        engine.step()
    row = held_bytes(engine)
    row["live"] = live_tensor_bytes()
    row.update(rank=ctx.rank, pid=os.getpid(), rss_before=rss_before,
               peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               rss_end=int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    Path(config["out"], f"stage{cfg.deepspeed.zero_stage}-rank{ctx.rank}.json").write_text(json.dumps(row))


def zero_memory(args: argparse.Namespace, work: Path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.ray_session import connect_ray, train_controller_released
    from trainer.models import build_tokenizer

    connect_ray()
    out = work / "zero"
    out.mkdir(parents=True, exist_ok=True)
    small = argparse.Namespace(**{**vars(args), "image_size": 32, "patch": 4, "width": args.zero_width,
                                  "layers": args.zero_layers, "batch": 4, "steps": args.zero_steps, "cpus": 1})
    stages = [int(s) for s in args.zero_stages.split(",")]
    for stage in stages:
        cfg = tokenizer_config(small, "unused", "trainer.num_workers=2", f"deepspeed.zero_stage={stage}",
                               "mlflow.enabled=false", *args.zero_set)
        with train_controller_released():  # else the run's controller lives until Ray's end
            TorchTrainer(zero_worker, train_loop_config={"cfg": cfg, "steps": args.zero_steps, "out": str(out)},
                         scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                         torch_config=TorchConfig(backend="gloo"),
                         run_config=RunConfig(name=f"zero{stage}", storage_path=str(work / "ray-zero"))).fit()

    params = sum(p.numel() for p in build_tokenizer(cfg.model).parameters())
    print(f"\nZeRO memory per rank: 2 workers, gloo, fp32, TiTok {params / 1e6:.2f}M params "
          f"({4 * params / MB:.0f} MiB fp32), {args.zero_steps} steps; MiB. RSS init: peak RSS once the process "
          f"group is up, before the model is built")
    print(f"{'stage':>5}{'rank':>5}{'params':>9}{'fp32 master':>13}{'Adam state':>12}{'params+opt':>12}"
          f"{'all tensors':>13}{'RSS: init':>11}{'peak':>7}{'end':>7}{'peak-init':>11}")
    held: dict[int, int] = {}
    for stage in stages:
        for rank in (0, 1):
            row = json.loads((out / f"stage{stage}-rank{rank}.json").read_text())
            both = row["params"] + row["master"] + row["state"]
            held[stage] = max(held.get(stage, 0), both)
            print(f"{stage:5d}{rank:5d}{row['params'] / MB:9.1f}{row['master'] / MB:13.1f}{row['state'] / MB:12.1f}"
                  f"{both / MB:12.1f}{row['live'] / MB:13.1f}{row['rss_before'] / MB:11.0f}{row['peak_rss'] / MB:7.0f}"
                  f"{row['rss_end'] / MB:7.0f}{(row['peak_rss'] - row['rss_before']) / MB:11.0f}")
    if all(s in held for s in (0, 1, 2, 3)):
        falls = held[0] >= held[1] >= held[2] >= held[3] and held[1] < held[0] and held[3] < held[2]
        print(f"params+optimizer bytes/rank fall with the stage (0 >= 1 >= 2 >= 3, 1 < 0, 3 < 2): "
              f"{'PASS' if falls else 'FAIL'} ({' > '.join(f'{held[s] / MB:.1f}' for s in (0, 1, 2, 3))} MiB)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="overhead,zero,preemption",
                        help="comma list of: overhead, zero, preemption, loader")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (plain, Ray) runs, order alternating")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="steps dropped at the start of each run (a "
                        "multiple of --log-every)")
    parser.add_argument("--log-every", type=int, default=5, help="the loop's log interval = timing window")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--width", type=int, default=256, help="encoder and decoder ViT width (heads: width / 64)")
    parser.add_argument("--layers", type=int, default=4, help="encoder and decoder ViT layers")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=2, help="trainer.cpus_per_worker = plain loop torch threads")
    parser.add_argument("--images", type=int, default=240, help="demo images to shard")
    parser.add_argument("--cache-mb", type=float, default=64.0, help="data.decoded_cache_mb of the loader part")
    parser.add_argument("--zero-stages", default="0,1,2,3")
    parser.add_argument("--zero-width", type=int, default=512)
    parser.add_argument("--zero-layers", type=int, default=4)
    parser.add_argument("--zero-steps", type=int, default=3)
    parser.add_argument("--zero-set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the ZeRO runs, e.g. deepspeed.reduce_bucket_size=5000000")
    parser.add_argument("--work-dir", default=None, help="kept if given; default: a temporary dir, removed")
    args = parser.parse_args()
    if args.warmup < args.log_every or args.warmup % args.log_every or args.steps % args.log_every or \
            args.steps <= args.warmup:
        parser.error("--warmup and --steps must be multiples of --log-every, with 0 < --warmup < --steps")

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="titok-bench-overhead-")).resolve()
    os.environ["TITOK_HOME"] = str(work / "titok-home")  # no local services a developer left running
    started = time.perf_counter()
    try:
        parts = args.parts.split(",")
        if "overhead" in parts:
            overhead(args, work)
        if "zero" in parts:
            zero_memory(args, work)
        if "preemption" in parts:
            preemption_checks(args, work)
        if "loader" in parts:
            loader_cost(args, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nbench wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
