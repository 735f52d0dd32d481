"""safetensors weight files read and written one tensor at a time, without mapping them.

safetensors' own ``safe_open`` maps the whole file (every page a reader touches stays resident
until the map closes) and its ``save`` builds the file in memory from a byte copy of every tensor
(three copies of a shard at the peak). Here a reader ``pread``s each tensor into its own buffer and
a writer streams each tensor's bytes straight to the file, so a 2 GB shard costs 2 GB.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from .dtypes import DTYPE_TO_TORCH, TORCH_TO_DTYPE
from .errors import SourceError
from .format import atomic_write



SAFETENSORS_HEADER_LIMIT = 100_000_000  # safetensors' own limit on its JSON header


class SafetensorsFile:
    """One safetensors file read with ``os.pread``, one tensor at a time.

    safetensors' ``safe_open`` maps the whole file: every page a reader touches stays in the
    process's resident set until the map is closed, so streaming a 7B model through it shows the
    whole model in RSS. Reading each tensor into its own buffer keeps only that tensor resident
    (the page cache still serves repeated reads). The header is checked like safetensors checks it:
    a JSON object of ``{dtype, shape, data_offsets}`` entries whose byte ranges lie in the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise SourceError(f"cannot open ({exc.strerror})", path) from None
        try:
            self._entries, self._metadata, self._data_start = self._read_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _read_header(self) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str], int]:
        info = os.fstat(self._fd)
        if not stat.S_ISREG(info.st_mode):
            raise SourceError("not a regular file", self.path)
        size = info.st_size
        prefix = os.pread(self._fd, 8, 0)
        if len(prefix) < 8:
            raise SourceError("not a readable safetensors file (shorter than its 8-byte header length)", self.path)
        length = int.from_bytes(prefix, "little")
        if length > SAFETENSORS_HEADER_LIMIT or 8 + length > size:
            raise SourceError(f"not a readable safetensors file (header length {length} for {size} bytes)", self.path)
        try:
            header = json.loads(os.pread(self._fd, length, 8))
        except (ValueError, UnicodeDecodeError) as exc:
            raise SourceError(f"not a readable safetensors file (header: {exc})", self.path) from None
        if not isinstance(header, dict):
            raise SourceError("not a readable safetensors file (header is not a JSON object)", self.path)
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise SourceError("not a readable safetensors file (bad __metadata__)", self.path)
        data_start = 8 + length
        entries = {}
        for name, entry in header.items():
            try:
                code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
                ok = (isinstance(code, str) and all(type(d) is int and d >= 0 for d in shape)
                      and type(begin) is int and type(end) is int and 0 <= begin <= end <= size - data_start)
            except (TypeError, KeyError, ValueError):
                ok = False
            if not ok:
                raise SourceError(f"not a readable safetensors file (bad entry for {name!r})", self.path)
            if code not in DTYPE_TO_TORCH:
                raise SourceError(f"tensor {name!r}: dtype {code} is not supported", self.path)
            count = 1
            for d in shape:
                count *= d
            if count * DTYPE_TO_TORCH[code].itemsize != end - begin:
                raise SourceError(f"not a readable safetensors file ({name!r}: {end - begin} bytes for shape "
                                  f"{list(shape)} of {code})", self.path)
            entries[name] = (code, shape, begin, end)
        return entries, metadata, data_start

    def keys(self) -> list[str]:
        return list(self._entries)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def dtype_shape(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        code, shape, _, _ = self._entries[name]
        return DTYPE_TO_TORCH[code], shape

    def get_tensor(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name``, read into memory of its own (a fresh CPU tensor), or, with ``into``
        (a uint8 CPU tensor of at least its bytes), into the start of ``into``: a view of it."""
        code, shape, begin, end = self._entries[name]
        dtype = DTYPE_TO_TORCH[code]
        if into is None:
            out = torch.empty(shape, dtype=dtype)
        else:
            assert into.dtype == torch.uint8 and into.is_contiguous() and into.numel() >= end - begin
            out = into[:end - begin].view(dtype).view(shape)
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        done = 0
        while done < end - begin:
            got = os.preadv(self._fd, [view[done:]], self._data_start + begin + done)
            if got <= 0:
                raise SourceError(f"tensor {name!r}: the file is shorter than its header says", self.path)
            done += got
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass



def safetensors_order(specs: Mapping[str, tuple[torch.dtype, Sequence[int]]]) -> list[str]:
    """safetensors' order of tensors in a file: larger dtypes first, then by name."""
    return sorted(specs, key=lambda n: (-specs[n][0].itemsize, n))


def safetensors_header(specs: Mapping[str, tuple[torch.dtype, Sequence[int]]],
                       metadata: Mapping[str, str] | None = None) -> bytes:
    """The length prefix and header of a safetensors file holding tensors of these (dtype, shape),
    laid out in :func:`safetensors_order`."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in safetensors_order(specs):
        dtype, shape = specs[name]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": TORCH_TO_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A CPU tensor's own bytes (a contiguous copy first if it is not contiguous)."""
    t = t.detach().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
                      ) -> Iterator[bytes | memoryview]:
    """The chunks of a safetensors file of ``tensors`` (CPU tensors): the header, then each
    tensor's own bytes, in :func:`safetensors_order`."""
    specs = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    yield safetensors_header(specs, metadata)
    for name in safetensors_order(specs):
        if tensors[name].numel():
            yield tensor_bytes(tensors[name])


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file, atomically, without a copy of them in memory."""
    atomic_write(path, safetensors_bytes(tensors, metadata))
