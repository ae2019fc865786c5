"""Reading ``.npz`` files piecewise, locally or on S3.

ADM-style sample batches (``arr_0``: uint8 [N, H, W, 3]) hold 10 GB at N=50,000, and reference batches
also carry their images next to ``mu``/``sigma``. Workers read only their rows: ``np.savez`` stores
members uncompressed, so a row range is one byte range of the file (a ranged GET on S3). Compressed
members (``np.savez_compressed``) are streamed and the leading rows skipped.
"""

from __future__ import annotations

import io
import struct
import zipfile
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from cluster import storage

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header (30 bytes)
_READAHEAD = 1 << 20


class _RangedReader(io.RawIOBase):
    """A seekable read-only file over ranged reads of an object (zipfile needs to seek)."""

    def __init__(self, url: str) -> None:
        self.url, self._size, self._pos = url, storage.size(url), 0
        self._buf_start, self._buf = 0, b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        end = self._pos + want
        if not (self._buf_start <= self._pos and end <= self._buf_start + len(self._buf)):
            self._buf_start = self._pos
            self._buf = storage.read_bytes(self.url, self._pos, min(self._size, self._pos + max(want, _READAHEAD)))
        offset = self._pos - self._buf_start
        buffer[:want] = self._buf[offset:offset + want]
        self._pos = end
        return want


def _open(url: str) -> BinaryIO:
    if storage.is_remote(url):
        return io.BufferedReader(_RangedReader(url), buffer_size=_READAHEAD)
    return storage.open_read(url)


def member_names(url: str) -> set[str]:
    """Array names in the file (``arr_0``, ``mu``, ...)."""
    with _open(url) as f:
        try:
            with zipfile.ZipFile(f) as zf:
                return {n[:-4] if n.endswith(".npy") else n for n in zf.namelist()}
        except zipfile.BadZipFile:
            raise ValueError(f"{url} is not an .npz file") from None


def read_member(url: str, name: str) -> np.ndarray:
    """One whole array (no pickles)."""
    with _open(url) as f, zipfile.ZipFile(f) as zf:
        try:
            member = zf.open(f"{name}.npy")
        except KeyError:
            raise KeyError(f"{url} has no array {name!r}") from None
        with member:
            return np.lib.format.read_array(member, allow_pickle=False)


@dataclass(frozen=True)
class ArrayInfo:
    shape: tuple[int, ...]
    dtype: np.dtype
    data_offset: int | None  # file offset of the first element (None: compressed or Fortran order)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


def array_info(url: str, name: str) -> ArrayInfo:
    """Shape and dtype of a member, and where its data starts when it can be read by ranges."""
    with _open(url) as f, zipfile.ZipFile(f) as zf:
        try:
            info = zf.getinfo(f"{name}.npy")
        except KeyError:
            raise KeyError(f"{url} has no array {name!r}") from None
        with zf.open(info) as member:
            shape, fortran, dtype = _read_npy_header(member)
            header_len = member.tell()
        offset = None
        if info.compress_type == zipfile.ZIP_STORED and not fortran:
            f.seek(info.header_offset)
            fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
            name_len, extra_len = fields[-2], fields[-1]
            offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len + header_len
        return ArrayInfo(shape, dtype, offset)


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    if dtype.hasobject:
        raise ValueError("object arrays (pickles) are not read")
    return tuple(shape), bool(fortran), np.dtype(dtype)


def read_rows(url: str, name: str, start: int, end: int, info: ArrayInfo | None = None) -> np.ndarray:
    """Rows ``[start, end)`` of a member along its first axis."""
    info = info or array_info(url, name)
    n = info.shape[0] if info.shape else 0
    if not 0 <= start <= end <= n:
        raise IndexError(f"rows [{start}, {end}) out of range for {name} with {n} rows in {url}")
    rows = end - start
    if info.data_offset is not None:
        first = info.data_offset + start * info.row_bytes
        data = storage.read_bytes(url, first, first + rows * info.row_bytes)
        if len(data) != rows * info.row_bytes:
            raise ValueError(f"{url} is truncated: {name} rows [{start}, {end}) are not all there")
        return np.frombuffer(data, dtype=info.dtype).reshape((rows, *info.shape[1:]))
    with _open(url) as f, zipfile.ZipFile(f) as zf, zf.open(f"{name}.npy") as member:
        shape, fortran, dtype = _read_npy_header(member)
        if fortran:  # rare: load it all, then slice
            return np.lib.format.read_array(zf.open(f"{name}.npy"), allow_pickle=False)[start:end]
        skip = start * info.row_bytes
        while skip:
            got = len(member.read(min(skip, 64 << 20)))
            if not got:
                raise ValueError(f"{url} is truncated: {name} ends before row {start}")
            skip -= got
        data = member.read(rows * info.row_bytes)
        if len(data) != rows * info.row_bytes:
            raise ValueError(f"{url} is truncated: {name} rows [{start}, {end}) are not all there")
        return np.frombuffer(data, dtype=dtype).reshape((rows, *shape[1:]))
