"""Streaming reader of image shards (``data_prep/shard.py`` output) for training and evaluation.

    layout = StepLayout(global_batch=256, streams=16, world_size=world, micro_batch=32)
    batches = step_batches("s3://bucket/imagenet/train-{000000..001281}.tar", layout, rank, image_size=256,
                           num_workers=8, seed=0, shuffle_buffer=1000, start_step=step)
    for batch in batches:   # ImageBatch(images, labels, keys, step, micro, padding), endless
        ...
    for batch in eval_batches("val-*.tar", batch_size=64, image_size=256, rank=rank, world_size=world):
        ...

**Training order.** A run reads its images in ``L`` logical streams (``trainer/image_streams.py``):
stream ``l`` reads the shards ``perm_e[l::L]`` of epoch ``e`` whole and in order (every ``L``-th
sample of every shard when there are fewer shards than streams), shuffled within windows of
``shuffle_buffer`` samples; the crop and flip of a sample come from a generator seeded by its
(epoch, window, position). Step ``s`` takes ``q = G / L`` consecutive samples of every stream
(``trainer/batch_layout.py``: global slot ``i`` is sample ``s q + i % q`` of stream ``i // q``). So
the pixels, labels and keys of every slot of every step are a pure function of (shards, ``G``,
``L``, seed, ``shuffle_buffer``): **not of the number of ranks or of loader workers**. Within a
stream's epoch every sample is used once, across any sequence of resizes, because a stream's
position is the step number alone.

**A rank's reading.** Rank ``m`` reads the streams its slots touch (``layout.rank_streams(m)``:
whole streams, and partial ones at its edges when the world size does not divide ``L``). It reads
them whole-shard and sequentially (S3-friendly, no random access per sample) but decodes only its
offsets. Its streams are dealt round-robin to ``min(num_workers, streams)`` DataLoader workers (a
notice is logged when loader workers would idle). For every step, each loader worker decodes the
offsets of its streams into one *chunk* and yields it, so the DataLoader's round-robin hands the
main process, per step, one chunk from each worker in worker order; the main process puts the slots
in order and cuts them into ``layout.accumulation`` micro-batches (``layout.micro_batches(m)``). An
empty micro-batch (a world size that does not divide ``G``, with fewer slots than micro-batches)
becomes a stand-in holding the rank's first sample of the step, ``padding=True``: the trainer runs
it with loss weight 0 to keep every rank in step.

**Exact resume.** ``start_step=k`` puts every stream at its position of step ``k``: the window is
located from the shard sample counts (``manifest/<split>_shards.parquet``, or one scan of the
shard), its bytes read, and only what is yielded is decoded. The micro-batches equal the
uninterrupted run's from step ``k`` on, for any number of loader workers (and any world size, slot
for slot).

**Bad data.** A slot whose sample fails to decode, or that a truncated shard no longer holds,
takes its stream's next good sample (with that sample's own crop and flip): the replacement is the
same whichever rank or worker reads the slot, so bad data does not break the invariants above, and
micro-batches keep their size. Each bad slot is counted once (by the rank owning it); truncated and
unreadable shards are counted per reading (a partial stream is read by two ranks). A stream with no
decodable image in as many samples as the dataset holds is an error. :attr:`StepBatches.counters`
has the totals.

**Memory.** Every stream keeps the raw bytes of the window it yields and of the next one, read ahead
by a thread: a loader worker holds ``2 x (its streams) x shuffle_buffer`` samples, ~220 MB per stream
for ImageNet's original JPEGs (~110 KB) at ``shuffle_buffer=1000``. Give each loader worker one
stream (``L = world size x loader workers``, the default of a new run) to keep it at two windows.

**Loader workers** decode into a ring of shared-memory buffers per worker (:class:`_BatchRing`, a
slot holds the largest chunk) and send only the slot number; the main process copies each
micro-batch out (to ``device``, or converting to float) and frees the slots after a step's last
micro-batch. Shared memory: workers x (prefetch_factor + 3) x largest chunk, e.g. 8 x 5 x 6.3 MB for
chunks of 32 images of 256 pixels.

**Decoding.** PIL's JPEG ``draft()`` (DCT-domain downscale to at least the target size) before the
bicubic resize of the shorter side to ``image_size``; training takes a random ``image_size`` crop
and a random horizontal flip, evaluation the center crop (the TiTok recipe). Images are float NCHW
in [0, 1], or with ``uint8=True`` the decoded bytes as uint8 NHWC: the trainer takes those and
converts them on its device with :func:`to_float_images` (a quarter of the bytes to copy, and no
conversion on the CPU cores the loader workers need). ``device`` is where batches are delivered.

**Decoded cache** (``decoded_cache_mb``, per loader worker; 0 = off, the default): a dataset small
enough to keep (the demo's, a small fine-tuning set) is decoded and resized once, not once an epoch
(:class:`DecodedCache`). The batches are the same bit for bit: the crop and flip still come from each
sample's own generator. At the demo's size on 2 cores a step then costs 0.85 to 0.87x (``python
bench/train_overhead.py --parts loader``).

**Evaluation** (:class:`ImageShardStream`, :func:`eval_batches`): one pass in shard order, center
crop, every sample once across ``world_size x max(1, num_workers)`` readers (shard-level split when
there are enough shards, every ``S``-th sample otherwise), batches of ``batch_size`` within a reader
(the last may be short); corrupt samples are skipped and counted.
"""

