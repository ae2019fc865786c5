"""Image shards -> token shards for the generator stage, on a pool of Ray actors.

    python data_prep/pretokenize.py tokenizer=runs/l32/exports/step_00250000 \\
        shards=s3://bucket/imagenet-wds/train-*.tar output=s3://bucket/imagenet-tokens/l32 augment=flip
    python data_prep/pretokenize.py output=s3://bucket/imagenet-tokens/l32 mode=verify

Image shard i (in sorted order) becomes <output>/tokens-NNNNNN.parquet with NNNNNN = i: one row per
image and view, in the shard's order, with columns key, label, tokens (list<uint16>, K per row), flip
and crop. <output>/manifest.parquet comes last: one row per token shard (shard, rows, bytes, sha256,
source, images) and, under the schema metadata key "titok", the dataset's metadata (num_tokens,
codebook_size, tokenizer and its weights' sha256, image_size, crop policy, augment, crops, source
shards, ...). trainer/token_data.py reads both. Each actor loads the tokenizer once and takes one
image shard at a time; RAY_ADDRESS selects a cluster, otherwise Ray starts locally. On a cluster
the tokenizer, the shards and the output must be reachable from every node (s3:// or shared).

What the tokenizer sees is the evaluation's view of the data (trainer.data): the image decoded,
its shorter side resized to image_size (bicubic, antialiased), the center crop, divided by 255.
augment=flip adds that crop mirrored left-right (flip=true). augment=ten_crop cuts the center
square of side int(1.1 x image_size) and, from it, the center and the four corner crops of
image_size (crop 0..4 in the metadata's "crops"), each also mirrored: 10 rows per image. Samples
that fail to decode are skipped and listed in the shard's record, as evaluation skips them; an
image shard that cannot be read to its end fails its token shard with a message naming it.

Exact tokens. On a CPU, encoding a batch is not bit-identical to encoding its images one by one:
oneDNN reduces the encoder's final 1x1 convolution differently by batch size and by thread count
(measured here: latents differ by 1e-8..1e-6), and where the two nearest codes nearly tie, that
flips a token. With batch_size=1 (the default) every image goes through TiTok.encode alone, with the
shapes of ``tokenizer.encode(image[None])``, on a single torch thread in CPU actors, so its tokens
equal that call's (one thread, same device type and torch build) whichever actor runs it, however
many there are, and however often the run was resumed. GPU actors run without TF32, with
deterministic cuDNN and no benchmarking; their tokens can differ from the CPU's in such near-ties.
batch_size>1 encodes fixed groups of rows (counted from the start of each shard) together: faster on
a GPU and still reproducible for that batch size, but not guaranteed equal to encoding one by one.

Resume. Each finished token shard has a record <output>/parts/tokens-NNNNNN.json (fingerprint of the
plan, size of its image shard, its own size and sha256); a re-run keeps shards whose record matches,
redoes the rest (a repaired image shard redoes its own token shard) and ends with the same bytes as
an uninterrupted run. The plan (<output>/parts/plan.json: settings and the list of image shards) must
match the one already there; a different tokenizer, shard list or setting is refused.

keys:
  tokenizer        export directory (local or s3://, ours or the authors' hub layout) or a hub id
  shards           image shards: a folder/prefix with one split's shards, a glob or a brace pattern
  output           local folder or s3://bucket/prefix
  mode             write | verify (re-read every token shard, compare with the manifest, exit 1 on mismatch)
  image_size       null: the tokenizer's; another value is an error
  augment          none | flip | ten_crop (rows per image: 1, 2, 10)
  jpeg_draft       PIL's DCT-domain downscale while decoding (faster, not bit-exact with a full decode)
  batch_size       images per encoder call; 1 = bit-identical to encoding each image alone
  workers          tokenizer actors (0: one per GPU with use_gpu, else one per cpus_per_worker CPUs)
  cpus_per_worker  CPUs reserved per actor, used as JPEG decode threads
  use_gpu          one GPU per actor
  device           auto | cpu | cuda
  progress         show the progress bar (images/s)
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

if __package__ in (None, ""):  # `python data_prep/pretokenize.py`: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from cluster import preflight, storage  # noqa: E402
from cluster.ray_session import connect_ray  # noqa: E402
from data_prep import manifest  # noqa: E402
from data_prep.jobs import (  # noqa: E402
    absolute_url,
    ray_concurrency,
    remove_stale_temp_files,
    run_write_or_verify,
)
from data_prep.schema import Device, PretokenizeConfig  # noqa: E402
from data_prep.sources import InputError  # noqa: E402
from data_prep.token_writer import (  # noqa: E402
    CROP_NAMES,
    RECORD_VERSION,
    EncodeOptions,
    ShardOutcome,
    TokenizerWorker,
    completed_record,
    crop_size,
    token_shard_name,
    verify_token_shard,
    views_per_image,
)
from trainer.config import ConfigError  # noqa: E402
from trainer.token_data import MANIFEST, TOKEN_SHARD_PREFIX, read_metadata  # noqa: E402

MANIFEST_SCHEMA = pa.schema([("shard", pa.string()), ("rows", pa.int64()), ("bytes", pa.int64()),
                             ("sha256", pa.string()), ("source", pa.string()), ("images", pa.int64())])
_IMAGE_SHARD = re.compile(r"^(?P<split>.+)-\d+\.tar$")
IO_THREADS = 16   # concurrent small reads (records, sizes) on the driver; S3 latency dominates them


@dataclass
class PretokenizeReport:
    """What a write run did; ``line()`` is the summary printed at the end."""

    output: str
    num_tokens: int = 0
    shards: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    images: int = 0
    rows: int = 0
    undecodable: int = 0
    failed: list[str] = field(default_factory=list)
    workers: int = 0
    ray_start_s: float = 0.0
    workers_start_s: float = 0.0
    encode_s: float = 0.0          # first shard task start to last shard task end (steady state)
    total_s: float = 0.0
    written_images: int = 0        # in the token shards written by this run (not the kept ones)
    written_rows: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.written_rows * self.num_tokens / self.encode_s if self.encode_s > 0 else 0.0

    def line(self) -> str:
        images_per_s = self.written_images / self.encode_s if self.encode_s > 0 else 0.0
        skipped = f", {self.undecodable} undecodable images skipped" if self.undecodable else ""
        status = f"; FAILED shards: {', '.join(self.failed)} (re-run to retry)" if self.failed else ""
        return (f"pretokenize: {self.images} images -> {self.rows} rows of {self.num_tokens} tokens in {self.shards} "
                f"token shards ({self.shards_written} written, {self.shards_skipped} already complete){skipped} -> "
                f"{self.output}; {self.tokens_per_s:.0f} tokens/s, {images_per_s:.1f} images/s over "
                f"{self.encode_s:.1f} s of {self.workers} actors; {self.total_s:.1f} s total (Ray start "
                f"{self.ray_start_s:.1f} s, actors start {self.workers_start_s:.1f} s){status}")


@dataclass
class VerifyReport:
    output: str
    shards: int = 0
    rows: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        verdict = "OK" if not self.problems else f"{len(self.problems)} problem(s)"
        return f"verify {self.output}: {self.shards} token shards, {self.rows} rows: {verdict}"


class PlanMismatch(InputError):
    pass


def _threaded(fn: Callable, items: list) -> list:
    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        return list(pool.map(fn, items))


# ----------------------------------------------------------------------------------------------
# Inputs: the image shards and the tokenizer


@dataclass(frozen=True)
class TokenizerInfo:
    source: str
    image_size: int
    num_tokens: int
    codebook_size: int
    weights_sha256: str     # of the state dict (names, dtypes, shapes, bytes): what decides the tokens


def inspect_tokenizer(source: str) -> TokenizerInfo:
    """Load the tokenizer once on the driver: fail early and clearly, and fingerprint its weights."""
    import torch

    from trainer.checkpoint import is_complete
    from trainer.models import load_tokenizer

    try:
        if storage.is_remote(source) or Path(source).is_dir():
            source = absolute_url(source)
            if storage.exists(storage.join(source, "meta.json")) and not is_complete(source):
                raise InputError(f"tokenizer {source}: export incomplete (no COMPLETE marker yet)")
        model = load_tokenizer(source)
    except InputError:
        raise
    except (FileNotFoundError, ValueError, TypeError, OSError, storage.StorageError) as err:
        raise InputError(f"tokenizer {source}: cannot load it ({err})") from None
    cfg = model.config
    if cfg.quantize_mode != "vq":
        raise InputError(f"tokenizer {source} has continuous tokens (quantize_mode={cfg.quantize_mode}); "
                         "token shards hold discrete ids, so pre-tokenize with a VQ tokenizer")
    if cfg.codebook_size > 1 << 16:
        raise InputError(f"tokenizer {source}: codebook_size {cfg.codebook_size} does not fit token shards' uint16")
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}\t{flat.dtype}\t{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return TokenizerInfo(source, cfg.image_size, cfg.num_latent_tokens, cfg.codebook_size, digest.hexdigest())


def list_image_shards(shards: str) -> list[tuple[str, int]]:
    """(URL, bytes) of every input shard, sorted: shard i becomes token shard i."""
    from trainer.data import expand_shard_urls

    try:
        urls = expand_shard_urls(shards if storage.is_remote(shards) else absolute_url(shards))
    except (FileNotFoundError, ValueError, storage.StorageError) as err:
        raise preflight.BadInput("shards", str(err)) from None
    return list(zip(urls, _threaded(storage.size, urls)))


def _input_plans(urls: list[str]) -> dict[tuple[str, str], tuple[dict | None, dict | None]]:
    """Per (folder, split) of the image shards: data_prep/shard.py's plan and sample counts, when there."""
    groups = {(url.rpartition("/")[0], m.group("split")) for url in urls
              if (m := _IMAGE_SHARD.match(url.rpartition("/")[2]))}

    def read(group: tuple[str, str]) -> tuple[dict | None, dict | None]:
        try:
            return manifest.read_plan(*group), manifest.shard_sample_counts(*group)
        except Exception:  # noqa: BLE001 - a missing or damaged manifest only costs the checks and the ETA
            return None, None

    ordered = sorted(groups)
    return dict(zip(ordered, _threaded(read, ordered)))


