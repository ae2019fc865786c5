"""GPU acceptance run: the published L-32 sizes on one accelerator, in at most ~8 minutes (H100/H200).

    python bench/gpu_acceptance.py [--json gpu_acceptance.json] [--budget-s 420]
    python bench/gpu_acceptance.py --cpu          # the same script at tiny sizes on the CPU (make test runs it)

Sections (all through the project's own code, random weights):

1. **L-32 stage 1** (proxy codes of a random full-size MaskGIT-VQGAN teacher), bf16 autocast, ZeRO-2,
   one rank: :class:`trainer.stages.tokenizer.TokenizerStage` at the largest micro-batch the capacity
   plan (trainer/plan.py) allows on this accelerator; images/s, MFU, peak allocated memory next to the
   plan's figure.
2. **L-32 generator** (:class:`trainer.stages.generator.GeneratorStage`), bf16, ZeRO-2: sequences/s, MFU.
3. **L-32 sampling**: :func:`trainer.sample.sample_images` at batch 125 with the authors' settings
   (configs/sample.yaml: 8 steps, guidance 4.5 linear, temperature 9.5 annealed), images/s.
4. **Inception features/s** (evals/inception.py; torch-fidelity's weights when cached, else random).
5. **JPEG decode images/s per CPU core** through the reader (trainer/data.py) over ImageNet-like JPEGs.

Training steps run on random batches already on the device (the reader is measured on its own in 5).
FLOPs are counted once per section with torch's FlopCounterMode (forward + backward of the real step,
teacher included), MFU against the dense bf16 peak of trainer/loop.py's table. Timings synchronise
the device before reading the clock; memory is ``torch.cuda.max_memory_allocated``.

Output: one table on stdout and a JSON file (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

GiB = 2**30

# Tiny sizes for --cpu: the legacy (proxy-code) geometry at 32 px with a 3-level teacher.
TINY_TOKENIZER = ["data.image_size=32", "model.image_size=32", "model.patch_size=4", "model.num_latent_tokens=8",
                  "model.codebook_size=64", "model.token_size=8", "model.vit_enc_model_size=null",
                  "model.vit_dec_model_size=null", "model.vit_enc_width=64", "model.vit_enc_num_layers=2",
                  "model.vit_enc_num_heads=2", "model.vit_dec_width=64", "model.vit_dec_num_layers=2",
                  "model.vit_dec_num_heads=2", "model.pixel_decoder.hidden_channels=32",
                  "model.pixel_decoder.channel_mult=[1,1,2]", "model.pixel_decoder.num_res_blocks=1",
                  "model.pixel_decoder.z_channels=32", "model.pixel_decoder.codebook_size=128"]
TINY_GENERATOR = ["model.hidden_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=2",
                  "model.intermediate_size=128", "model.image_seq_len=8", "model.codebook_size=64"]


class Clock:
    """Wall time of device work: synchronises before reading the clock."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def rate(fn: Callable[[], int], clock: Clock, warmup: int, seconds: float, min_calls: int = 2) -> tuple[float, int]:
    """(items/s, calls) of ``fn`` (returns items per call) after ``warmup`` calls, over >= ``seconds``."""
    for _ in range(warmup):
        fn()
    done, calls, start = 0, 0, clock.now()
    while calls < min_calls or time.perf_counter() - start < seconds:
        done += fn()
        calls += 1
    return done / (clock.now() - start), calls


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    from trainer.loop import PEAK_TFLOPS

    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def init_process_group(use_gpu: bool):
    """A one-rank process group, as Ray Train would give a single worker; returns the WorkerContext."""
    import torch.distributed as dist

    from trainer.distributed import setup_worker

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          LOCAL_WORLD_SIZE="1")
    return setup_worker(use_gpu)


def release(*objects: Any) -> None:
    import gc

    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Sections


def time_train_steps(stage, inputs: tuple, batch: int, ctx, args) -> tuple[float, int, float, float | None]:
    """Train steps of ``stage`` on the fixed ``inputs`` (a micro-batch of ``batch``): (samples/s, steps
    timed, FLOPs per sample, MFU or None where the device's peak is unknown)."""
    counter = {"step": 0}

    def step() -> int:
        stage.train_step(inputs, counter["step"])
        stage.after_optimizer_step()
        counter["step"] += 1
        return batch

    per_s, steps = rate(step, Clock(ctx.device), args.warmup, args.seconds)
    flops = count_flops(step) / batch
    device_peak = peak_flops(ctx.device)
    return per_s, steps, flops, (flops * per_s / device_peak if device_peak else None)


