"""``CompressedExpert``: a container opened lazily; tensors are read, verified and decoded on demand."""

from __future__ import annotations

import math
import os
from typing import Any, Iterator

import numpy as np
import torch

from .codec import golomb, kernels
from .errors import InvalidArgumentError, LayoutError
from .format import ENCODING_DENSE, FileReader, Header, RangeReader, TensorEntry, atomic_write, check_crc, read_header
from .sources import DTYPE_TO_TORCH

_BITS_VIEW = {torch.float32: (torch.int32, np.uint32), torch.float16: (torch.int16, np.uint16),
              torch.bfloat16: (torch.int16, np.uint16)}
_ADD_MODE = {torch.float32: kernels.MODE_ADD_F32, torch.float16: kernels.MODE_ADD_F16,
             torch.bfloat16: kernels.MODE_ADD_BF16}
_COPY_BLOCK = 16 * 1024 * 1024


def flat_bits(tensor: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous CPU float32/float16/bfloat16 tensor's bits (uint32/uint16)."""
    int_dtype, np_dtype = _BITS_VIEW[tensor.dtype]
    return tensor.detach().view(int_dtype).reshape(-1).numpy().view(np_dtype)


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor from calloc (numpy): large ones are fresh pages the OS zeroes lazily, so
    decoding need not write the zeros itself (measured faster than torch.empty + fill)."""
    int_dtype, np_dtype = _BITS_VIEW[dtype]
    flat = np.zeros(math.prod(shape), dtype=np_dtype)
    return torch.from_numpy(flat.view(np.int32 if np_dtype == np.uint32 else np.int16)).view(dtype).reshape(shape)


def kept_value(scale: float, dtype: torch.dtype) -> float:
    """The magnitude a kept entry decodes to: the float32 scale rounded to the tensor's dtype."""
    return float(torch.tensor(scale, dtype=torch.float32).to(dtype).float())


def value_patterns(scale: float, dtype: torch.dtype) -> tuple[int, int]:
    """Bit patterns of +value and -value in ``dtype`` (the sign bit differs)."""
    bits = flat_bits(torch.tensor([scale], dtype=torch.float32).to(dtype))
    sign = 0x80000000 if dtype == torch.float32 else 0x8000
    return int(bits[0]), int(bits[0]) | sign


class CompressedExpert:
    """A compressed expert (one ``.cpeft`` container). Construct with :func:`compeft.open` or
    :func:`compeft.compress`; nothing but the header is read until a tensor is asked for.

    Examples
    --------
    >>> import torch, compeft
    >>> expert = compeft.compress({"w": torch.randn(64, 64)}, density=0.1)
    >>> expert.to_dense("w").shape
    torch.Size([64, 64])
    """

    def __init__(self, reader: RangeReader, header: Header | None = None) -> None:
        self._reader = reader
        self.header = header if header is not None else read_header(reader)
        self._checked: set[str] = set()

    # -- description ---------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self._reader.name

    @property
    def metadata(self) -> dict[str, Any]:
        return self.header.metadata

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.header.tensors]

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.header.by_name[name]
        except KeyError:
            raise InvalidArgumentError(f"no tensor named {name!r} in this expert", self.path) from None

    def __contains__(self, name: object) -> bool:
        return name in self.header.by_name

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.header.tensors)

    def __repr__(self) -> str:
        m = self.metadata
        return (f"CompressedExpert({self.path!r}, tensors={len(self)}, source={m.get('source')!r}, "
                f"density={m.get('density')}, scope={m.get('scope')!r}, bytes={self.header.file_length})")

    # -- payload access ------------------------------------------------------------------------
    def _payload(self, e: TensorEntry) -> bytes:
        data = self._reader.read(self.header.data_start + e.offset, e.length) if e.length else b""
        check_crc(data, e.crc32, f"tensor {e.name!r}", self.path)
        return data

    def streams(self, name: str) -> golomb.GolombStreams:
        """The verified, structurally checked streams of a compressed tensor."""
        e = self.entry(name)
        if e.encoding == ENCODING_DENSE:
            raise InvalidArgumentError(f"tensor {name!r} is stored dense", self.path)
        s = golomb.parse_payload(self._payload(e), nnz=e.nnz, numel=e.numel, golomb_m=e.golomb_m,
                                 chunk_size=e.chunk_size, unary_bits=e.unary_bits,
                                 remainder_bits=e.remainder_bits, where=f"tensor {name!r}", path=self.path)
        if name not in self._checked:
            golomb.decode(s, e.numel, kernels.MODE_CHECK, np.empty(0, np.uint16), where=f"tensor {name!r}",
                          path=self.path)
            self._checked.add(name)
        return s

    def _dense_payload(self, e: TensorEntry) -> torch.Tensor:
        out = torch.empty(e.shape, dtype=DTYPE_TO_TORCH[e.dtype])
        if e.numel:
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            if isinstance(self._reader, FileReader):
                self._reader.readinto(self.header.data_start + e.offset, view)
            else:
                view[:] = self._reader.read(self.header.data_start + e.offset, e.length)
            check_crc(view, e.crc32, f"tensor {e.name!r}", self.path)
        return out

    def to_dense(self, name: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Decode one tensor to a dense torch tensor in its original dtype and shape.

        A ``delta`` tensor gives the reconstructed residual τ̃ (without the PEFT ``init``); a
        ``value`` tensor gives its stored value. ``dtype`` converts the result.
        """
        e = self.entry(name)
        if e.encoding == ENCODING_DENSE:
            out = self._dense_payload(e)
        else:
            tdtype = DTYPE_TO_TORCH[e.dtype]
            out = zeros(e.shape, tdtype)
            positive, negative = value_patterns(e.scale, tdtype)
            s = golomb.parse_payload(self._payload(e), nnz=e.nnz, numel=e.numel, golomb_m=e.golomb_m,
                                     chunk_size=e.chunk_size, unary_bits=e.unary_bits,
                                     remainder_bits=e.remainder_bits, where=f"tensor {name!r}", path=self.path)
            bits = flat_bits(out) if e.numel else np.empty(0, np.uint16)
            golomb.decode(s, e.numel, kernels.MODE_SCATTER, bits, positive=positive, negative=negative,
                          where=f"tensor {name!r}", path=self.path)
            self._checked.add(name)
        return out if dtype is None else out.to(dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor decoded (see :meth:`to_dense`)."""
        return {name: self.to_dense(name) for name in self.names}

    # -- whole-file operations -----------------------------------------------------------------
    def _file_blocks(self) -> Iterator[bytes]:
        size = self.header.file_length
        for start in range(0, size, _COPY_BLOCK):
            yield self._reader.read(start, min(_COPY_BLOCK, size - start))

    def to_bytes(self) -> bytes:
        """The whole container as bytes."""
        return b"".join(self._file_blocks())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the container to ``path`` atomically (temporary file + rename)."""
        atomic_write(path, self._file_blocks())

    def verify(self) -> None:
        """Check every checksum, the padding and every payload's structure (decodes without output)."""
        end = 0
        for e in self.header.tensors:
            if e.offset > end:  # alignment padding between payloads must be zero bytes
                pad = self._reader.read(self.header.data_start + end, e.offset - end)
                if pad.strip(b"\0"):
                    raise LayoutError(f"non-zero padding bytes before tensor {e.name!r}", self.path)
            if e.encoding == ENCODING_DENSE:
                self._dense_payload(e)
            else:
                self.streams(e.name)
            end = e.offset + e.length
        tail = self.header.file_length - self.header.data_start - end
        if tail and self._reader.read(self.header.data_start + end, tail).strip(b"\0"):
            raise LayoutError("non-zero padding bytes at the end of the file", self.path)
