"""Streaming safetensors writes and fragment-wise reads, for checkpoints too large to hold twice.

``safetensors.torch.save_file`` turns every tensor into a ``bytes`` object before writing, so saving a
rank's optimizer partition costs that partition's size again in memory, at the moment memory is
tightest. :func:`write_safetensors` writes the same file format (8-byte header length, JSON header,
raw little-endian data) tensor by tensor from views of the live tensors: nothing is copied but one
tensor's bytes at a time, and only when it is not contiguous.

Reading goes through ``safetensors.safe_open`` (memory-mapped), which reads only the slices asked for.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import BinaryIO, Iterable

import torch

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order (a view when the CPU tensor is contiguous)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous().reshape(-1)
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.view(torch.uint8).numpy())


def safetensors_header(specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                       metadata: dict[str, str] | None = None) -> tuple[bytes, int]:
    """The encoded header (length prefix included) for tensors ``(name, dtype, shape)`` stored in
    that order, and the number of data bytes that must follow it."""
    header: dict[str, object] = {}
    offset = 0
    for name, dtype, shape in specs:
        if dtype not in _DTYPE_NAMES:
            raise TypeError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    return len(encoded).to_bytes(8, "little") + encoded, offset


def write_safetensors_stream(out: BinaryIO, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                             tensors: Iterable[torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file to ``out`` whose tensors arrive one at a time, in ``specs`` order (e.g.
    gathered one parameter at a time): only the tensor being written is ever in memory. Returns bytes."""
    header, size = safetensors_header(specs, metadata)
    out.write(header)
    written = 0
    for (name, dtype, shape), tensor in zip(specs, tensors, strict=True):
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, the header says {dtype} {shape}")
        data = _raw_bytes(tensor)
        out.write(data)
        written += len(data)
    if written != size:
        raise ValueError(f"wrote {written} data bytes, the header announced {size}")
    return len(header) + size


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, torch.Tensor]],
                      metadata: dict[str, str] | None = None) -> int:
    """Write ``(name, tensor)`` pairs as a safetensors file at ``path``; returns the bytes written.

    The file is written to ``path + '.tmp'``, fsynced and renamed, so a reader never sees half of it."""
    items = list(tensors)
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in items]
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        size = write_safetensors_stream(out, specs, (t for _, t in items), metadata)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    return size


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (reads only its header)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})