def tokenizer_section(args, ctx, work: Path) -> dict:
    """L-32 stage 1, bf16 autocast, ZeRO-2, at the plan's largest micro-batch."""
    from trainer import models
    from trainer.config import build_config
    from trainer.plan import make_plan
    from trainer.schema import TokenizerTrainConfig
    from trainer.stages.tokenizer import TokenizerStage

    teacher_cfg = models.PixelDecoderConfig(hidden_channels=32, channel_mult=[1, 1, 2], num_res_blocks=1,
                                            z_channels=32, codebook_size=128) if args.cpu else models.PixelDecoderConfig()
    teacher = work / "maskgit-vqgan-random.bin"
    torch.manual_seed(0)
    torch.save(models.build_maskgit_vqgan(teacher_cfg).state_dict(), teacher)
    common = ["experiment=titok_l32", "tokenizer.recipe=proxy_codes", f"tokenizer.teacher_weights={teacher}",
              "trainer.num_workers=1", "deepspeed.zero_stage=2", "deepspeed.precision=bf16", "deepspeed.autocast=true",
              f"trainer.use_gpu={str(not args.cpu).lower()}", "data.loader_workers=0", "mlflow.enabled=false",
              "trainer.max_steps=1000", "optim.warmup_steps=10", *(TINY_TOKENIZER if args.cpu else [])]
    cfg = build_config("tokenizer", TokenizerTrainConfig, common + ["trainer.batch_size_per_worker=1"])
    # The device's memory is what limits here: no host runtime line (runtime=0).
    plan = make_plan(cfg, gpu_mem_gib=args.gpu_mem, runtime=0)
    batch = max(1, min(plan.largest_micro_batch() or 1, args.max_batch))
    cfg = build_config("tokenizer", TokenizerTrainConfig, common + [f"trainer.batch_size_per_worker={batch}"])
    plan = make_plan(cfg, gpu_mem_gib=args.gpu_mem, activation=plan.activation, runtime=plan.runtime)
    reset_peak(ctx.device)
    stage = TokenizerStage(cfg, ctx)
    size = cfg.model.image_size
    images = torch.rand(batch, 3, size, size, device=ctx.device)
    labels = torch.zeros(batch, dtype=torch.long, device=ctx.device)
    images_per_s, steps, flops, mfu = time_train_steps(stage, (images, labels), batch, ctx, args)
    result = {"micro_batch": batch, "images_per_s": images_per_s, "steps_timed": steps, "flops_per_image": flops,
              "mfu": mfu, "peak_allocated": peak_memory(ctx.device),
              "plan_peak": plan.train_peak, "plan_largest_micro_batch": plan.largest_micro_batch(),
              "params_trainable": plan.counts.trainable}
    release(stage)
    return result


def generator_section(args, ctx) -> dict:
    """The L-32 generator, bf16 autocast, ZeRO-2."""
    from trainer.config import build_config
    from trainer.plan import make_plan
    from trainer.schema import GeneratorTrainConfig
    from trainer.stages.generator import GeneratorStage

    common = ["experiment=titok_l32", "trainer.num_workers=1", "deepspeed.zero_stage=2", "deepspeed.precision=bf16",
              f"trainer.use_gpu={str(not args.cpu).lower()}", "mlflow.enabled=false", "trainer.max_steps=1000",
              "optim.warmup_steps=10", *(TINY_GENERATOR if args.cpu else [])]
    cfg = build_config("generator", GeneratorTrainConfig, common + ["trainer.batch_size_per_worker=1"])
    plan = make_plan(cfg, gpu_mem_gib=args.gpu_mem, runtime=0)
    batch = max(1, min(plan.largest_micro_batch() or 1, args.max_generator_batch))
    cfg = build_config("generator", GeneratorTrainConfig, common + [f"trainer.batch_size_per_worker={batch}"])
    reset_peak(ctx.device)
    stage = GeneratorStage(cfg, ctx)
    m = cfg.model
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, m.codebook_size, (batch, m.image_seq_len), generator=generator).to(ctx.device)
    labels = torch.randint(0, m.condition_num_classes, (batch,), generator=generator).to(ctx.device)
    sequences_per_s, steps, flops, mfu = time_train_steps(stage, (tokens, labels), batch, ctx, args)
    result = {"micro_batch": batch, "sequences_per_s": sequences_per_s, "steps_timed": steps,
              "flops_per_sequence": flops, "flops_per_sequence_6nd": stage.flops_per_sample(), "mfu": mfu,
              "peak_allocated": peak_memory(ctx.device), "plan_peak": plan.train_peak,
              "params_trainable": plan.counts.trainable}
    release(stage)
    return result


