"""Byte access to containers: range readers over local files and in-memory buffers, atomic writes."""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
import zlib
from pathlib import Path
from typing import Iterable, Protocol

from ..errors import ChecksumError, CompeftError, CorruptPayloadError, SourceError, TruncatedFileError
from .header import ENCODING_DENSE, PREAMBLE_SIZE, Header, TensorEntry, parse_header, parse_preamble

# One read at open that usually holds the preamble and the whole header.
FIRST_READ = 64 * 1024
_NOT_BOOL = re.compile(rb"[^\x00\x01]")


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
    preamble = parse_preamble(head, reader.name, reader.size)
    end = PREAMBLE_SIZE + preamble.header_length
    text = head[PREAMBLE_SIZE:end] if len(head) >= end else reader.read(PREAMBLE_SIZE, preamble.header_length)
    return parse_header(text, preamble, reader.name)


def check_crc(data: bytes | memoryview, expected: int, what: str, path: object) -> None:
    if zlib.crc32(data) != expected:
        raise ChecksumError(f"{what}: CRC-32 mismatch (the payload is corrupt)", path)


def check_payload(entry: TensorEntry, data: bytes | memoryview, path: object) -> None:
    """Every check of one payload's bytes that needs no decoding (spec/FORMAT.md 6 and 9): its CRC-32
    (``ChecksumError``), then, for a dense BOOL tensor, that every byte is 0 or 1
    (``CorruptPayloadError``: any other byte in a bool tensor is undefined behaviour in torch and
    numpy, and two readers could disagree on what it means). Ternary-golomb payloads are checked
    further by the codec (chunk tables, then decoding)."""
    check_crc(data, entry.crc32, f"tensor {entry.name!r}", path)
    if entry.encoding == ENCODING_DENSE and entry.dtype == "BOOL":
        stray = _NOT_BOOL.search(data)
        if stray is not None:
            raise CorruptPayloadError(f"tensor {entry.name!r}: BOOL element {stray.start()} is the byte "
                                      f"{stray.group()[0]:#04x}, not 0 or 1", path)


def atomic_write(path: str | os.PathLike[str], chunks: Iterable[bytes | memoryview]) -> None:
    """Write ``chunks`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    A crash at any point leaves either the old file or none at ``path``, never a partial one. On
    Linux the temporary file has no name until its content is complete and synced (``O_TMPFILE``),
    so a writer killed mid-write leaves nothing behind either (only a kill between the two system
    calls that name it and rename it can leave a hidden ``.NAME.*.tmp``); elsewhere the temporary
    file is such a hidden file from the start.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = _unnamed_file(directory)
        if tmp is None:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise CompeftError(f"cannot write: {exc.strerror}", path) from None
    renamed = False
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fchmod(handle.fileno(), _new_file_mode())
            os.fsync(handle.fileno())
            if not tmp:  # unnamed and complete: name it and rename it at once
                tmp = str(directory / f".{target.name}.{os.getpid()}.{id(handle):x}.tmp")
                try:
                    _link(handle.fileno(), directory, Path(tmp).name)
                except OSError:  # linkat through /proc refused (some sandboxes): copy it instead
                    tmp = _named_copy(handle.fileno(), directory, target.name)
                os.replace(tmp, target)
                renamed = True
        if not renamed:
            os.replace(tmp, target)
        _sync_directory(directory)
    except BaseException:
        if tmp and not renamed:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise


def _new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file (0o666 less the umask): the temporary file
    starts private (0o600), but a published expert or catalog must be as readable as any other file.
    The umask is read from /proc, since setting it to read it races with other threads."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def _unnamed_file(directory: Path) -> tuple[int, str | None]:
    """(fd, "") of an O_TMPFILE file in ``directory``, or (-1, None) where the OS or file system lacks it."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag or not os.path.isdir("/proc/self/fd"):
        return -1, None
    try:
        return os.open(directory, flag | os.O_RDWR, 0o600), ""  # 0o600: the mode mkstemp gives too
    except OSError as exc:
        if exc.errno in (errno.EISDIR, errno.EOPNOTSUPP, errno.EINVAL):
            return -1, None  # EISDIR: a kernel without O_TMPFILE; EOPNOTSUPP: a file system without it
        raise


def _link(fd: int, directory: Path, name: str) -> None:
    """Give the unnamed file ``fd`` the name ``directory/name`` (linkat with AT_SYMLINK_FOLLOW through
    /proc: a directory fd makes os.link use linkat, which follows the /proc link to the file)."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
    finally:
        os.close(dir_fd)


def _named_copy(fd: int, directory: Path, name: str) -> str:
    """A hidden, fsynced copy of the finished unnamed file ``fd``; returns its path."""
    out_fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    with os.fdopen(out_fd, "wb") as out:
        os.lseek(fd, 0, os.SEEK_SET)
        while block := os.read(fd, 1 << 20):
            out.write(block)
        out.flush()
        os.fchmod(out.fileno(), _new_file_mode())
        os.fsync(out.fileno())
    return tmp


def _sync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
