"""compeft: compressed fine-tuning residuals (ComPEFT) in a documented container.

The public API is small: :func:`compress`, :func:`open`, :func:`apply`, :func:`decompress` and
:class:`CompressedExpert`, plus the :class:`CompeftError` hierarchy. Attributes load lazily so that
``compeft inspect`` starts without importing torch or numba.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["compress", "open", "apply", "decompress", "merge", "tune_alpha", "build_library", "open_library",
           "CompressedExpert", "CompeftError", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .api import apply, compress, decompress, open, tune_alpha
    from .errors import CompeftError
    from .expert import CompressedExpert
    from .library import build_library, open_library
    from .merging import merge


def __getattr__(name: str) -> Any:
    if name in ("compress", "open", "apply", "decompress", "tune_alpha"):
        from . import api
        return getattr(api, name)
    if name in ("build_library", "open_library"):
        from . import library
        return getattr(library, name)
    if name == "merge":
        from .merging import merge
        return merge
    if name == "CompressedExpert":
        from .expert import CompressedExpert
        return CompressedExpert
    if name == "CompeftError":
        from .errors import CompeftError
        return CompeftError
    if name == "errors":
        import importlib
        return importlib.import_module(".errors", __name__)
    raise AttributeError(f"module 'compeft' has no attribute {name!r}")
