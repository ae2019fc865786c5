"""Images/s of the evaluation pool (Ray actors) against torch-fidelity's own single-process
computation on the same images, in the same run: the pool's overhead.

    python bench/eval_throughput.py [--images 96] [--workers 2] [--size 256] [--weights FILE] [--gpu] [--repeats 2]

CPU (default): the pool runs ``--workers`` actors of 1 thread each; the baseline is torch-fidelity
(``calculate_metrics(isc=True)``: the same features and logits) with ``--workers`` threads in one
process. Target: >= 0.9x. Also 1 actor against torch-fidelity with 1 thread (the pure overhead,
ideal 1.0x) and the pool's scaling from 1 to ``--workers`` actors. ``--gpu``: one GPU actor against torch-fidelity
on the same GPU. The figures exclude the pool's start-up (actors, imports, weights), printed on its own.

Last, a projection of FID-50k with 8 workers of the measured kind, from the measured per-image cost
of one worker (feature extraction and merging; a generation eval adds the sampler's cost). Without
``--weights`` the Inception weights are random (same architecture and cost).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def make_images(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        low = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(low).resize((size, size), Image.BILINEAR), dtype=np.float64)
        pixels = np.clip(field + rng.normal(0, 20, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.png")


def torch_fidelity_rate(folder: Path, weights: str, threads: int, batch_size: int, gpu: bool, repeats: int) -> float:
    import torch_fidelity

    torch.set_num_threads(threads)
    kwargs = dict(input1=str(folder), isc=True, cuda=gpu, batch_size=batch_size, cache=False, save_cpu_ram=True,
                  verbose=False, feature_extractor_weights_path=weights)
    torch_fidelity.calculate_metrics(**{**kwargs, "input1": str(folder / "warmup")})
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch_fidelity.calculate_metrics(**kwargs)
        best = min(best, time.perf_counter() - start)
    return len(list(folder.glob("*.png"))) / best


def pool_rate(folder: Path, weights: str, workers: int, batch_size: int, chunk_size: int, gpu: bool, repeats: int):
    from evals.pool import EvalPool, PoolSettings
    from evals.sources import resolve_input
    from evals.worker import Chunk, ScoreTask, WorkerSettings

    chunks = [Chunk(i, "bench", part, logits=True)
              for i, part in enumerate(resolve_input(str(folder), chunk_size=chunk_size, image_size=256).slices)]
    warmup = [Chunk(0, "bench", resolve_input(str(folder / "warmup"), chunk_size=chunk_size, image_size=256).slices[0])]
    started = time.perf_counter()
    pool = EvalPool(WorkerSettings(weights, batch_size, use_gpu=gpu, threads=1), ScoreTask(),
                    PoolSettings(num_workers=workers, use_gpu=gpu, progress=False))
    pool.start()
    startup = time.perf_counter() - started
    try:
        for _ in range(workers):  # one warm-up chunk per actor (first-call allocations, oneDNN plans)
            pool.run(warmup)
        runs = [pool.run(chunks) for _ in range(repeats)]
        merged, report = max(runs, key=lambda run: run[1].images_per_s)
    finally:
        pool.close()
    merge_start = time.perf_counter()
    merged.sums["bench"].to_stats()
    merge_seconds = time.perf_counter() - merge_start
    per_image = report.worker_seconds / report.images  # one worker's time per image
    return report.images_per_s, startup, per_image, merge_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="image side (Inception resizes to 299 anyway)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--weights", help="Inception weights file (default: random weights, same cost)")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per configuration; the best counts")
    args = parser.parse_args()

    import ray

    from evals.inception import write_random_inception_weights
    from evals.stats import FidStats, frechet_distance

    with tempfile.TemporaryDirectory(prefix="eval-bench-") as tmp:
        root = Path(tmp)
        weights = args.weights or write_random_inception_weights(root / "inception-random.pth")
        make_images(root / "images", args.images, args.size)
        make_images(root / "images" / "warmup", args.batch_size, args.size)
        workers = 1 if args.gpu else args.workers
        ray.init(address="local", num_cpus=max(2, workers), num_gpus=1 if args.gpu else 0, include_dashboard=False,
                 log_to_driver=False)
        pool = {n: pool_rate(root / "images", weights, n, args.batch_size, args.chunk_size, args.gpu, args.repeats)
                for n in sorted({1, workers})}
        ray.shutdown()
        base = {n: torch_fidelity_rate(root / "images", weights, n, args.batch_size, args.gpu, args.repeats) for n in sorted({1, workers})}

        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(64, 2048)), rng.normal(size=(64, 2048))
        start = time.perf_counter()
        frechet_distance(FidStats(x.mean(0), np.cov(x, rowvar=False), 64), FidStats(y.mean(0), np.cov(y, rowvar=False), 64))
        fid_seconds = time.perf_counter() - start

    device = "GPU" if args.gpu else "CPU"
    print(f"images: {args.images} PNG {args.size}x{args.size}, batch {args.batch_size}, chunk {args.chunk_size}, {device}")
    for n in sorted(pool):
        what = "GPU" if args.gpu else f"{n} thread{'s' if n > 1 else ''}"
        print(f"torch-fidelity, one process, {what:9s}: {base[n]:7.2f} images/s   "
              f"Ray pool, {n} worker{'s' if n > 1 else ' '} x 1 thread: {pool[n][0]:7.2f} images/s   "
              f"ratio {pool[n][0] / base[n]:.3f}x")
    if workers > 1:
        print(f"pool scaling 1 -> {workers} workers: {pool[workers][0] / pool[1][0]:.2f}x (ideal {workers}.00x)")
    ips, startup, per_image, merge_seconds = pool[workers]
    print(f"target: pool {workers} x 1 thread / torch-fidelity {workers} threads >= 0.9x -> "
          f"{ips / base[workers]:.3f}x")
    print(f"pool start-up (actors, imports, weights via object store): {startup:.1f} s, once per job")
    print(f"per-image cost of one worker: {per_image * 1e3:.1f} ms; driver: mean/cov {merge_seconds:.2f} s, "
          f"FID formula {fid_seconds:.2f} s")
    projected = 50_000 * per_image / 8 + startup + fid_seconds
    print(f"projected FID-50k with 8 {device} workers like these: {projected / 60:.1f} min "
          f"({50_000 * per_image / 8:.0f} s of features + start-up + FID)")


if __name__ == "__main__":
    main()
