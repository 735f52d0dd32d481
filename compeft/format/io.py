"""Byte access to containers: range readers over local files and in-memory buffers, atomic writes."""

from __future__ import annotations

import os
import stat
import tempfile
import zlib
from pathlib import Path
from typing import Iterable, Protocol

from ..errors import ChecksumError, CompeftError, SourceError, TruncatedFileError
from .header import PREAMBLE_SIZE, Header, parse_header, parse_preamble

# One read at open that usually holds the preamble and the whole header.
FIRST_READ = 64 * 1024


class RangeReader(Protocol):
    """Where a container's bytes come from: a local file, a buffer, later a URL."""

    name: str
    size: int | None

    def read(self, offset: int, length: int) -> bytes: ...


class FileReader:
    """Reads ranges of a local file with ``os.pread`` (no mmap: a file truncated while open must
    give an error, not a SIGBUS)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.name = str(path)
        self._fd = -1
        try:
            self._fd = os.open(self.name, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            info = os.fstat(self._fd)
        except OSError as exc:
            self.close()
            raise SourceError(f"cannot open: {exc.strerror}", path) from None
        if not stat.S_ISREG(info.st_mode):
            self.close()
            raise SourceError("not a regular file", path)
        self.size = info.st_size

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise SourceError(f"read failed: {exc.strerror}", self.name) from None
        if len(data) != length:
            raise TruncatedFileError(f"short read: {len(data)} of {length} bytes at offset {offset}", self.name)
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class BytesReader:
    """Reads ranges of an in-memory container (fetched bytes, tests)."""

    def __init__(self, data: bytes, name: str = "<bytes>") -> None:
        self._data = memoryview(data)
        self.name = name
        self.size = len(data)

    def read(self, offset: int, length: int) -> bytes:
        if offset + length > len(self._data):
            raise TruncatedFileError(f"short read: {length} bytes at offset {offset}", self.name)
        return bytes(self._data[offset: offset + length])


def read_header(reader: RangeReader) -> Header:
    """Read and validate the preamble and header: one read when the header is under 64 KiB."""
    head = reader.read(0, min(FIRST_READ, reader.size)) if reader.size is not None else reader.read(0, PREAMBLE_SIZE)
    header_length, header_crc, file_length, flags = parse_preamble(head, reader.name, reader.size)
    end = PREAMBLE_SIZE + header_length
    text = head[PREAMBLE_SIZE:end] if len(head) >= end else reader.read(PREAMBLE_SIZE, header_length)
    return parse_header(text, header_crc, end, file_length, reader.name, flags)


def check_crc(data: bytes | memoryview, expected: int, what: str, path: object) -> None:
    if zlib.crc32(data) != expected:
        raise ChecksumError(f"{what}: CRC-32 mismatch (the payload is corrupt)", path)


def atomic_write(path: str | os.PathLike[str], chunks: Iterable[bytes | memoryview]) -> None:
    """Write ``chunks`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    A crash at any point leaves either the old file or none at ``path``, never a partial one.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise CompeftError(f"cannot write: {exc.strerror}", path) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