def sampling_section(args, device: torch.device) -> dict:
    """L-32 sampling with the authors' settings (configs/sample.yaml) at batch 125."""
    from trainer import models
    from trainer.config import build_config
    from trainer.sample import SampleConfig, sample_images

    settings = build_config("sample", SampleConfig, ["generator=unused", "output=unused"]).sampling
    settings.batch_size = args.sample_batch
    if args.cpu:
        tok_cfg = models.TiTokConfig(image_size=32, patch_size=4, num_latent_tokens=8, codebook_size=64, token_size=8,
                                     vit_enc_model_size=None, vit_dec_model_size=None, vit_enc_width=64,
                                     vit_enc_num_layers=1, vit_enc_num_heads=2, vit_dec_width=64, vit_dec_num_layers=1,
                                     vit_dec_num_heads=2, pixel_decoder=models.PixelDecoderConfig(
                                         hidden_channels=32, channel_mult=[1, 1, 2], num_res_blocks=1, z_channels=32,
                                         codebook_size=128))
        gen_cfg = models.GeneratorConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=128, image_seq_len=8, codebook_size=64)
    else:
        tok_cfg, gen_cfg = models.published_tokenizer_config("titok_l32"), models.published_generator_config("titok_l32")
    torch.manual_seed(0)
    with torch.device(device):
        tokenizer = models.build_tokenizer(tok_cfg).eval()
        generator = models.build_generator(gen_cfg).eval()
    n = settings.batch_size
    labels = torch.arange(n, device=device) % gen_cfg.condition_num_classes
    clock = Clock(device)

    def sample() -> int:  # fp32, as trainer.sample runs (its sampling arithmetic is fp32 by design)
        sample_images(generator, tokenizer, labels, list(range(n)), settings)
        return n

    reset_peak(device)
    images_per_s, calls = rate(sample, clock, 1, args.seconds / 2, min_calls=2)
    result = {"batch": n, "images_per_s": images_per_s, "batches_timed": calls, "num_steps": settings.num_steps,
              "guidance_scale": settings.guidance_scale, "precision": "fp32",
              "peak_allocated": peak_memory(device)}
    release(tokenizer, generator)
    return result


def inception_section(args, device: torch.device) -> dict:
    """Inception-v3 pool features per second on uint8 256 px images (the resize to 299 is inside)."""
    from evals.inception import InceptionFeatures, InceptionWeights, load_inception_weights, random_inception_state_dict

    from evals.inception import DEFAULT_WEIGHTS_URL

    cached = Path(torch.hub.get_dir()) / "checkpoints" / DEFAULT_WEIGHTS_URL.rsplit("/", 1)[-1]
    if cached.exists() and not args.cpu:  # never downloads: the machine may be offline
        weights, source = load_inception_weights(str(cached)), "torch-fidelity weights (cached)"
    else:
        weights, source = InceptionWeights(random_inception_state_dict(0), "random", ""), "random weights"
    net = InceptionFeatures(weights, device)
    batch = args.inception_batch
    size = 64 if args.cpu else 256
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)

    def features() -> int:
        net(images)
        return batch

    images_per_s, calls = rate(features, Clock(device), 1, args.seconds / 2)
    result = {"batch": batch, "image_size": size, "images_per_s": images_per_s, "batches_timed": calls,
              "weights": source}
    release(net)
    return result


def jpeg_section(args, work: Path) -> dict:
    """Reader images/s (decode, resize, crop, flip) per loader worker = per CPU core."""
    from bench.reader_throughput import build_shards, reader_rate
    from bench.shard_throughput import make_jpeg_tree

    workers = 1 if args.cpu else max(1, min(8, (os.cpu_count() or 2) - 1))
    images = 40 if args.cpu else 600
    make_jpeg_tree(work / "jpegs", images, seed=1)
    build_shards(work / "jpegs", work / "shards", None, 100 if not args.cpu else 20)
    per_s = reader_rate(work / "shards", 256, 16, workers, args.seconds / 2)
    return {"loader_workers": workers, "images_per_s": per_s, "images_per_s_per_core": per_s / workers,
            "image_size": 256, "source_jpegs": images}


