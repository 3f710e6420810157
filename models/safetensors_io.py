"""Reading checkpoint tensors straight into preallocated parameters.

Safetensors files are parsed here (8-byte little-endian header length, JSON header, raw data) and
each tensor is read with `readinto` into the parameter's own memory: no mmap, no second copy of
the weights, and a truncated or corrupt file is caught from its header before any data is read.
Pickle checkpoints (pytorch_model.bin) go through torch.load(weights_only=True), only when allowed.
"""
from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import torch

from .errors import CheckpointError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024


class TensorEntry:
    __slots__ = ("file", "dtype", "shape", "begin", "end")

    def __init__(self, file, dtype, shape, begin, end):
        self.file, self.dtype, self.shape, self.begin, self.end = file, dtype, shape, begin, end


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Validate a safetensors file's header against its size; return its tensors by name."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    data_start = 8 + n
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for {name!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{path}: corrupt header: {name!r} has a wrong byte range")
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated: {name!r} ends at byte {data_start + end}, the file has {size}")
        entries[name] = TensorEntry(path, dtype, shape, data_start + begin, data_start + end)
    return entries


class TensorSource:
    """All tensors of a checkpoint (one file, shards, or an allowed pickle), read on demand."""

    def __init__(self, entries: dict[str, TensorEntry] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None):
        self._entries = entries or {}
        self._tensors = tensors or {}
        self._files: dict[Path, object] = {}

    @classmethod
    def from_safetensors(cls, files: list[Path]) -> "TensorSource":
        entries: dict[str, TensorEntry] = {}
        for file in files:
            entries.update(read_safetensors_header(file))
        return cls(entries=entries)

    @classmethod
    def from_pickle(cls, files: list[Path]) -> "TensorSource":
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for a bad pickle
                raise CheckpointError(f"{file}: cannot load pickle weights ({exc})") from None
            tensors.update(state)
        return cls(tensors=tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._tensors

    def keys(self):
        return list(self._entries) + list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._entries:
            return self._entries[name].shape
        return tuple(self._tensors[name].shape)

    def read_into(self, name: str, dst: torch.Tensor) -> None:
        """Copy tensor `name` into `dst` (same number of elements), converting dtype/device."""
        self.read_rows(name, 0, self.shape(name)[0] if self.shape(name) else 1, dst)

    def read_rows(self, name: str, start: int, stop: int, dst: torch.Tensor) -> None:
        """Copy rows [start, stop) of tensor `name` (along its first dimension; a 0-d tensor has
        one) into `dst` (same number of elements), converting dtype/device: a large tensor can
        be read piece by piece without ever holding all of it."""
        if name in self._tensors:
            t = self._tensors[name]
            dst.copy_((t[start:stop] if t.dim() else t).reshape(dst.shape))
            return
        e = self._entries[name]
        row_bytes = (e.end - e.begin) // e.shape[0] if e.shape and e.shape[0] else e.end - e.begin
        f = self._files.get(e.file)
        if f is None:
            f = self._files[e.file] = open(e.file, "rb")
        f.seek(e.begin + start * row_bytes)
        direct = dst.dtype == e.dtype and dst.device.type == "cpu" and dst.is_contiguous()
        buf = dst if direct else torch.empty(dst.shape, dtype=e.dtype)
        # A writable view of the tensor's own bytes (no numpy needed: torch does not require it)
        view = (ctypes.c_char * buf.nbytes).from_address(buf.data_ptr()) if buf.nbytes else bytearray()
        if f.readinto(view) != (stop - start) * row_bytes:
            raise CheckpointError(f"{e.file}: truncated while reading {name!r}")
        if not direct:
            dst.copy_(buf)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._tensors.clear()
