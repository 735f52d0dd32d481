"""The container's preamble and JSON header (spec/FORMAT.md sections 2-4): model, encoding, validation.

Pure standard library on purpose: ``compeft inspect`` reads headers without importing numpy's
heavier neighbours, torch or numba.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Sequence

from ..errors import HeaderError, LayoutError, NotACompeftFileError, TruncatedFileError, UnsupportedVersionError
from .json_limits import JsonLimits, JsonRuleError, loads

MAGIC = b"\x89CPEFT\r\n"
FORMAT_VERSION = 1
PREAMBLE = struct.Struct("<8sHHIIIQ")  # magic, version, flags, header_length, header_crc32, reserved, file_length
PREAMBLE_SIZE = PREAMBLE.size  # 32
DATA_ALIGNMENT = 64  # the data section starts at a multiple of this
PAYLOAD_ALIGNMENT = 8  # every payload starts at a multiple of this inside the data section
FLAG_DEFLATE = 0x0001  # the header is a zlib stream (RFC 1950) of the JSON text, then zero padding
KNOWN_FLAGS = FLAG_DEFLATE
DEFLATE_ABOVE = 2 * 1024  # the reference writer deflates JSON texts longer than this (spec/FORMAT.md 3)

# Limits (spec/FORMAT.md section 8). Readers reject files beyond them before allocating anything.
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_TENSORS = 1 << 20
MAX_NAME_BYTES = 1024
MAX_NDIM = 16
MAX_NUMEL = 1 << 48
MAX_CHUNK_SIZE = 1 << 20
MAX_GOLOMB_M = 1 << 48
MAX_JSON_DEPTH = 64
# JSON objects and arrays in a header (outside strings), counted before parsing: every tensor needs
# two (its entry and its shape), metadata a few. Parsing costs ~60 bytes of memory per container
# (so a 64 MiB header of "{}," would need ~1.5 GB); this bound keeps that below ~150 MB.
MAX_JSON_CONTAINERS = 2 * MAX_TENSORS + 65536
HEADER_JSON = JsonLimits(max_bytes=MAX_HEADER_BYTES, max_containers=MAX_JSON_CONTAINERS, max_depth=MAX_JSON_DEPTH)
MAX_INTEGER = 1 << 62  # integer fields without a limit of their own (offset, length, nnz, stream bits)

ENCODING_DENSE = "dense"
ENCODING_GOLOMB = "ternary-golomb"
ENCODINGS = (ENCODING_DENSE, ENCODING_GOLOMB)
COMPRESSIBLE_DTYPES = ("F32", "F16", "BF16")
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
SOURCES = ("peft", "full", "tensors")
SCOPES = ("global", "tensor")
ROLES = ("delta", "value")


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def golomb_width(m: int) -> int:
    """b = ceil(log2 m): the longest remainder field of Golomb parameter m."""
    return (m - 1).bit_length()


class GolombFields(NamedTuple):
    """The derived fields of a Golomb parameter m (spec/FORMAT.md 5.2), see :func:`golomb_fields`."""

    b: int  # ceil(log2 m): bits of the longest remainder
    w: int  # max(b - 1, 0): bits of each entry's low field
    cut: int  # low fields x >= cut are long-form (take a high bit): 2**b - m
    half: int  # a high bit of 1 adds this to x: 2**(b - 1) - cut


def golomb_fields(m: int) -> GolombFields:
    """(b, w, cut, half) of Golomb parameter m >= 1: the one Python definition, shared by the
    header checks, the codec and the GPU launcher (``compeft.codec.kernels.golomb_fields`` is its
    Numba twin, for use inside kernels).

    m = 1 (b = 0) has no remainder; there ``cut`` is 1 and ``half`` 0, so the decoding rule
    "x >= cut is long-form" never fires (x is always 0) and no kernel needs a special case.
    """
    if m < 1:
        raise ValueError(f"Golomb parameter must be at least 1, not {m}")
    b = golomb_width(m)
    if b == 0:
        return GolombFields(0, 0, 1, 0)
    cut = (1 << b) - m
    return GolombFields(b, b - 1, cut, (1 << (b - 1)) - cut)


def golomb_payload_length(nnz: int, chunk_size: int, golomb_m: int, unary_bits: int, high_bits: int) -> int:
    """Bytes of a ternary-golomb payload: chunk table, unary, low, high and sign streams (spec 5.1)."""
    width = golomb_fields(golomb_m).w
    words = (3 * -(-nnz // chunk_size) + -(-unary_bits // 64) + -(-(nnz * width) // 64) + -(-high_bits // 64)
             + -(-nnz // 64))
    return 8 * words


@dataclass(slots=True)  # not frozen: frozen dataclasses initialise slowly, and there are many entries
class TensorEntry:
    """One tensor of the header. ``offset`` is relative to the start of the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    encoding: str
    role: str
    offset: int
    length: int
    crc32: int
    init: float | None = None
    nnz: int = 0
    scale: float = 0.0
    golomb_m: int = 1
    chunk_size: int = 0
    unary_bits: int = 0
    high_bits: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_chunks(self) -> int:
        return -(-self.nnz // self.chunk_size) if self.chunk_size else 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "dtype": self.dtype, "shape": list(self.shape),
            "encoding": self.encoding, "role": self.role, "init": self.init,
            "offset": self.offset, "length": self.length, "crc32": self.crc32,
        }
        if self.encoding == ENCODING_GOLOMB:
            out.update(nnz=self.nnz, scale=self.scale, golomb_m=self.golomb_m,
                       chunk_size=self.chunk_size, unary_bits=self.unary_bits,
                       high_bits=self.high_bits)
        return out


