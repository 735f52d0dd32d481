"""Expert libraries: many sources compressed in parallel on Dask, published with a catalog.

``build_library`` expands source URLs (globs allowed), sends one task per expert to a Dask cluster
(an embedded ``LocalCluster`` of worker processes, or a scheduler address) and writes the catalog
after the experts. Each task reads its source and writes its ``NAME.cpeft`` through fsspec, so the
same job runs on a laptop and on a cluster with an object store. Outputs carry a ``build`` record
(source identity and settings), which makes a re-run skip the experts whose verified outputs are
already there. ``open_library`` reads the catalog with one request and opens experts by name.

The catalog layout and the reader's rules are normative in ``spec/LIBRARY.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from . import __version__
from .errors import CatalogError, CompeftError, InvalidArgumentError, SourceError, UnsupportedVersionError
from .format.header import strict_json
from .progress import progress_bar
from .remote import attempt, is_url, object_identity, redact, resolve, write

CATALOG_NAME = "catalog.json"
CATALOG_FORMAT = "compeft-library"
CATALOG_VERSION = 1
EXPERT_SUFFIX = ".cpeft"
MAX_CATALOG_BYTES = 256 << 20  # ~250 B per entry: about a million experts
MAX_EXPERTS = 1 << 20
MAX_NAME_LENGTH = 200
# Expert names become file names and object keys on every store and CLI arguments: no separators,
# no leading dot, nothing a shell or a URL would reinterpret.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GLOB = re.compile(r"[*?\[]")
# Files of a source that encoding reads: a PEFT adapter's config and weights; a full fine-tune's
# safetensors shards, their index and its small JSON files (config.json, ...).
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


# ---------------------------------------------------------------------------------------------
# The catalog


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
        doc = strict_json(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CatalogError(f"catalog is not valid UTF-8 JSON ({exc})", where) from None
    if not isinstance(doc, dict) or doc.get("format") != CATALOG_FORMAT:
        raise CatalogError(f'catalog is not a JSON object with "format": "{CATALOG_FORMAT}"', where)
    if doc.get("format_version") != CATALOG_VERSION:
        raise UnsupportedVersionError(f"catalog format_version {doc.get('format_version')!r} is not "
                                      f"{CATALOG_VERSION}", where)
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


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name if is_url(root) else os.path.join(root, name)


def _catalog_url(url: str) -> tuple[str, str]:
    """(library root, catalog URL) for the root, or for a catalog file itself (any ``*.json``)."""
    text = os.fspath(url)
    if text.endswith(".json"):
        cut = text.rfind("/")
        return (text[:cut] if cut > 0 else "." if cut < 0 else "/"), text
    return text, _join(text, CATALOG_NAME)


def _fetch(fs: Any, path: str, what: str, name: str, *, limit: int | None = None) -> bytes | None:
    """The object's bytes (at most ``limit`` + 1 of them, in one request), or None when it does not exist."""
    from .remote import _cause

    def fetch() -> bytes:
        return fs.cat_file(path) if limit is None else fs.cat_file(path, start=0, end=limit + 1)

    try:
        return attempt(fetch, what, name)
    except CompeftError as exc:
        cause = _cause(exc.__cause__) if exc.__cause__ is not None else None
        if isinstance(cause, FileNotFoundError) or getattr(cause, "status", None) == 404:
            return None
        raise


def _read_catalog(catalog: str, storage_options: Mapping[str, Any] | None, *, missing_ok: bool = False
                  ) -> dict[str, CatalogEntry] | None:
    """One request for the whole catalog (a range of at most the size limit + 1 byte)."""
    fs, path = resolve(catalog, storage_options)
    name = redact(catalog)
    data = _fetch(fs, path, "reading the catalog", name, limit=MAX_CATALOG_BYTES)
    if data is None:
        if missing_ok:
            return None
        raise CatalogError("no catalog here: not an expert library (build one with `compeft library build`)", name)
    return parse_catalog(data, name)