from __future__ import annotations

import concurrent.futures
import fnmatch
import functools
import hashlib
import io
import itertools
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from cluster import storage
from trainer.batch_layout import StepLayout
# Re-exported: other modules read shards through trainer.data.
from trainer.image_streams import (IMAGE_EXTENSIONS, RawSample, ReadCounters, SampleId, StreamPlan,  # noqa: F401
                                   StreamReader, image_bytes_of, tar_samples)

log = logging.getLogger(__name__)

_SHARD_NAME = re.compile(r"^(?P<split>.+)-\d+\.tar$")
_GLOB_CHARS = re.compile(r"[*?\[]")


class ImageBatch(NamedTuple):
    images: torch.Tensor   # float32 [B, 3, S, S] in [0, 1]; with ``uint8=True`` uint8 [B, S, S, 3]
    labels: torch.Tensor   # int64 [B]
    keys: list[str]        # sample keys (eval: exactly the images read; train: after replacements)
    step: int = 0          # train: the optimizer step the micro-batch belongs to
    micro: int = 0         # train: its index among the step's micro-batches of this rank
    padding: bool = False  # train: a stand-in for an empty micro-batch (one real sample; loss weight 0)


# ----------------------------------------------------------------------------------------------
# Shard lists and counts


def expand_shard_urls(shards: str | os.PathLike | Sequence[str]) -> list[str]:
    """Shard URLs from a brace pattern (``train-{000000..000009}.tar``), a glob (``dir/train-*.tar``),
    one ``.tar``, a directory/prefix holding one split's shards, or a list of any of these."""
    from webdataset.shardlists import expand_urls

    if isinstance(shards, os.PathLike):
        shards = os.fspath(shards)
    if not isinstance(shards, str):
        return sorted({url for item in shards for url in expand_shard_urls(item)})
    urls: list[str] = []
    for url in expand_urls(shards):
        if _GLOB_CHARS.search(url):
            folder, _, pattern = url.rpartition("/")
            found = [f.url for f in storage.list_files(folder) if fnmatch.fnmatchcase(f.url.rsplit("/", 1)[-1], pattern)
                     and f.url.rsplit("/", 1)[0] == folder.rstrip("/")]
            urls.extend(found)
        elif url.endswith(".tar"):
            urls.append(url)
        else:
            urls.extend(_shards_in_folder(url))
    if not urls:
        raise FileNotFoundError(f"no shards match {shards!r}")
    return sorted(set(urls))


def _shards_in_folder(folder: str) -> list[str]:
    folder = folder.rstrip("/")
    found = [f.url for f in storage.list_files(folder)
             if f.url.endswith(".tar") and f.url.rsplit("/", 1)[0] == folder]
    splits = sorted({m.group("split") for u in found if (m := _SHARD_NAME.match(u.rsplit("/", 1)[-1]))})
    if len(splits) > 1:
        raise ValueError(f"{folder} holds shards of several splits ({', '.join(splits)}); "
                         f"name one, e.g. {folder}/{splits[0]}-*.tar")
    return found


