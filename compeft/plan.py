"""The one seam between consumers and the hardware: per-tensor plans, run by an executor.

A consumer (decode, apply, merge) makes a :class:`TensorPlan` per tensor — which operation, into
which tensor, with which scale, DARE drops and sign-election sums — once. An executor runs a batch
of plans over the compressed streams it holds: :class:`CpuExecutor` with the Numba kernels, or
:class:`compeft.gpu.DeviceExecutor` with the Triton kernels; both give bit-identical results.
Tensors stored dense run through :func:`run_dense`, the same rules in torch, on either device.

Operations (the float rule is :func:`compeft.dtypes.added`; step = scale × magnitude):

* ``DECODE``: ``out`` (the tensor's shape and dtype) receives τ̃ (±magnitude at kept entries, 0 elsewhere);
* ``ADD``: ``out`` is a weight: ``w = dtype(float32(w) ± step)`` at each kept entry (a value tensor
  is copied over the weight);
* ``ACCUMULATE``: ``out`` is a float32 accumulator: ``+= ±step`` at each kept entry DARE keeps;
  with ``fresh``, ``out`` holds nothing yet and receives what accumulating into zeros gives, bit for
  bit (every element written: a merge's first expert per tensor, so nobody zero-fills first);
* ``TIES``: ``out`` is float32 [2, numel]: where the entry's sign is that of ``aux`` (the elected
  sums; >= 0 elects +), row 0 ``+= ±step`` and row 1 ``+= 1``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from .codec import golomb, kernels
from .dtypes import added, flat_bits, magnitude, step, value_patterns

DECODE = "decode"
ADD = "add"
ACCUMULATE = "accumulate"
TIES = "ties"
OPERATIONS = (DECODE, ADD, ACCUMULATE, TIES)

# the kernel operation that adds into a weight of each dtype
ADD_MODES = {torch.float32: kernels.MODE_ADD_F32, torch.float16: kernels.MODE_ADD_F16,
             torch.bfloat16: kernels.MODE_ADD_BF16}
# the output dtypes each operation writes into a compressed tensor (DECODE: the tensor's own)
OUTPUT_DTYPES = {ADD: tuple(ADD_MODES), ACCUMULATE: (torch.float32,), TIES: (torch.float32,)}


@dataclass(slots=True)
class StreamTensor:
    """One tensor of an expert, read and CRC-checked: its compressed ``streams`` or, stored dense,
    its ``value``; what decoding it needs from the header."""

    name: str
    shape: tuple[int, ...]
    numel: int
    dtype: torch.dtype
    role: str  # "delta" or "value"
    scale: float  # the header's magnitude (float32) of a compressed tensor
    streams: golomb.GolombStreams | None = None
    value: torch.Tensor | None = None

    @property
    def magnitude(self) -> float:
        return magnitude(self.scale, self.dtype)

    def patterns(self) -> tuple[int, int]:
        """Bit patterns of ±magnitude in the tensor's dtype."""
        return value_patterns(self.scale, self.dtype)


@dataclass(slots=True)
class TensorPlan:
    """What to do with one tensor (see the module docstring for each operation)."""

    name: str
    operation: str
    out: torch.Tensor
    scale: float = 1.0
    aux: torch.Tensor | None = None  # TIES: the elected sums, float32 with the tensor's numel
    drop_key: int = 0  # DARE: entry e is dropped when splitmix64(key + e) >> 1 < cut (cut 0: no drops)
    drop_cut: int = 0
    fresh: bool = False  # ACCUMULATE: ``out`` is not zeroed yet (see the module docstring)


