"""Building an expert library: many sources compressed in parallel on Dask, published with a catalog.

:func:`build_library` expands source URLs (globs allowed), sends one task per expert
(:func:`compeft.library.worker.build_expert`) to a Dask cluster (an embedded ``LocalCluster`` of
worker processes, or a scheduler address) and writes the catalog after the experts. Each task reads
its source and writes its ``NAME.cpeft`` through fsspec, so the same job runs on a laptop and on a
cluster with an object store. Dask is imported only when a build starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..codec.golomb import DEFAULT_CHUNK_SIZE
from ..encode import check_arguments, default_alpha
from ..errors import InvalidArgumentError
from ..progress import progress_bar
from ..remote import attempt, is_url, redact, resolve, write
from .catalog import CATALOG_NAME, EXPERT_SUFFIX, CatalogEntry, catalog_bytes, check_name, join, read_catalog
from .worker import build_expert

_GLOB = re.compile(r"[*?\[]")


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


def encoding_settings(density: float, alpha: float | str, scope: str, keep_dense: Sequence[str], auto_dense: bool,
                      chunk_size: int, base: str | None) -> dict[str, Any]:
    return {"density": float(density), "alpha": alpha if isinstance(alpha, str) else float(alpha), "scope": scope,
            "keep_dense": list(keep_dense), "auto_dense": bool(auto_dense), "chunk_size": int(chunk_size),
            "base": None if base is None else redact(os.fspath(base))}


# Environment variables Dask's nanny sets in each worker and also writes into the client's os.environ.
_NANNY_ENVIRON = ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@contextlib.contextmanager
def plain_worker_environment() -> Iterator[None]:
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
        with plain_worker_environment(), LocalCluster(n_workers=count, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0") as cluster, \
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
    chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    alpha = default_alpha(scope) if alpha is None else alpha
    check_arguments(density, alpha, scope, chunk)
    keep = [keep_dense] if isinstance(keep_dense, str) else list(keep_dense)
    out_root = os.fspath(out) if is_url(out) else os.path.abspath(out)  # workers may run elsewhere
    options = dict(storage_options or {})
    settings = encoding_settings(density, alpha, scope, keep, auto_dense, chunk, base)
    found = find_sources(sources, options)
    root_fs, root_path = resolve(out_root, options)
    attempt(lambda: root_fs.makedirs(root_path, exist_ok=True), "creating the library root", redact(out_root))
    catalog_url = join(out_root, CATALOG_NAME)
    existing = read_catalog(catalog_url, options, missing_ok=True) or {}
    started = time.perf_counter()
    failed = [Failure(s.name, redact(s.url), s.problem) for s in found if s.problem]
    jobs = [{"name": s.name, "source": s.url, "output": join(out_root, s.name + EXPERT_SUFFIX), "base": base,
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