@dataclass(frozen=True)
class Header:
    """The parsed, validated header plus where the data section starts."""

    metadata: dict[str, Any]
    tensors: tuple[TensorEntry, ...]
    data_start: int = 0
    file_length: int = 0
    version: int = FORMAT_VERSION
    by_name: dict[str, TensorEntry] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.by_name:
            self.by_name.update((t.name, t) for t in self.tensors)


# ---------------------------------------------------------------------------------------------
# writing


def encode_header(metadata: Mapping[str, Any], tensors: Sequence[TensorEntry], data_length: int) -> bytes:
    """Preamble + padded header bytes for a data section of ``data_length`` bytes (unpadded end)."""
    doc = {
        "format": "compeft",
        "format_version": FORMAT_VERSION,
        "metadata": dict(metadata),
        "tensors": [t.to_json() for t in tensors],
    }
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    flags, pad = 0, b" "
    if len(text) > DEFLATE_ABOVE:  # names, config and figures repeat: a small adapter's header would outweigh its payload
        text, flags, pad = zlib.compress(text, 9), FLAG_DEFLATE, b"\0"
    header_length = round_up(PREAMBLE_SIZE + len(text), DATA_ALIGNMENT) - PREAMBLE_SIZE
    text = text + pad * (header_length - len(text))
    file_length = PREAMBLE_SIZE + header_length + round_up(data_length, PAYLOAD_ALIGNMENT)
    preamble = PREAMBLE.pack(MAGIC, FORMAT_VERSION, flags, header_length, zlib.crc32(text), 0, file_length)
    return preamble + text


# ---------------------------------------------------------------------------------------------
# reading


