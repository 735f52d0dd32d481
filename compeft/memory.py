"""How much memory a decode's outputs may take, and allocating them (a leaf: torch and the header's entries).

A file declares its tensors' sizes, and a compressed payload can declare far more than the file
holds bytes (a 2**48-element tensor of zeros has an empty payload). Every output buffer is
allocated by :func:`allocate`, which refuses one larger than the memory available now, and every
call that keeps several outputs alive checks their sum first (:func:`check_outputs`): one budget
per call, not per tensor.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable

import torch

from .dtypes import DTYPE_TO_TORCH
from .errors import OutputTooLargeError
from .format import TensorEntry

SMALL_OUTPUT = 64 << 20  # bytes: outputs up to this are allocated without asking how much memory is free
try:
    _PHYSICAL_MEMORY = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
except (AttributeError, ValueError, OSError):  # not POSIX: rely on the allocator's own refusal
    _PHYSICAL_MEMORY = 1 << 62


def _meminfo_available() -> int | None:
    """The kernel's estimate of memory available to new allocations (Linux), or None."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """Memory left under this process's cgroup (v2) limit, or None where there is none."""
    try:
        with open("/sys/fs/cgroup/memory.max", "rb") as f:
            limit = f.read().strip()
        if limit == b"max":
            return None
        with open("/sys/fs/cgroup/memory.current", "rb") as f:
            return int(limit) - int(f.read().strip())
    except (OSError, ValueError):
        return None


def _address_space_available() -> int | None:
    """Address space left under ``RLIMIT_AS`` (``ulimit -v``), or None where it is unlimited."""
    try:
        import resource
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm", "rb") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        return limit - used
    except (ImportError, OSError, ValueError, IndexError):
        return None


def available_memory(device: Any = None) -> int:
    """Bytes that outputs on ``device`` may still take: on the host the least of physical memory,
    the kernel's ``MemAvailable``, the cgroup's limit and the ``RLIMIT_AS`` headroom; on a CUDA
    device its free memory."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(dev)[0])
        except (RuntimeError, AssertionError):
            return 1 << 62
    if dev.type != "cpu":
        return 1 << 62  # (other devices: their allocator's own refusal)
    found = [v for v in (_meminfo_available(), _cgroup_available(), _address_space_available()) if v is not None]
    return max(0, min([_PHYSICAL_MEMORY, *found]))


def check_outputs(sizes: Iterable[tuple[str, int]], path: object, device: Any = None) -> None:
    """One memory budget per call: the outputs one call keeps alive together (``(name, bytes)``
    each, from the header's declarations) must fit in :func:`available_memory` before the first is
    allocated. Forty 1 GiB tensors declared in a 9 KB file each pass :func:`allocate`'s check,
    but not this one. Raises :class:`~compeft.errors.OutputTooLargeError`."""
    items = list(sizes)
    total = sum(size for _, size in items)
    if not items or total <= 0:
        return
    room = available_memory(device)
    if total > room:
        name, size = max(items, key=lambda item: item[1])
        raise OutputTooLargeError(f"{len(items)} decoded outputs of {total:,} bytes in all (the largest, {name!r}, "
                                  f"{size:,} bytes): more than the {room:,} bytes of memory available", path)


def output_bytes(e: TensorEntry) -> int:
    """Bytes of the decoded tensor ``e`` declares."""
    return e.numel * DTYPE_TO_TORCH[e.dtype].itemsize


def allocate(e: TensorEntry, shape: tuple[int, ...], dtype: torch.dtype, path: object, *, zero: bool = False,
             device: Any = None) -> torch.Tensor:
    """The output buffer of a decode. A compressed payload can declare far more elements than the file
    holds bytes (a 2**48-element tensor of zeros has an empty payload), so an output too large for
    the memory available now (:func:`available_memory`) is a clear error, not a MemoryError or
    RuntimeError from deep inside torch. A call's outputs together are checked by :func:`check_outputs`."""
    size = math.prod(shape) * dtype.itemsize
    # asking the kernel costs a few file reads: small outputs skip it (the allocator's own refusal
    # is still caught below, and a call's outputs together went through check_outputs)
    room = available_memory(device) if size > SMALL_OUTPUT else size
    reason = f"more than the {room:,} bytes of memory available" if size > room else ""
    if not reason:  # (checked first: with overcommit, an allocation can succeed and the zero-fill kill us)
        device = device or "cpu"
        try:
            return (torch.zeros(shape, dtype=dtype, device=device) if zero
                    else torch.empty(shape, dtype=dtype, device=device))
        except (RuntimeError, MemoryError) as exc:
            reason = str(exc).splitlines()[0][:120]
    raise OutputTooLargeError(f"tensor {e.name!r}: cannot allocate its decoded output of {size:,} bytes ({reason})",
                              path)
