"""Expert libraries: many sources compressed in parallel on Dask, published with a catalog.

``build_library`` expands source URLs (globs allowed), sends one task per expert to a Dask cluster
(an embedded ``LocalCluster`` of worker processes, or a scheduler address) and writes the catalog
after the experts. Each task reads its source and writes its ``NAME.cpeft`` through fsspec, so the
same job runs on a laptop and on a cluster with an object store. Outputs carry a ``build`` record
(source identity and settings), which makes a re-run skip the experts whose verified outputs are
already there. ``open_library`` reads the catalog with one request and opens experts by name.

One job per module: :mod:`.catalog` (entries, their rules, the catalog's bytes, reading it),
:mod:`.reading` (:class:`Library`, :func:`open_library`), :mod:`.build` (:func:`build_library`
and its Dask engine) and :mod:`.worker` (:func:`build_expert`, one task). Building loads lazily:
listing or opening a library imports neither Dask nor the encoder.

The catalog layout and the reader's rules are normative in ``spec/LIBRARY.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .catalog import (CATALOG_FORMAT, CATALOG_NAME, CATALOG_VERSION, EXPERT_SUFFIX, MAX_CATALOG_BYTES, MAX_EXPERTS,
                      MAX_NAME_LENGTH, CatalogEntry, catalog_bytes, check_name, parse_catalog)
from .reading import Library, open_library

if TYPE_CHECKING:  # pragma: no cover
    from .build import BuildReport, Failure, build_library, find_sources
    from .worker import build_expert

__all__ = ["CATALOG_FORMAT", "CATALOG_NAME", "CATALOG_VERSION", "EXPERT_SUFFIX", "MAX_CATALOG_BYTES", "MAX_EXPERTS",
           "MAX_NAME_LENGTH", "CatalogEntry", "catalog_bytes", "check_name", "parse_catalog", "Library",
           "open_library", "BuildReport", "Failure", "build_library", "find_sources", "build_expert"]

_BUILDING = ("BuildReport", "Failure", "build_library", "find_sources")


def __getattr__(name: str) -> Any:
    if name in _BUILDING:
        from . import build
        return getattr(build, name)
    if name == "build_expert":
        from .worker import build_expert
        return build_expert
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