def parse_preamble(raw: bytes, path: object, actual_size: int | None) -> tuple[int, int, int, int]:
    """Check the 32-byte preamble; return (header_length, header_crc32, file_length, flags)."""
    if len(raw) < len(MAGIC) or raw[: len(MAGIC)] != MAGIC:
        if len(raw) < PREAMBLE_SIZE and MAGIC.startswith(raw[: len(MAGIC)]):
            raise TruncatedFileError(f"file is {len(raw)} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble", path)
        raise NotACompeftFileError("not a compeft file (wrong magic bytes)", path)
    if len(raw) < PREAMBLE_SIZE:
        raise TruncatedFileError(f"file is {len(raw)} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble", path)
    magic, version, flags, header_length, header_crc, reserved, file_length = PREAMBLE.unpack(raw[:PREAMBLE_SIZE])
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"format version {version} is not supported (this compeft reads version {FORMAT_VERSION})", path)
    if flags & ~KNOWN_FLAGS:
        raise UnsupportedVersionError(f"unknown flags {flags:#x} in the preamble", path)
    if reserved != 0:  # (a later version may use it: "unsupported", like an unknown flag)
        raise UnsupportedVersionError(f"reserved preamble field is {reserved:#x}, not 0", path)
    if header_length > MAX_HEADER_BYTES:
        raise HeaderError(f"header of {header_length} bytes exceeds the limit of {MAX_HEADER_BYTES}", path)
    if (PREAMBLE_SIZE + header_length) % DATA_ALIGNMENT:
        raise LayoutError(f"header length {header_length} does not align the data section to {DATA_ALIGNMENT}", path)
    if file_length < PREAMBLE_SIZE + header_length:
        raise LayoutError(f"declared file length {file_length} is shorter than preamble + header", path)
    if actual_size is not None and actual_size != file_length:
        kind = "truncated" if actual_size < file_length else "has trailing bytes"
        raise TruncatedFileError(f"file {kind}: {actual_size} bytes present, {file_length} declared", path)
    return header_length, header_crc, file_length, flags


