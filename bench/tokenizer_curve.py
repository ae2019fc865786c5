"""How far the demo tokenizer gets in the time it has: validation PSNR along a plain training loop,
for the demo's settings and for variants of them, in one process.

    python bench/tokenizer_curve.py [--steps 3200] [--every 800] [--variant NAME:KEY=VALUE,KEY=VALUE ...]

Each run trains ``experiment=demo``'s tokenizer (plus the variant's overrides, e.g.
``--variant p4:model.patch_size=4`` or ``--variant lr1e3:optim.lr=1e-3``) on the demo's classes (40
training and 8 validation images a class, as ``make demo`` draws them) in a plain PyTorch loop: the
model, loss, optimizer groups, LR schedule, grad clipping and EMA of the trainer, the batches of
``trainer.data.step_batches``, no Ray or DeepSpeed (``bench/train_overhead.py``'s ``PlainLoop``, whose
bench measures what those add). Every ``--every`` steps the EMA weights reconstruct the validation images, read as
``evals/run.py eval.kind=reconstruction`` reads them (shorter side to 32, center crop), and the bench
prints PSNR (mean over images, as ``evals.quality.psnr``), SSIM and the share of the codebook used.

At the end the bench prints each run's final PSNR by class (which classes hold the mean down), then a
table of each run's final PSNR and seconds a step, and the step time as a ratio to the first run's
(the demo's settings unless ``--no-baseline``): compare ratios, the machine is noisy.
Runs differ by up to ~0.3 dB between seeds and thread counts at the same settings.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.train_overhead import PlainLoop, make_shards  # noqa: E402


def load_val_images(shards: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation images as the reconstruction eval reads them: float [N, 3, S, S] in [0, 1], and
    their ImageNet labels [N]."""
    from evals.sources import SliceReport, shard_input

    images, labels = [], []
    for piece in shard_input(f"{shards}/val-*.tar", chunk_size=10**6, image_size=image_size).slices:
        for batch in piece.batches(64, SliceReport()):
            images.append(batch.images)
            labels.append(batch.labels)
    return torch.cat(images).float() / 255.0, torch.cat(labels)


@torch.no_grad()
def evaluate(model: torch.nn.Module, ema, images: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """PSNR of each image, mean SSIM and codebook share of the EMA weights on ``images``; the live
    weights are restored."""
    from evals.quality import psnr, ssim

    live = {name: p.detach().clone() for name, p in model.named_parameters()}
    params = dict(model.named_parameters())
    for name, value in ema.shadow.items():
        params[name].copy_(value)
    model.eval()
    reconstructions, aux = model(images)
    model.train()
    for name, value in live.items():
        params[name].copy_(value)
    reconstructions = (reconstructions.clamp(0, 1) * 255).round() / 255  # what the eval scores: uint8
    token_ids = aux.get("token_ids")
    usage = token_ids.unique().numel() / model.config.codebook_size if token_ids is not None else float("nan")
    return psnr(reconstructions, images), float(ssim(reconstructions, images).mean()), usage


def train_curve(name: str, overrides: list[str], shards: str, steps: int, every: int, threads: int) -> dict:
    from trainer.config import build_config
    from trainer.ema import ParamEMA
    from trainer.schema import TokenizerTrainConfig

    cfg = build_config("tokenizer", TokenizerTrainConfig, [
        "experiment=demo", f"data.train_shards={shards}/train-*.tar", f"trainer.max_steps={steps}",
        f"trainer.cpus_per_worker={threads}", *overrides])
    val_images, val_labels = load_val_images(shards, cfg.data.image_size)
    loop = PlainLoop(cfg)
    ema = ParamEMA(loop.model, cfg.trainer.ema_decay or 0.0)
    trained = 0.0
    points = []
    try:
        for step in range(1, steps + 1):
            started = time.perf_counter()
            loop.step(step)
            ema.update(loop.model)
            trained += time.perf_counter() - started
            if step % every == 0 or step == steps:
                per_image, ssim, usage = evaluate(loop.model, ema, val_images)
                psnr = float(per_image.mean())
                points.append((step, psnr))
                print(f"{name:>12} step {step:>5}  val PSNR {psnr:6.2f} dB  SSIM {ssim:.3f}  codebook used "
                      f"{usage:.3f}  {trained / step:.4f} s/step", flush=True)
    finally:
        loop.close()
    params = sum(p.numel() for p in loop.model.parameters())
    per_class = {int(label): float(per_image[val_labels == label].mean()) for label in val_labels.unique()}
    return {"name": name, "points": points, "s_per_step": trained / steps, "params": params, "per_class": per_class}


def print_per_class(results: list[dict]) -> None:
    """Final validation PSNR of each run by demo class: which classes hold the mean down."""
    from data_prep.make_demo_data import DEMO_CLASSES
    from data_prep.wnids import wnid_to_label

    names = {wnid_to_label()[c.wnid]: c.name.replace(" ", "-") for c in DEMO_CLASSES}
    labels = sorted(results[0]["per_class"])
    print(f"\nfinal PSNR by class (dB)\n{'run':>12} " + " ".join(f"{names.get(k, k):>15}" for k in labels))
    for r in results:
        print(f"{r['name']:>12} " + " ".join(f"{r['per_class'][k]:>15.2f}" for k in labels))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3200, help="steps of each run (the LR schedule's length)")
    parser.add_argument("--every", type=int, default=800, help="evaluate every N steps")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="a run with these overrides of experiment=demo's tokenizer (repeatable)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run at the demo's own settings")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the demo's worker gets the CPUs)")
    parser.add_argument("--work", default=None, help="folder for the images and shards (default: a temporary one)")
    args = parser.parse_args()
    if args.steps < 1 or args.every < 1 or args.threads < 1:
        parser.error("--steps, --every and --threads must be >= 1")
    runs = [] if args.no_baseline else [("demo", [])]
    for spec in args.variant:
        name, _, keys = spec.partition(":")
        if not name or not keys:
            parser.error(f"--variant {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
        # Split on the commas that start the next KEY=, so list values (optim.betas=[0.9,0.95]) survive.
        runs.append((name, re.split(r",(?=[\w.]+=)", keys)))
    if not runs:
        parser.error("nothing to run: --no-baseline without --variant")
    with tempfile.TemporaryDirectory(prefix="tokenizer-curve-") as tmp:
        work = Path(args.work or tmp)
        shards = make_shards(work / "data", 6 * 40, val_per_class=8, min_size=64, max_size=160)
        print(f"48 validation images; {args.steps} steps a run, evaluated every {args.every}", flush=True)
        results = [train_curve(name, keys, shards, args.steps, args.every, args.threads) for name, keys in runs]
    print_per_class(results)
    base = results[0]["s_per_step"]
    print(f"\n{'run':>12} {'params':>9} {'final PSNR':>11} {'s/step':>8} {'x first':>8}")
    for r in results:
        print(f"{r['name']:>12} {r['params']:>9,} {r['points'][-1][1]:>8.2f} dB {r['s_per_step']:>8.4f} "
              f"{r['s_per_step'] / base:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
