"""The one place that chooses Numba's threading layer for compeft's parallel kernels.

Numba's default order is tbb, omp, workqueue, and ``workqueue`` is not thread-safe: two Python
threads entering parallel kernels at once abort the whole process ("Terminating: Nested parallel
kernel launch detected"). Decoding experts from several threads (a server merging adapters per
request) must not do that, so at import compeft asks Numba for a thread-safe layer (tbb, else the
OpenMP one) when either can be loaded. When neither can — or the user forced an unsafe layer with
``NUMBA_THREADING_LAYER`` — compeft keeps working but runs one parallel kernel at a time, behind a
lock (:func:`serialized`). ``THREAD_SAFE`` tells which of the two happened.

This must run before the first parallel kernel launches anywhere in the process; a layer already
launched is read back instead of chosen.
"""

from __future__ import annotations

import functools
import importlib
import threading
from typing import Any, Callable

import numba
from numba.np.ufunc import parallel as _parallel

SAFE_LAYERS = ("tbb", "omp")  # thread-safe in every configuration Numba supports on Linux
_LOCK = threading.Lock()


def _loadable(layer: str) -> bool:
    try:
        importlib.import_module(f"numba.np.ufunc.{layer}pool")
    except ImportError:  # tbb needs the `tbb` package, omp the OpenMP runtime (libgomp)
        return False
    return True


def _pin() -> tuple[str, bool]:
    """(the layer requested or running, whether concurrent launches are safe)."""
    if getattr(_parallel, "_is_initialized", False):  # someone launched a parallel kernel first
        layer = numba.threading_layer()
        return layer, layer in SAFE_LAYERS
    requested = str(numba.config.THREADING_LAYER).lower()
    if requested != "default":  # the user chose (NUMBA_THREADING_LAYER): respect it, guard if unsafe
        return requested, requested in (*SAFE_LAYERS, "threadsafe", "safe")
    if any(_loadable(layer) for layer in SAFE_LAYERS):
        numba.config.THREADING_LAYER = "threadsafe"  # Numba picks tbb, then omp, and checks tbb's version
        return "threadsafe", True
    numba.config.THREADING_LAYER = "workqueue"
    return "workqueue", False


LAYER, THREAD_SAFE = _pin()


def serialized(kernel: Callable[..., Any]) -> Callable[..., Any]:
    """``kernel`` itself on a thread-safe layer; otherwise a wrapper that lets one thread in at a time."""
    if THREAD_SAFE:
        return kernel

    @functools.wraps(kernel)
    def one_at_a_time(*args: Any) -> Any:
        with _LOCK:
            return kernel(*args)
    return one_at_a_time