def _check_image_size(cfg: PretokenizeConfig, tokenizer: TokenizerInfo, plans: dict) -> None:
    side = tokenizer.image_size
    if cfg.image_size is not None and cfg.image_size != side:
        raise InputError(f"image_size={cfg.image_size}, but tokenizer {tokenizer.source} takes {side}x{side} images "
                         f"(its positional embeddings fix the size); drop image_size or set image_size={side}")
    needed = crop_size(side, cfg.augment)
    for (folder, split), (plan, _) in sorted(plans.items()):
        resize = ((plan or {}).get("settings") or {}).get("resize")
        if resize and resize < needed:
            raise InputError(f"the {split} shards in {folder} were pre-resized to a shorter side of {resize} px, "
                             f"smaller than the {needed} px this tokenizer{' with ten_crop' if needed != side else ''} "
                             f"reads; re-shard with resize>={needed} or resize=null")


def _total_images(urls: list[str], plans: dict) -> int | None:
    """Images in the input from the shard manifests (None when some shard has none: the bar has no total)."""
    total = 0
    for url in urls:
        folder, _, name = url.rpartition("/")
        m = _IMAGE_SHARD.match(name)
        counts = plans.get((folder, m.group("split")), (None, None))[1] if m else None
        if not counts or name not in counts:
            return None
        total += counts[name]
    return total


