"""Container surgery for tests and tools: take a ``.cpeft`` file apart, edit it, put it back together.

A file is a 32-byte preamble, a header region (the JSON text, deflated when the preamble's flags
say so, padded so that the data section starts at a multiple of 64) and the data section
(spec/FORMAT.md 2-4). ``split`` takes it apart, ``join`` puts it together with consistent lengths
and CRC unless told otherwise (to build deliberately inconsistent files), and the ``with_*``
functions edit one part of a file's bytes and return the new bytes::

    pre, doc, data = split(blob)
    blob = join(doc, data, preamble=pre)                         # the same file, re-assembled
    blob = with_header(blob, lambda doc: doc.update(format_version=2))
    blob = with_payload(blob, "w", lambda payload: payload.reverse())  # its crc32 fixed
    blob = with_preamble(blob, version=2)                        # raw: nothing else recomputed
    blob = recrc(patch(blob, 40, b"x"))                          # header CRC over the edited header

JSON is read leniently (``json.loads``: NaN, duplicate keys) so that hostile headers can be taken
apart too, and written the way compeft writes it (compact, UTF-8). A test and tool aid, not part of
the ``compeft`` package: tools/ scripts import it directly, tests through ``conftest.load_tool``.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

from compeft.format.header import (DATA_ALIGNMENT, FLAG_DEFLATE, FORMAT_VERSION, FORMAT_VERSIONS, MAGIC, PREAMBLE,
                                   PREAMBLE_SIZE, deflate as deflate_text, round_up)
from compeft.format.header_dictionary import HEADER_DICTIONARY


class Preamble(NamedTuple):
    """The preamble's fields, in file order (``compeft.format.header.PREAMBLE``)."""

    magic: bytes
    version: int
    flags: int
    header_length: int
    header_crc: int
    reserved: int
    file_length: int

    @property
    def data_start(self) -> int:
        return PREAMBLE_SIZE + self.header_length


# struct codes of the fields, from PREAMBLE's format ("<8sHHIIIQ" -> "8s", "H", ...)
FIELD_CODES = dict(zip(Preamble._fields, re.findall(r"\d*[a-zA-Z]", PREAMBLE.format)))


def preamble(blob: bytes) -> Preamble:
    return Preamble(*PREAMBLE.unpack_from(blob))


def header_text(blob: bytes) -> bytes:
    """The header's JSON text: inflated when flagged (from version 2 with the preset dictionary),
    padding (spaces, or zero bytes) stripped."""
    pre = preamble(blob)
    region = blob[PREAMBLE_SIZE:pre.data_start]
    if not pre.flags & FLAG_DEFLATE:
        return region.rstrip(b" ")
    inflater = zlib.decompressobj(zdict=HEADER_DICTIONARY) if pre.version >= 2 else zlib.decompressobj()
    return inflater.decompress(region.rstrip(b"\0")) + inflater.flush()


def split(blob: bytes) -> tuple[Preamble, Any, bytes]:
    """(preamble, parsed header JSON, data section). Raises on a header that does not parse."""
    pre = preamble(blob)
    return pre, json.loads(header_text(blob).decode("utf-8")), blob[pre.data_start:]


def encode(doc: Any, *, allow_nan: bool = False) -> bytes:
    """JSON text as compeft writes it: compact separators, UTF-8, no NaN unless asked."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan).encode("utf-8")


def join(header: Any, data: bytes = b"", *, preamble: Preamble | None = None, deflate: bool | None = None,
         pad: bytes | None = None, allow_nan: bool = False, magic: bytes | None = None, version: int | None = None,
         flags: int | None = None, reserved: int | None = None, header_length: int | None = None,
         header_crc: int | None = None, file_length: int | None = None) -> bytes:
    """Assemble a file from a header and a data section.

    ``header`` is a JSON document (encoded with :func:`encode`) or bytes: the JSON text, or with
    ``deflate=False`` any header region. ``magic``, ``version``, ``flags`` and ``reserved`` default to
    ``preamble``'s fields (else a fresh file's: MAGIC, the document's ``format_version`` — of the JSON
    text too — when it is 1 or 2, else FORMAT_VERSION, 0, 0), with FLAG_DEFLATE set or cleared by ``deflate`` unless ``flags``
    is given (then written as given). The text is deflated when ``deflate`` is true or, left None,
    when the flags have FLAG_DEFLATE (as compeft deflates for the file's version: from version 2 with
    the preset dictionary), then padded (``pad``: spaces,
    zero bytes after deflating) so that the data section starts at a multiple of 64.
    ``header_length``, ``header_crc`` and ``file_length`` are computed from what was assembled unless
    given: give them (or ``flags``) to build deliberately inconsistent files.
    """
    text = header if isinstance(header, (bytes, bytearray)) else encode(header, allow_nan=allow_nan)
    if preamble is None:
        declared = header.get("format_version") if isinstance(header, dict) else declared_version(header)
        preamble = Preamble(MAGIC, declared if declared in FORMAT_VERSIONS and type(declared) is int
                            else FORMAT_VERSION, 0, 0, 0, 0, 0)
    base = preamble
    if flags is None:  # the preamble's, with FLAG_DEFLATE as ``deflate`` says
        flags = base.flags if deflate is None else base.flags & ~FLAG_DEFLATE | (FLAG_DEFLATE if deflate else 0)
    if deflate is None:
        deflate = bool(flags & FLAG_DEFLATE)
    if deflate:
        text = deflate_text(text, base.version if version is None else version)
    if pad is None:
        pad = b"\0" if deflate else b" "
    text = bytes(text) + pad * (round_up(PREAMBLE_SIZE + len(text), DATA_ALIGNMENT) - PREAMBLE_SIZE - len(text))
    fields = base._replace(
        magic=base.magic if magic is None else magic,
        version=base.version if version is None else version,
        flags=flags,
        header_length=len(text) if header_length is None else header_length,
        header_crc=zlib.crc32(text) if header_crc is None else header_crc,
        reserved=base.reserved if reserved is None else reserved,
        file_length=PREAMBLE_SIZE + len(text) + len(data) if file_length is None else file_length)
    return PREAMBLE.pack(*fields) + text + bytes(data)


def declared_version(text: bytes | bytearray) -> Any:
    """The ``format_version`` of a JSON header text, or None (a text that is not a JSON object)."""
    try:
        doc = json.loads(bytes(text).decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return doc.get("format_version") if isinstance(doc, dict) else None


def entry(doc: dict[str, Any], name: str) -> dict[str, Any]:
    """The header's tensor entry called ``name``."""
    return next(t for t in doc["tensors"] if t["name"] == name)


