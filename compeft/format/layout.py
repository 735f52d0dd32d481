"""Where payloads go in the data section: aligned, in order, zero padding between (spec/FORMAT.md 4).

The writer side (:func:`lay_out`) and the reader side (:func:`padding`) of the same rule, so no
other module computes an offset or a pad.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

from .header import PAYLOAD_ALIGNMENT, Header, round_up


@dataclass(frozen=True)
class Placed:
    """One payload's place in the data section: offset and length (bytes) and CRC-32."""

    offset: int
    length: int
    crc32: int


def lay_out(payloads: Sequence[Sequence[bytes | memoryview]], alignments: Sequence[int]
            ) -> tuple[list[Placed], list[bytes | memoryview], int]:
    """Place each payload (a list of pieces written back to back) at the next multiple of its
    alignment (:attr:`TensorEntry.alignment`); the data section ends at a multiple of
    ``PAYLOAD_ALIGNMENT``. Returns the places, the pieces of the whole data section (zero padding
    included, nothing copied) and its length."""
    places: list[Placed] = []
    parts: list[bytes | memoryview] = []
    offset = 0
    for pieces, alignment in zip(payloads, alignments, strict=True):
        start = round_up(offset, alignment)
        parts.append(bytes(start - offset))
        length = sum(len(p) for p in pieces)
        crc = 0
        for p in pieces:
            crc = zlib.crc32(p, crc)
        places.append(Placed(start, length, crc))
        parts.extend(pieces)
        offset = start + length
    end = round_up(offset, PAYLOAD_ALIGNMENT)
    parts.append(bytes(end - offset))
    return places, [p for p in parts if len(p)], end


def padding(header: Header) -> list[tuple[int, int, str]]:
    """(file offset, length, what precedes) of every gap the layout leaves between and after the
    payloads: a reader that verifies a file checks these bytes are zero."""
    gaps = []
    end = 0
    for e in header.tensors:
        if e.offset > end:
            gaps.append((header.data_start + end, e.offset - end, f"before tensor {e.name!r}"))
        end = e.offset + e.length
    tail = header.file_length - header.data_start - end
    if tail:
        gaps.append((header.data_start + end, tail, "at the end of the file"))
    return gaps