def _inflate(region: bytes, path: object) -> bytes:
    """The JSON text of a deflated header region, at most MAX_HEADER_BYTES (no zip bombs)."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(region, MAX_HEADER_BYTES + 1)
    except zlib.error as exc:
        raise HeaderError(f"deflated header is corrupt ({exc})", path) from None
    if len(text) > MAX_HEADER_BYTES:
        raise HeaderError(f"deflated header expands beyond the limit of {MAX_HEADER_BYTES} bytes", path)
    if not inflater.eof or inflater.unused_data.strip(b"\0"):
        raise HeaderError("deflated header is incomplete or followed by non-zero bytes", path)
    return text


def parse_header(text: bytes, header_crc: int, data_start: int, file_length: int, path: object,
                 flags: int = 0) -> Header:
    """Verify the header's CRC, parse its JSON and validate every field and the layout, in the order
    of spec/FORMAT.md 12 (the error class of a file breaking several rules is that of the first)."""
    if zlib.crc32(text) != header_crc:
        raise HeaderError("header checksum mismatch (the header bytes are corrupt)", path)
    if flags & FLAG_DEFLATE:
        text = _inflate(text, path)
    try:
        doc = loads(text, HEADER_JSON)
    except JsonRuleError as exc:
        raise HeaderError(f"header JSON: {exc}", path) from None
    if not isinstance(doc, dict) or doc.get("format") != "compeft":
        raise HeaderError('header is not a JSON object with "format": "compeft"', path)
    version = doc.get("format_version")
    if type(version) is not int:  # 1.0 and true are not integers; a missing version is not "unsupported"
        raise HeaderError(f"header format_version must be an integer, got {version!r:.40}", path)
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(f"header format_version {version} is not {FORMAT_VERSION}", path)
    metadata = doc.get("metadata")
    raw_tensors = doc.get("tensors")
    if not isinstance(metadata, dict) or not isinstance(raw_tensors, list):
        raise HeaderError('header needs a "metadata" object and a "tensors" array', path)
    _check_metadata(metadata, path)
    if len(raw_tensors) > MAX_TENSORS:
        raise HeaderError(f"{len(raw_tensors)} tensors exceed the limit of {MAX_TENSORS}", path)
    tensors = tuple(_parse_entry(raw, i, path) for i, raw in enumerate(raw_tensors))
    _check_layout(tensors, data_start, file_length, path)
    return Header(metadata=metadata, tensors=tensors, data_start=data_start, file_length=file_length)


def _number(value: Any) -> bool:
    """A JSON number (finite: the JSON rules refuse the rest), not ``true``/``false``."""
    return type(value) in (int, float)


# The metadata keys readers use, each optional but typed when present (spec/FORMAT.md 3.1); null
# only where the spec says "or null". The informative keys (alpha_rule, tuning, model_files,
# fidelity, build) and unknown keys are never checked: a file is not invalid because of them.
_METADATA_RULES: tuple[tuple[str, Any, str], ...] = (
    ("density", lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    ("scope", lambda v: isinstance(v, str) and v in SCOPES, f"one of {SCOPES}"),
    ("source", lambda v: isinstance(v, str) and v in SOURCES, f"one of {SOURCES}"),
    ("user", lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
     "an object mapping strings to strings"),
    ("adapter_config", lambda v: v is None or isinstance(v, dict), "a JSON object or null"),
    ("created_by", lambda v: isinstance(v, str), "a string"),
    ("base_fingerprint", lambda v: v is None or isinstance(v, str), "a string or null"),
    ("alpha", lambda v: v is None or _number(v), "a finite number or null"),
    ("sigma", _number, "a finite number"),
    ("threshold", _number, "a finite number"),
)


def _check_metadata(meta: Mapping[str, Any], path: object) -> None:
    for key, valid, what in _METADATA_RULES:
        if key in meta and not valid(meta[key]):
            raise HeaderError(f"metadata {key} must be {what}, got {meta[key]!r:.80}", path)


def _is_float32(value: float) -> bool:
    try:
        return struct.unpack("<f", struct.pack("<f", value))[0] == value
    except OverflowError:  # beyond float32's range (3.4028235677973366e+38 was found by the fuzzer)
        return False


def _is_int(value: Any, limit: int) -> bool:
    return type(value) is int and 0 <= value <= limit


# Keys every entry must hold, and those a ternary-golomb entry holds besides (spec/FORMAT.md 3.2).
ENTRY_KEYS = ("name", "dtype", "shape", "encoding", "role", "init", "offset", "length", "crc32")
GOLOMB_KEYS = ("nnz", "scale", "golomb_m", "chunk_size", "unary_bits", "high_bits")


def _parse_entry(raw: Any, index: int, path: object) -> TensorEntry:
    if not isinstance(raw, dict):
        raise HeaderError(f"tensor #{index} is not a JSON object", path)
    name = raw.get("name")
    # (a lone surrogate, which UTF-8 cannot encode, was refused with the JSON)
    if not isinstance(name, str) or not name or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise HeaderError(f"tensor #{index}: name must be a non-empty string of at most {MAX_NAME_BYTES} bytes", path)

    def bad(message: str, kind: type[HeaderError] | type[UnsupportedVersionError] = HeaderError) -> Exception:
        return kind(f"tensor {name!r}: {message}", path)

    def integer(key: str, limit: int = MAX_INTEGER) -> int:
        value = raw[key]
        if not _is_int(value, limit):
            raise bad(f"field {key!r} must be an integer in [0, {limit}], got {value!r:.40}")
        return value

    encoding = raw.get("encoding")  # first: an entry of a later encoding may hold other fields
    if not isinstance(encoding, str):
        raise bad(f"encoding must be a string, got {encoding!r:.40}")
    if encoding not in ENCODINGS:
        raise bad(f"unknown encoding {encoding!r:.80}", UnsupportedVersionError)
    missing = [k for k in ENTRY_KEYS + (GOLOMB_KEYS if encoding == ENCODING_GOLOMB else ()) if k not in raw]
    if missing:
        raise bad(f"lacks the key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    dtype = raw["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:  # (a list or object is not even hashable)
        raise bad(f"unknown dtype {dtype!r:.40}")
    shape = raw["shape"]
    if type(shape) is not list or len(shape) > MAX_NDIM or not all(_is_int(d, MAX_NUMEL) for d in shape):
        raise bad(f"shape must be a list of at most {MAX_NDIM} integers in [0, {MAX_NUMEL}]")
    # Every accepted shape must be allocatable (numpy, torch): [0, 2**48, 2**48] holds no element,
    # but its strides would overflow. So the limit bounds the product of the non-zero dimensions.
    extent = math.prod(d for d in shape if d)
    if extent > MAX_NUMEL:
        raise bad(f"{extent} elements (the product of the non-zero dimensions) exceed the limit of {MAX_NUMEL}")
    numel = math.prod(shape)
    role = raw["role"]
    if not isinstance(role, str) or role not in ROLES:
        raise bad(f"role {role!r:.40} is not one of {ROLES}")
    init = raw["init"]
    if init is not None and not _number(init):
        raise bad("init must be a finite number or null")
    entry = TensorEntry(name=name, dtype=dtype, shape=tuple(shape), encoding=encoding, role=role,
                        init=None if init is None else float(init), offset=integer("offset"),
                        length=integer("length"), crc32=integer("crc32", 0xFFFFFFFF))
    if encoding == ENCODING_DENSE:
        expected = numel * DTYPE_SIZES[dtype]
        if entry.length != expected:
            raise bad(f"dense payload of {entry.length} bytes, shape and dtype need {expected}")
        return entry
    if dtype not in COMPRESSIBLE_DTYPES:
        raise bad(f"encoding {encoding} needs a floating dtype, not {dtype}")
    if role != "delta":
        raise bad(f"encoding {encoding} stores a delta, its role must be 'delta'")
    nnz = entry.nnz = integer("nnz")
    m = entry.golomb_m = integer("golomb_m", MAX_GOLOMB_M)
    chunk_size = entry.chunk_size = integer("chunk_size", MAX_CHUNK_SIZE)
    unary_bits = entry.unary_bits = integer("unary_bits")
    high_bits = entry.high_bits = integer("high_bits")
    scale = raw["scale"]
    # copysign: -0.0 (and the number -0) would decode every kept entry to -0, whatever its sign bit
    if not _number(scale) or math.copysign(1.0, scale) < 0 or not _is_float32(scale):
        raise bad(f"scale {scale!r:.40} must be a finite, non-negative float32 value (-0.0 is negative)")
    entry.scale = float(scale)
    if nnz > numel:
        raise bad(f"nnz {nnz} exceeds the {numel} elements of shape {list(shape)}")
    if m < 1 or chunk_size < 1:
        raise bad("golomb_m and chunk_size must be at least 1")
    if nnz == 0 and (unary_bits or high_bits):
        raise bad("a tensor with nnz 0 has empty streams (unary_bits and high_bits must be 0)")
    if not nnz <= unary_bits <= nnz + numel // m:
        raise bad(f"unary_bits {unary_bits} is impossible for nnz {nnz} and {numel} elements")
    if high_bits > (nnz if m > 1 else 0):
        raise bad(f"high_bits {high_bits} is impossible for nnz {nnz} and m {m}")
    expected = golomb_payload_length(nnz, chunk_size, m, unary_bits, high_bits)
    if entry.length != expected:
        raise bad(f"payload of {entry.length} bytes, its stream sizes need {expected}")
    return entry


def _check_layout(tensors: Sequence[TensorEntry], data_start: int, file_length: int, path: object) -> None:
    """Names strictly increasing (a header rule: HeaderError); payloads in name order, each at the
    next aligned offset, covering the data section exactly (LayoutError)."""
    expected = 0
    previous = None
    for t in tensors:
        if previous is not None and not t.name > previous:
            raise HeaderError(f"tensor names must be unique and sorted: {t.name!r} follows {previous!r}", path)
        previous = t.name
        if t.offset != expected:
            raise LayoutError(f"tensor {t.name!r}: payload at offset {t.offset}, expected {expected} "
                              "(payloads must follow each other without holes or overlaps)", path)
        expected = round_up(t.offset + t.length, PAYLOAD_ALIGNMENT)
    if data_start + expected != file_length:
        raise LayoutError(f"payloads end at {data_start + expected} but the file is {file_length} bytes "
                          "(the file must be covered exactly)", path)