# ----------------------------------------------------------------------------------------------
# The plan: what decides the bytes of every token shard


def _device(cfg: PretokenizeConfig) -> str:
    return "cuda" if cfg.use_gpu and cfg.device != Device.cpu else "cpu"


def _settings(cfg: PretokenizeConfig, tokenizer: TokenizerInfo) -> dict[str, Any]:
    return {"tokenizer_sha256": tokenizer.weights_sha256, "image_size": tokenizer.image_size,
            "augment": cfg.augment.value, "jpeg_draft": cfg.jpeg_draft, "batch_size": cfg.batch_size,
            "device": _device(cfg), "record_version": RECORD_VERSION}


def plan_url(output: str) -> str:
    return storage.join(output, "parts", "plan.json")


def _ensure_plan(output: str, settings: dict[str, Any], sources: list[str]) -> str:
    """Write the plan, or check the one there; returns its fingerprint.

    The plan names the image shards; their sizes live in the shard records, so an image shard that was
    repaired (data_prep/shard.py re-run) only redoes its own token shard."""
    plan = {"settings": settings, "sources": sources}
    fingerprint = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    url = plan_url(output)
    if storage.exists(url):
        previous = json.loads(storage.read_bytes(url))
        if previous.get("fingerprint") != fingerprint:
            old = previous.get("settings") or {}
            changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
            what = f"settings {', '.join(changed)}" if changed else "the list of image shards"
            raise PlanMismatch(f"{output} already holds token shards made differently ({what} changed); use a new "
                               f"output, or delete the old token shards and {url}")
        return fingerprint
    storage.ensure_bucket(output)
    storage.write_bytes(url, json.dumps({"fingerprint": fingerprint, **plan}, sort_keys=True, indent=1).encode())
    return fingerprint


