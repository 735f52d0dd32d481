"""``CompressedExpert``: a container opened lazily; tensors are read, verified and decoded on demand."""

from __future__ import annotations

import functools
import math
import os
import struct
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from .codec import golomb, kernels
from .errors import InvalidArgumentError, LayoutError, OutputTooLargeError
from .format import ENCODING_DENSE, Header, RangeReader, TensorEntry, atomic_write, check_crc, read_header
from .weights import DTYPE_TO_TORCH

_BITS_VIEW = {torch.float32: (torch.int32, np.uint32), torch.float16: (torch.int16, np.uint16),
              torch.bfloat16: (torch.int16, np.uint16)}
_ADD_MODE = {torch.float32: kernels.MODE_ADD_F32, torch.float16: kernels.MODE_ADD_F16,
             torch.bfloat16: kernels.MODE_ADD_BF16}
_COPY_BLOCK = 16 * 1024 * 1024
_GAP = 64 * 1024  # payloads closer than this are fetched in one read
_MAX_READ = 256 * 1024 * 1024  # ... as long as that read stays below this
_NO_OUTPUT = np.empty(0, dtype=np.uint16)
try:
    _PHYSICAL_MEMORY = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
except (AttributeError, ValueError, OSError):  # not POSIX: rely on the allocator's own refusal
    _PHYSICAL_MEMORY = 1 << 62


