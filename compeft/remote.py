"""Experts over the network: any fsspec URL read as a :class:`~compeft.format.RangeReader`.

Everything remote lives here: resolving a URL (chained ones too) with its ``storage_options``,
fetching byte ranges concurrently with bounded retries, checking that every response is exactly the
range asked for, keeping fetched ranges in memory (a verify-then-apply or a prefetch does not fetch
twice), an optional persistent cache directory (its pieces: :mod:`compeft.remote_cache`), and atomic
writes to stores. The bytes are those of the container on disk; the expert still checks every
payload's CRC-32 before using it. The normative description of URLs, requests, the fallback and
the cache layout is ``spec/REMOTE.md``.

No torch or numba here: ``compeft inspect URL`` stays light. fsspec's HTTP and S3 file systems need
``aiohttp`` and ``s3fs`` (``pip install 'compeft[remote]'``); they are imported only for such URLs.
"""

from __future__ import annotations

import errno
import os
import random
import re
import stat
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from .errors import CompeftError, RemoteError, SourceError, TruncatedFileError
from .format.io import FileReader, atomic_write
from .progress import byte_bar
from .remote_cache import FetchStats, PieceCache

PART_SIZE = 4 << 20  # a long range is fetched as parts of at most this many bytes, concurrently
DEFAULT_WORKERS = 8  # concurrent requests per opened object
DEFAULT_RETRIES = 4  # extra attempts after a transient failure ...
DEFAULT_BACKOFF = 0.25  # ... waiting about this many seconds, doubling each time
MEMORY_BUDGET = 256 << 20  # fetched bytes kept in memory for later reads (least recently used go first)
BAR_BYTES = 8 << 20  # one read fetching more than this shows a progress bar

# HTTP statuses worth another try: timeouts, throttling and server-side failures.
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_TRANSIENT_ERRNO = frozenset({errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT,
                              errno.EPIPE, errno.EAGAIN, errno.EHOSTUNREACH, errno.ENETUNREACH})
# Stores where one put makes the whole object visible at once (never a partial object).
_SINGLE_PUT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "http", "https"})
# Fields of fsspec's ``info`` that change whenever an object's bytes change (the cache key).
_VALIDATORS = ("VersionId", "version_id", "generation", "ETag", "etag", "md5Hash", "LastModified",
               "Last-Modified", "last_modified", "mtime", "updated", "created")

T = TypeVar("T")


class RangeIgnoredWarning(UserWarning):
    """The server answered a range request with the whole object (it ignores ``Range``)."""


def is_url(target: object) -> bool:
    """Whether ``target`` is a URL (``scheme://…`` or a chain ``a::b://…``) rather than a local path."""
    return isinstance(target, str) and ("://" in target or "::" in target)


def redact(url: str) -> str:
    """``url`` without passwords (``user:secret@host`` becomes ``user:***@host``), for messages and keys."""
    return re.sub(r"(://[^/@:]*):[^/@]*@", r"\1:***@", url)


