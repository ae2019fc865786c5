"""ImageNet -> WebDataset shards on a local folder or S3, one Ray task per shard.

    python data_prep/shard.py input=/data/imagenet output=s3://bucket/imagenet-wds split=train
    python data_prep/shard.py input=/data/imagenet output=s3://bucket/imagenet-wds split=train mode=verify

Reads extracted folders, a flat validation folder with its labels file, or the original
ILSVRC2012_img_{train,val}.tar archives in place. Writes <output>/<split>-NNNNNN.tar (samples shuffled
across shards with the seed) and <output>/manifest/<split>.parquet, <split>_rejected.parquet,
<split>_shards.parquet. Re-running skips complete shards (size and digest checked against their
records), redoes the rest and ends with the same bytes as an uninterrupted run; bad inputs are
rejected with a reason, never fatal. RAY_ADDRESS selects a cluster; otherwise Ray starts locally.
On a cluster every node must see the input (s3:// or a shared mount) and the output should be
s3:// (or shared): shard tasks run on whichever node has a free CPU.

keys:
  input              ImageNet as downloaded: a folder with <split>/<wnid>/*.JPEG or a flat <split>/
                     folder, a folder holding ILSVRC2012_img_<split>.tar, or that tar (local/mounted)
  output             local folder or s3://bucket/prefix
  split              train | val
  mode               write | verify (re-read every shard, compare with the manifest, exit 1 on mismatch)
  labels             flat val labels: LOC_val_solution.csv, ILSVRC2012_validation_ground_truth.txt or
                     ILSVRC2012_devkit_t12.tar.gz (default: looked up next to the input)
  synsets            devkit ID order for the ground-truth file (default: the shipped ILSVRC2012 order)
  samples_per_shard  at most this many samples per shard
  shard_max_mb       at most this many MB of source images per shard (0: no limit)
  seed               seed of the cross-shard shuffle
  workers            shard tasks in flight (0: one per CPU of the Ray cluster)
  full_decode        also decode every image (default: structural checks: JPEG markers, header)
  resize             pre-resized variant: shorter side in pixels, aspect kept (null: original bytes)
  jpeg_quality       quality of converted (CMYK, PNG, ...) and resized images
  resume_check       checksum | size: how a re-run recognises a complete shard
  progress           show the progress bar (images/s, ETA)
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python data_prep/shard.py`: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from cluster import preflight, storage  # noqa: E402
from cluster.ray_session import connect_ray  # noqa: E402
from data_prep import manifest  # noqa: E402
from data_prep.jobs import absolute_url, ray_concurrency, remove_stale_temp_files, run_write_or_verify  # noqa: E402
from data_prep.schema import ResumeCheck, ShardConfig  # noqa: E402
from data_prep.shard_plan import fingerprint, plan_shards  # noqa: E402
from data_prep.shard_writer import ShardOptions, ShardOutcome, ensure_shard, shard_url, verify_shard  # noqa: E402
from data_prep.sources import InputError, list_split  # noqa: E402


@dataclass
class ShardReport:
    """What a write run did; ``line()`` is the summary printed at the end."""

    split: str
    output: str
    samples: int = 0
    rejected: int = 0
    bytes: int = 0
    shards: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    failed: list[str] = field(default_factory=list)
    listing_s: float = 0.0
    ray_start_s: float = 0.0
    tasks_s: float = 0.0        # first shard task start to last shard task end (steady state)
    tasks_cpu_s: float = 0.0    # CPU time of the shard tasks that wrote (their waits on storage excluded)
    total_s: float = 0.0
    written_images: int = 0     # images in the shards written by this run (not skipped)
    written_bytes: int = 0

    def line(self) -> str:
        rate = self.written_images / self.tasks_s if self.tasks_s > 0 else 0.0
        mbps = self.written_bytes / self.tasks_s / 1e6 if self.tasks_s > 0 else 0.0
        status = f"; FAILED shards: {', '.join(self.failed)} (re-run to retry)" if self.failed else ""
        return (f"shard {self.split}: {self.samples} samples written, {self.rejected} rejected, "
                f"{self.bytes / 1e6:.1f} MB in {self.shards} shards ({self.shards_written} written, "
                f"{self.shards_skipped} already complete) -> {self.output}; {self.total_s:.1f} s total "
                f"(listing {self.listing_s:.1f} s, Ray start {self.ray_start_s:.1f} s), "
                f"{rate:.0f} images/s, {mbps:.1f} MB/s over {self.tasks_s:.1f} s of shard tasks{status}")


@dataclass
class VerifyReport:
    split: str
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        verdict = "OK" if not self.problems else f"{len(self.problems)} problem(s)"
        return f"verify {self.split}: {self.shards} shards, {self.samples} samples: {verdict}"


class PlanMismatch(InputError):
    pass


# ----------------------------------------------------------------------------------------------
# Ray


def _run_tasks(fn, count: int, make_args, workers: int, on_done) -> list[tuple[int, Any, BaseException | None]]:
    """Run ``fn(*make_args(i))`` for ``i < count`` as Ray tasks, ``workers`` at a time (arguments are
    built only when submitted, so memory stays bounded); ``on_done(i, result, error)`` is called as
    each finishes. Returns (index, result, error) in index order.

    When ``workers`` takes every CPU of the cluster, as many tasks again wait queued in Ray: a freed
    CPU starts the next one at once instead of after a round trip through this loop (~4 ms a task)."""
    import ray

    remote = ray.remote(num_cpus=1, max_retries=2)(fn)
    in_flight = 2 * workers if workers >= ray.cluster_resources().get("CPU", 0) else workers
    pending: dict[Any, int] = {}
    results: list[tuple[int, Any, BaseException | None]] = []
    next_index = 0
    while next_index < count or pending:
        while next_index < count and len(pending) < in_flight:
            pending[remote.remote(*make_args(next_index))] = next_index
            next_index += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            i = pending.pop(ref)
            try:
                result, error = ray.get(ref), None
            except Exception as err:  # noqa: BLE001 - reported per shard; the other shards go on
                result, error = None, err
            results.append((i, result, error))
            on_done(i, result, error)
    return sorted(results, key=lambda r: r[0])


# ----------------------------------------------------------------------------------------------
# Write


def _settings(cfg: ShardConfig) -> dict[str, Any]:
    """The settings that decide shard bytes (part of the plan fingerprint)."""
    return {"split": cfg.split.value, "seed": cfg.seed, "samples_per_shard": cfg.samples_per_shard,
            "shard_max_mb": cfg.shard_max_mb, "full_decode": cfg.full_decode, "resize": cfg.resize,
            "jpeg_quality": cfg.jpeg_quality}


def check_inputs(cfg: ShardConfig) -> None:
    """What costs nothing, before the listing (minutes for ImageNet on S3) and Ray: the input, the
    labels and synsets files exist, the output can be written. Raises
    :class:`~cluster.preflight.BadInput`."""
    if not preflight.path_exists("input", cfg.input):
        raise preflight.BadInput("input", f"no images for split '{cfg.split.value}': {cfg.input} does not exist")
    preflight.require_file("labels", cfg.labels, "labels file")
    preflight.require_file("synsets", cfg.synsets, "synsets file")
    preflight.require_writable("output", cfg.output)


def write(cfg: ShardConfig) -> ShardReport:
    """Plan, write (or keep) every shard, then the manifests. Raises :class:`InputError` for unusable input."""
    from tqdm import tqdm

    begin = time.time()
    output, split = absolute_url(cfg.output), cfg.split.value
    check_inputs(cfg)
    report = ShardReport(split, output)
    listing = list_split(cfg.input, split, labels=cfg.labels, synsets=cfg.synsets)
    settings = _settings(cfg)
    plan_fingerprint = fingerprint(listing.items, settings)
    previous = manifest.read_plan(output, split)
    if previous is not None and previous["fingerprint"] != plan_fingerprint:
        what = ("settings " + ", ".join(f"{k}: {previous['settings'].get(k)!r} -> {v!r}" for k, v in settings.items()
                                        if previous["settings"].get(k) != v)
                if previous.get("settings") != settings else "the input listing")
        raise PlanMismatch(f"{output} already holds split '{split}' sharded differently ({what} changed); "
                           f"use a new output, or delete the old shards and {manifest.plan_url(output, split)}")
    specs = plan_shards(listing.items, split, cfg.seed, cfg.samples_per_shard, int(cfg.shard_max_mb * 1e6))
    listing_rejected = [r.row() for r in listing.rejected]
    storage.ensure_bucket(output)
    manifest.write_plan(output, split, {"fingerprint": plan_fingerprint, "settings": settings, "form": listing.form,
                                        "items": len(listing.items), "shards": len(specs),
                                        "listing_rejected": listing_rejected})
    report.listing_s = time.time() - begin
    remove_stale_temp_files(output, ("", "manifest/parts"), rf"{re.escape(split)}-\d{{6}}\.(?:tar|json)")

    report.ray_start_s = connect_ray()
    options = ShardOptions(output=output, split=split, fingerprint=plan_fingerprint, full_decode=cfg.full_decode,
                           resize=cfg.resize, jpeg_quality=cfg.jpeg_quality,
                           verify_checksum=cfg.resume_check == ResumeCheck.checksum)
    bar = tqdm(total=len(listing.items), unit="img", disable=not cfg.progress, desc=f"shard {split}",
               file=sys.stderr, smoothing=0.1)

    def on_done(i: int, outcome: ShardOutcome | None, error: BaseException | None) -> None:
        bar.update(len(specs[i].items))
        if error is not None:
            bar.write(f"shard {specs[i].name} failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}")

    results = _run_tasks(ensure_shard, len(specs), lambda i: (specs[i], options), ray_concurrency(cfg.workers), on_done)
    bar.close()
    outcomes: list[ShardOutcome] = [r for _, r, e in results if e is None]
    report.failed = [specs[i].name for i, _, e in results if e is not None]
    report.shards = len(specs)
    report.shards_skipped = sum(o.skipped for o in outcomes)
    report.shards_written = len(outcomes) - report.shards_skipped
    report.samples = sum(o.samples for o in outcomes)
    report.rejected = len(listing_rejected) + sum(o.rejected for o in outcomes)
    report.bytes = sum(o.bytes for o in outcomes)
    written = [o for o in outcomes if not o.skipped]
    report.written_images = sum(o.samples + o.rejected for o in written)
    report.written_bytes = sum(o.bytes for o in written)
    if written:
        report.tasks_s = max(o.end for o in written) - min(o.start for o in written)
        report.tasks_cpu_s = sum(o.cpu_s for o in written)
    if not report.failed:
        manifest.write_manifests(output, split, len(specs), listing_rejected)
    report.total_s = time.time() - begin
    return report


# ----------------------------------------------------------------------------------------------
# Verify


def verify(cfg: ShardConfig) -> VerifyReport:
    """Re-read every shard of the split and compare it with the manifests."""
    output, split = absolute_url(cfg.output), cfg.split.value
    if not storage.exists(manifest.shards_url(output, split)):
        raise InputError(f"no manifest for split '{split}' under {output} (write the shards first)")
    shards = manifest.read_table(manifest.shards_url(output, split)).to_pylist()
    samples = manifest.read_table(manifest.samples_url(output, split))
    # Rows are in shard order: each shard is one contiguous slice, turned into dicts only when its
    # task is submitted.
    names = samples.column("shard").to_pylist()
    slices: dict[str, tuple[int, int]] = {}
    for position, name in enumerate(names):
        first, length = slices.get(name, (position, 0))
        if first + length != position:
            raise InputError(f"{manifest.samples_url(output, split)}: rows of {name} are not contiguous")
        slices[name] = (first, length + 1)
    report = VerifyReport(split, shards=len(shards), samples=len(names))
    listed = {s["shard"] for s in shards}
    pattern = re.compile(rf"^{re.escape(split)}-\d{{6}}\.tar$")
    prefix = output.rstrip("/") + "/"
    for info in storage.list_files(output):
        rel = info.url[len(prefix):] if info.url.startswith(prefix) else info.url
        if pattern.match(rel) and rel not in listed:
            report.problems.append(f"{rel}: shard on storage but not in the manifest")
    for name in sorted(set(slices) - listed):
        report.problems.append(f"{name}: in the sample manifest but not in {split}_shards.parquet")

    def args(i: int) -> tuple:
        shard = shards[i]
        first, length = slices.get(shard["shard"], (0, 0))
        return shard_url(output, shard["shard"]), shard["bytes"], shard["digest"], samples.slice(first, length).to_pylist()

    connect_ray()
    for i, problems, error in _run_tasks(verify_shard, len(shards), args, ray_concurrency(cfg.workers), lambda *a: None):
        if error is not None:
            report.problems.append(f"{shards[i]['shard']}: verification failed ({type(error).__name__}: {error})")
        else:
            report.problems.extend(problems)
    return report


# ----------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> int:
    """``python data_prep/shard.py key=value ...``; ``--help`` prints every setting."""
    from trainer.config import load_config

    cfg = load_config("shard", ShardConfig, argv, description=__doc__)
    return run_write_or_verify("shard", cfg, write, verify, (InputError,))


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["ShardReport", "VerifyReport", "write", "verify", "main"]