def _metadata(cfg: PretokenizeConfig, tokenizer: TokenizerInfo, sources: list[tuple[str, int]],
              records: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    side = tokenizer.image_size
    square = crop_size(side, cfg.augment)
    crop = (f"shorter side to {square} (bicubic, antialias{', JPEG draft' if cfg.jpeg_draft else ''}), "
            f"center crop {square}" + (f", then five crops of {side}" if square != side else ""))
    return {"num_tokens": tokenizer.num_tokens, "codebook_size": tokenizer.codebook_size,
            "tokenizer": tokenizer.source, "tokenizer_sha256": tokenizer.weights_sha256, "image_size": side,
            "crop": crop, "augment": cfg.augment.value, "crops": list(CROP_NAMES[cfg.augment]),
            "rows_per_image": len(views_per_image(cfg.augment)), "jpeg_draft": cfg.jpeg_draft,
            "images": sum(r["images"] for r in records), "rows": sum(r["rows"] for r in records),
            "undecodable": sum(len(r["undecodable"]) for r in records),
            "encoding": "per-sample" if cfg.batch_size == 1 else f"batches of {cfg.batch_size}",
            "device": _device(cfg), "torch": torch.__version__, "source_shards": [url for url, _ in sources]}


def write_manifest(output: str, records: list[dict[str, Any]], metadata: dict[str, Any]) -> None:
    import pyarrow.parquet as pq

    rows = [{"shard": r["shard"], "rows": r["rows"], "bytes": r["bytes"], "sha256": r["sha256"], "source": r["source"],
             "images": r["images"]} for r in records]
    schema = MANIFEST_SCHEMA.with_metadata({b"titok": json.dumps(metadata, sort_keys=True).encode()})
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer, compression="zstd")
    url, data = storage.join(output, MANIFEST), buffer.getvalue()
    if not (storage.exists(url) and storage.read_bytes(url) == data):  # a complete dataset is left untouched
        storage.write_bytes(url, data)


# ----------------------------------------------------------------------------------------------
# The actor pool