def flat_bits(tensor: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous CPU float32/float16/bfloat16 tensor's bits (uint32/uint16)."""
    int_dtype, np_dtype = _BITS_VIEW[tensor.dtype]
    return tensor.detach().view(int_dtype).reshape(-1).numpy().view(np_dtype)


@functools.lru_cache(maxsize=4096)
def value_patterns(scale: float, dtype: torch.dtype) -> tuple[int, int]:
    """Bit patterns of +value and -value in ``dtype``: the float32 ``scale`` rounded to nearest even."""
    bits = struct.unpack("<I", struct.pack("<f", scale))[0]
    if dtype == torch.float32:
        return bits, bits | 0x80000000
    if dtype == torch.bfloat16:
        half = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    else:
        half = int(np.array([scale], dtype=np.float32).astype(np.float16).view(np.uint16)[0])
    return half, half | 0x8000


def kept_value(scale: float, dtype: torch.dtype) -> float:
    """The magnitude a kept entry decodes to: the float32 scale rounded to the tensor's dtype."""
    bits = value_patterns(scale, dtype)[0]
    if dtype == torch.float32:
        return struct.unpack("<f", struct.pack("<I", bits))[0]
    if dtype == torch.bfloat16:
        return struct.unpack("<f", struct.pack("<I", bits << 16))[0]
    return float(np.array([bits], dtype=np.uint16).view(np.float16)[0])


def allocate(e: TensorEntry, shape: tuple[int, ...], dtype: torch.dtype, path: object, *, zero: bool = False,
             device: Any = None) -> torch.Tensor:
    """The output buffer of a decode. A compressed payload can declare far more elements than the file
    holds bytes (a 2**48-element tensor of zeros has an empty payload), so an output too large for
    this machine is a clear error, not a MemoryError or RuntimeError from deep inside torch."""
    size = math.prod(shape) * dtype.itemsize
    on_cpu = device is None or torch.device(device).type == "cpu"
    reason = "more than this machine's memory" if on_cpu and size > _PHYSICAL_MEMORY else ""
    if not reason:  # (checked first: with overcommit, an allocation can succeed and the zero-fill kill us)
        device = device or "cpu"
        try:
            return (torch.zeros(shape, dtype=dtype, device=device) if zero
                    else torch.empty(shape, dtype=dtype, device=device))
        except (RuntimeError, MemoryError) as exc:
            reason = str(exc).splitlines()[0][:120]
    raise OutputTooLargeError(f"tensor {e.name!r}: cannot allocate its decoded output of {size:,} bytes ({reason})",
                              path)


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
        self._on_device: dict[torch.device, Any] = {}

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
    def _runs(self, entries: Sequence[TensorEntry]) -> list[tuple[int, int]]:
        """(start index, end index) into ``entries`` (in file order) of the runs read together: a run
        grows while the next payload is near and the run stays bounded."""
        runs = []
        i = 0
        while i < len(entries):
            j = i + 1
            while (j < len(entries) and entries[j].offset - (entries[j - 1].offset + entries[j - 1].length) <= _GAP
                   and entries[j].offset + entries[j].length - entries[i].offset <= _MAX_READ):
                j += 1
            runs.append((i, j))
            i = j
        return runs

    def _ranges(self, entries: Sequence[TensorEntry], runs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """(file offset, length) of each run."""
        starts = [entries[i].offset for i, _ in runs]
        ends = [entries[j - 1].offset + entries[j - 1].length for _, j in runs]
        return [(self.header.data_start + s, e - s) for s, e in zip(starts, ends)]

    def _read(self, entries: Sequence[TensorEntry]) -> list[memoryview]:
        """CRC-verified payloads of ``entries`` (in file order); neighbours come in one read, and a
        reader that can (a remote one) fetches all the runs concurrently."""
        runs = self._runs(entries)
        ranges = self._ranges(entries, runs)
        read_many = getattr(self._reader, "read_many", None)
        wanted = [(o, n) for o, n in ranges if n]
        got = iter(read_many(wanted) if read_many is not None else [self._reader.read(o, n) for o, n in wanted])
        views: list[memoryview] = []
        for (i, j), (offset, length) in zip(runs, ranges):
            data = memoryview(next(got) if length else b"")
            start = offset - self.header.data_start
            for e in entries[i:j]:
                view = data[e.offset - start: e.offset - start + e.length]
                check_crc(view, e.crc32, f"tensor {e.name!r}", self.path)
                views.append(view)
        return views

    def prefetch(self, names: Sequence[str] | None = None) -> None:
        """Start fetching these tensors' payloads (default all) in the background, when the expert
        is read from a URL; later reads of them wait for those bytes instead of asking again. Lets a
        caller overlap the network with decoding. Does nothing for local files."""
        prefetch = getattr(self._reader, "prefetch", None)
        if prefetch is None:
            return
        entries = self._entries(names)
        prefetch([r for r in self._ranges(entries, self._runs(entries)) if r[1]])

    def _entries(self, names: Sequence[str] | None) -> list[TensorEntry]:
        entries = list(self.header.tensors) if names is None else [self.entry(n) for n in names]
        return sorted(entries, key=lambda e: e.offset)

    def _parse(self, e: TensorEntry, payload: memoryview, check: bool = False) -> golomb.GolombStreams:
        return golomb.parse_payload(payload, nnz=e.nnz, numel=e.numel, golomb_m=e.golomb_m, chunk_size=e.chunk_size,
                                    unary_bits=e.unary_bits, high_bits=e.high_bits,
                                    where=f"tensor {e.name!r}", path=self.path, check=check)

    @staticmethod
    def _dense(e: TensorEntry, payload: memoryview) -> torch.Tensor:
        out = torch.empty(e.shape, dtype=DTYPE_TO_TORCH[e.dtype])
        if e.numel:
            out.view(-1).view(torch.uint8).numpy()[:] = np.frombuffer(payload, dtype=np.uint8)
        return out

    def payloads(self, names: Sequence[str] | None = None, *, check: bool = True
                 ) -> dict[str, torch.Tensor | golomb.GolombStreams]:
        """Read and CRC-verify tensors without decoding them: dense tensors as torch tensors,
        compressed ones as their streams. With ``check``, every chunk not checked before is also
        decoded once without output, so a later decode into a caller's weights cannot fail halfway."""
        entries = self._entries(names)
        out: dict[str, torch.Tensor | golomb.GolombStreams] = {}
        jobs = []
        unchecked = []
        for e, payload in zip(entries, self._read(entries)):
            if e.encoding == ENCODING_DENSE:
                out[e.name] = self._dense(e, payload)
                continue
            streams = out[e.name] = self._parse(e, payload)
            if check and e.name not in self._checked:
                jobs.append(golomb.DecodeJob(streams, e.numel, _NO_OUTPUT, f"tensor {e.name!r}"))
                unchecked.append(e.name)
        golomb.decode_many(jobs, kernels.MODE_CHECK, self.path)
        self._checked.update(unchecked)
        return out

    def to_device(self, device: str | torch.device = "cuda") -> Any:
        """The expert's compressed bytes copied to a GPU once (cached per device): a
        :class:`compeft.gpu.DeviceExpert` that decodes, applies and merges there."""
        from .gpu import DeviceExpert, kernel_device

        dev = kernel_device(device)
        if dev not in self._on_device:
            self._on_device[dev] = DeviceExpert(self, dev)
        return self._on_device[dev]

    def state_dict(self, names: Sequence[str] | None = None, *, device: str | torch.device | None = None
                   ) -> dict[str, torch.Tensor]:
        """Tensors decoded (all, or ``names``), in their original dtypes and shapes; see :meth:`to_dense`.

        Every payload is read (neighbours in one read), verified and decoded in one parallel pass;
        with a CUDA ``device``, the compressed bytes are copied there (once) and decoded there.
        """
        if device is not None and torch.device(device).type != "cpu":
            return self.to_device(device).state_dict(names)
        entries = self._entries(names)
        out: dict[str, torch.Tensor] = {}
        jobs = []
        for e, payload in zip(entries, self._read(entries)):
            if e.encoding == ENCODING_DENSE:
                out[e.name] = self._dense(e, payload)
                continue
            dtype = DTYPE_TO_TORCH[e.dtype]
            streams = self._parse(e, payload, check=True)  # the chunk table is sound before the output exists
            tensor = out[e.name] = allocate(e, e.shape, dtype, self.path)
            positive, negative = value_patterns(e.scale, dtype)
            jobs.append(golomb.DecodeJob(streams, e.numel, flat_bits(tensor), f"tensor {e.name!r}", positive, negative))
        golomb.decode_many(jobs, kernels.MODE_DENSE, self.path)
        self._checked.update(e.name for e in entries)
        return out if names is None else {n: out[n] for n in names}

    def to_dense(self, name: str, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None
                 ) -> torch.Tensor:
        """Decode one tensor to a dense torch tensor in its original dtype and shape.

        A ``delta`` tensor gives the reconstructed residual τ̃ (without the PEFT ``init``); a
        ``value`` tensor gives its stored value. ``dtype`` converts the result. A CUDA ``device``
        decodes there from the compressed bytes (bit-identical to the CPU decoder).
        """
        out = self.state_dict([name], device=device)[name]
        return out if dtype is None else out.to(dtype)

    # -- whole-file operations -----------------------------------------------------------------
    def _file_blocks(self) -> Iterator[bytes]:
        size = self.header.file_length
        for start in range(0, size, _COPY_BLOCK):
            yield self._reader.read(start, min(_COPY_BLOCK, size - start))

    def to_bytes(self) -> bytes:
        """The whole container as bytes."""
        return b"".join(self._file_blocks())

    def save(self, path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> None:
        """Write the container to ``path`` atomically: a local path or ``file://`` URL by temporary
        file + rename, any other fsspec URL as :func:`compeft.remote.write` describes (one put on
        object stores). ``storage_options`` go to fsspec."""
        from .remote import is_url, write
        if is_url(path):
            write(str(path), self._file_blocks(), storage_options)
        else:
            atomic_write(path, self._file_blocks())

    def verify(self) -> None:
        """Check every checksum, the padding and every payload's structure (decodes without output)."""
        end = 0
        for e in self.header.tensors:
            if e.offset > end:  # alignment padding between payloads must be zero bytes
                pad = self._reader.read(self.header.data_start + end, e.offset - end)
                if pad.strip(b"\0"):
                    raise LayoutError(f"non-zero padding bytes before tensor {e.name!r}", self.path)
            end = e.offset + e.length
        tail = self.header.file_length - self.header.data_start - end
        if tail and self._reader.read(self.header.data_start + end, tail).strip(b"\0"):
            raise LayoutError("non-zero padding bytes at the end of the file", self.path)
        self._checked.clear()
        self.payloads()
