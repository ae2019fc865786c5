"""The logical streams of image shards: which samples stream ``l`` of ``L`` reads, in which order,
and reading them (whole shards, sequentially, one window ahead).

**Order.** Epoch ``e`` permutes the shards with ``(seed, e)``. With at least ``L`` shards, stream
``l`` reads the shards ``perm[l::L]`` of the epoch; otherwise every stream reads every shard and
keeps the samples whose position in the epoch is ``l`` modulo ``L`` (disjoint and complete either
way). A stream groups its shards of an epoch into *windows* of at least ``window`` samples and
yields each window in a permutation seeded by ``(seed, epoch, stream, window)``. So the raw sample
at any position of a stream is a pure function of (shard sample counts, ``L``, seed, window,
position), and :meth:`StreamPlan.locate` finds a position's window from the counts alone.

**Reading.** :class:`StreamReader` reads a window's shards whole and in order (tar stream mode for
S3, random access for files) and keeps the raw bytes of the window it yields plus the next one,
read ahead by a thread: two windows per stream in memory. Nothing is decoded here.

**Bad shards.** A shard that cannot be opened or ends early (truncated) is counted in
:class:`ReadCounters` and logged; the samples it no longer holds come out as ``None``, so positions
never shift. What to do with a ``None`` or undecodable sample is the consumer's choice
(``trainer/data.py``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import tarfile
from collections import deque
from dataclasses import asdict, dataclass, fields
from typing import Iterator, Sequence

import numpy as np

from cluster import storage

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

SampleId = tuple[int, int, int]   # (epoch, window, index in the window's shuffled order) of a stream


@dataclass
class ReadCounters:
    """Problems met while reading (shard counts are events: a shard read by two readers counts twice)."""

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
# Tar shards


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
        _require_end_of_archive(url, tar)
    if key is not None:
        yield index, key, files


def _require_end_of_archive(url: str, tar: tarfile.TarFile) -> None:
    """Raise unless iteration stopped at a whole (zero) header block: the end-of-archive marker.

    tarfile ends iteration without an error when the file stops inside a header block or exactly
    between members, so a shard cut there would pass for a shorter, complete one. Its last read was
    that header block: ``tell() - offset`` bytes of it were there."""
    header_bytes = tar.fileobj.tell() - tar.offset  # type: ignore[union-attr]
    if header_bytes < tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"{url}: truncated at byte {tar.offset + header_bytes} (no end-of-archive block "
                                f"after its last complete member)")


def image_bytes_of(files: dict[str, bytes]) -> bytes | None:
    return next((files[ext] for ext in IMAGE_EXTENSIONS if ext in files), None)


@dataclass(frozen=True)
class Segment:
    """The part of one shard that a stream reads in one epoch."""

    shard: int
    keep: tuple[int, ...] | None   # sample indices within the shard; None: the first ``count``
    count: int


@dataclass
class RawSample:
    key: str
    image: bytes | None
    label: bytes | None
    bad: bool = False    # found undecodable by a consumer, which then drops ``image``


def read_segment(url: str, seg: Segment, counters: ReadCounters) -> list[RawSample | None]:
    """One entry per expected sample of ``seg``; None where the shard no longer holds it (the
    missing samples are left for the consumer to count; the shard's problem is counted here)."""
    slots: list[RawSample | None] = [None] * seg.count
    position = {index: p for p, index in enumerate(seg.keep)} if seg.keep is not None else None
    want = (lambda i: i < seg.count) if position is None else position.__contains__
    found = 0
    try:
        for index, key, files in tar_samples(url, want):
            if not want(index):
                continue
            slots[index if position is None else position[index]] = RawSample(key, image_bytes_of(files), files.get("cls"))
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
    return slots


# ----------------------------------------------------------------------------------------------
# Which samples each stream reads


class StreamPlan:
    """Epoch ``e`` of stream ``l`` of ``num_streams``: its shard segments, grouped into shuffle windows."""

    def __init__(self, counts: Sequence[int], num_streams: int, seed: int, window: int) -> None:
        self.counts, self.num_streams, self.seed, self.window = list(counts), num_streams, seed, window
        self._cache: dict[tuple[int, int], list[list[Segment]]] = {}

    def shard_order(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.counts)).tolist()

    def segments(self, epoch: int, stream: int) -> list[Segment]:
        order, streams = self.shard_order(epoch), self.num_streams
        if len(order) >= streams:  # shard-level split
            return [Segment(s, None, self.counts[s]) for s in order[stream::streams] if self.counts[s] > 0]
        out, before = [], 0  # sample-level split: every stream reads every shard
        for s in order:
            keep = tuple(range((stream - before) % streams, self.counts[s], streams))
            if keep:
                out.append(Segment(s, keep, len(keep)))
            before += self.counts[s]
        return out

    def windows(self, epoch: int, stream: int) -> list[list[Segment]]:
        key = (epoch, stream)
        if key not in self._cache:
            windows: list[list[Segment]] = [[]]
            filled = 0
            for seg in self.segments(epoch, stream):
                if filled >= self.window:
                    windows.append([])
                    filled = 0
                windows[-1].append(seg)
                filled += seg.count
            # Streams of one reader may be an epoch apart; what is evicted is only recomputed.
            self._cache = {k: v for k, v in self._cache.items() if k[0] >= epoch - 2}
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

    def window_sequence(self, stream: int, epoch: int, window: int) -> Iterator[tuple[int, int, list[Segment]]]:
        while True:
            windows = self.windows(epoch, stream)
            for w in range(window, len(windows)):
                yield epoch, w, windows[w]
            epoch, window = epoch + 1, 0