def shard_sample_counts(urls: Sequence[str]) -> list[int]:
    """Samples per shard from the manifests next to the shards; shards without one are scanned once."""
    from data_prep.manifest import shard_sample_counts as manifest_counts

    counts: list[int | None] = [None] * len(urls)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, url in enumerate(urls):
        folder, _, name = url.rpartition("/")
        match = _SHARD_NAME.match(name)
        if match:
            groups.setdefault((folder, match.group("split")), []).append(i)
    for (folder, split), indices in groups.items():
        try:
            known = manifest_counts(folder, split) or {}
        except Exception as err:  # noqa: BLE001 - a damaged manifest only costs a scan
            log.warning("cannot read the shard manifest in %s (%s); counting samples by scanning", folder, err)
            known = {}
        for i in indices:
            counts[i] = known.get(urls[i].rsplit("/", 1)[-1])
    missing = [i for i, c in enumerate(counts) if c is None]
    if missing:
        log.warning("no manifest counts for %d shard(s) (e.g. %s); scanning them once", len(missing), urls[missing[0]])
        for i in missing:
            counts[i] = _scan_count(urls[i])
    return [int(c) for c in counts]  # type: ignore[arg-type]


def _scan_count(url: str) -> int:
    samples = 0
    try:
        for _ in tar_samples(url, want=lambda index: False):
            samples += 1
    except Exception as err:  # noqa: BLE001
        log.warning("shard %s unreadable while counting its samples (%s)", url, err)
    return samples