def _run_actors(options: EncodeOptions, jobs: list[tuple[int, str, int]], workers: int, cfg: PretokenizeConfig,
                on_done: Callable[[int, ShardOutcome | None, BaseException | None], None]) -> float:
    """Tokenize every (index, source, source bytes) job on ``workers`` actors, two jobs queued per actor so
    none waits for the driver; ``on_done(index, outcome, error)`` as each finishes. Returns the seconds
    the actors took to start (tokenizer loaded).

    A dead actor is restarted by Ray and its shard retried; a shard that fails is reported, the others go on."""
    import ray
    from ray.exceptions import RayActorError

    actor_class = ray.remote(TokenizerWorker).options(
        num_cpus=cfg.cpus_per_worker, num_gpus=1 if cfg.use_gpu else 0, max_restarts=2, max_task_retries=2)
    started = time.time()
    actors = [actor_class.remote(options) for _ in range(workers)]
    try:
        try:
            ray.get([actor.ready.remote() for actor in actors])
        except Exception as err:  # noqa: BLE001
            cause = getattr(err, "cause", None) or err
            raise InputError(f"tokenizer actors failed to start: {type(cause).__name__}: {cause}") from None
        start_s = time.time() - started
        queue = list(reversed(jobs))
        pending: dict[Any, tuple[Any, int]] = {}

        def submit(actor) -> None:
            job = queue.pop()
            pending[actor.encode_shard.remote(*job)] = (actor, job[0])

        for _ in range(2):
            for actor in actors:
                if queue:
                    submit(actor)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                actor, index = pending.pop(ref)
                try:
                    outcome, error = ray.get(ref), None
                except Exception as err:  # noqa: BLE001 - reported per shard; the other shards go on
                    outcome, error = None, getattr(err, "cause", None) or err
                on_done(index, outcome, error)
                if queue and not isinstance(error, RayActorError):  # an actor past its restarts gets no more
                    submit(actor)
            if queue and not pending:  # every actor died for good: a re-run retries the rest
                while queue:
                    on_done(queue.pop()[0], None, RuntimeError("no tokenizer actor left"))
        return start_s
    finally:
        for actor in actors:
            ray.kill(actor)


# ----------------------------------------------------------------------------------------------
# Write


