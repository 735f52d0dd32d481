"""``CompressedExpert``: a container opened lazily; tensors are read, verified and decoded on demand.

Also the verbs that turn a path into an expert (:func:`open`, :func:`as_expert`) and the check
that a state dict is an expert's base (:func:`check_base`).
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, MutableMapping, Sequence

import numpy as np
import torch

from .codec import golomb, kernels
from .dtypes import DTYPE_TO_TORCH
from .errors import BaseMismatchError, InvalidArgumentError, LayoutError
from .format import ENCODING_DENSE, Header, RangeReader, TensorEntry, atomic_write, check_payload, read_header
from .format.layout import padding
from . import gpu
from .memory import allocate, available_memory, check_outputs, output_bytes  # noqa: F401 - re-exported
from .plan import ADD, DECODE, CpuExecutor, StreamTensor, TensorPlan
from .remote import is_url, open_reader, write
from .sources import fingerprint

PathLike = str | os.PathLike[str]

_COPY_BLOCK = 16 * 1024 * 1024
_GAP = 64 * 1024  # payloads closer than this are fetched in one read
_MAX_READ = 256 * 1024 * 1024  # ... as long as that read stays below this
_NO_OUTPUT = np.empty(0, dtype=np.uint16)

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
        """(file offset, length) of each run; a run that reaches the last payload also takes the
        file's final padding (at most 7 bytes), so that ``verify`` after reading everything asks for
        nothing more."""
        data_length = self.header.file_length - self.header.data_start
        starts = [entries[i].offset for i, _ in runs]
        ends = [entries[j - 1].offset + entries[j - 1].length for _, j in runs]
        ends = [data_length if data_length - e < 8 else e for e in ends]
        return [(self.header.data_start + s, e - s) for s, e in zip(starts, ends)]

    def _split(self, entries: Sequence[TensorEntry], data: memoryview, offset: int) -> list[memoryview]:
        """The checked payloads (CRC, and whatever else needs no decoding) of one run read at ``offset``."""
        start = offset - self.header.data_start
        views = []
        for e in entries:
            view = data[e.offset - start: e.offset - start + e.length]
            check_payload(e, view, self.path)
            views.append(view)
        return views

    def _read(self, entries: Sequence[TensorEntry]) -> list[memoryview]:
        """Checked payloads of ``entries`` (in file order); neighbours come in one read, and a
        reader that can (a remote one) fetches all the runs concurrently."""
        runs = self._runs(entries)
        ranges = self._ranges(entries, runs)
        read_many = getattr(self._reader, "read_many", None)
        wanted = [(o, n) for o, n in ranges if n]
        got = iter(read_many(wanted) if read_many is not None else [self._reader.read(o, n) for o, n in wanted])
        views: list[memoryview] = []
        for (i, j), (offset, length) in zip(runs, ranges):
            views += self._split(entries[i:j], memoryview(next(got) if length else b""), offset)
        return views

    def _read_runs(self, entries: Sequence[TensorEntry]) -> Iterator[list[tuple[TensorEntry, memoryview]]]:
        """The checked payloads of ``entries`` one run at a time (at most one run's bytes held, plus
        the next run a remote reader is already fetching): what :meth:`verify` walks."""
        runs = self._runs(entries)
        ranges = self._ranges(entries, runs)
        prefetch = getattr(self._reader, "prefetch", None)
        for k, ((i, j), (offset, length)) in enumerate(zip(runs, ranges)):
            if prefetch is not None and k + 1 < len(ranges) and ranges[k + 1][1]:
                prefetch([ranges[k + 1]])
            data = memoryview(self._reader.read(offset, length) if length else b"")
            yield list(zip(entries[i:j], self._split(entries[i:j], data, offset)))

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
                                    unary_bits=e.unary_bits, high_bits=e.high_bits, encoding=e.encoding,
                                    where=f"tensor {e.name!r}", path=self.path, check=check)

    def _dense(self, e: TensorEntry, payload: memoryview) -> torch.Tensor:
        out = allocate(e, e.shape, DTYPE_TO_TORCH[e.dtype], self.path)
        if e.numel:
            out.view(-1).view(torch.uint8).numpy()[:] = np.frombuffer(payload, dtype=np.uint8)
        return out

    def payloads(self, names: Sequence[str] | None = None, *, check: bool = True
                 ) -> dict[str, torch.Tensor | golomb.GolombStreams]:
        """Read and CRC-verify tensors without decoding them: dense tensors as torch tensors,
        compressed ones as their streams. With ``check``, every chunk of these very bytes is also
        checked (``kernels.tally_chunk``: the walk's verdict, without output), so a later decode of
        them into a caller's weights cannot fail halfway. Nothing is cached between calls: the bytes
        read are the bytes checked (spec/SECURITY.md T22), and checking them costs less than hashing
        them would."""
        entries = self._entries(names)
        check_outputs([(e.name, output_bytes(e)) for e in entries if e.encoding == ENCODING_DENSE], self.path)
        out: dict[str, torch.Tensor | golomb.GolombStreams] = {}
        jobs = []
        for e, payload in zip(entries, self._read(entries)):
            if e.encoding == ENCODING_DENSE:
                out[e.name] = self._dense(e, payload)
                continue
            streams = out[e.name] = self._parse(e, payload, check=True)  # the table is sound before any output exists
            if check:
                jobs.append(golomb.DecodeJob(streams, e.numel, _NO_OUTPUT, f"tensor {e.name!r}"))
        golomb.decode_many(jobs, kernels.MODE_CHECK, self.path)
        return out

    def tensors(self, names: Sequence[str] | None = None, *, check: bool = True) -> dict[str, StreamTensor]:
        """:meth:`payloads` with what an executor needs from the header, in file order."""
        out = {}
        for name, payload in self.payloads(names, check=check).items():
            e = self.entry(name)
            dense = isinstance(payload, torch.Tensor)
            out[name] = StreamTensor(name, e.shape, e.numel, DTYPE_TO_TORCH[e.dtype], e.role, e.scale,
                                     streams=None if dense else payload, value=payload if dense else None)
        return out

    def executor(self, device: str | torch.device | None = None, names: Sequence[str] | None = None, *,
                 check: bool = True) -> CpuExecutor | gpu.DeviceExecutor:
        """What runs plans (:mod:`compeft.plan`) over these tensors (default all): a
        :class:`~compeft.plan.CpuExecutor`, or for a CUDA ``device`` a
        :class:`~compeft.gpu.DeviceExecutor` holding the compressed bytes there (the whole
        expert's copy is cached per device). ``check``: every chunk is decoded once without output
        first, so a later write into a caller's weights cannot fail halfway."""
        if device is None or torch.device(device).type == "cpu" and not gpu.interpreted():
            return CpuExecutor(self.tensors(names, check=check), self.path)
        if names is None or list(names) == self.names:
            placed = self.to_device(device).executor
        else:
            placed = gpu.DeviceExecutor(list(self.tensors(names, check=False).values()), device, self.path)
        if check:
            placed.check()
        return placed

    def to_device(self, device: str | torch.device = "cuda") -> DeviceExpert:
        """The expert's compressed bytes copied to a GPU once (cached per device): a
        :class:`DeviceExpert` that decodes and applies there."""
        dev = gpu.kernel_device(device)
        if dev not in self._on_device:
            self._on_device[dev] = DeviceExpert(self, gpu.DeviceExecutor(list(self.tensors(check=False).values()),
                                                                         dev, self.path))
        return self._on_device[dev]

    def state_dict(self, names: Sequence[str] | None = None, *, device: str | torch.device | None = None
                   ) -> dict[str, torch.Tensor]:
        """Tensors decoded (all, or ``names``), in their original dtypes and shapes; see :meth:`to_dense`.

        Every payload is read (neighbours in one read), verified and decoded in one parallel pass;
        with a CUDA ``device``, the compressed bytes are copied there (once) and decoded there.
        """
        if device is not None and torch.device(device).type != "cpu":
            return self.to_device(device).state_dict(names)
        check_outputs([(e.name, output_bytes(e)) for e in self._entries(names)], self.path)  # before any allocation
        held = self.tensors(names, check=False)
        out: dict[str, torch.Tensor] = {}
        plans = []
        for name, t in held.items():
            if t.value is not None:
                out[name] = t.value
                continue
            out[name] = allocate(self.entry(name), t.shape, t.dtype, self.path)
            plans.append(TensorPlan(name, DECODE, out[name]))
        CpuExecutor(held, self.path).run(plans)
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
        if is_url(path):
            write(str(path), self._file_blocks(), storage_options)
        else:
            atomic_write(path, self._file_blocks())

    def verify(self) -> None:
        """Check every checksum, the padding and every payload's structure (decodes without output).

        Reads one run of neighbouring payloads at a time and copies nothing: it holds the header and
        at most one run (FORMAT.md 8), whatever the file's size."""
        for offset, length, where in padding(self.header):
            if self._reader.read(offset, length).strip(b"\0"):
                raise LayoutError(f"non-zero padding bytes {where}", self.path)
        for run in self._read_runs(self._entries(None)):
            jobs = []
            for e, payload in run:
                if e.encoding == ENCODING_DENSE:
                    continue  # its bytes are checked (CRC, bool values); nothing to decode
                streams = self._parse(e, payload, check=True)
                jobs.append(golomb.DecodeJob(streams, e.numel, _NO_OUTPUT, f"tensor {e.name!r}"))
            golomb.decode_many(jobs, kernels.MODE_CHECK, self.path)


class DeviceExpert:
    """An expert with its compressed bytes on one GPU (:meth:`CompressedExpert.to_device`): decodes
    and adds there, bit-identical to the CPU. ``executor`` is the :class:`compeft.gpu.DeviceExecutor`."""

    def __init__(self, expert: CompressedExpert, executor: gpu.DeviceExecutor) -> None:
        self.expert, self.executor = expert, executor
        self.device = executor.device

    @property
    def nbytes(self) -> int:
        """Bytes of compressed words held on the device."""
        return self.executor.nbytes

    def state_dict(self, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Dense tensors on the device (as :meth:`CompressedExpert.state_dict`, bit for bit)."""
        names = self.executor.names if names is None else list(names)
        out: dict[str, torch.Tensor] = {}
        by_dtype: dict[torch.dtype, list[str]] = {}
        for name in names:
            if name not in self.executor.tensors:
                raise InvalidArgumentError(f"tensor {name!r} is not on this device", self.expert.path)
            if name in self.executor.dense:
                out[name] = self.executor.dense[name].value.clone()
            else:
                by_dtype.setdefault(self.executor.tensors[name].dtype, []).append(name)
        check_outputs([(n, output_bytes(self.expert.entry(n))) for group in by_dtype.values() for n in group],
                      self.expert.path, self.device)
        plans = []
        for dtype, group in by_dtype.items():
            # one zero-filled buffer per dtype, each tensor a view of it: one memset, one launch
            held = [self.executor.tensors[n] for n in group]
            flat = allocate(self.expert.entry(group[0]), (sum(t.numel for t in held),), dtype, self.expert.path,
                            zero=True, device=self.device)
            start = 0
            for t in held:
                view = flat[start:start + t.numel]
                out[t.name] = view.view(t.shape)
                plans.append(TensorPlan(t.name, DECODE, view))
                start += t.numel
        self.executor.run(plans)
        return {n: out[n] for n in names}

    def add_into(self, state: MutableMapping[str, torch.Tensor], scale: float = 1.0,
                 names: Sequence[str] | None = None) -> None:
        """``w = dtype(float32(w) ± step)`` at every kept entry, in place (as :func:`compeft.apply`);
        value tensors are copied over their weights. Every chunk is checked before the first write."""
        names = self.executor.names if names is None else list(names)
        self.executor.check()
        self.executor.run([TensorPlan(n, ADD, state[n], scale) for n in names])


def open(path: PathLike, *, storage_options: Mapping[str, Any] | None = None,  # noqa: A001 - as safetensors
         cache: PathLike | None = None, progress: bool = False) -> CompressedExpert:
    """Open a ``.cpeft`` file or URL lazily: reads and validates the preamble and header only.

    Parameters
    ----------
    path
        A local path, or any fsspec URL (``https://…``, ``s3://bucket/key``, ``hf://…``,
        ``file://…``, chained ``simplecache::s3://…``). Reading one tensor of a remote expert is
        one range request; many tensors are fetched concurrently (docs/remote.md).
    storage_options
        Options for the URL's file system (credentials, ``client_kwargs``…), passed to fsspec.
    cache
        A directory for a persistent cache of fetched bytes, keyed by the URL and the object's
        ETag / version / size, so a changed object is never served stale; several processes may
        share it. Not used for local files.
    progress
        Show a progress bar of bytes fetched on long transfers.

    Examples
    --------
    >>> import compeft, torch, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "e.cpeft")
    >>> compeft.compress({"w": torch.randn(8, 8)}).save(path)
    >>> compeft.open(path).names
    ['w']
    >>> compeft.open("file://" + path).names
    ['w']
    """
    return CompressedExpert(open_reader(path, storage_options, cache, progress=progress))


def as_expert(expert: CompressedExpert | PathLike) -> CompressedExpert:
    """``expert`` itself, or the expert opened from a path or URL."""
    return expert if isinstance(expert, CompressedExpert) else open(expert)


def check_state(expert: CompressedExpert, state: Mapping[str, torch.Tensor], check_fingerprint: bool,
               names: Sequence[str] | None = None) -> None:
    """``state`` holds a floating weight of the right shape for each of ``names`` (default all the
    expert's tensors) and, when they are all of them and ``check_fingerprint``, matches the
    expert's base fingerprint."""
    names = expert.names if names is None else list(names)
    missing = [n for n in names if n not in state]
    if missing:
        raise BaseMismatchError(f"{len(missing)} tensors of the expert are not in the base (e.g. {missing[:3]})",
                                expert.path)
    for name in names:
        e, w = expert.entry(name), state[name]
        if tuple(w.shape) != e.shape:
            raise BaseMismatchError(f"tensor {name!r}: expert shape {list(e.shape)}, base shape {list(w.shape)}",
                                    expert.path)
        if e.role == "delta" and not w.is_floating_point():
            raise BaseMismatchError(f"tensor {name!r}: cannot add a delta into a {w.dtype} weight", expert.path)
    wanted = expert.metadata.get("base_fingerprint")
    if check_fingerprint and wanted and len(names) == len(expert):
        got = fingerprint((n, state[n]) for n in expert.names)
        if got != wanted:
            raise BaseMismatchError("the base is not the one this expert was made from (fingerprint "
                                    f"{got[:22]}… ≠ {wanted[:22]}…); pass check_base=False / --force to apply anyway",
                                    expert.path)
