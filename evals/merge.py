"""Ordered merge of chunk results into per-set statistics.

Results arrive in any order from any worker; :class:`ResultMerger` adds them strictly in chunk-index
order (holding early arrivals until their turn), so the float64 sums, and every metric computed from
them, are bit-identical whatever the number of workers, their speed, or which chunks were retried.
A chunk index is accepted once: a duplicate delivery is dropped, never counted twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from evals.inception import FEATURE_DIM
from evals.stats import FeatureSums
from evals.worker import ChunkResult

log = logging.getLogger(__name__)


@dataclass
class MergedSets:
    sums: dict[str, FeatureSums] = field(default_factory=dict)
    logits: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    previews: dict[str, np.ndarray] = field(default_factory=dict)
    psnr_sum: float = 0.0
    ssim_sum: float = 0.0
    quality_count: int = 0
    code_counts: np.ndarray | None = None
    confusion: np.ndarray | None = None
    report: dict[str, int] = field(default_factory=dict)
    chunks: int = 0

    def count(self, set_name: str) -> int:
        return self.counts.get(set_name, 0)

    def all_logits(self, set_name: str) -> torch.Tensor:
        return torch.cat(self.logits[set_name]) if self.logits.get(set_name) else torch.empty(0, 1008)


class ResultMerger:
    def __init__(self, num_chunks: int) -> None:
        self.num_chunks = num_chunks
        self.merged = MergedSets()
        self._next = 0
        self._held: dict[int, ChunkResult] = {}
        self._seen: set[int] = set()

    def add(self, result: ChunkResult) -> bool:
        """Take a result; False (and ignored) when that chunk was already taken."""
        if result.index in self._seen:
            log.warning("chunk %d delivered twice; the second copy is ignored", result.index)
            return False
        if not 0 <= result.index < self.num_chunks:
            raise ValueError(f"chunk index {result.index} outside the plan of {self.num_chunks}")
        self._seen.add(result.index)
        self._held[result.index] = result
        while self._next in self._held:
            self._fold(self._held.pop(self._next))
            self._next += 1
        return True

    @property
    def done(self) -> bool:
        return self._next == self.num_chunks

    def missing(self) -> list[int]:
        return [i for i in range(self.num_chunks) if i not in self._seen]

    def _fold(self, result: ChunkResult) -> None:
        m = self.merged
        for name, sums in result.sums.items():
            m.sums.setdefault(name, FeatureSums(FEATURE_DIM)).merge(sums)
        for name, logits in result.logits.items():
            m.logits.setdefault(name, []).append(logits)
        for name, images in result.previews.items():
            have = m.previews.get(name)
            m.previews[name] = images if have is None else np.concatenate([have, images])
        for name, count in result.set_counts().items():
            m.counts[name] = m.counts.get(name, 0) + count
        m.psnr_sum += result.psnr_sum
        m.ssim_sum += result.ssim_sum
        m.quality_count += result.quality_count
        m.code_counts = _add(m.code_counts, result.code_counts)
        m.confusion = _add(m.confusion, result.confusion)
        for key, value in result.report.items():
            m.report[key] = m.report.get(key, 0) + value
        m.chunks += 1


def _add(total: np.ndarray | None, part: np.ndarray | None) -> np.ndarray | None:
    """Integer count arrays summed (exact in any order); None stands for "none yet"."""
    if part is None:
        return total
    return part.astype(np.int64) if total is None else total + part