class Library(Mapping[str, Any]):
    """An expert library opened through its catalog: a mapping name -> :class:`CompressedExpert`.

    Experts open lazily (header only) on first access and are checked against their catalog entry
    (size and metadata); :meth:`verify` also checks every byte against the catalog's SHA-256.
    """

    def __init__(self, root: str, entries: Mapping[str, CatalogEntry], *,
                 storage_options: Mapping[str, Any] | None = None, cache: str | os.PathLike[str] | None = None,
                 catalog: str | None = None) -> None:
        self.root = root
        self.entries = dict(entries)
        self.catalog = catalog or _join(root, CATALOG_NAME)
        self._storage_options = dict(storage_options or {})
        self._cache = cache
        self._opened: dict[str, Any] = {}

    def url(self, name: str) -> str:
        """Where expert ``name`` lives."""
        return _join(self.root, self._entry(name).file)

    def _entry(self, name: str) -> CatalogEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise InvalidArgumentError(f"no expert named {name!r} in the library "
                                       f"(it has {len(self.entries)}: {', '.join(sorted(self.entries)[:8])}"
                                       f"{', …' if len(self.entries) > 8 else ''})", redact(self.root)) from None

    def __getitem__(self, name: str) -> Any:
        if name not in self._opened:
            from .api import open as open_expert
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

    def select(self, names: Sequence[str]) -> list[Any]:
        """The experts ``names``, in that order (an unknown name is an error naming the library)."""
        return [self[n] for n in names]

    def verify(self, names: Sequence[str] | None = None, *, progress: bool = False) -> None:
        """Read each expert whole: its SHA-256 must match the catalog, then every CRC and payload
        structure is checked (:meth:`CompressedExpert.verify`)."""
        from .expert import CompressedExpert
        from .format import BytesReader
        for name in progress_bar(list(self) if names is None else list(names), "verifying", progress, "expert"):
            entry = self._entry(name)
            where = redact(self.url(name))
            fs, path = resolve(self.url(name), self._storage_options)
            data = _fetch(fs, path, "reading the expert", where)
            if data is None:
                raise CatalogError(f"expert {name!r} is listed in the catalog but its file is missing", where)
            if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
                raise CatalogError(f"expert {name!r} does not match its catalog entry (size or SHA-256 differs)",
                                   where)
            expert = CompressedExpert(BytesReader(data, name=where))
            _check_matches(entry, expert, where)
            expert.verify()


def _check_matches(entry: CatalogEntry, expert: Any, where: str) -> None:
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
    root, catalog = _catalog_url(os.fspath(url))
    entries = _read_catalog(catalog, storage_options)
    assert entries is not None
    return Library(root, entries, storage_options=storage_options, cache=cache, catalog=catalog)


# ---------------------------------------------------------------------------------------------
# Building


@dataclasses.dataclass(frozen=True)
class Failure:
    """An expert that could not be built: its name, its source and why."""

    name: str
    origin: str
    reason: str


