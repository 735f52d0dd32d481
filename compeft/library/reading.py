"""Reading an expert library: :func:`open_library` reads the catalog with one request and
:class:`Library` opens experts by name, each checked against its catalog entry.

The catalog layout and the reader's rules are normative in ``spec/LIBRARY.md``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import CatalogError, InvalidArgumentError
from ..progress import progress_bar
from ..remote import local_path, redact, regular_file, resolve
from ..report import human_size, number, shown
from .catalog import CATALOG_NAME, CatalogEntry, fetch_object, join, locate_catalog, read_catalog

if TYPE_CHECKING:  # pragma: no cover - torch is imported only when an expert is opened
    from ..expert import CompressedExpert


class Library(Mapping[str, "CompressedExpert"]):
    """An expert library opened through its catalog: a mapping name -> :class:`CompressedExpert`.

    Experts open lazily (header only) on first access and are checked against their catalog entry
    (size and metadata); :meth:`verify` also checks every byte against the catalog's SHA-256.
    """

    def __init__(self, root: str, entries: Mapping[str, CatalogEntry], *,
                 storage_options: Mapping[str, Any] | None = None, cache: str | os.PathLike[str] | None = None,
                 catalog: str | None = None) -> None:
        self.root = root
        self.entries = dict(entries)
        self.catalog = catalog or join(root, CATALOG_NAME)
        self._storage_options = dict(storage_options or {})
        self._cache = cache
        self._opened: dict[str, CompressedExpert] = {}

    def url(self, name: str) -> str:
        """Where expert ``name`` lives."""
        return join(self.root, self._entry(name).file)

    def _entry(self, name: str) -> CatalogEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise InvalidArgumentError(f"no expert named {name!r} in the library "
                                       f"(it has {len(self.entries)}: {', '.join(sorted(self.entries)[:8])}"
                                       f"{', …' if len(self.entries) > 8 else ''})", redact(self.root)) from None

    def __getitem__(self, name: str) -> CompressedExpert:
        if name not in self._opened:
            from ..expert import open as open_expert
            entry = self._entry(name)
            expert = open_expert(self.url(name), storage_options=self._storage_options, cache=self._cache)
            _check_matches(entry, expert, redact(self.url(name)))
            self._opened[name] = expert
        return self._opened[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.entries))

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"Library({redact(self.root)!r}, {len(self.entries)} experts)"

    def select(self, names: Sequence[str]) -> list[CompressedExpert]:
        """The experts ``names``, in that order (an unknown name is an error naming the library)."""
        return [self[n] for n in names]

    def verify(self, names: Sequence[str] | None = None, *, progress: bool = False) -> None:
        """Read each expert whole: its SHA-256 must match the catalog, then every CRC and payload
        structure is checked (:meth:`CompressedExpert.verify`)."""
        from ..expert import CompressedExpert
        from ..format import BytesReader
        for name in progress_bar(list(self) if names is None else list(names), "verifying", progress, "expert"):
            entry = self._entry(name)
            where = redact(self.url(name))
            fs, path = resolve(self.url(name), self._storage_options)
            _not_blocking(fs, path)
            data = fetch_object(fs, path, "reading the expert", where)
            if data is None:
                raise CatalogError(f"expert {name!r} is listed in the catalog but its file is missing", where)
            if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
                raise CatalogError(f"expert {name!r} does not match its catalog entry (size or SHA-256 differs)",
                                   where)
            expert = CompressedExpert(BytesReader(data, name=where))
            _check_matches(entry, expert, where)
            expert.verify()


def listing(entries: Sequence[CatalogEntry]) -> list[str]:
    """The lines ``compeft library ls`` prints for ``entries``: a header, one row per expert, a
    total. A catalog is untrusted: every field goes through :func:`compeft.report.shown` or
    :func:`compeft.report.number` (escape sequences escaped, huge integers described, never a
    traceback)."""
    names = [shown(e.name, 120) for e in entries]
    width = max([len("name"), *map(len, names)])
    lines = [f"{'name':<{width}}  {'source':<6} {'base':<24} {'size':>10} {'params':>13} {'density':>7} "
             f"{'alpha':>6} scope"]
    for name, e in zip(names, entries):
        base = shown(e.base_model or e.base_fingerprint or "-", 24)
        alpha = shown(e.alpha_rule, 16) if e.alpha is None else number(e.alpha, "g")
        lines.append(f"{name:<{width}}  {shown(e.source, 16):<6} {base:<24} {human_size(e.size):>10} "
                     f"{number(e.parameters, ','):>13} {number(e.density, 'g'):>7} {alpha:>6} {shown(e.scope, 16)}")
    total = sum(e.size for e in entries if type(e.size) is int)
    lines.append(f"{len(entries)} experts, {human_size(total)}")
    return lines


def _not_blocking(fs: Any, path: str) -> None:
    """A local catalog or expert that exists must be a regular file: reading a FIFO would block
    forever (:func:`compeft.remote.regular_file`)."""
    local = local_path(fs, path)
    if local is not None and os.path.lexists(local):
        regular_file(local)


def _check_matches(entry: CatalogEntry, expert: CompressedExpert, where: str) -> None:
    """The header of an expert agrees with its catalog entry (cheap: header only)."""
    meta = expert.metadata
    found = {"size": expert.header.file_length, "density": meta.get("density"), "scope": meta.get("scope"),
             "source": meta.get("source"), "base_fingerprint": meta.get("base_fingerprint"),
             "tensors": len(expert.header.tensors)}
    wrong = [k for k, v in found.items() if v != getattr(entry, k)]
    if wrong:
        raise CatalogError(f"expert {entry.name!r} does not match its catalog entry ({', '.join(wrong)} differ): "
                           "the file was replaced after the catalog was written; rebuild the library", where)


def open_library(url: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None,
                 cache: str | os.PathLike[str] | None = None) -> Library:
    """Open an expert library by its root (or its ``catalog.json``): one request reads the catalog.

    Examples
    --------
    >>> import compeft, os, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> src = tempfile.mkdtemp()
    >>> for name in ("math", "code"):
    ...     os.makedirs(f"{src}/{name}")
    ...     save_file({"base_model.model.l.lora_A.weight": torch.randn(8, 64)}, f"{src}/{name}/adapter_model.safetensors")
    ...     with open(f"{src}/{name}/adapter_config.json", "w") as f:
    ...         _ = f.write('{"peft_type": "LORA", "base_model_name_or_path": "tiny"}')
    >>> lib = tempfile.mkdtemp()
    >>> report = compeft.build_library(f"{src}/*/", lib, scope="tensor", workers=1)  # doctest: +SKIP
    >>> sorted(compeft.open_library(lib))  # doctest: +SKIP
    ['code', 'math']
    """
    root, catalog = locate_catalog(os.fspath(url))
    _not_blocking(*resolve(catalog, storage_options))
    entries = read_catalog(catalog, storage_options)
    assert entries is not None
    return Library(root, entries, storage_options=storage_options, cache=cache, catalog=catalog)
