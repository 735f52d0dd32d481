"""Progress bars (tqdm) that vanish when not wanted or when the output is not a terminal."""

from __future__ import annotations

import sys
from typing import Any, Iterable


class _Silent:
    def __init__(self, iterable: Iterable[Any] | None) -> None:
        self._iterable = iterable

    def __iter__(self) -> Any:
        return iter(self._iterable or ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(items: Iterable[Any] | int, description: str, enabled: bool, unit: str = "tensor") -> Any:
    """A tqdm bar over ``items`` (or of ``items`` steps when an int), or a silent stand-in."""
    iterable = None if isinstance(items, int) else items
    if not enabled or not sys.stderr.isatty():
        return _Silent(iterable)
    from tqdm import tqdm
    total = items if isinstance(items, int) else None
    return tqdm(iterable, total=total, desc=description, unit=unit, leave=False, file=sys.stderr)


def byte_bar(total: int, description: str, enabled: bool) -> Any:
    """A tqdm bar counting ``total`` bytes (call ``update(n)`` per n bytes), or a silent stand-in."""
    if not enabled or not sys.stderr.isatty():
        return _Silent(None)
    from tqdm import tqdm
    return tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                file=sys.stderr)