@dataclasses.dataclass(frozen=True)
class BuildReport:
    """What :func:`build_library` did. ``built`` and ``skipped`` (already built and verified) are
    catalog entries; ``failed`` names each bad source and the reason. ``catalog`` is the URL written."""

    catalog: str
    built: tuple[CatalogEntry, ...]
    skipped: tuple[CatalogEntry, ...]
    failed: tuple[Failure, ...]
    seconds: float
    workers: int
    bytes_read: int
    bytes_written: int

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def parameters(self) -> int:
        """Parameters of the experts built in this run."""
        return sum(e.parameters for e in self.built)

    def to_json(self) -> dict[str, Any]:
        return {"catalog": self.catalog, "built": [e.to_json() for e in self.built],
                "skipped": [e.to_json() for e in self.skipped], "failed": [dataclasses.asdict(f) for f in self.failed],
                "seconds": self.seconds, "workers": self.workers, "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written}


@dataclasses.dataclass(frozen=True)
class _Source:
    name: str
    url: str
    problem: str | None = None  # a source found bad while listing (reported, not built)


def _name_of(path: str) -> str:
    base = path.rstrip("/").rsplit("/", 1)[-1]
    return base[: -len(".safetensors")] if base.endswith(".safetensors") else base


def find_sources(sources: str | Sequence[str], storage_options: Mapping[str, Any] | None = None) -> list[_Source]:
    """Expand ``sources`` (URLs or paths; ``*``, ``?`` and ``[…]`` glob; a trailing ``/`` keeps only
    directories) into one source per expert, named by its last path component."""
    found: list[_Source] = []
    for pattern in [sources] if isinstance(sources, (str, os.PathLike)) else list(sources):
        pattern = os.fspath(pattern)
        fs, path = resolve(pattern, storage_options)
        if _GLOB.search(path):
            matches = attempt(lambda: fs.glob(path, detail=True), "listing the sources", redact(pattern))
            if pattern.endswith("/"):
                matches = {p: i for p, i in matches.items() if i.get("type") == "directory"}
            if not matches:
                raise InvalidArgumentError("the pattern matches nothing", redact(pattern))
            paths = sorted(matches)
        else:
            paths = [path]
        for p in paths:
            url = fs.unstrip_protocol(p) if is_url(pattern) else p
            name = _name_of(p)
            found.append(_Source(name, url, check_name(name)))
    seen: dict[str, str] = {}
    for s in found:
        if s.name in seen and seen[s.name] != s.url:
            raise InvalidArgumentError(f"two sources give the expert name {s.name!r}: {redact(seen[s.name])} and "
                                       f"{redact(s.url)}; build them into different libraries")
        seen[s.name] = s.url
    unique = {s.name: s for s in found}
    return [unique[n] for n in sorted(unique)]


def _settings(density: float, alpha: float | str, scope: str, keep_dense: Sequence[str], auto_dense: bool,
              chunk_size: int, base: str | None) -> dict[str, Any]:
    return {"density": float(density), "alpha": alpha if isinstance(alpha, str) else float(alpha), "scope": scope,
            "keep_dense": list(keep_dense), "auto_dense": bool(auto_dense), "chunk_size": int(chunk_size),
            "base": None if base is None else redact(os.fspath(base))}


# Environment variables Dask's nanny sets in each worker and also writes into the client's os.environ.
_NANNY_ENVIRON = ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@contextlib.contextmanager
def _plain_worker_environment() -> Iterator[None]:
    """Start local workers without Dask's default MALLOC_TRIM_THRESHOLD_=65536: glibc then gives
    every large temporary array of the codec back to the OS and maps it again, which made a build
    3-10x slower than a plain loop (benchmarks/README.md "Library builds"). The variables the
    nanny copies into this process's environment are put back as they were."""
    import dask
    saved = {k: os.environ.get(k) for k in _NANNY_ENVIRON}
    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _engine(scheduler: Any, workers: int | None) -> Iterator[tuple[Any, int, int | None]]:
    """(Dask client, worker count, kernel threads per task or None to leave workers' defaults)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise InvalidArgumentError("library builds run on Dask: pip install 'compeft[library]'") from None
    if scheduler is not None and workers is not None:
        raise InvalidArgumentError("workers applies to the embedded local cluster, not to a scheduler address")
    if scheduler is None:
        cores = os.cpu_count() or 1
        count = cores if workers is None else workers
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InvalidArgumentError(f"workers must be a positive integer, got {workers!r}")
        # One task per worker process; the cores are shared out so Numba's threads do not oversubscribe.
        with _plain_worker_environment(), LocalCluster(n_workers=count, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0") as cluster, \
                Client(cluster) as client:
            yield client, count, max(1, cores // count)
        return
    if isinstance(scheduler, Client):
        yield scheduler, len(scheduler.scheduler_info().get("workers", {})), None
        return
    try:
        client = Client(str(scheduler), timeout=30)
    except (OSError, TimeoutError) as exc:
        raise InvalidArgumentError(f"cannot reach the Dask scheduler ({exc})", str(scheduler)) from None
    with client:
        yield client, len(client.scheduler_info().get("workers", {})), None


def build_library(sources: str | Sequence[str], out: str | os.PathLike[str], *, base: str | None = None,
                  density: float = 0.1, alpha: float | str | None = None, scope: str = "tensor",
                  keep_dense: Sequence[str] = (), auto_dense: bool = True, chunk_size: int | None = None,
                  storage_options: Mapping[str, Any] | None = None, scheduler: Any = None,
                  workers: int | None = None, progress: bool = False) -> BuildReport:
    """Compress many sources into a library at ``out``, in parallel on Dask, and write its catalog.

    Parameters
    ----------
    sources
        PEFT adapter directories (or, with ``base``, fine-tuned model directories / ``.safetensors``
        files) as paths or fsspec URLs; glob patterns expand (``"s3://raw/adapters/*/"``). Each
        expert is named by its source's last path component.
    out
        The library root (a directory or URL prefix): ``NAME.cpeft`` per expert and ``catalog.json``.
    base
        The base model of full fine-tunes (a path the workers can read, or a URL fetched once per worker).
    density, alpha, scope, keep_dense, auto_dense, chunk_size
        As for :func:`compeft.compress`.
    storage_options
        fsspec options for every URL (sources, base, ``out``); they travel to the workers.
    scheduler
        None: an embedded ``LocalCluster`` of ``workers`` processes (default one per core); a Dask
        scheduler address (``"tcp://host:8786"``) or a ``distributed.Client``: that cluster.
    workers
        Worker processes of the embedded cluster.
    progress
        A bar over experts (with bytes read and written) on the client.

    Returns
    -------
    BuildReport
        Built, skipped (already built, verified) and failed experts. A bad source fails alone;
        the catalog lists every expert built now or before.

    Notes
    -----
    Idempotent and resumable: an output whose ``build`` record (source identity and settings)
    matches and which verifies is kept. Outputs are written atomically, so a worker killed mid-task
    leaves no partial file; Dask runs its task again elsewhere.
    """
    from .api import check_arguments, default_alpha
    from .codec.golomb import DEFAULT_CHUNK_SIZE
    chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    alpha = default_alpha(scope) if alpha is None else alpha
    check_arguments(density, alpha, scope, chunk)
    keep = [keep_dense] if isinstance(keep_dense, str) else list(keep_dense)
    out_root = os.fspath(out) if is_url(out) else os.path.abspath(out)  # workers may run elsewhere
    options = dict(storage_options or {})
    settings = _settings(density, alpha, scope, keep, auto_dense, chunk, base)
    found = find_sources(sources, options)
    root_fs, root_path = resolve(out_root, options)
    attempt(lambda: root_fs.makedirs(root_path, exist_ok=True), "creating the library root", redact(out_root))
    catalog_url = _join(out_root, CATALOG_NAME)
    existing = _read_catalog(catalog_url, options, missing_ok=True) or {}
    started = time.perf_counter()
    failed = [Failure(s.name, redact(s.url), s.problem) for s in found if s.problem]
    jobs = [{"name": s.name, "source": s.url, "output": _join(out_root, s.name + EXPERT_SUFFIX), "base": base,
             "settings": settings, "storage_options": options} for s in found if not s.problem]
    built: list[CatalogEntry] = []
    skipped: list[CatalogEntry] = []
    read = written = 0
    with _engine(scheduler, workers) as (client, count, threads):
        from distributed import as_completed
        run = uuid.uuid4().hex[:8]
        futures = {client.submit(build_expert, dict(job, kernel_threads=threads), pure=False,
                                 key=f"compeft-build-{job['name']}-{run}"): job for job in jobs}
        bar = progress_bar(len(futures), "building", progress, "expert")
        for future in as_completed(futures):
            job = futures[future]
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker: the engine gave up on this task
                failed.append(Failure(job["name"], redact(job["source"]), f"{type(exc).__name__}: {exc}"[:500]))
            else:
                read += result["bytes_read"]
                if result["status"] == "failed":
                    failed.append(Failure(job["name"], redact(job["source"]), result["reason"]))
                else:
                    entry = CatalogEntry(**result["entry"])
                    (built if result["status"] == "built" else skipped).append(entry)
                    written += entry.size if result["status"] == "built" else 0
            bar.update()
            bar.set_postfix_str(f"read {read / 2**20:.0f} MiB, wrote {written / 2**20:.1f} MiB, "
                                f"{len(failed)} failed")
        bar.close()
    entries = dict(existing)
    entries.update((e.name, e) for e in (*built, *skipped))
    write(catalog_url, [catalog_bytes(entries)], options)
    return BuildReport(redact(catalog_url), tuple(sorted(built, key=lambda e: e.name)),
                       tuple(sorted(skipped, key=lambda e: e.name)), tuple(sorted(failed, key=lambda f: f.name)),
                       time.perf_counter() - started, count, read, written)


# ---------------------------------------------------------------------------------------------
# One expert (runs on a Dask worker; plain data in and out)


def _source_files(fs: Any, path: str, full: bool) -> tuple[list[dict[str, Any]], bool]:
    """The files encoding reads, with their fsspec info (size and validators), and whether the
    source is a directory (else a single ``.safetensors`` file)."""
    if not attempt(lambda: fs.isdir(path), "listing the source", path):
        if full and path.endswith(".safetensors"):
            return [attempt(lambda: fs.info(path), "reading the source", path)], False
        raise SourceError("not a directory" + (" or a .safetensors file" if full else " (a PEFT adapter directory)"),
                          path)
    listing = attempt(lambda: fs.ls(path, detail=True), "listing the source", path)
    files = [i for i in listing if i.get("type") == "file"]
    if full:
        return [i for i in files if i["name"].endswith((".safetensors", ".json"))], True
    chosen = [i for i in files if i["name"].rsplit("/", 1)[-1] in _ADAPTER_FILES]
    if not any(i["name"].endswith("/adapter_config.json") for i in chosen):
        raise SourceError("not a PEFT adapter directory (no adapter_config.json)", path)
    return chosen, True


def _identity(files: Sequence[Mapping[str, Any]], root: str) -> str:
    """A digest of each file's name, size and validators (ETag, mtime…): changes when a source changes."""
    digest = hashlib.sha256()
    for info in sorted(files, key=lambda i: i["name"]):
        relative = info["name"][len(root):].lstrip("/")
        digest.update(f"{relative}\0{info.get('size')}\0{object_identity(info) or ''}\n".encode())
    return digest.hexdigest()


@contextlib.contextmanager
def _local(fs: Any, path: str, files: Sequence[Mapping[str, Any]], is_dir: bool) -> Iterator[str]:
    """A local path to the source: itself on a local file system, else a temporary copy of ``files``."""
    from .remote import _local_path
    local = _local_path(fs, path)
    if local is not None:
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="compeft-source-") as tmp:
        yield _copy_files(fs, path, files, is_dir, tmp, "fetching the source")


