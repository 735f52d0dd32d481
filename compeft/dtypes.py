"""Dtypes: the safetensors dtype codes, bit views, and the one rounding rule of every add.

Every write of a task vector into weights, on any path (CPU kernels, GPU kernels, dense-stored
tensors, merges), follows one rule (glossary: *step* = scale × magnitude)::

    w = dtype(float32(w) + float32(step))        # float64 weights add in float64

and every kept entry of a tensor decodes to ±magnitude, the header's float32 ``scale`` rounded to
the tensor's dtype (round to nearest even).
"""

from __future__ import annotations

import functools
import struct

import numpy as np
import torch

TORCH_TO_DTYPE = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        TORCH_TO_DTYPE[getattr(torch, _name)] = _code
DTYPE_TO_TORCH = {code: dtype for dtype, code in TORCH_TO_DTYPE.items()}

# dtypes the kernels decode into and add into: (torch integer view, numpy bit dtype)
BITS_VIEW = {torch.float32: (torch.int32, np.uint32), torch.float16: (torch.int16, np.uint16),
             torch.bfloat16: (torch.int16, np.uint16)}


def flat_bits(tensor: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous CPU float32/float16/bfloat16 tensor's bits (uint32/uint16)."""
    int_dtype, np_dtype = BITS_VIEW[tensor.dtype]
    # (numpy's reshape and view cost a fraction of torch's: this runs once per tensor of every call)
    return (tensor.detach() if tensor.requires_grad else tensor).view(int_dtype).numpy().reshape(-1).view(np_dtype)


@functools.lru_cache(maxsize=4096)
def value_patterns(scale: float, dtype: torch.dtype) -> tuple[int, int]:
    """Bit patterns of +magnitude and -magnitude in ``dtype``: the float32 ``scale`` rounded to nearest even."""
    bits = struct.unpack("<I", struct.pack("<f", scale))[0]
    if dtype == torch.float32:
        return bits, bits | 0x80000000
    if dtype == torch.bfloat16:
        half = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    else:
        half = int(np.array([scale], dtype=np.float32).astype(np.float16).view(np.uint16)[0])
    return half, half | 0x8000


def magnitude(scale: float, dtype: torch.dtype) -> float:
    """The magnitude a kept entry decodes to: the header's float32 ``scale`` rounded to ``dtype``."""
    bits = value_patterns(scale, dtype)[0]
    if dtype == torch.float32:
        return struct.unpack("<f", struct.pack("<I", bits))[0]
    if dtype == torch.bfloat16:
        return struct.unpack("<f", struct.pack("<I", bits << 16))[0]
    return float(np.array([bits], dtype=np.uint16).view(np.float16)[0])


def step(scale: float, magnitude_: float) -> float:
    """scale × magnitude in float32: the amount every kept entry adds."""
    return float(np.float32(np.float32(scale) * np.float32(magnitude_)))


def added(weight: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """weight + change (float32) rounded once to the weight's dtype; float64 weights add in float64."""
    if weight.dtype == torch.float64:
        return weight + change.double()
    return (weight.float() + change).to(weight.dtype)