# ----------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(results: dict) -> str:
    rows = []
    t = results.get("tokenizer_stage1")
    if t:
        mem = t["peak_allocated"]
        rows.append(("L-32 stage 1 (bf16, ZeRO-2)", f"{t['images_per_s']:.1f} images/s", f"batch {t['micro_batch']}",
                     f"MFU {_fmt(t['mfu'] and 100 * t['mfu'])}%",
                     f"peak {_fmt(mem and mem / GiB, 2)} GiB (plan {t['plan_peak'] / GiB:.2f})"))
    g = results.get("generator")
    if g:
        rows.append(("L-32 generator (bf16, ZeRO-2)", f"{g['sequences_per_s']:.1f} sequences/s",
                     f"batch {g['micro_batch']}", f"MFU {_fmt(g['mfu'] and 100 * g['mfu'])}%",
                     f"peak {_fmt(g['peak_allocated'] and g['peak_allocated'] / GiB, 2)} GiB "
                     f"(plan {g['plan_peak'] / GiB:.2f})"))
    s = results.get("sampling")
    if s:
        rows.append(("L-32 sampling", f"{s['images_per_s']:.1f} images/s", f"batch {s['batch']}",
                     f"{s['num_steps']} steps, guidance {s['guidance_scale']}", s["precision"]))
    i = results.get("inception")
    if i:
        rows.append(("Inception features", f"{i['images_per_s']:.1f} images/s", f"batch {i['batch']}",
                     f"{i['image_size']} px", i["weights"]))
    j = results.get("jpeg_decode")
    if j:
        rows.append(("JPEG decode (reader)", f"{j['images_per_s_per_core']:.1f} images/s/core",
                     f"{j['loader_workers']} workers", f"{j['images_per_s']:.1f} images/s", "256 px"))
    widths = [max(len(r[c]) for r in rows) for c in range(5)] if rows else []
    lines = [f"{results['device']} | {results['date']} | {results['seconds']:.0f} s"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (what make test runs)")
    parser.add_argument("--json", default="gpu_acceptance.json", help="where the JSON results go")
    parser.add_argument("--seconds", type=float, default=None, help="timing window per training section")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per training section")
    parser.add_argument("--gpu-mem", type=float, default=None, help="GiB to plan for (default: the device's)")
    parser.add_argument("--max-batch", type=int, default=1024, help="cap on the planned stage-1 micro-batch")
    parser.add_argument("--max-generator-batch", type=int, default=1024)
    parser.add_argument("--sample-batch", type=int, default=125)
    parser.add_argument("--inception-batch", type=int, default=None)
    parser.add_argument("--sections", default="tokenizer,generator,sampling,inception,jpeg")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for the tiny CPU version", file=sys.stderr)
        return 2
    args.seconds = args.seconds or (2.0 if args.cpu else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.cpu else 3)
    args.inception_batch = args.inception_batch or (2 if args.cpu else 250)
    if args.cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        args.sample_batch = min(args.sample_batch, 8)
        args.max_batch = min(args.max_batch, 8)
        args.max_generator_batch = min(args.max_generator_batch, 16)
    else:
        args.gpu_mem = args.gpu_mem or torch.cuda.get_device_properties(0).total_memory / GiB
    started = time.perf_counter()
    sections = args.sections.split(",")
    ctx = init_process_group(not args.cpu)
    device = ctx.device
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "tiny": args.cpu,
        "gpu_mem_gib": args.gpu_mem}
    with tempfile.TemporaryDirectory(prefix="titok-acceptance-") as tmp:
        work = Path(tmp)
        for name, run in (("tokenizer", lambda: tokenizer_section(args, ctx, work)),
                          ("generator", lambda: generator_section(args, ctx)),
                          ("sampling", lambda: sampling_section(args, device)),
                          ("inception", lambda: inception_section(args, device)),
                          ("jpeg", lambda: jpeg_section(args, work))):
            if name not in sections:
                continue
            section_start = time.perf_counter()
            key = {"tokenizer": "tokenizer_stage1", "jpeg": "jpeg_decode"}.get(name, name)
            results[key] = run()
            results[key]["seconds"] = time.perf_counter() - section_start
            print(f"[{name}] done in {results[key]['seconds']:.0f} s", flush=True)
    results["seconds"] = time.perf_counter() - started
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