def _copy_files(fs: Any, path: str, files: Sequence[Mapping[str, Any]], is_dir: bool, directory: str,
                what: str) -> str:
    """Copy ``files`` of the source or base at ``path`` into ``directory``; the local path to use."""
    for info in files:
        target = os.path.join(directory, info["name"].rsplit("/", 1)[-1])
        attempt(lambda i=info, t=target: fs.get_file(i["name"], t), what, redact(info["name"]))
    return directory if is_dir else os.path.join(directory, path.rsplit("/", 1)[-1])


# Per worker process: remote bases fetched, (URL, identity) -> (their directory, the local path to use).
_BASES: dict[tuple[str, str], tuple[tempfile.TemporaryDirectory[str], str]] = {}


def _base_path(base: str, options: Mapping[str, Any]) -> tuple[str, str]:
    """(a local path to the base, its identity); a remote base is fetched once per process."""
    fs, path = resolve(base, options) if is_url(base) else resolve(os.path.abspath(base), options)
    files, is_dir = _source_files(fs, path, full=True)
    identity = _identity(files, path)
    from .remote import _local_path
    local = _local_path(fs, path)
    if local is not None:
        return local, identity
    key = (redact(base), identity)
    if key not in _BASES:
        holder = tempfile.TemporaryDirectory(prefix="compeft-base-")
        _BASES[key] = (holder, _copy_files(fs, path, files, is_dir, holder.name, "fetching the base"))
    return _BASES[key][1], identity


