"""What remote reads keep and count: the persistent cache of fetched pieces of an object, and
the counters of what fetching it cost. The cache layout is normative in ``spec/REMOTE.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import RemoteError
from .format.io import atomic_write

_PIECE = re.compile(r"^(\d+)-(\d+)\.([0-9a-f]{8})$")


@dataclass
class FetchStats:
    """What an opened object cost: requests to the store and body bytes received, retries, and
    bytes taken from the persistent cache instead."""

    requests: int = 0
    bytes_fetched: int = 0
    retries: int = 0
    cache_bytes: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, **counts: int) -> None:
        """Add to the counters (fetches run on several threads)."""
        with self._lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)


class PieceCache:
    """The persistent cache of one version of one object: each fetched range is a file
    ``<start>-<end>.<crc32 hex>`` in a directory named by SHA-256 of the URL and the object's
    identity, written to a temporary name and renamed (other processes never see a partial piece;
    two writing the same piece write the same bytes). A piece whose CRC-32 does not match is removed
    and fetched again."""

    def __init__(self, root: str | os.PathLike[str], url: str, identity: str) -> None:
        key = hashlib.sha256(f"{url}\n{identity}".encode()).hexdigest()
        self.directory = Path(root).expanduser() / "compeft-v1" / key[:2] / key
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            note = self.directory / "object.json"
            if not note.exists():  # for people and cleanup scripts; readers never need it
                atomic_write(note, [json.dumps({"url": url, "identity": identity}, indent=1).encode()])
        except OSError as exc:
            raise RemoteError(f"cannot use the cache directory {root}: {exc.strerror or exc}", url) from None

    def pieces(self) -> list[tuple[int, int, Path]]:
        """(start, end, file) of every complete piece, by start."""
        out = []
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        for name in names:
            match = _PIECE.match(name)
            if match:
                out.append((int(match[1]), int(match[2]), self.directory / name))
        return sorted(out)

    def load(self, start: int, end: int, path: Path) -> bytes | None:
        """The piece's bytes, or None when it is gone (another process cleaned up) or corrupt."""
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if len(data) != end - start or f"{zlib.crc32(data):08x}" != path.name.rsplit(".", 1)[1]:
            try:
                path.unlink()
            except OSError:
                pass
            return None
        return data

    def store(self, start: int, data: bytes) -> None:
        name = f"{start}-{start + len(data)}.{zlib.crc32(data):08x}"
        atomic_write(self.directory / name, [data])