def drop_key(seed: int, expert: int, name: str) -> int:
    """The DARE key of tensor ``name`` of the ``expert``-th expert of a merge (spec: merging)."""
    digest = hashlib.sha256(f"{seed}:{expert}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def added_to_zero(step: float) -> tuple[int, int]:
    """The float32 bits of 0.0 + step and 0.0 + (-step): what accumulating one kept entry into a
    zeroed accumulator leaves there (a DECODE of a fresh accumulator writes them directly)."""
    s = np.float32(step)
    zero = np.float32(0.0)
    return int((zero + s).view(np.uint32)), int((zero + -s).view(np.uint32))


def run_dense(plan: TensorPlan, tensor: StreamTensor) -> None:
    """Run ``plan`` on a tensor stored dense: its non-zero entries are its kept entries."""
    value = tensor.value
    assert value is not None
    out = plan.out
    if plan.operation == DECODE:
        out.copy_(value)
        return
    if plan.operation == ADD:
        if tensor.role == "value":
            out.copy_(value)
        else:
            out.copy_(added(out, float(np.float32(plan.scale)) * value.to(out.device).float()))
        return
    if plan.fresh:
        out.zero_()
    values = value.to(out.device).float().reshape(-1)
    if not values.numel():
        return
    kept = values != 0
    if plan.drop_cut:  # drawn on the CPU whatever the device, so that drops do not depend on it
        generator = torch.Generator().manual_seed(plan.drop_key)
        kept &= (torch.rand(values.shape, generator=generator) >= plan.drop_cut / 2.0 ** 63).to(out.device)
    zeros = torch.zeros_like(values)
    rows = out.reshape(-1, values.numel())
    if plan.operation == ACCUMULATE:
        rows[0].add_(torch.where(kept, values * np.float32(plan.scale), zeros))
        return
    assert plan.aux is not None
    agree = kept & ((values < 0) == (plan.aux.reshape(-1) < 0))
    rows[0].add_(torch.where(agree, values * np.float32(plan.scale), zeros))
    rows[1].add_(agree.float())


def check_plans(plans: Sequence[TensorPlan], tensors: Mapping[str, StreamTensor], device: torch.device,
                path: object) -> None:
    """Every plan names a held tensor and an output of the right size, dtype and device."""
    from .errors import InvalidArgumentError

    for plan in plans:
        if plan.operation not in OPERATIONS:
            raise InvalidArgumentError(f"unknown operation {plan.operation!r}", path)
        if plan.fresh and plan.operation != ACCUMULATE:
            raise InvalidArgumentError(f"tensor {plan.name!r}: only {ACCUMULATE} takes a fresh output", path)
        if plan.name not in tensors:
            raise InvalidArgumentError(f"tensor {plan.name!r} is not held by this executor", path)
        t, out = tensors[plan.name], plan.out
        rows = 2 if plan.operation == TIES else 1
        if out.numel() != rows * t.numel:
            raise InvalidArgumentError(f"tensor {plan.name!r}: the output must hold {rows * t.numel} entries, "
                                       f"not {out.numel()}", path)
        if t.value is None and (out.device != device or not out.is_contiguous()):
            raise InvalidArgumentError(f"weight {plan.name!r} must be a contiguous tensor on {device}, "
                                       f"not {'a strided one' if out.device == device else out.device}", path)
        if t.value is not None:
            continue
        wanted = (t.dtype,) if plan.operation == DECODE else OUTPUT_DTYPES[plan.operation]
        if out.dtype not in wanted:
            raise InvalidArgumentError(f"tensor {plan.name!r}: {plan.operation} needs an output of "
                                       f"{' or '.join(map(str, wanted))}, not {out.dtype}", path)


def kernel_mode(plan: TensorPlan, zeroed: bool) -> int:
    """The codec's operation for a plan on a compressed tensor (``zeroed``: DECODE's output is
    known to be zero, so only the kept entries are written)."""
    if plan.operation == DECODE:
        return kernels.MODE_SCATTER if zeroed else kernels.MODE_DENSE
    if plan.operation == ADD:
        return ADD_MODES[plan.out.dtype]
    return kernels.MODE_ADD_F32 if plan.operation == ACCUMULATE else kernels.MODE_TIES


class CpuExecutor:
    """Runs plans with the Numba kernels over tensors held on the host."""

    device = torch.device("cpu")

    def __init__(self, tensors: Mapping[str, StreamTensor], path: str) -> None:
        self.tensors = dict(tensors)
        self.path = path

    def run(self, plans: Sequence[TensorPlan]) -> None:
        """Run every plan: the compressed tensors in one parallel kernel region per operation.
        Raises :class:`compeft.errors.CorruptPayloadError` on the first bad chunk."""
        check_plans(plans, self.tensors, self.device, self.path)
        by_mode: dict[int, list[golomb.DecodeJob]] = {}
        for plan in plans:
            t = self.tensors[plan.name]
            if t.streams is None:
                run_dense(plan, t)
                continue
            mode = kernel_mode(plan, zeroed=False)
            if plan.fresh and not plan.drop_cut:  # written whole: ±step where kept, 0 elsewhere
                mode = kernels.MODE_DENSE
                job = golomb.DecodeJob(t.streams, t.numel, flat_bits(plan.out), f"tensor {plan.name!r}",
                                       *added_to_zero(step(plan.scale, t.magnitude)))
            elif plan.operation == DECODE:
                job = golomb.DecodeJob(t.streams, t.numel, flat_bits(plan.out), f"tensor {plan.name!r}", *t.patterns())
            else:
                if plan.fresh:  # (DARE: drops are drawn per entry, by the add kernels only)
                    plan.out.zero_()
                job = golomb.DecodeJob(t.streams, t.numel, flat_bits(plan.out), f"tensor {plan.name!r}", 0, 0,
                                       step(plan.scale, t.magnitude),
                                       None if plan.aux is None else plan.aux.reshape(-1).numpy(),
                                       plan.drop_key, plan.drop_cut)
            by_mode.setdefault(mode, []).append(job)
        for mode in sorted(by_mode):
            golomb.decode_many(by_mode[mode], mode, self.path)
