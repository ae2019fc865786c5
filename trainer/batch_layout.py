"""Which samples make up an optimizer step, whatever the number of workers that computes it.

A run fixes three numbers when it starts and keeps them for its whole life (they are stored with
every checkpoint, and a resume that changes one is refused): the **global batch** ``G``, the number
of **logical streams** ``L`` (a divisor of ``G``) and the seed.

* A *stream* is a sequence of samples that depends only on (data, ``L``, seed, stream index). For
  image shards, stream ``l`` reads the shards ``perm_e[l::L]`` of epoch ``e`` whole and in order,
  shuffled within windows (``trainer/image_streams.py``); for token shards, which fit in memory, there is one
  stream, a seeded permutation per epoch (``trainer/token_data.py``).
* Step ``s`` takes ``q = G / L`` consecutive samples of every stream, stream-major: global slot
  ``i`` in ``[0, G)`` of step ``s`` is sample ``s * q + i % q`` of stream ``i // q``
  (:meth:`StepLayout.stream_position`; a deliberate change of ``G`` moves the origin).
* With ``M`` workers, rank ``m`` computes the contiguous slots ``[m G / M, (m + 1) G / M)`` (rounded
  down) and cuts them into ``A`` contiguous micro-batches of at most ``B`` samples, ``A`` being the
  same on every rank so that DeepSpeed's accumulation windows line up.

What is guaranteed, and why:

* **The samples of step s do not depend on M or on the loader workers**: slots map to (stream,
  position) through ``G`` and ``L`` only, and a stream's content depends on neither.
* **Within a stream's epoch every sample is used exactly once, across any sequence of resizes**:
  each stream advances by exactly ``q`` samples per step, so the data position of the run is the
  step number alone.
* **The gradient is the mean over the global batch**: when ``M`` divides ``G`` and ``B`` divides
  ``G / M`` every micro-batch has ``B`` samples and weight 1. Otherwise (an elastic group whose size
  does not divide the batch, or a micro-batch cap that does not divide a rank's share) micro-batches
  differ in size by at most one sample, and :meth:`StepLayout.loss_weight` rescales each one's mean
  loss so that DeepSpeed's average over ranks and accumulation steps is still the mean over ``G``
  samples (exact for losses that are per-sample means, as all of ours are).
* A rank reads only the streams its slots touch: whole streams when ``M`` divides ``L``, and at most
  two partial streams otherwise (read by both neighbouring ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n``, ascending."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def default_streams(global_batch: int, readers: int) -> int:
    """The logical stream count a new run picks: the largest divisor of ``global_batch`` that is at
    most ``readers`` (the run's first ``workers x loader workers``), so that at that size every
    reader owns at least one stream and no stream is read twice."""
    return max(d for d in divisors(global_batch) if d <= max(1, readers))


@dataclass(frozen=True)
class StepLayout:
    """The layout of every optimizer step of a run on ``world_size`` workers (see the module doc)."""

    global_batch: int      # G: samples per optimizer step, fixed for the run
    streams: int           # L: logical streams, fixed for the run, divides G
    world_size: int        # M: workers computing the step now
    micro_batch: int       # B: the most samples a worker feeds its model at once
    # Where the streams stood when G last changed (a deliberate change, trainer.allow_global_batch_change):
    # from step ``origin_step`` on, each stream advances q = G / L samples per step from ``origin_position``.
    origin_step: int = 0
    origin_position: int = 0

    def __post_init__(self) -> None:
        if min(self.global_batch, self.streams, self.world_size, self.micro_batch) < 1:
            raise ValueError(f"every size of a step layout must be >= 1: {self}")
        if self.global_batch % self.streams:
            raise ValueError(f"the stream count {self.streams} must divide the global batch {self.global_batch}")
        if self.world_size > self.global_batch:
            raise ValueError(f"{self.world_size} workers cannot share a global batch of {self.global_batch}")

    # --- the step -------------------------------------------------------------------------------
    @property
    def per_stream(self) -> int:
        """q: samples every stream gives to each step."""
        return self.global_batch // self.streams

    def stream_position(self, step: int, offset: int = 0) -> int:
        """Position in every stream of the sample at ``offset`` (< q) of step ``step``."""
        if step < self.origin_step:
            raise ValueError(f"step {step} precedes this layout's origin step {self.origin_step}")
        return self.origin_position + (step - self.origin_step) * self.per_stream + offset

    def slot_source(self, step: int, slot: int) -> tuple[int, int]:
        """(stream, position in that stream) of global slot ``slot`` of step ``step``."""
        q = self.per_stream
        return slot // q, self.stream_position(step, slot % q)

    # --- one rank's share -------------------------------------------------------------------------
    def rank_slots(self, rank: int) -> range:
        """The global slots rank ``rank`` computes in every step."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is not in [0, {self.world_size})")
        g, m = self.global_batch, self.world_size
        return range(rank * g // m, (rank + 1) * g // m)

    @property
    def accumulation(self) -> int:
        """A: micro-batches per step on every rank (enough for the largest share at ``B`` each)."""
        largest = -(-self.global_batch // self.world_size)
        return -(-largest // self.micro_batch)

    def micro_batches(self, rank: int) -> list[range]:
        """The ``A`` contiguous slot ranges of rank ``rank``'s micro-batches, sizes differing by <= 1.

        A range is empty only when the rank's share is smaller than ``A`` (an elastic group whose size
        does not divide the batch): the stage then runs a zero-weight micro-batch to keep in step."""
        slots, parts = self.rank_slots(rank), self.accumulation
        n = len(slots)
        return [range(slots.start + j * n // parts, slots.start + (j + 1) * n // parts) for j in range(parts)]

    def loss_weight(self, size: int) -> float:
        """Factor on a micro-batch's mean loss so that DeepSpeed's mean over ``M`` ranks and ``A``
        accumulation steps is the mean over the ``G`` samples: ``size * M * A / G`` (1 when even)."""
        return size * self.world_size * self.accumulation / self.global_batch

    @property
    def even(self) -> bool:
        """Every micro-batch of every rank has exactly ``B`` samples (all loss weights are 1)."""
        g, m = self.global_batch, self.world_size
        return g % m == 0 and (g // m) % self.micro_batch == 0

    def rank_streams(self, rank: int) -> list[tuple[int, range]]:
        """(stream, offsets within the stream's ``q`` samples of a step) that rank ``rank`` reads,
        in slot order: concatenating them over a step gives the rank's slots in order."""
        slots, q = self.rank_slots(rank), self.per_stream
        out: list[tuple[int, range]] = []
        for stream in range(slots.start // q, (slots.stop - 1) // q + 1):
            lo, hi = max(slots.start, stream * q), min(slots.stop, (stream + 1) * q)
            out.append((stream, range(lo - stream * q, hi - stream * q)))
        return out


def valid_worker_counts(global_batch: int, limit: int | None = None) -> list[int]:
    """Worker counts that split ``global_batch`` evenly (its divisors), up to ``limit``."""
    return [d for d in divisors(global_batch) if limit is None or d <= limit]
