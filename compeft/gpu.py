"""Decode, apply and merge on a GPU straight from the compressed bytes (Triton kernels).

A :class:`DeviceExpert` holds an expert's compressed tensors on one device: every payload copied
once (one host-to-device copy of the words, from pinned memory) plus a small parameter table. From
there, decoding to dense tensors, adding into resident weights, saving and restoring the entries
an add overwrites (hot swaps) and the merge accumulators all run as one kernel launch over every
chunk of every tensor (:mod:`compeft.codec.triton_kernels`).

Results are bit-identical to the CPU decoder: the same float32 adds in the same order per
position, the same round-to-nearest-even into bfloat16 / float16. Nothing here is imported unless
a device is asked for; ``import compeft`` never imports triton.

Examples
--------
>>> import torch, compeft                                   # doctest: +SKIP
>>> expert = compeft.open("math.cpeft")                     # doctest: +SKIP
>>> w = expert.to_dense("layers.0.q_proj.lora_A.weight", device="cuda")   # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping, MutableMapping, NamedTuple, Sequence

import numpy as np
import torch

from .codec import golomb, kernels
from .errors import CorruptPayloadError, InvalidArgumentError
from .expert import allocate, kept_value, value_patterns
from .format.header import golomb_width
from .weights import DTYPE_TO_TORCH

if TYPE_CHECKING:  # pragma: no cover
    from .expert import CompressedExpert

BLOCK = 512  # unary bits per tile of the decode kernel: the best of benchmarks/gpu.py's sweep on an H100
NUM_WARPS = 2
_WIDE = {torch.float32: True, torch.float16: False, torch.bfloat16: False}
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_ADD_MODE = {torch.float32: kernels.MODE_ADD_F32, torch.float16: kernels.MODE_ADD_F16,
             torch.bfloat16: kernels.MODE_ADD_BF16}


def interpreted() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``): then CPU tensors stand in
    for device ones, which is how the kernels are tested on machines without a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """Whether a CUDA device and Triton are present."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device the kernels can run on, or a clear error."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else dev
    if dev.type == "cpu" and interpreted():
        return dev
    if dev.type != "cuda":
        raise InvalidArgumentError(f"the GPU decoder runs on CUDA devices, not {dev}")
    if not available():
        raise InvalidArgumentError("no usable CUDA device: torch.cuda.is_available() is False or triton is missing "
                                   "(pip install triton)")
    return dev


def _is_narrow(streams: golomb.GolombStreams, numel: int) -> bool:
    """Whether the kernel may decode this tensor with int32 chunk-relative arithmetic: every chunk
    spans fewer than 2**30 positions and unary bits, and m < 2**19 (so a tile's Σ r, at most
    BLOCK · m, fits too)."""
    table = streams.table
    spans = np.diff(table[:, 0], append=numel)
    bits = np.diff(table[:, 1], append=streams.unary_bits)
    return bool(streams.golomb_m < 1 << 19 and spans.max() < 1 << 30 and bits.max() < 1 << 30)


class _Launch(NamedTuple):
    status: torch.Tensor  # int64[chunks] on the device
    names: list[str]
    work: np.ndarray  # int64[chunks, 2]: (index into names, chunk)
    path: str


def raise_bad(launches: Sequence[_Launch | None]) -> None:
    """Raise :class:`CorruptPayloadError` for the first bad chunk of ``launches`` (one device sync
    when all are good)."""
    done = [launch for launch in launches if launch is not None]
    if not done or not bool(torch.stack([launch.status.ne(0).any() for launch in done]).any()):
        return
    for launch in done:
        bad = torch.nonzero(launch.status).flatten()
        if bad.numel():
            j = int(bad[0])
            code = int(launch.status[j])
            name = launch.names[int(launch.work[j, 0])]
            raise CorruptPayloadError(f"tensor {name!r}: chunk {int(launch.work[j, 1])} is corrupt: "
                                      f"{kernels.STATUS_MESSAGES.get(code, str(code))}", launch.path)