# ----------------------------------------------------------------------------------------------
# Decoding and augmentation (the TiTok recipe)


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(w, h) with the shorter side ``shorter`` (torchvision ``Resize(int)``'s rounding)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def decode_resized(data: bytes, size: int, draft: bool = True) -> Image.Image:
    """Decode to RGB with the shorter side resized to ``size`` (bicubic, antialiased).

    With ``draft`` a JPEG is first decoded at the smallest DCT scale (1/2, 1/4, 1/8) that stays at or
    above the target size, which skips most of the decoding work for large images."""
    image = Image.open(io.BytesIO(data))
    target = resized_size(*image.size, size)
    if draft and image.format == "JPEG":
        image.draft(image.mode, target)
    if image.mode != "RGB":  # convert() of an RGB image would only copy it
        image = image.convert("RGB")
    if image.size != target:
        image = image.resize(target, Image.Resampling.BICUBIC)
    return image


def random_crop_flip(image: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``size`` x ``size`` crop, flipped horizontally with probability 1/2; HWC uint8.

    Cropped and flipped by PIL: copying a flipped numpy view costs ~4x more (3-byte pixels)."""
    w, h = image.size
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    crop = image.crop((left, top, left + size, top + size))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop)


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    pixels = np.asarray(image)
    h, w = pixels.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return pixels[top:top + size, left:left + size]


class DecodedCache:
    """Resized decodes of training images kept in memory, up to ``budget_mb`` (``data.decoded_cache_mb``).

    ``decode(data)`` is ``decode_resized(data, size, draft)``, computed once per distinct image while the
    budget lasts. Keyed by a digest of the encoded bytes, so a hit returns what decoding these bytes
    gives, whatever the sample's key or shard. When full it keeps what it holds and decodes the rest:
    training reads every sample once an epoch, and under that cyclic order evicting one image for
    another never raises the hit rate (LRU would drop every image just before its next use). An image
    that fails to decode raises as before and is not kept."""

    def __init__(self, size: int, draft: bool = True, budget_mb: float = 0.0) -> None:
        if budget_mb < 0:
            raise ValueError(f"the decoded cache budget must be >= 0 MB, got {budget_mb}")
        self.size, self.draft, self.budget = size, draft, int(budget_mb * 2**20)
        self._images: dict[bytes, Image.Image] = {}
        self.bytes = self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._images)

    def decode(self, data: bytes) -> Image.Image:
        if not self.budget:
            return decode_resized(data, self.size, self.draft)
        digest = hashlib.blake2b(data, digest_size=16).digest()
        image = self._images.get(digest)
        if image is not None:
            self.hits += 1
            return image
        self.misses += 1
        image = decode_resized(data, self.size, self.draft)
        cost = image.width * image.height * len(image.getbands())
        if self.bytes + cost <= self.budget:
            image.load()   # one that needed no resize is still lazy: decode it now, once (PIL then drops its bytes)
            self._images[digest] = image
            self.bytes += cost
        return image


# ----------------------------------------------------------------------------------------------
# Shared memory and delivery


@dataclass(frozen=True)
class _RingRef:
    """Stands for a batch's images in the loader-worker -> main process message: slot ``slot`` of
    worker ``worker``'s ring, first ``count`` images."""

    worker: int
    slot: int
    count: int


class _BatchRing:
    """Pixel buffers in shared memory that the loader workers fill and the main process empties, each
    worker a ring of ``slots``: a classic bounded ring buffer.

    Worker ``w`` decodes its ``j``-th batch into slot ``j % slots`` once the main process has released
    its batch ``j - slots`` (the main process counts what it released, per worker, in shared memory
    too). Fresh shared memory for every batch cost the workers ~6% of their time in page faults. With
    ``slots`` above the DataLoader's prefetch depth plus what the main process holds, a worker never
    waits in practice; the wait is the guarantee, not the flow control."""

    def __init__(self, workers: int, slots: int, batch_size: int, size: int) -> None:
        self.slots, self.batch_size, self.main_pid = slots, batch_size, os.getpid()
        self.pixels = torch.empty((workers, slots, batch_size, size, size, 3), dtype=torch.uint8).share_memory_()
        self.taken = torch.zeros(workers, dtype=torch.int64).share_memory_()

    def acquire(self, worker: int, number: int) -> tuple[_RingRef, np.ndarray]:
        """Worker side: the slot for the worker's batch ``number`` (0, 1, ...), once it is free."""
        while number - int(self.taken[worker]) >= self.slots:
            try:
                os.kill(self.main_pid, 0)  # still there? (signal 0 only checks)
            except ProcessLookupError:
                raise RuntimeError("the main process of the data loader is gone") from None
            time.sleep(0.0005)
        slot = number % self.slots
        return _RingRef(worker, slot, self.batch_size), self.pixels[worker, slot].numpy()

    def view(self, ref: _RingRef) -> torch.Tensor:
        """Main process: the batch's pixels, valid until :meth:`release`."""
        return self.pixels[ref.worker, ref.slot, :ref.count]

    def release(self, ref: _RingRef) -> None:
        """Main process: the worker may reuse the slot (batches are released in order per worker)."""
        self.taken[ref.worker] += 1

    def take(self, ref: _RingRef, copy_out) -> torch.Tensor:
        """Main process: ``copy_out(view of the slot)`` (which must copy), then free the slot."""
        images = copy_out(self.view(ref))
        self.release(ref)
        return images


class _BatchBuffers:
    """Where a reader decodes its batches of ``count`` images: a fresh tensor per batch in the main
    process, its slots of the ring in a loader worker."""

    def __init__(self, ring: _BatchRing | None, worker: int, count: int, size: int) -> None:
        self._ring, self._worker, self._shape, self._number = ring, worker, (count, size, size, 3), 0

    def new(self) -> tuple[torch.Tensor | _RingRef, np.ndarray]:
        """(what the batch carries as its images, the [count, H, W, 3] uint8 array to decode into)."""
        if self._ring is None:
            images = torch.empty(self._shape, dtype=torch.uint8)
            return images, images.numpy()
        ref, pixels = self._ring.acquire(self._worker, self._number)
        self._number += 1
        count = self._shape[0]
        return _RingRef(ref.worker, ref.slot, count), pixels[:count]


def _first(images: torch.Tensor | _RingRef, count: int) -> torch.Tensor | _RingRef:
    return images[:count] if isinstance(images, torch.Tensor) else _RingRef(images.worker, images.slot, count)


class _LoaderDataset(torch.utils.data.IterableDataset):
    """Runs ``produce(loader worker id)`` in each DataLoader worker (worker 0: the main process)."""

    def __init__(self, produce: Callable[[int], Iterator]) -> None:
        self.produce = produce

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        return self.produce(info.id if info else 0)


def to_float_images(images: torch.Tensor, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> contiguous [B, 3, H, W] ``dtype`` in [0, 1] (``ToTensor``'s x / 255), on
    ``device`` (default: where ``images`` are). The uint8 bytes are copied first (non-blocking from
    pinned memory) and converted there, so a GPU does the conversion."""
    if device is not None:
        images = images.to(device, non_blocking=True)
    return images.permute(0, 3, 1, 2).to(dtype, memory_format=torch.contiguous_format).div_(255.0)


# ----------------------------------------------------------------------------------------------
# Training: the micro-batches of a rank's steps


class _Chunk(NamedTuple):
    """What a loader worker sends for one step: its streams' offsets of the step, decoded, in the
    order it was dealt the streams."""

    step: int
    worker: int
    images: torch.Tensor | _RingRef   # uint8 [n, S, S, 3]
    labels: np.ndarray                # int64 [n]: pickled inline (a tensor would cost a shared-memory
                                      # segment and a file-descriptor handover per step)
    keys: list[str]
    problems: dict                    # the worker's new problems since its previous chunk


def _runs(where: list[tuple[int, int]], slots: range) -> list[tuple[int, int, int]]:
    """(worker, start, stop) runs of chunk indices that hold ``slots`` (rank-relative), in order."""
    runs: list[tuple[int, int, int]] = []
    for slot in slots:
        worker, index = where[slot]
        if runs and runs[-1][0] == worker and runs[-1][2] == index:
            runs[-1] = (worker, runs[-1][1], index + 1)
        else:
            runs.append((worker, index, index + 1))
    return runs


class StepBatches:
    """Rank ``rank``'s micro-batches of steps ``start_step, start_step + 1, ...`` (endless, in order):
    an iterator of :class:`ImageBatch` with ``step``, ``micro`` and ``padding`` set. See the module
    docstring for the order, the loader workers and bad data; :attr:`counters` sums the problems.

    The batches come from a generator of :class:`_StepReader` that does not refer back to this
    object, so dropping it closes the generator and stops the loader workers at once (no cycle)."""

    def __init__(self, shards: str | Sequence[str], layout: StepLayout, rank: int, **options) -> None:
        self.reader = _StepReader(shards, layout, rank, **options)
        self.counters = ReadCounters()
        self._batches: Iterator[ImageBatch] | None = None

    @property
    def counts(self) -> list[int]:
        """Samples per shard, in shard order."""
        return self.reader.counts

    def __iter__(self) -> "StepBatches":
        return self

    def __next__(self) -> ImageBatch:
        if self._batches is None:
            self._batches = self.reader.batches(self.counters)
        return next(self._batches)

    def close(self) -> None:
        """Stop the loader workers now (dropping the object does too); iterating again starts over."""
        if self._batches is not None:
            self._batches.close()  # type: ignore[attr-defined]
            self._batches = None


class _StepReader:
    """Everything :class:`StepBatches` reads by: the rank's streams, their loader workers, the
    micro-batches' places in the workers' chunks."""

    def __init__(self, shards: str | Sequence[str], layout: StepLayout, rank: int, *, image_size: int,
                 num_workers: int, seed: int, shuffle_buffer: int, start_step: int = 0, draft: bool = True,
                 uint8: bool = False, device: str | torch.device = "cpu", prefetch_factor: int = 2,
                 decoded_cache_mb: float = 0.0) -> None:
        if image_size < 1 or num_workers < 0 or shuffle_buffer < 1 or start_step < 0 or decoded_cache_mb < 0:
            raise ValueError("image_size, shuffle_buffer >= 1 and num_workers, start_step, decoded_cache_mb >= 0 "
                             "are required")
        if not 0 <= rank < layout.world_size:
            raise ValueError(f"rank must be in [0, {layout.world_size}), got {rank}")
        self.urls = expand_shard_urls(shards)
        self.counts = shard_sample_counts(self.urls)
        if not sum(self.counts):
            raise ValueError(f"the shards hold no samples: {self.urls[:3]}{' ...' if len(self.urls) > 3 else ''}")
        self.layout, self.rank, self.start_step = layout, rank, start_step
        self.first_position = layout.slot_source(start_step, 0)[1]   # every stream's position at the start
        self.image_size, self.seed, self.shuffle_buffer, self.draft = image_size, seed, shuffle_buffer, draft
        self.uint8, self.device, self.prefetch_factor = uint8, torch.device(device), prefetch_factor
        self.decoded_cache_mb = decoded_cache_mb

        streams = layout.rank_streams(rank)
        self.loader_workers = min(num_workers, len(streams))
        if num_workers > len(streams):
            log.warning("rank %d reads %d stream(s): %d of its %d loader workers would idle, %d started "
                        "(data.streams sets the streams of a new run)", rank, len(streams),
                        num_workers - len(streams), num_workers, len(streams))
        parts = max(1, self.loader_workers)
        self.assignment = [streams[w::parts] for w in range(parts)]   # loader worker -> its (stream, offsets)
        self.chunk_sizes = [sum(len(offsets) for _, offsets in mine) for mine in self.assignment]
        where: list[tuple[int, int]] = []   # (loader worker, index in its chunk) of each slot of the rank
        filled = [0] * parts
        for k, (_, offsets) in enumerate(streams):
            where.extend((k % parts, filled[k % parts] + i) for i in range(len(offsets)))
            filled[k % parts] += len(offsets)
        first = layout.rank_slots(rank).start
        # Each micro-batch: its (worker, start, stop) chunk runs, and whether it is a padding stand-in.
        self._micro_runs = [(_runs(where, range(r.start - first, r.stop - first)), False) if r
                            else (_runs(where, range(0, 1)), True) for r in layout.micro_batches(rank)]

    # --- main process ---------------------------------------------------------------------------
    def batches(self, counters: ReadCounters) -> Iterator[ImageBatch]:
        """The micro-batches from ``start_step`` on; the problems met are added to ``counters``."""
        workers = self.loader_workers
        # Slots per worker: the DataLoader's prefetch depth, the chunk being decoded, the one the main
        # process is cutting into micro-batches, and one spare.
        ring = (_BatchRing(workers, self.prefetch_factor + 3, max(self.chunk_sizes), self.image_size)
                if workers else None)
        loader = torch.utils.data.DataLoader(
            _LoaderDataset(functools.partial(self._worker_chunks, ring=ring)), batch_size=None, num_workers=workers,
            prefetch_factor=self.prefetch_factor if workers else None)
        chunks = iter(loader)
        last = len(self._micro_runs) - 1
        for step in itertools.count(self.start_step):
            got: list[_Chunk] = [next(chunks) for _ in self.assignment]
            for w, chunk in enumerate(got):
                if (chunk.step, chunk.worker) != (step, w):
                    raise RuntimeError(f"loader chunks out of order: expected step {step} of worker {w}, got step "
                                       f"{chunk.step} of worker {chunk.worker}")
                if any(chunk.problems.values()):
                    counters.add(chunk.problems)
                    log.warning("data problems so far (rank %d): %s", self.rank, asdict(counters))
            views = [ring.view(c.images) if ring is not None else c.images for c in got]
            for micro, (runs, padding) in enumerate(self._micro_runs):
                images = self._deliver([views[w][lo:hi] for w, lo, hi in runs])
                labels = torch.from_numpy(np.concatenate([got[w].labels[lo:hi] for w, lo, hi in runs]))
                keys = [key for w, lo, hi in runs for key in got[w].keys[lo:hi]]
                if micro == last and ring is not None:
                    for chunk in got:  # every micro-batch of the step is copied out
                        ring.release(chunk.images)
                yield ImageBatch(images, labels, keys, step, micro, padding)

    def _deliver(self, views: list[torch.Tensor]) -> torch.Tensor:
        """A micro-batch from uint8 views of chunks (ring slots, reused once released): copied out, on
        ``device``, as uint8 or float NCHW in [0, 1] (workers ship uint8, a quarter of the bytes; a GPU
        converts them itself). Copies to another device are blocking, so the slots are free after."""
        if not self.uint8 and len(views) == 1:
            return to_float_images(views[0].to(self.device))  # on the CPU the conversion is the copy
        out = torch.empty((sum(len(v) for v in views), *views[0].shape[1:]), dtype=torch.uint8, device=self.device)
        at = 0
        for view in views:
            out[at:at + len(view)].copy_(view)
            at += len(view)
        return out if self.uint8 else to_float_images(out)

    # --- loader workers -------------------------------------------------------------------------
    def _worker_chunks(self, worker: int, ring: _BatchRing | None) -> Iterator[_Chunk]:
        """Loader worker ``worker``: one chunk per step, its streams' offsets in dealt order."""
        storage.register_webdataset_s3()
        mine, size = self.assignment[worker], self.chunk_sizes[worker]
        buffers = _BatchBuffers(ring, worker, size, self.image_size)
        decoded = DecodedCache(self.image_size, self.draft, self.decoded_cache_mb)   # this worker's own
        plan = StreamPlan(self.counts, self.layout.streams, self.seed, self.shuffle_buffer)
        q = self.layout.per_stream
        problems, reported = ReadCounters(), asdict(ReadCounters())
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(mine)) as pool:
            readers = [(StreamReader(self.urls, plan, stream, self.first_position, pool, problems), offsets)
                       for stream, offsets in mine]
            for step in itertools.count(self.start_step):
                images, pixels = buffers.new()
                labels = np.empty(size, np.int64)
                keys: list[str] = []
                for reader, offsets in readers:
                    piece = reader.take(q)   # every stream moves by q samples a step, read or not
                    for offset in offsets:
                        key, label = self._fill(reader, piece, offset, pixels[len(keys)], problems, decoded)
                        labels[len(keys)] = label
                        keys.append(key)
                totals = asdict(problems)
                yield _Chunk(step, worker, images, labels, keys,
                             {name: value - reported[name] for name, value in totals.items()})
                reported = totals

    def _fill(self, reader: StreamReader, piece: list[tuple[SampleId, RawSample | None]], offset: int,
              out: np.ndarray, problems: ReadCounters, decoded: DecodedCache) -> tuple[str, int]:
        """Decode the sample at ``offset`` of a stream's piece of a step into ``out``; (key, label).

        A missing or undecodable sample is counted here (the slot belongs to this rank alone) and
        replaced by the stream's next good sample, which depends on nothing but the stream."""
        sample_id, raw = piece[offset]
        if raw is not None and (label := self._decode(reader.stream, sample_id, raw, out, decoded)) is not None:
            return raw.key, label
        if raw is None:
            problems.missing_samples += 1
        else:
            problems.corrupt_samples += 1
        limit = sum(self.counts)
        for next_id, candidate in itertools.islice(itertools.chain(piece[offset + 1:], reader.ahead()), limit):
            if candidate is None:
                continue
            if (label := self._decode(reader.stream, next_id, candidate, out, decoded)) is not None:
                return candidate.key, label
        raise RuntimeError(f"stream {reader.stream} has no decodable image in {limit} samples in a row; check the "
                           f"shards ({self.urls[0]} ...)")

    def _decode(self, stream: int, sample_id: SampleId, raw: RawSample, out: np.ndarray,
                decoded: DecodedCache) -> int | None:
        """Decode, crop and flip ``raw`` into ``out`` (its own seeded crop and flip); its label, or None
        when it does not decode (it is then marked bad and its bytes dropped)."""
        if raw.bad:
            return None
        try:
            label = int(raw.label)  # type: ignore[arg-type]
            epoch, window, position = sample_id
            rng = np.random.default_rng([self.seed, epoch, stream, window, position, 3])
            out[:] = random_crop_flip(decoded.decode(raw.image), self.image_size, rng)  # type: ignore[arg-type]
        except Exception as err:  # noqa: BLE001 - a bad sample never stops training
            raw.bad, raw.image = True, None
            log.warning("sample %s undecodable (%s: %s); its slot takes its stream's next good sample", raw.key,
                        type(err).__name__, err)
            return None
        return label


def step_batches(shards: str | Sequence[str], layout: StepLayout, rank: int, *, image_size: int, num_workers: int,
                 seed: int, shuffle_buffer: int, start_step: int = 0, draft: bool = True, uint8: bool = False,
                 device: str | torch.device = "cpu", decoded_cache_mb: float = 0.0) -> StepBatches:
    """Rank ``rank``'s training micro-batches, ``layout.accumulation`` per step, from ``start_step`` on
    (endless); the same samples per step whatever the world size and loader workers (module docstring)."""
    return StepBatches(shards, layout, rank, image_size=image_size, num_workers=num_workers, seed=seed,
                       shuffle_buffer=shuffle_buffer, start_step=start_step, draft=draft, uint8=uint8, device=device,
                       decoded_cache_mb=decoded_cache_mb)


# ----------------------------------------------------------------------------------------------
# Evaluation: one pass in shard order


class ImageShardStream:
    """Evaluation batches of decoded, center-cropped images from WebDataset shards: one pass in a fixed
    order, the last batch may be short, every sample of the shards exactly once across the
    ``world_size`` ranks (each split among ``max(1, num_workers)`` readers)."""

    def __init__(self, shards: str | Sequence[str], *, image_size: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, draft: bool = True, pin_memory: bool | None = None,
                 prefetch_factor: int = 2, uint8: bool = False, device: str | torch.device = "cpu") -> None:
        if image_size < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError("image_size, batch_size >= 1 and num_workers >= 0 are required")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.urls = expand_shard_urls(shards)
        self.image_size, self.batch_size = image_size, batch_size
        self.rank, self.world_size, self.num_workers, self.draft = rank, world_size, num_workers, draft
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor, self.uint8, self.device = prefetch_factor, uint8, torch.device(device)
        self.streams_per_rank = max(1, num_workers)
        self.num_streams = world_size * self.streams_per_rank
        self.counters = ReadCounters()

    def iter_batches(self) -> Iterator[ImageBatch]:
        """This rank's batches, once."""
        # Slots per worker: the DataLoader's prefetch depth, the batch being decoded, the one a worker
        # holds back, and one spare.
        ring = (_BatchRing(self.num_workers, self.prefetch_factor + 3, self.batch_size, self.image_size)
                if self.num_workers else None)
        loader = torch.utils.data.DataLoader(
            _LoaderDataset(functools.partial(self._worker_batches, ring=ring)), batch_size=None,
            num_workers=self.num_workers, pin_memory=self.pin_memory and ring is None,
            prefetch_factor=self.prefetch_factor if self.num_workers else None)
        for batch, problems in loader:
            if any(problems.values()):
                self.counters.add(problems)
                log.warning("data problems so far (rank %d): %s", self.rank, asdict(self.counters))
            images = batch.images
            if isinstance(images, _RingRef):
                images = ring.take(images, lambda view: self._deliver(view, copy=True))  # type: ignore[union-attr]
            else:
                images = self._deliver(images, copy=False)
            yield batch._replace(images=images)

    def __iter__(self) -> Iterator[ImageBatch]:
        return self.iter_batches()

    def _deliver(self, images: torch.Tensor, copy: bool) -> torch.Tensor:
        """The consumer's batch from uint8 pixels: as they are, or float NCHW in [0, 1], on ``device``.
        ``copy``: the pixels are a ring slot, which the worker reuses as soon as this returns."""
        if images.device != self.device:
            images, copy = images.to(self.device), False  # a blocking copy: the slot is free after it
        if self.uint8:
            return images.clone() if copy else images
        return to_float_images(images)

    def _worker_batches(self, worker: int, ring: _BatchRing | None) -> Iterator[tuple[ImageBatch, dict]]:
        storage.register_webdataset_s3()
        buffers = _BatchBuffers(ring, worker, self.batch_size, self.image_size)
        yield from self._eval_batches(self.rank * self.streams_per_rank + worker, buffers)

    def _eval_batches(self, stream: int, buffers: _BatchBuffers) -> Iterator[tuple[ImageBatch, dict]]:
        """This stream's samples in shard order (shard-level split, or every ``S``-th sample).

        A finished batch is held back until the next one is full, so that problems met after the
        last batch still reach the main process with it."""
        streams, size, batch_size = self.num_streams, self.image_size, self.batch_size
        shard_level = len(self.urls) >= streams
        urls = self.urls[stream::streams] if shard_level else self.urls
        problems = ReadCounters()
        held: tuple[torch.Tensor | _RingRef, list[int], list[str]] | None = None
        images, pixels = buffers.new()
        labels: list[int] = []
        keys: list[str] = []
        before = 0  # samples in the shards before this one (sample-level split)

        def emit(batch: tuple[torch.Tensor | _RingRef, list[int], list[str]]) -> tuple[ImageBatch, dict]:
            nonlocal problems
            out = ImageBatch(batch[0], torch.tensor(batch[1], dtype=torch.int64), batch[2]), asdict(problems)
            problems = ReadCounters()
            return out

        for url in urls:
            want = (lambda i: True) if shard_level else (lambda i, b=before: (b + i) % streams == stream)
            seen = 0
            try:
                for index, key, files in tar_samples(url, want):
                    seen = index + 1
                    if not want(index):
                        continue
                    try:
                        label = int(files["cls"])
                        pixels[len(keys)] = center_crop(decode_resized(image_bytes_of(files), size, self.draft), size)  # type: ignore[arg-type]
                    except Exception as err:  # noqa: BLE001
                        problems.corrupt_samples += 1
                        log.warning("sample %s undecodable (%s: %s); skipped", key, type(err).__name__, err)
                        continue
                    labels.append(label)
                    keys.append(key)
                    if len(keys) == batch_size:
                        if held is not None:
                            yield emit(held)
                        held, labels, keys = (images, labels, keys), [], []
                        images, pixels = buffers.new()
            except Exception as err:  # noqa: BLE001
                if seen == 0:
                    problems.unreadable_shards += 1
                else:
                    problems.truncated_shards += 1
                log.warning("shard %s unreadable after %d samples (%s: %s)", url, seen, type(err).__name__, err)
            before += seen
        if keys:
            if held is not None:
                yield emit(held)
            held = (_first(images, len(keys)), labels, keys)
        if held is not None:
            yield emit(held)
        elif problems.any():
            log.warning("stream %d yielded no image; its data problems: %s", stream, asdict(problems))



def eval_batches(shards: str | Sequence[str], *, batch_size: int, image_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, draft: bool = True, uint8: bool = False,
                 device: str | torch.device = "cpu") -> Iterator[ImageBatch]:
    """This rank's share of the shards, once, center-cropped, with keys (see :class:`ImageShardStream`)."""
    stream = ImageShardStream(shards, image_size=image_size, batch_size=batch_size, rank=rank, world_size=world_size,
                              num_workers=num_workers, draft=draft, uint8=uint8, device=device)
    return stream.iter_batches()
