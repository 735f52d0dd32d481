"""Decode, apply and merge on a GPU straight from the compressed bytes (Triton kernels).

A :class:`DeviceExecutor` holds an expert's compressed tensors on one device: every payload copied
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
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from .codec import golomb, kernels
from .errors import CorruptPayloadError, InvalidArgumentError
from .format.header import golomb_fields
from .plan import DECODE, StreamTensor, TensorPlan, check_plans, kernel_mode, run_dense

BLOCK = 512  # unary bits per tile of the decode kernel: the best of benchmarks/gpu.py's sweep on an H100
NUM_WARPS = 2
_WIDE = {torch.float32: True, torch.float16: False, torch.bfloat16: False}
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


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


class DeviceExecutor:
    """An expert's tensors with their compressed bytes on ``device``: runs plans there
    (:mod:`compeft.plan`) with the Triton kernels.

    Build with :meth:`compeft.CompressedExpert.to_device` (cached per device). Payload CRCs and
    chunk tables are checked on the host before the copy; each chunk's bits are checked on the
    device the first time something is written into a caller's weights (:meth:`check`).
    """

    def __init__(self, tensors: Sequence[StreamTensor], device: str | torch.device, path: str) -> None:
        self.device = kernel_device(device)
        self.path = path
        self.tensors = {t.name: t for t in tensors}
        self.names = list(self.tensors)
        self.dense: dict[str, StreamTensor] = {}
        self.rows: dict[str, int] = {}  # name -> parameter row; -1 for a tensor with no kept entry
        compressed: list[tuple[golomb.GolombStreams, int]] = []
        for t in tensors:
            if t.streams is None:
                assert t.value is not None
                self.dense[t.name] = StreamTensor(t.name, t.shape, t.numel, t.dtype, t.role, t.scale,
                                                  value=t.value.to(self.device))
            else:
                self.rows[t.name] = len(compressed) if t.streams.nnz else -1
                if t.streams.nnz:
                    compressed.append((t.streams, t.numel))
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
            fields = golomb_fields(streams.golomb_m)
            self.params[t, [k.G_WIDTH, k.G_CUT, k.G_HALF, k.G_CHUNKS]] = (fields.w, fields.cut, fields.half,
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

    def run(self, plans: Sequence[TensorPlan]) -> None:
        """Run every plan (:mod:`compeft.plan`): one launch per kernel operation and output width,
        one device sync at the end. A DECODE output must be zero-filled (only kept entries are
        written). Raises :class:`CorruptPayloadError` on the first bad chunk."""
        check_plans(plans, self.tensors, self.device, self.path)
        by_mode: dict[tuple[int, bool, bool], dict[str, dict[str, Any]]] = {}
        for plan in plans:
            if plan.name in self.dense:
                run_dense(plan, self.dense[plan.name])
                continue
            if plan.fresh:  # (the Triton kernels add: zero first, the same result bit for bit)
                plan.out.zero_()
            t = self.tensors[plan.name]
            values: dict[str, Any] = dict(out=plan.out.data_ptr())
            if plan.operation == DECODE:
                values["positive"], values["negative"] = t.patterns()
            else:
                values["delta"] = float(np.float32(np.float32(plan.scale) * np.float32(t.magnitude)))
            if plan.aux is not None:
                values["aux"] = plan.aux.data_ptr()
            if plan.drop_cut:
                values["drop_key"], values["drop_cut"] = plan.drop_key, plan.drop_cut
            key = (kernel_mode(plan, zeroed=True), plan.out.dtype == torch.float32, bool(plan.drop_cut))
            by_mode.setdefault(key, {})[plan.name] = values
        raise_bad([self._launch(mode, targets, wide, drops) for (mode, wide, drops), targets in by_mode.items()])

    # -- hot swaps: the values an add overwrites -----------------------------------------------
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

    def restore_entries(self, state: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor]) -> None:
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