def _kernels() -> Any:
    from .codec import triton_kernels
    return triton_kernels


class DeviceExpert:
    """An expert's tensors (all, or ``names``) with their compressed bytes on ``device``.

    Build with :meth:`compeft.CompressedExpert.to_device` (cached per device). Payload CRCs and
    chunk tables are checked on the host before the copy; each chunk's bits are checked on the
    device the first time something is written into a caller's weights (:meth:`check`).
    """

    def __init__(self, expert: CompressedExpert, device: str | torch.device = "cuda",
                 names: Sequence[str] | None = None,
                 payloads: Mapping[str, torch.Tensor | golomb.GolombStreams] | None = None) -> None:
        self.device = kernel_device(device)
        self.expert = expert
        self.path = expert.path
        if payloads is None:
            payloads = expert.payloads(names, check=False)
        self.names = list(payloads) if names is None else list(names)
        self.dense: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}  # name -> parameter row; -1 for a tensor with no kept entry
        compressed: list[tuple[golomb.GolombStreams, int]] = []
        for name in self.names:
            payload = payloads[name]
            if isinstance(payload, torch.Tensor):
                self.dense[name] = payload.to(self.device)
            else:
                self.rows[name] = len(compressed) if payload.nnz else -1
                if payload.nnz:
                    compressed.append((payload, expert.entry(name).numel))
        words, cpu_params = golomb.pack(compressed)
        status = np.zeros(len(compressed), dtype=np.int64)
        kernels.check_tables(words, cpu_params, status)
        bad = np.flatnonzero(status)
        if bad.size:
            name = [n for n in self.rows if self.rows[n] >= 0][int(bad[0])]
            raise CorruptPayloadError(f"tensor {name!r}: {kernels.STATUS_MESSAGES[int(status[bad[0]])]}", self.path)
        k = _kernels()
        self.params = np.zeros((len(compressed), k.N_GPU_PARAMS), dtype=np.int64)
        self.params[:, :kernels.N_PARAMS] = cpu_params
        for t, (streams, _) in enumerate(compressed):
            b = golomb_width(streams.golomb_m)
            cut = (1 << b) - streams.golomb_m if b else 1  # m = 1: the low field is always 0, never a long form
            half = (1 << (b - 1)) - cut if b else 0
            self.params[t, [k.G_WIDTH, k.G_CUT, k.G_HALF, k.G_CHUNKS]] = (max(b - 1, 0), cut, half,
                                                                           streams.table.shape[0])
        self.narrow = np.array([_is_narrow(streams, numel) for streams, numel in compressed], dtype=bool)
        host = torch.from_numpy(words.view(np.int64))
        if self.device.type == "cuda":
            host = host.pin_memory()
        self.words = host.to(self.device, non_blocking=True)
        self._checked = False

    # -- launching -----------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of compressed words held on the device."""
        return int(self.words.numel()) * 8

    def _launch(self, mode: int, targets: Mapping[str, dict[str, Any]], wide: bool, drops: bool = False
                ) -> _Launch | None:
        """One kernel launch over every chunk of the tensors in ``targets`` (name -> column values
        of its parameter row: ``out``, ``aux``, ``delta``, ``positive``, ``negative``, drops).
        Returns what :func:`raise_bad` needs to report a bad chunk (no device sync here)."""
        k = _kernels()
        names = [n for n in targets if self.rows.get(n, -1) >= 0]
        if not names:
            return None
        index = np.array([self.rows[n] for n in names], dtype=np.int64)
        params = self.params[index].copy()
        for t, name in enumerate(names):
            values = targets[name]
            params[t, k.G_OUT] = values.get("out", 0)
            params[t, k.G_AUX] = values.get("aux", 0)
            params[t, k.G_DELTA] = int(np.float32(values.get("delta", 0.0)).view(np.uint32))
            params[t, kernels.P_POSITIVE] = values.get("positive", 0)
            params[t, kernels.P_NEGATIVE] = values.get("negative", 0)
            params[t, kernels.P_DROP_KEY] = values.get("drop_key", 0)
            params[t, kernels.P_DROP_CUT] = values.get("drop_cut", 0)
        work = golomb.chunk_work(params[:, k.G_CHUNKS])
        params_dev = torch.from_numpy(params).to(self.device)
        work_dev = torch.from_numpy(work).to(self.device)
        status = torch.zeros(work.shape[0], dtype=torch.int64, device=self.device)
        import triton.language as tl

        index_type = tl.int32 if self.narrow[index].all() else tl.int64
        k.decode_chunks[(work.shape[0],)](self.words, params_dev, work_dev, status, MODE=mode, WIDE=wide,
                                          DROPS=drops, IDX=index_type, BLOCK=BLOCK, num_warps=NUM_WARPS)
        return _Launch(status, names, work, self.path)

    def check(self) -> None:
        """Decode every chunk without output once; raises :class:`CorruptPayloadError` on the first bad one."""
        if not self._checked:
            raise_bad([self._launch(kernels.MODE_CHECK, {n: {} for n in self.rows}, wide=False)])
            self._checked = True

    # -- decoding ------------------------------------------------------------------------------
    def state_dict(self, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Dense tensors on the device, in their original dtypes and shapes (as
        :meth:`compeft.CompressedExpert.state_dict`, bit for bit)."""
        names = self.names if names is None else list(names)
        out: dict[str, torch.Tensor] = {}
        by_dtype: dict[torch.dtype, list[str]] = {}
        for name in names:
            if name in self.dense:
                out[name] = self.dense[name].clone()
            elif name not in self.rows:
                raise InvalidArgumentError(f"tensor {name!r} is not on this device", self.path)
            else:
                by_dtype.setdefault(DTYPE_TO_TORCH[self.expert.entry(name).dtype], []).append(name)
        launches = []
        for dtype, group in by_dtype.items():
            # one zero-filled buffer per dtype, each tensor a view of it: one memset, one launch
            entries = [self.expert.entry(n) for n in group]
            flat = allocate(entries[0], (sum(e.numel for e in entries),), dtype, self.path, zero=True,
                            device=self.device)
            targets = {}
            start = 0
            for name, e in zip(group, entries):
                view = flat[start:start + e.numel]
                out[name] = view.view(e.shape)
                positive, negative = value_patterns(e.scale, dtype)
                targets[name] = dict(out=view.data_ptr(), positive=positive, negative=negative)
                start += e.numel
            launches.append(self._launch(kernels.MODE_SCATTER, targets, wide=_WIDE[dtype]))
        raise_bad(launches)
        return {n: out[n] for n in names}

    # -- writing into weights ------------------------------------------------------------------
    def _weights(self, state: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
        found = {}
        for name in names:
            w = state[name]
            if w.device != self.device or not w.is_contiguous():
                raise InvalidArgumentError(f"weight {name!r} must be a contiguous tensor on {self.device}, "
                                           f"not {'a strided one' if w.device == self.device else w.device}",
                                           self.path)
            found[name] = w
        return found

    def add_into(self, state: MutableMapping[str, torch.Tensor], scale: float = 1.0,
                 names: Sequence[str] | None = None) -> None:
        """``w = dtype(float32(w) + float32(scale) · float32(v))`` at every kept entry, in place (as
        :func:`compeft.apply`); value tensors are copied over their weights. Every chunk is checked
        before the first write."""
        from .api import _added  # api imports this module lazily: no cycle at import time

        names = self.names if names is None else list(names)
        weights = self._weights(state, names)
        self.check()
        step = np.float32(scale)
        by_mode: dict[tuple[int, bool], dict[str, dict[str, Any]]] = {}
        for name in names:
            w = weights[name]
            e = self.expert.entry(name)
            if name in self.dense:
                if e.role == "value":
                    w.copy_(self.dense[name])
                else:
                    w.copy_(_added(w, float(step) * self.dense[name].float()))
                continue
            if w.dtype not in _ADD_MODE:
                raise InvalidArgumentError(f"weight {name!r} is {w.dtype}: the GPU add supports float32, "
                                           "float16 and bfloat16", self.path)
            delta = float(np.float32(step * np.float32(kept_value(e.scale, DTYPE_TO_TORCH[e.dtype]))))
            by_mode.setdefault((_ADD_MODE[w.dtype], _WIDE[w.dtype]), {})[name] = dict(out=w.data_ptr(), delta=delta)
        raise_bad([self._launch(mode, targets, wide) for (mode, wide), targets in by_mode.items()])

    def save_entries(self, state: Mapping[str, torch.Tensor], names: Sequence[str] | None = None
                     ) -> dict[str, torch.Tensor]:
        """The current values of ``state`` at the kept entries (one slot per entry, in entry order),
        and a copy of each dense-stored tensor's weight: what :meth:`restore_entries` puts back."""
        names = self.names if names is None else list(names)
        weights = self._weights(state, names)
        self.check()
        saved: dict[str, torch.Tensor] = {}
        by_width: dict[bool, dict[str, dict[str, Any]]] = {}
        for name in names:
            w = weights[name]
            if name in self.dense or w.dtype not in _WIDE:
                saved[name] = w.clone()
                continue
            nnz = int(self.params[self.rows[name], kernels.P_NNZ]) if self.rows[name] >= 0 else 0
            slots = saved[name] = torch.empty(nnz, dtype=_INT_VIEW[w.dtype], device=self.device)
            by_width.setdefault(_WIDE[w.dtype], {})[name] = dict(out=w.data_ptr(), aux=slots.data_ptr())
        raise_bad([self._launch(_kernels().MODE_SAVE, targets, wide) for wide, targets in by_width.items()])
        return saved

    def restore_entries(self, state: MutableMapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor]) -> None:
        """Put back what :meth:`save_entries` saved (bit-exact)."""
        weights = self._weights(state, list(saved))
        by_width: dict[bool, dict[str, dict[str, Any]]] = {}
        for name, slots in saved.items():
            w = weights[name]
            if slots.shape == w.shape and slots.dtype == w.dtype:
                w.copy_(slots)
                continue
            by_width.setdefault(_WIDE[w.dtype], {})[name] = dict(out=w.data_ptr(), aux=slots.data_ptr())
        raise_bad([self._launch(_kernels().MODE_RESTORE, targets, wide) for wide, targets in by_width.items()])

    # -- merge accumulators --------------------------------------------------------------------
    def accumulate(self, mode: int, outs: Mapping[str, torch.Tensor], deltas: Mapping[str, float],
                   elected: Mapping[str, torch.Tensor] | None = None,
                   drops: Mapping[str, tuple[int, int]] | None = None) -> _Launch | None:
        """Merge passes (``kernels.MODE_ADD_F32`` or ``MODE_TIES``) into float32 accumulators
        ``outs`` (flat; [2·numel] for MODE_TIES) on the device; ``elected``: the flat float32
        sign-election sums of MODE_TIES; ``drops``: DARE (key, cut) per tensor. Returns the launch
        for :func:`raise_bad` (checked once per merge group rather than once per expert)."""
        targets = {}
        for name, out in outs.items():
            values: dict[str, Any] = dict(out=out.data_ptr(), delta=deltas[name])
            if elected is not None:
                values["aux"] = elected[name].data_ptr()
            if drops:
                values["drop_key"], values["drop_cut"] = drops[name]
            targets[name] = values
        return self._launch(mode, targets, wide=True, drops=bool(drops))


def on_device(expert: CompressedExpert, device: torch.device, names: Sequence[str]) -> DeviceExpert:
    """``expert``'s tensors ``names`` on ``device``: the cached whole expert when they are all of
    them (its bytes copied once, reused by later calls), else a new partial copy."""
    if list(names) == expert.names:
        return expert.to_device(device)
    return DeviceExpert(expert, device, names)
