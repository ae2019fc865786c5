"""Streaming reader of image shards (``data_prep/shard.py`` output) for training and evaluation.

    stream = ImageShardStream("s3://bucket/imagenet/train-{000000..001281}.tar", image_size=256,
                              batch_size=32, rank=rank, world_size=world, num_workers=8, seed=0)
    for batch in stream.iter_batches(start_batch=step):   # ImageBatch(images, labels, keys)
        ...

**Streams.** The ``world_size x max(1, num_workers)`` DataLoader workers of a job are *streams*.
Each epoch ``e`` permutes the shards with ``(seed, e)``; with at least as many shards as streams,
stream ``j`` reads shards ``perm[j::S]``, otherwise every stream reads every shard and keeps the
samples whose position in the epoch is ``j`` modulo ``S`` (still disjoint and complete).

**Shuffle and exact resume.** A stream groups its shards of an epoch into *windows* of at least
``shuffle_buffer`` samples and yields each window in a seeded permutation; crops and flips come from a
generator seeded by the sample's position. So the sample at any stream position is a pure function
of (seed, position, shard sample counts). The counts come from ``manifest/<split>_shards.parquet``
(or one scan of the shard). Resuming at batch ``k`` locates the window, reads its bytes (no decoding)
and decodes only what it yields: the batches equal the uninterrupted run's, as long as seed, batch
size, world size, worker count and shuffle_buffer are the same. Memory: each loader worker holds
the raw bytes of two windows (the one it yields and the next, read ahead), ~2 x shuffle_buffer x
110 KB for ImageNet's original JPEGs.

**DataLoader order.** Each worker batches its own stream; the DataLoader hands out worker batches
round-robin, so rank-local batch ``b`` is stream batch ``b // W`` of worker stream ``b % W``. After a
restart at ``b0``, loader worker ``i`` plays stream ``(b0 + i) % W``.

**Bad data.** A sample that fails to decode, or that a truncated shard no longer holds, is counted,
logged and replaced by another image of the same batch (batches keep their size and their step);
unreadable or truncated shards are counted as well. :attr:`ImageShardStream.counters` has the totals.

Decoding uses PIL's JPEG ``draft()`` (DCT-domain downscale to at least the target size) before the
bicubic resize of the shorter side to ``image_size``; train mode takes a random ``image_size`` crop
and a random horizontal flip, eval mode the center crop (the TiTok recipe). Images are float NCHW
in [0, 1], or with ``uint8=True`` the decoded bytes as uint8 NHWC: the trainer takes those and
converts them on its device with :func:`to_float_images` (a quarter of the bytes to copy, and no
conversion on the CPU cores the loader workers need). ``device`` is where batches are delivered.

**Loader workers** decode into a ring of shared-memory batch buffers per worker (:class:`_BatchRing`)
and send only the slot number; the main process copies each batch out (to ``device``, or converting
to float) and frees the slot. Shared memory: workers x (prefetch_factor + 3) x batch bytes
(uint8), e.g. 8 x 5 x 6.3 MB for batches of 32 images of 256 pixels.
"""

from __future__ import annotations

import concurrent.futures
import fnmatch
import io
import logging
import os
import re
import tarfile
import time
from dataclasses import asdict, dataclass, fields
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from cluster import storage

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_SHARD_NAME = re.compile(r"^(?P<split>.+)-\d+\.tar$")
_GLOB_CHARS = re.compile(r"[*?\[]")


class ImageBatch(NamedTuple):
    images: torch.Tensor   # float32 [B, 3, S, S] in [0, 1]; with ``uint8=True`` uint8 [B, S, S, 3]
    labels: torch.Tensor   # int64 [B]
    keys: list[str]        # sample keys (eval: exactly the images read; train: after replacements)


@dataclass
class ReadCounters:
    """Problems met while reading (events: a truncated shard read by two streams counts twice)."""

    corrupt_samples: int = 0     # image or label that could not be decoded
    missing_samples: int = 0     # expected from the shard counts but absent (truncated shard)
    truncated_shards: int = 0
    unreadable_shards: int = 0

    def add(self, other: "ReadCounters | dict") -> None:
        values = other if isinstance(other, dict) else asdict(other)
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + values.get(f.name, 0))

    def any(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))


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
# Reading tar shards


