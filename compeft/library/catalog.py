"""The catalog of an expert library: its entries, their rules, its bytes, and reading it.

``catalog.json`` lists every expert of a library (name, file, size, SHA-256, settings, origin);
a reader needs nothing else to find and check an expert. Its layout and the reader's rules are
normative in ``spec/LIBRARY.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

from ..errors import CatalogError, CompeftError, UnsupportedVersionError
from ..format.json_limits import JsonLimits, JsonRuleError, loads
from ..remote import attempt, is_url, redact, resolve, root_cause
from ..version import __version__

CATALOG_NAME = "catalog.json"
CATALOG_FORMAT = "compeft-library"
CATALOG_VERSION = 1
EXPERT_SUFFIX = ".cpeft"
MAX_CATALOG_BYTES = 256 << 20  # ~250 B per entry: about a million experts
MAX_EXPERTS = 1 << 20
MAX_NAME_LENGTH = 200
# The JSON rules of headers with the catalog's own limits (spec/LIBRARY.md 3.3): one object and 17
# values per expert (room for 24), and room for unknown keys. Parsing costs ~60 bytes per object or
# array and 30-70 per scalar: without the counts, 256 MiB of "{}," would need ~7 GB, of '"ab",' ~4 GB.
CATALOG_JSON = JsonLimits(max_bytes=MAX_CATALOG_BYTES, max_containers=MAX_EXPERTS + 65536, max_depth=64,
                          max_values=24 * MAX_EXPERTS + 65536)
# Expert names become file names and object keys on every store and CLI arguments: no separators,
# no leading dot, nothing a shell or a URL would reinterpret.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    """One expert of a library, as the catalog lists it (spec/LIBRARY.md, "Entries")."""

    name: str
    file: str
    size: int
    sha256: str
    density: float
    alpha: float | None
    alpha_rule: str | None
    scope: str
    source: str
    base_fingerprint: str | None
    base_model: str | None
    peft_type: str | None
    parameters: int
    tensors: int
    origin: str
    source_id: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "file": (str,), "size": (int,), "sha256": (str,), "density": (int, float),
    "alpha": (int, float, type(None)), "alpha_rule": (str, type(None)), "scope": (str,), "source": (str,),
    "base_fingerprint": (str, type(None)), "base_model": (str, type(None)), "peft_type": (str, type(None)),
    "parameters": (int,), "tensors": (int,), "origin": (str,), "source_id": (str,),
}


def check_name(name: object) -> str | None:
    """Why ``name`` cannot name an expert of a library, or None when it can."""
    if not isinstance(name, str) or not name:
        return "an expert name must be a non-empty string"
    if len(name) > MAX_NAME_LENGTH:
        return f"expert name {name[:40]!r}… is longer than {MAX_NAME_LENGTH} characters"
    if not _NAME.fullmatch(name):
        return (f"expert name {name!r} may hold only letters, digits and _ . + = @ - (and must not start with "
                "'.', '+', '=', '@' or '-')")
    return None


def _entry_from_json(raw: object, where: str) -> CatalogEntry:
    if not isinstance(raw, dict):
        raise CatalogError("an entry of \"experts\" is not a JSON object", where)
    missing = [k for k in _FIELD_TYPES if k not in raw]
    if missing:
        raise CatalogError(f"entry {str(raw.get('name'))[:80]!r} lacks {', '.join(missing)}", where)
    for key, types in _FIELD_TYPES.items():
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise CatalogError(f"entry {str(raw['name'])[:80]!r}: {key} has the wrong type", where)
    entry = CatalogEntry(**{k: raw[k] for k in _FIELD_TYPES})
    problem = check_name(entry.name)
    if problem:
        raise CatalogError(problem, where)
    if entry.file != entry.name + EXPERT_SUFFIX:
        # a file elsewhere (../x, /etc/x, another URL) would let a catalog point outside its library
        raise CatalogError(f"entry {entry.name!r}: file {entry.file[:80]!r} is not {entry.name + EXPERT_SUFFIX!r}",
                           where)
    if entry.size < 0 or entry.parameters < 0 or entry.tensors < 0:
        raise CatalogError(f"entry {entry.name!r}: negative size, parameters or tensors", where)
    if not _SHA256.fullmatch(entry.sha256):
        raise CatalogError(f"entry {entry.name!r}: sha256 is not 64 lower-case hex digits", where)
    return entry


def parse_catalog(data: bytes, where: str) -> dict[str, CatalogEntry]:
    """The entries of a catalog's bytes, by name; every rule of spec/LIBRARY.md checked."""
    if len(data) > MAX_CATALOG_BYTES:
        raise CatalogError(f"catalog is larger than the limit of {MAX_CATALOG_BYTES} bytes", where)
    try:
        doc = loads(data, CATALOG_JSON)
    except JsonRuleError as exc:
        raise CatalogError(f"catalog JSON: {exc}", where) from None
    if not isinstance(doc, dict) or doc.get("format") != CATALOG_FORMAT:
        raise CatalogError(f'catalog is not a JSON object with "format": "{CATALOG_FORMAT}"', where)
    version = doc.get("format_version")
    if type(version) is not int:  # 1.0 and true are not integers; a missing version is not "unsupported"
        raise CatalogError(f"catalog format_version must be an integer, got {version!r:.40}", where)
    if version != CATALOG_VERSION:
        raise UnsupportedVersionError(f"catalog format_version {version} is not {CATALOG_VERSION}", where)
    experts = doc.get("experts")
    if not isinstance(experts, list):
        raise CatalogError('catalog needs an "experts" array', where)
    if len(experts) > MAX_EXPERTS:
        raise CatalogError(f"catalog lists {len(experts)} experts, more than the limit of {MAX_EXPERTS}", where)
    entries: dict[str, CatalogEntry] = {}
    for raw in experts:
        entry = _entry_from_json(raw, where)
        if entry.name in entries:
            raise CatalogError(f"expert {entry.name!r} is listed twice", where)
        entries[entry.name] = entry
    return entries