def resolve(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec file system and path of ``url`` (chained URLs take per-protocol options)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as exc:
        raise RemoteError(f"this URL needs a package that is not installed ({exc}); "
                          "pip install 'compeft[remote]'", redact(url)) from None
    except (ValueError, TypeError, KeyError) as exc:
        raise RemoteError(f"cannot resolve the URL or its storage options ({exc})", redact(url)) from None


def local_path(fs: Any, path: str) -> str | None:
    """The local path of ``path`` when ``fs`` is the local file system, else None."""
    from fsspec.implementations.local import LocalFileSystem

    return path if isinstance(fs, LocalFileSystem) else None


def open_reader(target: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None,
                cache: str | os.PathLike[str] | None = None, *, progress: bool = False,
                workers: int = DEFAULT_WORKERS, retries: int = DEFAULT_RETRIES,
                backoff: float = DEFAULT_BACKOFF) -> FileReader | RemoteReader:
    """A range reader for a local path, a ``file://`` URL or any other fsspec URL.

    Local files (plain paths and ``file://``) are read with ``os.pread``; ``cache`` does not apply
    to them. Other URLs give a :class:`RemoteReader`.
    """
    if not is_url(target):
        return FileReader(regular_file(target))
    url = str(target)
    fs, path = resolve(url, storage_options)
    local = local_path(fs, path)
    if local is not None:
        return FileReader(regular_file(local))
    return RemoteReader(fs, path, redact(url), cache=cache, progress=progress, workers=workers, retries=retries,
                        backoff=backoff)


def regular_file(path: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """``path``, checked to name a regular file before anything opens it: opening a FIFO for reading
    blocks until a writer appears (forever, for a hostile library member or a planted path), and a
    device or socket never ends. ``os.stat`` does not block. (A path swapped for a FIFO between this
    check and the open is the open's to refuse: it must use ``O_NONBLOCK`` and ``fstat``, as
    :class:`compeft.weights.SafetensorsFile` does.)"""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise SourceError(f"cannot open: {exc.strerror}", path) from None
    except ValueError as exc:  # a NUL byte in the path
        raise SourceError(f"cannot open: {exc}", ascii(os.fspath(path))) from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a directory" if stat.S_ISDIR(info.st_mode) else \
            "a device or socket"
        raise SourceError(f"not a regular file ({kind})", path)
    return path


def object_identity(info: Mapping[str, Any]) -> str | None:
    """What identifies this version of an object (ETag, version id, modification time… and size),
    or None when the store gives nothing that changes with the bytes (then nothing is cached)."""
    found = [f"{key}={text_of(info[key])}" for key in _VALIDATORS if info.get(key) not in (None, "")]
    if not found:
        return None
    return ";".join([*found, f"size={text_of(info.get('size'))}"])


def text_of(value: object) -> str:
    """``str(value)`` made encodable: a store's headers (an ETag with bytes that are not UTF-8 comes
    back with lone surrogates) and a URL from the command line may hold anything; what cannot be
    encoded is backslash-escaped (cache keys and their notes are UTF-8)."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def root_cause(exc: BaseException) -> BaseException:
    """What really failed: fsspec's HTTP ``info`` turns every failure (a 503, a refused connection)
    into FileNotFoundError; the HTTP status or connection error under it is what counts."""
    cause = exc.__cause__
    if isinstance(exc, FileNotFoundError) and cause is not None and (
            isinstance(getattr(cause, "status", None), int) or isinstance(cause, OSError)
            or type(cause).__module__.startswith("aiohttp")):
        return cause
    return exc


def is_transient(exc: BaseException) -> bool:
    """Whether another try may succeed: connection trouble, timeouts, throttling, 5xx answers."""
    exc = root_cause(exc)
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return status in _TRANSIENT_STATUS
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        import aiohttp
    except ImportError:
        pass
    else:
        if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO


def _not_satisfiable(exc: BaseException) -> bool:
    return getattr(exc, "status", None) == 416 or "not satisfiable" in str(exc).lower()


def attempt(call: Callable[[], T], what: str, name: str, retries: int = DEFAULT_RETRIES,
            backoff: float = DEFAULT_BACKOFF, stats: FetchStats | None = None) -> T:
    """``call()``, tried again after transient failures (at most ``retries`` more times, waiting
    ``backoff`` × 2^attempt × [1, 1.5) seconds); any failure becomes a compeft error naming ``name``."""
    for tried in range(retries + 1):
        try:
            if stats is not None:
                stats.add(requests=1)
            return call()
        except CompeftError:
            raise
        except Exception as exc:  # noqa: BLE001 - sorted into transient / permanent right here
            if tried < retries and is_transient(exc):
                if stats is not None:
                    stats.add(retries=1)
                time.sleep(backoff * 2 ** tried * random.uniform(1.0, 1.5))
                continue
            raise failure(exc, what, name, tried + 1) from exc
    raise AssertionError("unreachable")


def failure(exc: BaseException, what: str, name: str, attempts: int) -> CompeftError:
    """The compeft error for a store's exception: missing, denied, out of range, or what it said."""
    cause = root_cause(exc)
    if isinstance(cause, FileNotFoundError) or getattr(cause, "status", None) == 404:
        return RemoteError("no such object", name)
    exc = cause
    if isinstance(exc, PermissionError):
        return RemoteError("access denied (check the credentials in storage_options)", name)
    if _not_satisfiable(exc):
        return TruncatedFileError(f"{what}: the object ends before that range (it is shorter than its header "
                                  "declares)", name)
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return RemoteError(f"{what} failed{tries}: {type(exc).__name__}{': ' + detail if detail else ''}", name)


def _cover(start: int, end: int, intervals: Iterable[tuple[int, int, T]]) -> list[tuple[int, int, T | None]]:
    """[start, end) as consecutive segments, each inside one of ``intervals`` ((s, e, key), sorted by
    s) or, with key None, a gap that none of them covers."""
    out: list[tuple[int, int, T | None]] = []
    pos = start
    for s, e, key in intervals:
        if e <= pos:
            continue
        if s >= end:
            break
        if s > pos:
            out.append((pos, s, None))
            pos = s
        stop = min(e, end)
        out.append((pos, stop, key))
        pos = stop
        if pos >= end:
            break
    if pos < end:
        out.append((pos, end, None))
    return out


def _done(data: bytes) -> Future[bytes]:
    future: Future[bytes] = Future()
    future.set_result(data)
    return future


class RemoteReader:
    """Byte ranges of one remote object through fsspec, as a :class:`~compeft.format.RangeReader`.

    Ranges are fetched concurrently (at most ``workers`` requests at once, long ones cut into
    :data:`PART_SIZE` parts), transient failures retried ``retries`` times with exponential backoff,
    and each response checked to hold exactly the bytes asked for. Fetched ranges stay in memory
    (up to :data:`MEMORY_BUDGET` bytes) for later reads; with ``cache`` they are also kept on disk,
    keyed by the object's identity, so a changed object is never served from an old copy.

    ``size`` is None until known: without a cache no metadata request is made, and the header is
    read in two exact requests (preamble, then header).
    """

    def __init__(self, fs: Any, path: str, name: str, *, cache: str | os.PathLike[str] | None = None,
                 progress: bool = False, workers: int = DEFAULT_WORKERS, retries: int = DEFAULT_RETRIES,
                 backoff: float = DEFAULT_BACKOFF, memory_budget: int = MEMORY_BUDGET) -> None:
        self.name = name
        self.size: int | None = None
        self.stats = FetchStats()
        self._fs, self._path = fs, path
        self._progress = progress
        self._retries, self._backoff = retries, backoff
        self._budget = memory_budget
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="compeft-fetch")
        self._lock = threading.Lock()
        self._parts: OrderedDict[tuple[int, int], Future[bytes]] = OrderedDict()
        self._whole: bytes | None = None  # the object, when the server ignored Range
        self._cache: PieceCache | None = None
        if cache is not None:
            info = self._attempt(lambda: fs.info(path), "reading the object's metadata")
            size = info.get("size") if isinstance(info, Mapping) else None
            self.size = size if type(size) is int and size >= 0 else None  # else: unknown, as without a cache
            identity = object_identity(info) if isinstance(info, Mapping) else None
            if identity is None:
                warnings.warn(f"{name}: the store gives no ETag, version or modification time, so a change "
                              "could not be detected: the cache is not used for this object", stacklevel=3)
            else:
                self._cache = PieceCache(cache, text_of(name), identity)

    # -- fetching ------------------------------------------------------------------------------
    def _attempt(self, call: Callable[[], T], what: str) -> T:
        return attempt(call, what, self.name, self._retries, self._backoff, self.stats)

    def _fetch(self, start: int, end: int) -> bytes:
        """Exactly the bytes [start, end) of the object, from the store (runs on a worker thread)."""
        data = self._attempt(lambda: self._fs.cat_file(self._path, start=start, end=end),
                             f"reading bytes {start}-{end - 1}")
        self.stats.add(bytes_fetched=len(data))
        want = end - start
        if len(data) > want:
            # A range request answered with more than the range: the server ignored Range and sent
            # the whole object (HTTP 200). Keep it and serve every later read from it.
            with self._lock:
                if self._whole is None:
                    self._whole = data
                    self.size = len(data)
                    warnings.warn(f"{self.name}: the server ignores Range requests; the whole object "
                                  f"({len(data)} bytes) was downloaded once and later reads are served from it",
                                  RangeIgnoredWarning, stacklevel=2)
                    self._keep(0, data)
            if end > len(data):
                raise TruncatedFileError(f"the object has {len(data)} bytes, {end} expected", self.name)
            return data[start:end]
        if len(data) < want:
            raise TruncatedFileError(f"short read: {len(data)} of {want} bytes at offset {start} (the object is "
                                     "shorter than its header declares, or the server cut the response)", self.name)
        self._keep(start, data)
        return data

    def _keep(self, start: int, data: bytes) -> None:
        """Put fetched bytes into the persistent cache, if there is one."""
        if self._cache is not None:
            try:
                self._cache.store(start, data)
            except (OSError, CompeftError) as exc:  # a full or read-only cache must not fail the read
                warnings.warn(f"{self.name}: could not write to the cache: {exc}", stacklevel=2)

    # -- planning ------------------------------------------------------------------------------
    def _schedule(self, ranges: Sequence[tuple[int, int]]) -> tuple[list[list[tuple[int, int, int, Future[bytes]]]],
                                                                    list[Future[bytes]]]:
        """For each (offset, length): segments (start, end, part start, part future) that cover it,
        taking what is in memory, then what is in the cache, and submitting fetches for the rest.
        Also returns the fetches submitted."""
        plans: list[list[tuple[int, int, int, Future[bytes]]]] = []
        submitted: list[Future[bytes]] = []
        with self._lock:
            whole = self._whole
            for offset, length in ranges:
                if whole is not None:
                    if offset + length > len(whole):
                        raise TruncatedFileError(f"the object has {len(whole)} bytes, {offset + length} expected",
                                                 self.name)
                    plans.append([(offset, offset + length, 0, _done(whole))])
                    continue
                plan = []
                held = sorted((s, e, (s, e)) for s, e in self._parts)
                for s, e, key in _cover(offset, offset + length, held):
                    if key is not None:
                        self._parts.move_to_end(key)
                        plan.append((s, e, key[0], self._parts[key]))
                        continue
                    plan.extend(self._fill(s, e, submitted))
                plans.append(plan)
            self._evict()
        return plans, submitted

    def _fill(self, start: int, end: int, submitted: list[Future[bytes]]
              ) -> list[tuple[int, int, int, Future[bytes]]]:
        """Cover [start, end) with parts: cached pieces where they cover it, else new fetches of at
        most PART_SIZE bytes (added to ``submitted``). Returns its segments (lock held)."""
        pieces: list[tuple[int, int, tuple[int, int]]] = []
        if self._cache is not None:
            for s, e, path in self._cache.pieces():
                if e > start and s < end and (s, e) not in self._parts:
                    data = self._cache.load(s, e, path)
                    if data is not None:
                        self.stats.add(cache_bytes=len(data))
                        self._parts[(s, e)] = _done(data)
                        pieces.append((s, e, (s, e)))
        out = []
        for s, e, key in _cover(start, end, pieces):
            if key is not None:
                out.append((s, e, key[0], self._parts[key]))
                continue
            for part in range(s, e, PART_SIZE):
                stop = min(part + PART_SIZE, e)
                future = self._pool.submit(self._fetch, part, stop)
                self._parts[(part, stop)] = future
                submitted.append(future)
                out.append((part, stop, part, future))
        return out

    def _evict(self) -> None:
        """Forget the least recently used finished parts beyond the memory budget (lock held)."""
        held = sum(e - s for s, e in self._parts)
        for key in list(self._parts):
            if held <= self._budget:
                break
            if self._parts[key].done():
                del self._parts[key]
                held -= key[1] - key[0]

    def _forget_failed(self, futures: Iterable[Future[bytes]]) -> None:
        with self._lock:
            for key, future in list(self._parts.items()):
                if future in futures and future.done() and future.exception() is not None:
                    del self._parts[key]

    # -- the RangeReader protocol, and more ----------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """The bytes [offset, offset + length)."""
        return self.read_many([(offset, length)])[0]

    def read_many(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each (offset, length) range: ranges in memory or in the cache are reused, the
        rest fetched concurrently; a progress bar shows long transfers."""
        plans, submitted = self._schedule(ranges)
        fresh = {id(f): f for plan in plans for *_, f in plan if f in submitted}.values()
        with self._lock:
            total = sum(e - s for (s, e), f in self._parts.items() if f in fresh)
        bar = byte_bar(total, "fetching", self._progress and total > BAR_BYTES)
        try:
            for future in as_completed(fresh):
                if future.exception() is None:
                    bar.update(len(future.result()))
        finally:
            bar.close()
        try:
            out = []
            for plan in plans:
                pieces = [f.result()[s - part: e - part] for s, e, part, f in plan]
                out.append(pieces[0] if len(pieces) == 1 else b"".join(pieces))
            return out
        except BaseException:
            self._forget_failed([f for plan in plans for *_, f in plan])
            raise

    def prefetch(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Start fetching these (offset, length) ranges in the background; later reads wait for them."""
        self._schedule(ranges)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._parts.clear()


def write(url: str, chunks: Iterable[bytes | memoryview], storage_options: Mapping[str, Any] | None = None,
          *, retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF) -> None:
    """Write a whole object so that readers see the old object or the new one, never part of one.

    Local paths (and ``file://``): a temporary file beside the target, fsync, rename. Object stores
    (S3, GCS, Azure, ``memory://``) and HTTP: one put of the whole object (S3 makes a multipart
    upload visible only when it completes). Other file systems: a temporary name beside the
    target, then a move (atomic where the file system renames atomically, e.g. SFTP, HDFS).
    """
    if not is_url(url):
        atomic_write(url, chunks)
        return
    fs, path = resolve(url, storage_options)
    local = local_path(fs, path)
    if local is not None:
        atomic_write(local, chunks)
        return
    data = b"".join(bytes(c) if isinstance(c, memoryview) else c for c in chunks)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    name = redact(url)
    if protocols & _SINGLE_PUT_STORES:
        attempt(lambda: fs.pipe_file(path, data), "writing the object", name, retries, backoff)
        return
    temporary = f"{path}.{uuid.uuid4().hex}.tmp"
    attempt(lambda: fs.pipe_file(temporary, data), "writing a temporary object", name, retries, backoff)
    try:
        attempt(lambda: fs.mv(temporary, path), "moving the temporary object into place", name, retries, backoff)
    except CompeftError:
        try:
            fs.rm(temporary)
        except Exception:  # noqa: BLE001 - best effort; the original error matters
            pass
        raise
