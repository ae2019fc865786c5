"""Exact, mergeable FID statistics and the metrics computed from them.

A worker reduces the Inception features of its slice to :class:`FeatureSums` (count, sum, sum of
outer products, all float64); the driver adds the slices' sums (exact up to float64 rounding, and
bit-identical when added in a fixed order) and turns the total into a mean and covariance. FID and IS
then come from torch-fidelity's own functions, so the formula is the library's.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from cluster import storage

IS_SPLITS = 10
IS_SHUFFLE_SEED = 2020  # torch-fidelity's default rng_seed: IS splits a fixed permutation of the samples


@dataclass
class FeatureSums:
    """Sufficient statistics of a set of feature vectors."""

    dim: int
    count: int = 0
    total: torch.Tensor = field(default=None)   # type: ignore[assignment]  float64 [D]
    outer: torch.Tensor = field(default=None)   # type: ignore[assignment]  float64 [D, D]
    device: str = "cpu"                          # where the sums accumulate (a GPU worker keeps them there)

    def __post_init__(self) -> None:
        if self.total is None:
            self.total = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        if self.outer is None:
            self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)

    def add(self, features: torch.Tensor) -> None:
        """Accumulate a batch [B, D] of any float dtype (moved to the sums' device, summed in float64)."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features [B, {self.dim}], got {tuple(features.shape)}")
        f = features.detach().to(self.total.device, torch.float64)
        self.count += f.shape[0]
        self.total += f.sum(dim=0)
        self.outer += f.T @ f

    def cpu(self) -> "FeatureSums":
        """These sums on the CPU (what a worker returns)."""
        return FeatureSums(self.dim, self.count, self.total.cpu(), self.outer.cpu())

    def merge(self, other: "FeatureSums") -> "FeatureSums":
        """In place: add another slice's sums. Returns self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge {other.dim}-d sums into {self.dim}-d sums")
        self.count += other.count
        self.total += other.total.to(self.total.device)
        self.outer += other.outer.to(self.outer.device)
        return self

    @classmethod
    def merged(cls, parts: Iterable["FeatureSums"], dim: int) -> "FeatureSums":
        out = cls(dim)
        for part in parts:
            out.merge(part)
        return out

    def to_stats(self, source: str = "") -> "FidStats":
        """Mean and unbiased covariance (as ``np.cov``): ``(sum xx^T - n mu mu^T) / (n - 1)``."""
        if self.count < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.count}")
        n = self.count
        mu = self.total / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        sigma = 0.5 * (sigma + sigma.T)  # exact symmetry (the outer sums are symmetric up to rounding)
        return FidStats(mu.cpu().numpy(), sigma.cpu().numpy(), n, source)


@dataclass
class FidStats:
    """Mean and covariance of a set's features, as in the ADM reference batches (``mu``, ``sigma``)."""

    mu: np.ndarray       # float64 [D]
    sigma: np.ndarray    # float64 [D, D]
    count: int | None    # images behind them (unknown for some foreign files)
    source: str = ""

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        if self.mu.ndim != 1 or self.sigma.shape != (self.mu.shape[0], self.mu.shape[0]):
            raise ValueError(f"bad FID statistics{f' in {self.source}' if self.source else ''}: "
                             f"mu {self.mu.shape}, sigma {self.sigma.shape}")

    @property
    def stats_id(self) -> str:
        """Content id: sha256 of the float64 mean and covariance (16 hex digits)."""
        digest = hashlib.sha256(self.mu.tobytes())
        digest.update(self.sigma.tobytes())
        return digest.hexdigest()[:16]

    def to_npz_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, mu=self.mu, sigma=self.sigma, count=np.int64(-1 if self.count is None else self.count))
        return buffer.getvalue()

    def save(self, url: str) -> None:
        """Write an ``.npz`` readable by ADM's evaluator and :func:`load_stats` (atomic)."""
        storage.write_bytes(url, self.to_npz_bytes())


def load_stats(url: str) -> FidStats:
    """FID statistics from an ``.npz`` with ``mu`` and ``sigma`` (ours, ADM's reference batches)."""
    from evals.npz import read_member, member_names

    names = member_names(url)
    if "mu" not in names or "sigma" not in names:
        raise ValueError(f"{url} holds no FID statistics (arrays: {', '.join(sorted(names)) or 'none'}); "
                         "expected 'mu' and 'sigma'")
    count = int(read_member(url, "count")) if "count" in names else -1
    return FidStats(read_member(url, "mu"), read_member(url, "sigma"), count if count >= 0 else None, url)


def frechet_distance(a: FidStats, b: FidStats) -> float:
    """FID between two sets' statistics, by torch-fidelity's formula (float64 throughout)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature sizes differ: {a.mu.shape[0]} ({a.source}) vs {b.mu.shape[0]} ({b.source})")
    result = fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, verbose=False)
    return float(result[KEY_METRIC_FID])


def inception_score(logits: torch.Tensor, splits: int = IS_SPLITS) -> tuple[float, float]:
    """(mean, std) of the Inception Score over ``splits`` splits, by torch-fidelity's function.

    ``logits`` [N, 1008] must be in the set's sample order: like torch-fidelity, the splits are cut
    from a fixed permutation (seed 2020) of that order.
    """
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    if logits.shape[0] < splits:
        raise ValueError(f"the Inception Score needs at least {splits} images, got {logits.shape[0]}")
    out = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=IS_SHUFFLE_SEED)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])