def catalog_bytes(entries: Mapping[str, CatalogEntry]) -> bytes:
    """The catalog holding ``entries``: UTF-8 JSON, experts sorted by name, one per line."""
    lines = [json.dumps(entries[n].to_json(), sort_keys=True, ensure_ascii=False, allow_nan=False)
             for n in sorted(entries)]
    head = json.dumps({"format": CATALOG_FORMAT, "format_version": CATALOG_VERSION,
                       "created_by": f"compeft {__version__}"}, sort_keys=True)[:-1]
    return (head + ', "experts": [\n' + ",\n".join(lines) + "\n]}\n").encode("utf-8")


def join(root: str, name: str) -> str:
    """``name`` inside the library root ``root`` (a URL prefix or a local directory)."""
    return root.rstrip("/") + "/" + name if is_url(root) else os.path.join(root, name)


def locate_catalog(url: str) -> tuple[str, str]:
    """(library root, catalog URL) for the root, or for a catalog file itself (any ``*.json``)."""
    text = os.fspath(url)
    if text.endswith(".json"):
        cut = text.rfind("/")
        return (text[:cut] if cut > 0 else "." if cut < 0 else "/"), text
    return text, join(text, CATALOG_NAME)


def fetch_object(fs: Any, path: str, what: str, name: str, *, limit: int | None = None) -> bytes | None:
    """The object's bytes (at most ``limit`` + 1 of them, in one request), or None when it does not exist."""

    def fetch() -> bytes:
        return fs.cat_file(path) if limit is None else fs.cat_file(path, start=0, end=limit + 1)

    try:
        return attempt(fetch, what, name)
    except CompeftError as exc:
        cause = root_cause(exc.__cause__) if exc.__cause__ is not None else None
        if isinstance(cause, FileNotFoundError) or getattr(cause, "status", None) == 404:
            return None
        raise


def read_catalog(catalog: str, storage_options: Mapping[str, Any] | None, *, missing_ok: bool = False
                 ) -> dict[str, CatalogEntry] | None:
    """One request for the whole catalog (a range of at most the size limit + 1 byte)."""
    fs, path = resolve(catalog, storage_options)
    name = redact(catalog)
    data = fetch_object(fs, path, "reading the catalog", name, limit=MAX_CATALOG_BYTES)
    if data is None:
        if missing_ok:
            return None
        raise CatalogError("no catalog here: not an expert library (build one with `compeft library build`)", name)
    return parse_catalog(data, name)