@dataclass
class Container:
    """A file taken apart, to edit in place: ``doc`` and ``data`` are free to change."""

    preamble: Preamble
    doc: Any
    data: bytes

    @property
    def data_start(self) -> int:
        return self.preamble.data_start

    def entry(self, name: str) -> dict[str, Any]:
        return entry(self.doc, name)

    def payload_range(self, name: str) -> tuple[int, int]:
        """(start, end) of a tensor's payload, as absolute file offsets (of the file as read)."""
        e = self.entry(name)
        return self.data_start + e["offset"], self.data_start + e["offset"] + e["length"]

    def payload(self, name: str) -> bytes:
        e = self.entry(name)
        return self.data[e["offset"]:e["offset"] + e["length"]]

    def set_payload(self, name: str, payload: bytes) -> None:
        """Replace a payload by one of the same length and fix its crc32 in the header."""
        e = self.entry(name)
        assert len(payload) == e["length"], (len(payload), e["length"])
        self.data = self.data[:e["offset"]] + bytes(payload) + self.data[e["offset"] + e["length"]:]
        e["crc32"] = zlib.crc32(payload)

    def to_bytes(self, **join_args: Any) -> bytes:
        """``join(doc, data, preamble=<the one read>, ...)``: the file re-assembled, lengths and CRC fixed."""
        return join(self.doc, self.data, **{"preamble": self.preamble, **join_args})


def read(source: bytes | str | Path) -> Container:
    """A file's bytes, or the file at a path, taken apart."""
    blob = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
    return Container(*split(blob))


def with_header(blob: bytes, edit: Callable[[Any], Any] | None = None, **join_args: Any) -> bytes:
    """``blob`` with its header edited: ``edit(doc)`` changes the parsed JSON in place, or returns a
    replacement (a document, or JSON text bytes). The header is re-encoded (deflated again if it
    was) and header_length, the header CRC and file_length fixed; ``join_args`` go to :func:`join`."""
    pre, doc, data = split(blob)
    result = edit(doc) if edit is not None else None
    return join(doc if result is None else result, data, **{"preamble": pre, **join_args})


def with_payload(blob: bytes, name: str, edit: Callable[[bytearray], Any]) -> bytes:
    """``blob`` with tensor ``name``'s payload edited: ``edit(payload)`` changes the bytearray in place,
    or returns new bytes of the same length. Its crc32 is fixed and the header re-assembled (lengths
    and header CRC consistent), so only what the edit broke in the payload's structure is wrong."""
    container = read(blob)
    payload = bytearray(container.payload(name))
    result = edit(payload)
    container.set_payload(name, bytes(payload if result is None else result))
    return container.to_bytes()


def with_preamble(blob: bytes, *, wrap: bool = False, **fields: Any) -> bytes:
    """``blob`` with preamble fields replaced (``version=2``, ``file_length=...``) and nothing else
    recomputed; ``wrap`` reduces integers modulo their field's width instead of refusing them."""
    if wrap:
        fields = {k: v % 2 ** (8 * struct.calcsize("<" + FIELD_CODES[k])) if isinstance(v, int) else v
                  for k, v in fields.items()}
    return PREAMBLE.pack(*preamble(blob)._replace(**fields)) + blob[PREAMBLE_SIZE:]


def recrc(blob: bytes) -> bytes:
    """``blob`` with the header CRC recomputed over its header region as it stands (lengths kept)."""
    pre = preamble(blob)
    return with_preamble(blob, header_crc=zlib.crc32(blob[PREAMBLE_SIZE:pre.data_start]))


def recrc_payloads(doc: Any, data: bytes) -> None:
    """Set every tensor entry's crc32 to that of its payload in ``data``, leniently: entries that are
    not objects, or whose offset and length are not integers within ``data``, are left alone."""
    tensors = doc.get("tensors") if isinstance(doc, dict) else None
    for t in tensors if isinstance(tensors, list) else ():
        if isinstance(t, dict) and type(t.get("offset")) is int and type(t.get("length")) is int:
            if 0 <= t["offset"] <= len(data) and 0 <= t["length"] <= len(data):
                t["crc32"] = zlib.crc32(data[t["offset"]:t["offset"] + t["length"]])


def patch(blob: bytes, offset: int, new: bytes) -> bytes:
    """``blob`` with the bytes at ``offset`` overwritten by ``new`` (no checksum fixed)."""
    return blob[:offset] + new + blob[offset + len(new):]


def flip(blob: bytes, offset: int, mask: int = 0x01) -> bytes:
    """``blob`` with the byte at ``offset`` XORed with ``mask`` (no checksum fixed)."""
    return patch(blob, offset, bytes([blob[offset] ^ mask]))