def write(cfg: PretokenizeConfig) -> PretokenizeReport:
    """Tokenize (or keep) every token shard, then write the manifest. Raises :class:`InputError`
    (and :class:`~trainer.config.ConfigError`) for unusable input before any work."""
    from tqdm import tqdm

    begin = time.time()
    for key in ("tokenizer", "shards"):
        if not getattr(cfg, key):
            raise ConfigError(key, f"is required to write token shards (set {key}=...)")
    output = absolute_url(cfg.output)
    report = PretokenizeReport(output)
    # What costs nothing first (cluster/preflight.py); the tokenizer's weights are loaded only then.
    preflight.require_model("tokenizer", cfg.tokenizer)
    sources = list_image_shards(cfg.shards)  # type: ignore[arg-type]
    preflight.require_writable("output", output)
    tokenizer = inspect_tokenizer(cfg.tokenizer)  # type: ignore[arg-type]
    plans = _input_plans([url for url, _ in sources])
    _check_image_size(cfg, tokenizer, plans)
    report.num_tokens, report.shards = tokenizer.num_tokens, len(sources)
    fingerprint = _ensure_plan(output, _settings(cfg, tokenizer), [url for url, _ in sources])
    remove_stale_temp_files(output, ("", "parts"),
                            rf"{TOKEN_SHARD_PREFIX}\d{{6}}\.(?:parquet|json)|plan\.json|{re.escape(MANIFEST)}")

    records: list[dict[str, Any] | None] = _threaded(lambda i: completed_record(output, i, fingerprint, sources[i][1]),
                                                     list(range(len(sources))))
    todo = [(i, url, size) for i, (url, size) in enumerate(sources) if records[i] is None]
    report.shards_skipped = len(sources) - len(todo)
    if todo:
        report.ray_start_s = connect_ray()
        import ray

        if cfg.use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
            raise InputError("use_gpu=true but the Ray cluster has no GPU")
        resource, per_worker = ("GPU", 1) if cfg.use_gpu else ("CPU", cfg.cpus_per_worker)
        report.workers = min(len(todo), ray_concurrency(cfg.workers, resource, per_worker))
        options = EncodeOptions(tokenizer=tokenizer.source, output=output, fingerprint=fingerprint,
                                image_size=tokenizer.image_size, augment=cfg.augment, jpeg_draft=cfg.jpeg_draft,
                                batch_size=cfg.batch_size, device=_device(cfg), decode_threads=cfg.cpus_per_worker)
        done_images = sum(r["images"] + len(r["undecodable"]) for r in records if r is not None)
        bar = tqdm(total=_total_images([url for url, _ in sources], plans), initial=done_images, unit="img",
                   disable=not cfg.progress, desc="pretokenize", file=sys.stderr, smoothing=0.1)
        outcomes: list[ShardOutcome] = []

        def on_done(index: int, outcome: ShardOutcome | None, error: BaseException | None) -> None:
            if outcome is None:
                report.failed.append(token_shard_name(index))
                bar.write(f"{token_shard_name(index)} ({sources[index][0]}) failed: {type(error).__name__}: "
                          f"{str(error).splitlines()[0][:400] if str(error) else ''}", file=sys.stderr)
                return
            outcomes.append(outcome)
            records[index] = outcome.record
            bar.update(outcome.record["images"] + len(outcome.record["undecodable"]))

        try:
            report.workers_start_s = _run_actors(options, todo, report.workers, cfg, on_done)
        finally:
            bar.close()
        report.failed.sort()
        report.shards_written = len(outcomes)
        report.written_images = sum(o.record["images"] for o in outcomes)
        report.written_rows = sum(o.record["rows"] for o in outcomes)
        if outcomes:
            report.encode_s = max(o.end for o in outcomes) - min(o.start for o in outcomes)
    finished = [r for r in records if r is not None]
    report.images = sum(r["images"] for r in finished)
    report.rows = sum(r["rows"] for r in finished)
    report.undecodable = sum(len(r["undecodable"]) for r in finished)
    if not report.failed:
        write_manifest(output, finished, _metadata(cfg, tokenizer, sources, finished))
    report.total_s = time.time() - begin
    return report


# ----------------------------------------------------------------------------------------------
# Verify


def verify(cfg: PretokenizeConfig) -> VerifyReport:
    """Re-read every token shard and compare it with the manifest (on the driver: token shards are small)."""
    import pyarrow.parquet as pq

    output = absolute_url(cfg.output)
    url = storage.join(output, MANIFEST)
    if not storage.exists(url):
        raise InputError(f"no {MANIFEST} under {output} (write the token shards first)")
    listed = pq.read_table(io.BytesIO(storage.read_bytes(url))).to_pylist()
    metadata = read_metadata(output)
    report = VerifyReport(output, shards=len(listed), rows=sum(r["rows"] for r in listed))
    names = {r["shard"] for r in listed}
    pattern = re.compile(rf"^{re.escape(TOKEN_SHARD_PREFIX)}\d{{6}}\.parquet$")
    for info in storage.list_files(output):
        name = info.url.rsplit("/", 1)[-1]
        if info.url == storage.join(output, name) and pattern.match(name) and name not in names:
            report.problems.append(f"{name}: token shard on storage but not in the manifest")
    problems = _threaded(lambda row: verify_token_shard(storage.join(output, row["shard"]), row,
                                                        metadata["num_tokens"], metadata["codebook_size"]), listed)
    for found in problems:
        report.problems.extend(found)
    return report


# ----------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> int:
    """``python data_prep/pretokenize.py key=value ...``; ``--help`` prints every setting."""
    from trainer.config import load_config

    cfg = load_config("pretokenize", PretokenizeConfig, argv, description=__doc__)
    return run_write_or_verify("pretokenize", cfg, write, verify, (InputError, ConfigError))


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["PretokenizeReport", "VerifyReport", "TokenizerInfo", "inspect_tokenizer", "list_image_shards", "write",
           "verify", "write_manifest", "main"]
