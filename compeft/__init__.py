"""compeft: compressed fine-tuning residuals (ComPEFT) in a documented container.

The public API is small: :func:`compress`, :func:`open`, :func:`apply`, :func:`decompress` and
:class:`CompressedExpert`, plus the :class:`CompeftError` hierarchy. Attributes load lazily so that
``compeft inspect`` starts without importing torch or numba.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__

__all__ = ["compress", "open", "apply", "decompress", "merge", "tune_alpha", "export_lora", "build_library",
           "open_library", "CompressedExpert", "CompeftError", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .applying import apply
    from .encode import compress
    from .errors import CompeftError
    from .expert import CompressedExpert, open
    from .export import decompress
    from .library import build_library, open_library
    from .lora import export_lora
    from .merging import merge
    from .tuning import tune_alpha


# where each public name lives (loaded on first use)
_HOMES = {"compress": ".encode", "open": ".expert", "apply": ".applying", "decompress": ".export",
          "tune_alpha": ".tuning", "export_lora": ".lora", "merge": ".merging", "build_library": ".library", "open_library": ".library",
          "CompressedExpert": ".expert", "CompeftError": ".errors"}


def __getattr__(name: str) -> Any:
    import importlib

    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    if name == "errors":
        return importlib.import_module(".errors", __name__)
    raise AttributeError(f"module 'compeft' has no attribute {name!r}")
