"""Size and structure summaries of a container, computed from its header alone (no torch, no numba)."""

from __future__ import annotations

import math
from typing import Any

from .format.header import DTYPE_SIZES, ENCODING_GOLOMB, Header


def describe(header: Header) -> dict[str, Any]:
    """A JSON-ready summary: global metadata, one row per tensor, and totals."""
    rows = []
    params = 0
    original = 0
    for t in header.tensors:
        numel = t.numel
        params += numel
        original += numel * DTYPE_SIZES[t.dtype]
        rows.append({
            "name": t.name, "dtype": t.dtype, "shape": list(t.shape), "encoding": t.encoding, "role": t.role,
            "nnz": t.nnz if t.encoding == ENCODING_GOLOMB else numel,
            "bytes": t.length, "bits_per_param": (8 * t.length / numel) if numel else 0.0,
            "scale": t.scale if t.encoding == ENCODING_GOLOMB else None,
            "golomb_m": t.golomb_m if t.encoding == ENCODING_GOLOMB else None,
        })
    size = header.file_length
    meta = {k: v for k, v in header.metadata.items() if k != "adapter_config"}
    return {
        "format_version": header.version,
        "metadata": meta,
        "has_adapter_config": header.metadata.get("adapter_config") is not None,
        "tensors": rows,
        "totals": {
            "tensors": len(rows), "parameters": params, "file_bytes": size,
            "bits_per_param": 8 * size / params if params else 0.0,
            "ratio_vs_16bit": (2 * params / size) if size else math.inf,
            "ratio_vs_original": (original / size) if size else math.inf,
        },
    }