def _entry_for(expert: Any, data: bytes, name: str, record: Mapping[str, Any]) -> dict[str, Any]:
    meta = expert.metadata
    config = meta.get("adapter_config") or {}
    base_model = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    return CatalogEntry(
        name=name, file=name + EXPERT_SUFFIX, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
        density=meta["density"], alpha=meta.get("alpha"), alpha_rule=meta.get("alpha_rule"), scope=meta["scope"],
        source=meta["source"], base_fingerprint=meta.get("base_fingerprint"),
        base_model=base_model if isinstance(base_model, str) else None,
        peft_type=peft_type if isinstance(peft_type, str) else None,
        parameters=sum(e.numel for e in expert.header.tensors), tensors=len(expert.header.tensors),
        origin=record["origin"], source_id=record["source_id"]).to_json()


def _already_built(fs: Any, path: str, where: str, record: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The catalog entry of an existing output built from the same source with the same settings
    and intact (every checksum and payload verified), else None (missing, stale or corrupt)."""
    from .expert import CompressedExpert
    from .format import BytesReader
    data = _fetch(fs, path, "reading the existing output", where)
    if data is None:
        return None
    try:
        expert = CompressedExpert(BytesReader(data, name=where))
        if expert.metadata.get("build") != record:
            return None
        expert.verify()
    except CompeftError:
        return None  # a corrupt or foreign file is rebuilt (atomically replaced)
    return _entry_for(expert, data, name, record)


def build_expert(job: Mapping[str, Any]) -> dict[str, Any]:
    """Build (or find already built) one expert of a library. Runs on a worker: plain data in and
    out, and every failure of the source comes back as ``{"status": "failed", "reason": …}`` so that
    one bad input never fails the others (and is not retried: it would fail again)."""
    name, settings, options = job["name"], job["settings"], job["storage_options"]
    origin = redact(job["source"])
    if job.get("kernel_threads"):
        _set_threads(int(job["kernel_threads"]))
    read = 0
    try:
        fs, path = resolve(job["source"] if is_url(job["source"]) else os.path.abspath(job["source"]), options)
        full = job["base"] is not None
        files, is_dir = _source_files(fs, path, full)
        read = sum(int(i.get("size") or 0) for i in files)
        base_local, base_identity = _base_path(job["base"], options) if full else (None, "")
        source_id = _identity(files, path)
        if full:
            source_id = hashlib.sha256(f"{source_id}\0{base_identity}".encode()).hexdigest()
        record = {"name": name, "origin": origin, "source_id": source_id, "settings": settings}
        out_fs, out_path = resolve(job["output"], options)
        found = _already_built(out_fs, out_path, redact(job["output"]), record, name)
        if found is not None:
            return {"status": "skipped", "entry": found, "bytes_read": 0}
        with _local(fs, path, files, is_dir) as local:
            expert = _compress(local, base_local, settings, record)
        data = expert.to_bytes()
        entry = _entry_for(expert, data, name, record)
        write(job["output"], [data], options)
        return {"status": "built", "entry": entry, "bytes_read": read}
    except CompeftError as exc:
        return {"status": "failed", "reason": str(exc), "bytes_read": read}
    except (OSError, ValueError, RuntimeError) as exc:  # e.g. a source the file system cannot read
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:500], "bytes_read": read}


def _compress(local: str, base: str | None, settings: Mapping[str, Any], record: Mapping[str, Any]) -> Any:
    """The expert (in memory, a CompressedExpert) of the source at ``local`` with ``settings``."""
    from .api import _encode, _resolve_source
    encoded = _encode(_resolve_source(local, base), density=settings["density"], scope=settings["scope"],
                      keep_dense=settings["keep_dense"], auto_dense=settings["auto_dense"],
                      chunk_size=settings["chunk_size"], metadata=None, progress=False)
    return encoded.build(settings["alpha"], {"build": dict(record)})


def _set_threads(count: int) -> None:
    """Kernel threads of this task (Numba's count is per calling thread, torch's per process)."""
    import numba
    import torch
    numba.set_num_threads(max(1, min(count, numba.config.NUMBA_NUM_THREADS)))
    torch.set_num_threads(count)