# ----------------------------------------------------------------------------------------------
# Reading a stream


class StreamReader:
    """The raw samples of stream ``stream`` from ``position`` on, in order, as (sample id, sample or
    None). :meth:`take` consumes them; :meth:`ahead` looks past what was taken without consuming.

    The window being yielded and the next one (read by ``pool``, one read in flight per stream) are
    held as raw bytes. Shard problems are added to ``problems`` in the reader's own thread."""

    def __init__(self, urls: Sequence[str], plan: StreamPlan, stream: int, position: int,
                 pool: concurrent.futures.Executor, problems: ReadCounters) -> None:
        self.urls, self.plan, self.stream, self.problems = urls, plan, stream, problems
        self._ahead: deque[tuple[SampleId, RawSample | None]] = deque()
        self._samples = self._walk(position, pool)

    def take(self, count: int) -> list[tuple[SampleId, RawSample | None]]:
        """The next ``count`` samples."""
        return [self._ahead.popleft() if self._ahead else next(self._samples) for _ in range(count)]

    def ahead(self) -> Iterator[tuple[SampleId, RawSample | None]]:
        """The samples after those taken, in order, left in place for :meth:`take` (read on demand)."""
        i = 0
        while True:
            if i == len(self._ahead):
                self._ahead.append(next(self._samples))
            yield self._ahead[i]
            i += 1

    def _read(self, segments: list[Segment]) -> tuple[list[RawSample | None], ReadCounters]:
        counters = ReadCounters()
        return [s for seg in segments for s in read_segment(self.urls[seg.shard], seg, counters)], counters

    def _walk(self, position: int, pool: concurrent.futures.Executor) -> Iterator[tuple[SampleId, RawSample | None]]:
        epoch, window, offset = self.plan.locate(self.stream, position)
        windows = self.plan.window_sequence(self.stream, epoch, window)
        current = next(windows)
        pending = pool.submit(self._read, current[2])
        while True:
            epoch, window, _ = current
            samples, counters = pending.result()
            self.problems.add(counters)
            current = next(windows)
            pending = pool.submit(self._read, current[2])  # the next window, read while this one is used
            order = np.random.default_rng([self.plan.seed, epoch, self.stream, window, 2]).permutation(len(samples))
            for p in range(offset, len(samples)):
                yield (epoch, window, p), samples[order[p]]
            offset = 0