def _open(url: str):
    import webdataset

    storage.register_webdataset_s3()
    return webdataset.gopen(url, "rb")


def _tar_mode(stream) -> str:
    """Random access for files (half the CPU of stream mode per member, and skipped members are
    seeked over, not read); stream mode for anything else (S3 bodies, pipes)."""
    try:
        return "r:" if stream.seekable() else "r|"
    except (AttributeError, OSError, ValueError):
        return "r|"


def tar_samples(url: str, want) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(index, key, {extension: bytes}) for every sample of a shard, in order; the files are read
    only for samples ``want(index)`` accepts (tar stream mode skips the others' bytes).
    Raises on I/O and tar errors after yielding what was readable."""
    from webdataset.tariterators import base_plus_ext

    index, key, files, keep = -1, None, {}, False
    with _open(url) as stream, tarfile.open(fileobj=stream, mode=_tar_mode(stream)) as tar:
        for info in tar:
            if not info.isfile():
                continue
            member_key, ext = base_plus_ext(info.name)
            if member_key is None:
                continue
            if member_key != key:
                if key is not None:
                    yield index, key, files
                index, key, files = index + 1, member_key, {}
                keep = want(index)
            if keep:
                files[ext.lower()] = tar.extractfile(info).read()  # type: ignore[union-attr]
    if key is not None:
        yield index, key, files


@dataclass(frozen=True)
class _Segment:
    """The part of one shard that a stream reads in one epoch."""

    shard: int
    keep: tuple[int, ...] | None   # sample indices within the shard; None: the first ``count``
    count: int


@dataclass
class _Sample:
    key: str
    image: bytes | None
    label: bytes | None


def image_bytes_of(files: dict[str, bytes]) -> bytes | None:
    return next((files[ext] for ext in IMAGE_EXTENSIONS if ext in files), None)


def _read_segment(url: str, seg: _Segment, counters: ReadCounters) -> list[_Sample | None]:
    """One slot per expected sample of ``seg``; None where the shard no longer holds it."""
    slots: list[_Sample | None] = [None] * seg.count
    position = {index: p for p, index in enumerate(seg.keep)} if seg.keep is not None else None
    want = (lambda i: i < seg.count) if position is None else position.__contains__
    found = 0
    try:
        for index, key, files in tar_samples(url, want):
            if not want(index):
                continue
            slots[index if position is None else position[index]] = _Sample(key, image_bytes_of(files), files.get("cls"))
            found += 1
            if found == seg.count:
                break
    except Exception as err:  # noqa: BLE001 - unreadable or truncated shards are counted, never fatal
        if found == 0:
            counters.unreadable_shards += 1
            log.warning("shard %s unreadable (%s: %s); its %d samples are skipped", url, type(err).__name__, err, seg.count)
        else:
            counters.truncated_shards += 1
            log.warning("shard %s truncated after %d samples (%s: %s)", url, found, type(err).__name__, err)
    else:
        if found < seg.count:
            counters.truncated_shards += 1
            log.warning("shard %s holds %d of its %d expected samples", url, found, seg.count)
    counters.missing_samples += seg.count - found
    return slots


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

    Worker ``w`` decodes its ``j``-th batch into slot ``j % slots`` once the main process has taken
    out its batch ``j - slots`` (the main process counts what it took, per worker, in shared memory
    too). Fresh shared memory for every batch cost the workers ~6% of their time in page faults. With
    ``slots`` above the DataLoader's prefetch depth plus the one batch a worker holds back, a worker
    never waits in practice; the wait is the guarantee, not the flow control."""

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

    def take(self, ref: _RingRef, copy_out) -> torch.Tensor:
        """Main process: ``copy_out(view of the slot)`` (which must copy), then free the slot."""
        images = copy_out(self.pixels[ref.worker, ref.slot, :ref.count])
        self.taken[ref.worker] += 1
        return images


class _BatchBuffers:
    """Where one stream decodes its batches: a fresh tensor per batch in the main process, its slots
    of the ring in a loader worker."""

    def __init__(self, ring: _BatchRing | None, worker: int, batch_size: int, size: int) -> None:
        self._ring, self._worker, self._shape, self._number = ring, worker, (batch_size, size, size, 3), 0

    def new(self) -> tuple[torch.Tensor | _RingRef, np.ndarray]:
        """(what the batch carries as its images, the [B, H, W, 3] uint8 array to decode into)."""
        if self._ring is None:
            images = torch.empty(self._shape, dtype=torch.uint8)
            return images, images.numpy()
        ref, pixels = self._ring.acquire(self._worker, self._number)
        self._number += 1
        return ref, pixels


def _first(images: torch.Tensor | _RingRef, count: int) -> torch.Tensor | _RingRef:
    return images[:count] if isinstance(images, torch.Tensor) else _RingRef(images.worker, images.slot, count)


def to_float_images(images: torch.Tensor, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> contiguous [B, 3, H, W] ``dtype`` in [0, 1] (``ToTensor``'s x / 255), on
    ``device`` (default: where ``images`` are). The uint8 bytes are copied first (non-blocking from
    pinned memory) and converted there, so a GPU does the conversion."""
    if device is not None:
        images = images.to(device, non_blocking=True)
    return images.permute(0, 3, 1, 2).to(dtype, memory_format=torch.contiguous_format).div_(255.0)


# ----------------------------------------------------------------------------------------------
# Which samples each stream reads


class _StreamPlan:
    """Epoch ``e`` of stream ``j``: its shard segments, grouped into shuffle windows."""

    def __init__(self, counts: Sequence[int], num_streams: int, seed: int, window: int) -> None:
        self.counts, self.num_streams, self.seed, self.window = list(counts), num_streams, seed, window
        self._cache: dict[tuple[int, int], list[list[_Segment]]] = {}

    def shard_order(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.counts)).tolist()

    def segments(self, epoch: int, stream: int) -> list[_Segment]:
        order, streams = self.shard_order(epoch), self.num_streams
        if len(order) >= streams:  # shard-level split
            return [_Segment(s, None, self.counts[s]) for s in order[stream::streams] if self.counts[s] > 0]
        out, before = [], 0  # sample-level split: every stream reads every shard
        for s in order:
            keep = tuple(range((stream - before) % streams, self.counts[s], streams))
            if keep:
                out.append(_Segment(s, keep, len(keep)))
            before += self.counts[s]
        return out

    def windows(self, epoch: int, stream: int) -> list[list[_Segment]]:
        key = (epoch, stream)
        if key not in self._cache:
            windows: list[list[_Segment]] = [[]]
            filled = 0
            for seg in self.segments(epoch, stream):
                if filled >= self.window:
                    windows.append([])
                    filled = 0
                windows[-1].append(seg)
                filled += seg.count
            self._cache = {k: v for k, v in self._cache.items() if k[0] >= epoch - 1}
            self._cache[key] = windows if windows[0] else []
        return self._cache[key]

    def locate(self, stream: int, position: int) -> tuple[int, int, int]:
        """(epoch, window, offset in window) of a stream position."""
        epoch, empty_epochs = 0, 0
        while True:
            windows = self.windows(epoch, stream)
            length = sum(seg.count for w in windows for seg in w)
            if length == 0:
                empty_epochs += 1
                if empty_epochs > 1000:
                    raise ValueError(f"stream {stream} gets no samples (are the shards empty?)")
            elif position < length:
                for w, segs in enumerate(windows):
                    size = sum(seg.count for seg in segs)
                    if position < size:
                        return epoch, w, position
                    position -= size
            else:
                position -= length
            epoch += 1

    def window_sequence(self, stream: int, epoch: int, window: int) -> Iterator[tuple[int, int, list[_Segment]]]:
        while True:
            windows = self.windows(epoch, stream)
            for w in range(window, len(windows)):
                yield epoch, w, windows[w]
            epoch, window = epoch + 1, 0


# ----------------------------------------------------------------------------------------------
# The stream


class ImageShardStream:
    """Batches of decoded, augmented images from WebDataset shards (see the module docstring).

    ``train=True``: endless, shuffled, random crop + flip, resumable with ``iter_batches(start_batch)``.
    ``train=False``: one pass in a fixed order, center crop, the last batch may be short, every sample
    of the shards exactly once across ``world_size`` ranks.
    """

    def __init__(self, shards: str | Sequence[str], *, image_size: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, train: bool = True, seed: int = 0,
                 shuffle_buffer: int = 1000, draft: bool = True, pin_memory: bool | None = None,
                 prefetch_factor: int = 2, uint8: bool = False, device: str | torch.device = "cpu") -> None:
        if image_size < 1 or batch_size < 1 or num_workers < 0 or shuffle_buffer < 1:
            raise ValueError("image_size, batch_size, shuffle_buffer >= 1 and num_workers >= 0 are required")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.urls = expand_shard_urls(shards)
        self.image_size, self.batch_size = image_size, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.train, self.seed, self.shuffle_buffer, self.draft = train, seed, shuffle_buffer, draft
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor, self.uint8, self.device = prefetch_factor, uint8, torch.device(device)
        self.streams_per_rank = max(1, num_workers)
        self.num_streams = world_size * self.streams_per_rank
        self.counts = shard_sample_counts(self.urls) if train else None
        if train and not sum(self.counts or ()):
            raise ValueError(f"the shards hold no samples: {self.urls[:3]}{' ...' if len(self.urls) > 3 else ''}")
        self.counters = ReadCounters()

    # --- main process ---------------------------------------------------------------------------
    def iter_batches(self, start_batch: int = 0) -> Iterator[ImageBatch]:
        """Rank-local batches from batch ``start_batch`` on (train), or all of this rank's samples (eval)."""
        if start_batch < 0 or (start_batch and not self.train):
            raise ValueError("start_batch must be >= 0, and 0 for an eval stream")
        # Slots per worker: the DataLoader's prefetch depth, the batch being decoded, the one an eval
        # worker holds back, and one spare.
        ring = (_BatchRing(self.num_workers, self.prefetch_factor + 3, self.batch_size, self.image_size)
                if self.num_workers else None)
        loader = torch.utils.data.DataLoader(
            _LoaderDataset(self, start_batch, ring), batch_size=None, num_workers=self.num_workers,
            pin_memory=self.pin_memory and ring is None,
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

    def _deliver(self, images: torch.Tensor, copy: bool) -> torch.Tensor:
        """The consumer's batch from uint8 pixels: as they are, or float NCHW in [0, 1], on ``device``
        (workers ship uint8, a quarter of the bytes; a GPU converts them itself). ``copy``: the pixels
        are a ring slot, which the worker reuses as soon as this returns."""
        if images.device != self.device:
            images, copy = images.to(self.device), False  # a blocking copy: the slot is free after it
        if self.uint8:
            return images.clone() if copy else images
        return to_float_images(images)

    def __iter__(self) -> Iterator[ImageBatch]:
        return self.iter_batches(0)

    # --- loader workers -------------------------------------------------------------------------
    def _worker_batches(self, worker: int, start_batch: int, ring: _BatchRing | None
                        ) -> Iterator[tuple[ImageBatch, dict]]:
        storage.register_webdataset_s3()
        buffers = _BatchBuffers(ring, worker, self.batch_size, self.image_size)
        if not self.train:
            yield from self._eval_batches(self.rank * self.streams_per_rank + worker, buffers)
            return
        w = self.streams_per_rank
        stream = self.rank * w + (start_batch + worker) % w
        yield from self._train_batches(stream, (start_batch + worker) // w, buffers)

    def _train_samples(self, plan: _StreamPlan, stream: int, position: int, problems: ReadCounters
                       ) -> Iterator[tuple[tuple[int, int, int], _Sample | None]]:
        """(sample id, raw sample) from a stream position on; the next window is read ahead."""
        epoch, window, offset = plan.locate(stream, position)
        windows = plan.window_sequence(stream, epoch, window)

        def read(segments: list[_Segment]) -> tuple[list[_Sample | None], ReadCounters]:
            counters = ReadCounters()
            samples = [s for seg in segments for s in _read_segment(self.urls[seg.shard], seg, counters)]
            return samples, counters

        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            current = next(windows)
            pending = pool.submit(read, current[2])
            while True:
                epoch, window, _ = current
                samples, counters = pending.result()
                problems.add(counters)
                current = next(windows)
                pending = pool.submit(read, current[2])
                order = np.random.default_rng([self.seed, epoch, stream, window, 2]).permutation(len(samples))
                for p in range(offset, len(samples)):
                    yield (epoch, window, p), samples[order[p]]
                offset = 0

    def _train_batches(self, stream: int, first_batch: int, buffers: _BatchBuffers
                       ) -> Iterator[tuple[ImageBatch, dict]]:
        plan = _StreamPlan(self.counts or [], self.num_streams, self.seed, self.shuffle_buffer)
        problems = ReadCounters()
        samples = self._train_samples(plan, stream, first_batch * self.batch_size, problems)
        size, batch_size = self.image_size, self.batch_size
        previous: tuple[np.ndarray, np.ndarray, list[str]] | None = None
        reported: dict[str, int] = {}
        while True:
            images, pixels = buffers.new()
            labels = np.empty(batch_size, np.int64)
            keys = [""] * batch_size
            good = []
            for b in range(batch_size):
                (epoch, window, p), sample = next(samples)
                if sample is None:
                    continue  # counted as missing when its shard was read
                try:
                    labels[b] = int(sample.label)  # type: ignore[arg-type]
                    rng = np.random.default_rng([self.seed, epoch, stream, window, p, 3])
                    pixels[b] = random_crop_flip(decode_resized(sample.image, size, self.draft), size, rng)  # type: ignore[arg-type]
                except Exception as err:  # noqa: BLE001 - a bad sample never stops training
                    problems.corrupt_samples += 1
                    log.warning("sample %s undecodable (%s: %s); replaced within its batch", sample.key,
                                type(err).__name__, err)
                    continue
                keys[b] = sample.key
                good.append(b)
            if not good:
                if previous is None:
                    raise RuntimeError(f"no decodable image in the first batch of stream {stream}; check the shards "
                                       f"({self.urls[0]} ...)")
                log.warning("stream %d: a whole batch was unusable; repeating the previous one", stream)
                pixels[:], labels[:], keys = previous[0], previous[1], list(previous[2])
            else:
                for n, b in enumerate(sorted(set(range(batch_size)) - set(good))):
                    source = good[n % len(good)]
                    pixels[b], labels[b], keys[b] = pixels[source], labels[source], keys[source]
            # The previous batch's buffer is not reused before this one is taken (ring order).
            batch, previous = ImageBatch(images, torch.from_numpy(labels), keys), (pixels, labels, keys)
            totals = asdict(problems)  # cumulative for this stream; the batch carries the increase
            yield batch, {name: value - reported.get(name, 0) for name, value in totals.items()}
            reported = totals

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


class _LoaderDataset(torch.utils.data.IterableDataset):
    def __init__(self, stream: ImageShardStream, start_batch: int, ring: _BatchRing | None) -> None:
        self.stream, self.start_batch, self.ring = stream, start_batch, ring

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        return self.stream._worker_batches(info.id if info else 0, self.start_batch, self.ring)


# ----------------------------------------------------------------------------------------------
# Shortcuts


def train_batches(shards: str | Sequence[str], *, batch_size: int, image_size: int, rank: int = 0,
                  world_size: int = 1, num_workers: int = 0, shuffle_buffer: int = 1000, seed: int = 0,
                  start_batch: int = 0, draft: bool = True, uint8: bool = False,
                  device: str | torch.device = "cpu") -> Iterator[ImageBatch]:
    """Endless training batches of this rank from ``start_batch`` on (see :class:`ImageShardStream`)."""
    stream = ImageShardStream(shards, image_size=image_size, batch_size=batch_size, rank=rank, world_size=world_size,
                              num_workers=num_workers, train=True, seed=seed, shuffle_buffer=shuffle_buffer, draft=draft,
                              uint8=uint8, device=device)
    return stream.iter_batches(start_batch)


def eval_batches(shards: str | Sequence[str], *, batch_size: int, image_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, draft: bool = True, uint8: bool = False,
                 device: str | torch.device = "cpu") -> Iterator[ImageBatch]:
    """This rank's share of the shards, once, center-cropped, with keys (see :class:`ImageShardStream`)."""
    stream = ImageShardStream(shards, image_size=image_size, batch_size=batch_size, rank=rank, world_size=world_size,
                              num_workers=num_workers, train=False, draft=draft, uint8=uint8, device=device)
    return stream.iter_batches(0)
