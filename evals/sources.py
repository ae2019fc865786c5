"""Image sets to evaluate, and their split into slices that workers read independently.

An input URL (local path or ``s3://``) is one of:

* an image folder: its ``.png/.jpg/.jpeg`` files, non-recursive, in sorted order (torch-fidelity's
  folder input), each decoded to RGB as it is (no resize: the feature network resizes to 299);
* WebDataset shards (``data_prep/shard.py`` output: a folder/prefix, a glob, a brace pattern or one
  ``.tar``), read by ``trainer.data``'s eval mode: shorter side resized to ``image_size``, center crop;
* an ``.npz`` holding ``arr_0`` (ADM sample batches: uint8 [N, H, W, 3]), or ``mu``/``sigma``
  (reference statistics; see :func:`evals.stats.load_stats`).

A slice is a small picklable description (file names, a row range, shards and a stream); its
:meth:`batches` yields uint8 [B, 3, H, W] tensors in a fixed order, so the same slice always gives
the same images and the same features.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from cluster import storage

FOLDER_EXTENSIONS = ("png", "jpg", "jpeg")  # torch-fidelity's samples_find_ext


class BadInputError(ValueError):
    """Input data that cannot be evaluated (retrying elsewhere would not help)."""


@dataclass
class Batch:
    images: torch.Tensor             # uint8 [B, 3, H, W]
    labels: torch.Tensor | None = None


@dataclass
class SliceReport:
    """What reading a slice met besides images (shards skip undecodable samples and count them)."""

    corrupt_samples: int = 0
    missing_samples: int = 0
    truncated_shards: int = 0
    unreadable_shards: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# ----------------------------------------------------------------------------------------------
# Slices


@dataclass(frozen=True)
class FolderSlice:
    files: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.files)

    def batches(self, batch_size: int, report: SliceReport) -> Iterator[Batch]:
        """Consecutive images of equal size batched together (a size change starts a new batch)."""
        pending: list[np.ndarray] = []
        for url in self.files:
            pixels = decode_rgb(url)
            if pending and (len(pending) == batch_size or pending[0].shape != pixels.shape):
                yield Batch(_to_nchw(pending))
                pending = []
            pending.append(pixels)
        if pending:
            yield Batch(_to_nchw(pending))


@dataclass(frozen=True)
class NpzSlice:
    url: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def batches(self, batch_size: int, report: SliceReport) -> Iterator[Batch]:
        from evals.npz import array_info, read_rows

        info = array_info(self.url, "arr_0")
        for first in range(self.start, self.end, batch_size):
            rows = read_rows(self.url, "arr_0", first, min(first + batch_size, self.end), info)
            yield Batch(torch.from_numpy(rows.copy()).permute(0, 3, 1, 2).contiguous())


@dataclass(frozen=True)
class ShardSlice:
    """Stream ``stream`` of ``num_streams`` over ``urls`` (trainer.data's eval split): every sample of
    the shards belongs to exactly one stream."""

    urls: tuple[str, ...]
    stream: int
    num_streams: int
    image_size: int
    expected: int            # samples the manifest promises this slice (before bad data)
    draft: bool = False

    @property
    def size(self) -> int:
        return self.expected

    def batches(self, batch_size: int, report: SliceReport) -> Iterator[Batch]:
        from trainer.data import ImageShardStream

        reader = ImageShardStream(list(self.urls), image_size=self.image_size, batch_size=batch_size,
                                  rank=self.stream, world_size=self.num_streams, num_workers=0,
                                  draft=self.draft, pin_memory=False, uint8=True)
        for batch in reader.iter_batches():
            yield Batch(batch.images.permute(0, 3, 1, 2).contiguous(), batch.labels)
        for name, value in reader.counters.__dict__.items():
            setattr(report, name, getattr(report, name) + value)


ImageSlice = FolderSlice | NpzSlice | ShardSlice


def decode_rgb(url: str) -> np.ndarray:
    """One image file as uint8 [H, W, 3] (``PIL ... .convert("RGB")``, like torch-fidelity)."""
    try:
        with Image.open(io.BytesIO(storage.read_bytes(url))) as image:
            return np.asarray(image.convert("RGB"))
    except storage.StorageError:
        raise
    except Exception as err:  # noqa: BLE001
        raise BadInputError(f"{url}: cannot decode image ({type(err).__name__}: {err})") from None


def _to_nchw(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------
# Inputs


@dataclass
class ImageSet:
    """An input resolved into slices (or into statistics, for an ``.npz`` with ``mu``/``sigma``)."""

    url: str
    kind: str                                  # folder | shards | npz_images | npz_stats
    slices: list[ImageSlice] = field(default_factory=list)
    stats_url: str | None = None               # kind == npz_stats
    identity: str = ""                         # content description for cache keys
    policy: str = ""                           # how pixels are produced (for the protocol tag)
    home: str = ""                             # the folder holding the data (default cache location)

    @property
    def expected(self) -> int:
        return sum(s.size for s in self.slices)


def resolve_input(url: str, *, chunk_size: int, image_size: int, draft: bool = False) -> ImageSet:
    """Classify ``url`` and cut it into slices of about ``chunk_size`` images."""
    url = str(url)
    if len(url) > 1:
        url = url.rstrip("/")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    if url.endswith(".npz"):
        return _npz_input(url, chunk_size)
    if _looks_like_shards(url):
        return shard_input(url, chunk_size=chunk_size, image_size=image_size, draft=draft)
    files = list_folder_images(url)
    if files:
        slices = [FolderSlice(tuple(files[i:i + chunk_size])) for i in range(0, len(files), chunk_size)]
        identity = _digest([f"{f.rsplit('/', 1)[-1]}" for f in files])
        return ImageSet(url, "folder", slices, identity=identity, policy="folder images as stored (RGB)")
    raise BadInputError(f"{url}: no images (.{', .'.join(FOLDER_EXTENSIONS)}), shards (.tar) or .npz found")


def _looks_like_shards(url: str) -> bool:
    if url.endswith(".tar") or "{" in url or "*" in url:
        return True
    try:
        return any(f.url.endswith(".tar") and f.url.rsplit("/", 1)[0] == url for f in storage.list_files(url))
    except storage.StorageError:
        return False


def list_folder_images(url: str) -> list[str]:
    """Image files directly in a folder/prefix, sorted (torch-fidelity sorts real paths)."""
    if storage.is_remote(url):
        prefix = url.rstrip("/")
        found = [f.url for f in storage.list_files(prefix) if f.url.rsplit("/", 1)[0] == prefix]
    else:
        if not os.path.isdir(url):
            if os.path.exists(url):
                raise BadInputError(f"{url}: not a folder, .tar shard or .npz file")
            raise BadInputError(f"{url}: no such folder or file")
        found = [os.path.realpath(os.path.join(url, name)) for name in os.listdir(url)
                 if os.path.isfile(os.path.join(url, name))]
    return sorted(f for f in found if f.rsplit(".", 1)[-1].lower() in FOLDER_EXTENSIONS)


def shard_input(url: str | Sequence[str], *, chunk_size: int, image_size: int, draft: bool = False) -> ImageSet:
    """Shards as slices: whole shards grouped to ~``chunk_size`` samples, or a large shard read as
    several streams (each keeps every k-th sample)."""
    from trainer.data import expand_shard_urls, shard_sample_counts

    try:
        urls = expand_shard_urls(url)
    except (FileNotFoundError, ValueError) as err:
        raise BadInputError(str(err)) from None
    counts = shard_sample_counts(urls)
    slices: list[ImageSlice] = []
    group: list[str] = []
    group_count = 0
    for shard, count in zip(urls, counts):
        if group and (count > chunk_size or group_count + count > chunk_size):
            slices.append(ShardSlice(tuple(group), 0, 1, image_size, group_count, draft))
            group, group_count = [], 0
        if count > chunk_size:
            streams = math.ceil(count / chunk_size)
            for j in range(streams):
                # Stream j of k takes samples j, j+k, ...: count // k plus one for the first count % k.
                slices.append(ShardSlice((shard,), j, streams, image_size, count // streams + (j < count % streams), draft))
            continue
        group.append(shard)
        group_count += count
    if group:
        slices.append(ShardSlice(tuple(group), 0, 1, image_size, group_count, draft))
    sizes = [storage.size(u) for u in urls]
    identity = _digest([f"{u.rsplit('/', 1)[-1]}:{c}:{s}" for u, c, s in zip(urls, counts, sizes)] +
                       [f"image_size={image_size}", f"draft={draft}"])
    policy = (f"shards: shorter side to {image_size} (bicubic, antialias{', JPEG draft' if draft else ''}), "
              f"center crop {image_size}")
    label = url if isinstance(url, str) else ",".join(url)
    return ImageSet(label, "shards", slices, identity=identity, policy=policy, home=_parent(urls[0]))


def _npz_input(url: str, chunk_size: int) -> ImageSet:
    from evals.npz import array_info, member_names

    if not storage.exists(url):
        raise BadInputError(f"{url}: no such file")
    try:
        names = member_names(url)
    except ValueError as err:
        raise BadInputError(str(err)) from None
    if "mu" in names and "sigma" in names:
        return ImageSet(url, "npz_stats", stats_url=url, identity=f"npz:{url}", policy="precomputed statistics")
    if "arr_0" not in names:
        raise BadInputError(f"{url}: expected 'arr_0' (images) or 'mu' and 'sigma' (statistics); "
                            f"found {', '.join(sorted(names)) or 'nothing'}")
    info = array_info(url, "arr_0")
    if len(info.shape) != 4 or info.shape[3] != 3 or info.dtype != np.uint8:
        raise BadInputError(f"{url}: arr_0 must be uint8 [N, H, W, 3], got {info.dtype} {info.shape}")
    n = info.shape[0]
    slices = [NpzSlice(url, i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]
    return ImageSet(url, "npz_images", slices, identity=_digest([url, str(info.shape), str(storage.size(url))]),
                    policy="npz arr_0 uint8 as stored", home=_parent(url))


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _digest(parts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]
