"""The container's preamble and JSON header (spec/FORMAT.md sections 2-4): model, encoding, validation.

Pure standard library on purpose: ``compeft inspect`` reads headers without importing numpy's
heavier neighbours, torch or numba.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Sequence

from ..errors import HeaderError, LayoutError, NotACompeftFileError, TruncatedFileError, UnsupportedVersionError
from .header_dictionary import HEADER_DICTIONARY, HEADER_DICTIONARY_ID
from .json_limits import JsonLimits, JsonRuleError, loads

MAGIC = b"\x89CPEFT\r\n"
FORMAT_VERSION = 2  # what the reference writer writes
FORMAT_VERSIONS = (1, 2)  # what readers read; a writer may still write version 1 (spec/FORMAT.md 10)
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
ENCODING_PACKED = "ternary-golomb-packed"  # version 2: one chunk, no table, streams bit-contiguous
GOLOMB_ENCODINGS = (ENCODING_GOLOMB, ENCODING_PACKED)  # the compressed ones
ENCODINGS = {1: (ENCODING_DENSE, ENCODING_GOLOMB), 2: (ENCODING_DENSE, ENCODING_GOLOMB, ENCODING_PACKED)}
MAX_PACKED_NNZ = MAX_CHUNK_SIZE  # a packed tensor is one chunk
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


@functools.lru_cache(maxsize=256)  # (files use a few values of m; every tensor of every open asks)
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


def payload_alignment(encoding: str) -> int:
    """A payload of this encoding starts at a multiple of this (spec/FORMAT.md 4): a packed payload
    is copied into words before decoding, so it needs none."""
    return 1 if encoding == ENCODING_PACKED else PAYLOAD_ALIGNMENT


def golomb_payload_length(nnz: int, chunk_size: int, golomb_m: int, unary_bits: int, high_bits: int,
                          encoding: str = ENCODING_GOLOMB) -> int:
    """Bytes of a ternary-golomb payload: chunk table, unary, low, high and sign streams (spec 5.1);
    of a packed one, the four streams' bits back to back, rounded up to a byte (spec 5.5)."""
    width = golomb_fields(golomb_m).w
    if encoding == ENCODING_PACKED:
        return -(-(unary_bits + nnz * width + high_bits + nnz) // 8)
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

    @property
    def compressed(self) -> bool:
        """Encoded as ternary-golomb, packed or not (both decode the same way)."""
        return self.encoding in GOLOMB_ENCODINGS

    @property
    def alignment(self) -> int:
        return payload_alignment(self.encoding)

    def to_json(self, version: int = FORMAT_VERSION) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "dtype": self.dtype, "shape": list(self.shape),
            "encoding": self.encoding, "role": self.role, "init": self.init,
            "offset": self.offset, "length": self.length, "crc32": self.crc32,
        }
        if self.compressed:  # (version 2 readers round a scale to float32: its shortest digits suffice)
            out.update(nnz=self.nnz, scale=self.scale if version == 1 else short_float32(self.scale),
                       golomb_m=self.golomb_m, chunk_size=self.chunk_size, unary_bits=self.unary_bits,
                       high_bits=self.high_bits)
            if self.encoding == ENCODING_PACKED:
                del out["chunk_size"]
        return out


def short_float32(value: float) -> float:
    """The double whose shortest decimal is the shortest one that rounds to float32 ``value``
    (0.17984158, not 0.17984157800674438): version 2 readers round a scale to float32 (spec 3.2)."""
    short = float(f"{value:.9g}")
    for digits in range(1, 10):  # the fewest significant digits that round back to the same float32
        candidate = float(f"{value:.{digits}g}")
        if _to_float32(candidate) == value:
            short = candidate
            break
    return short if _to_float32(short) == value else value


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


def encode_header(metadata: Mapping[str, Any], tensors: Sequence[TensorEntry], data_length: int,
                  version: int = FORMAT_VERSION) -> bytes:
    """Preamble + padded header bytes for a data section of ``data_length`` bytes (unpadded end)."""
    if version not in FORMAT_VERSIONS or any(t.encoding not in ENCODINGS[version] for t in tensors):
        raise ValueError(f"format version {version} cannot hold these tensors")
    doc = {
        "format": "compeft",
        "format_version": version,
        "metadata": dict(metadata),
        "tensors": [t.to_json(version) for t in tensors],
    }
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    flags, pad = 0, b" "
    if len(text) > DEFLATE_ABOVE:  # names, config and figures repeat: a small adapter's header would outweigh its payload
        text, flags, pad = deflate(text, version), FLAG_DEFLATE, b"\0"
    header_length = round_up(PREAMBLE_SIZE + len(text), DATA_ALIGNMENT) - PREAMBLE_SIZE
    text = text + pad * (header_length - len(text))
    file_length = PREAMBLE_SIZE + header_length + round_up(data_length, PAYLOAD_ALIGNMENT)
    preamble = PREAMBLE.pack(MAGIC, version, flags, header_length, zlib.crc32(text), 0, file_length)
    return preamble + text


def deflate(text: bytes, version: int) -> bytes:
    """A zlib stream of ``text`` at level 9; from version 2, with the preset dictionary (spec 3.3)."""
    if version == 1:
        return zlib.compress(text, 9)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, zdict=HEADER_DICTIONARY)
    return compressor.compress(text) + compressor.flush()


# ---------------------------------------------------------------------------------------------
# reading


class Preamble(NamedTuple):
    """The checked fields of the 32-byte preamble (spec/FORMAT.md 2)."""

    version: int
    flags: int
    header_length: int
    header_crc32: int
    file_length: int


def parse_preamble(raw: bytes, path: object, actual_size: int | None) -> Preamble:
    """Check the 32-byte preamble (rules P1-P9)."""
    if len(raw) < len(MAGIC) or raw[: len(MAGIC)] != MAGIC:
        if len(raw) < PREAMBLE_SIZE and MAGIC.startswith(raw[: len(MAGIC)]):
            raise TruncatedFileError(f"file is {len(raw)} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble", path)
        raise NotACompeftFileError("not a compeft file (wrong magic bytes)", path)
    if len(raw) < PREAMBLE_SIZE:
        raise TruncatedFileError(f"file is {len(raw)} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble", path)
    magic, version, flags, header_length, header_crc, reserved, file_length = PREAMBLE.unpack(raw[:PREAMBLE_SIZE])
    if version not in FORMAT_VERSIONS:
        raise UnsupportedVersionError(
            f"format version {version} is not supported (this compeft reads versions 1 and 2)", path)
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
    return Preamble(version, flags, header_length, header_crc, file_length)


def _inflate(region: bytes, version: int, path: object) -> bytes:
    """The JSON text of a deflated header region, at most MAX_HEADER_BYTES (no zip bombs). From
    version 2 a stream may start from the preset dictionary (zlib asks for it by its Adler-32 and
    refuses any other); a version 1 stream that asks for one is corrupt."""
    inflater = zlib.decompressobj(zdict=HEADER_DICTIONARY) if version >= 2 else zlib.decompressobj()
    try:
        text = inflater.decompress(region, MAX_HEADER_BYTES + 1)
    except zlib.error as exc:
        if len(region) >= 6 and region[1] & 0x20:  # FDICT (RFC 1950): the stream starts from a dictionary
            dict_id = int.from_bytes(region[2:6], "big")
            raise HeaderError(f"deflated header asks for a preset dictionary (Adler-32 {dict_id:#010x}) "
                              + ("that version 1 files cannot use" if version == 1 else
                                 f"other than compeft's ({HEADER_DICTIONARY_ID:#010x})"), path) from None
        raise HeaderError(f"deflated header is corrupt ({exc})", path) from None
    if len(text) > MAX_HEADER_BYTES:
        raise HeaderError(f"deflated header expands beyond the limit of {MAX_HEADER_BYTES} bytes", path)
    if not inflater.eof or inflater.unused_data.strip(b"\0"):
        raise HeaderError("deflated header is incomplete or followed by non-zero bytes", path)
    return text


def parse_header(text: bytes, preamble: Preamble, path: object) -> Header:
    """Verify the header's CRC, parse its JSON and validate every field and the layout, in the order
    of spec/FORMAT.md 12 (the error class of a file breaking several rules is that of the first)."""
    data_start, file_length = PREAMBLE_SIZE + preamble.header_length, preamble.file_length
    if zlib.crc32(text) != preamble.header_crc32:
        raise HeaderError("header checksum mismatch (the header bytes are corrupt)", path)
    if preamble.flags & FLAG_DEFLATE:
        text = _inflate(text, preamble.version, path)
    try:
        doc = loads(text, HEADER_JSON)
    except JsonRuleError as exc:
        raise HeaderError(f"header JSON: {exc}", path) from None
    if not isinstance(doc, dict) or doc.get("format") != "compeft":
        raise HeaderError('header is not a JSON object with "format": "compeft"', path)
    version = doc.get("format_version")
    if type(version) is not int:  # 1.0 and true are not integers; a missing version is not "unsupported"
        raise HeaderError(f"header format_version must be an integer, got {version!r:.40}", path)
    if version not in FORMAT_VERSIONS:
        raise UnsupportedVersionError(f"header format_version {version} is not 1 or 2", path)
    if version != preamble.version:
        raise HeaderError(f"header format_version {version} differs from the preamble's version {preamble.version}",
                          path)
    metadata = doc.get("metadata")
    raw_tensors = doc.get("tensors")
    if not isinstance(metadata, dict) or not isinstance(raw_tensors, list):
        raise HeaderError('header needs a "metadata" object and a "tensors" array', path)
    _check_metadata(metadata, path)
    if len(raw_tensors) > MAX_TENSORS:
        raise HeaderError(f"{len(raw_tensors)} tensors exceed the limit of {MAX_TENSORS}", path)
    tensors = tuple(_parse_entry(raw, i, version, path) for i, raw in enumerate(raw_tensors))
    _check_layout(tensors, data_start, file_length, path)
    return Header(metadata=metadata, tensors=tensors, data_start=data_start, file_length=file_length,
                  version=version)


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


def _to_float32(value: float) -> float:
    """``value`` rounded to float32 (nearest, ties to even); infinity when beyond its range."""
    try:
        return struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:  # beyond float32's range (3.4028235677973366e+38 was found by the fuzzer)
        return math.copysign(math.inf, value)


def _is_float32(value: float) -> bool:
    return _to_float32(value) == value


# Keys every entry must hold, and those a ternary-golomb entry holds besides (spec/FORMAT.md 3.2).
ENTRY_KEYS = ("name", "dtype", "shape", "encoding", "role", "init", "offset", "length", "crc32")
GOLOMB_KEYS = ("nnz", "scale", "golomb_m", "chunk_size", "unary_bits", "high_bits")
ENCODING_KEYS = {ENCODING_DENSE: (), ENCODING_GOLOMB: GOLOMB_KEYS,
                 ENCODING_PACKED: tuple(k for k in GOLOMB_KEYS if k != "chunk_size")}


def _entry_error(name: str, message: str, path: object, kind: type[Exception] = HeaderError) -> Exception:
    return kind(f"tensor {name!r}: {message}", path)


def _integer(raw: dict[str, Any], key: str, name: str, path: object, limit: int = MAX_INTEGER) -> int:
    value = raw[key]
    if type(value) is not int or not 0 <= value <= limit:
        raise _entry_error(name, f"field {key!r} must be an integer in [0, {limit}], got {value!r:.40}", path)
    return value


_REQUIRED = {encoding: frozenset(ENTRY_KEYS + keys) for encoding, keys in ENCODING_KEYS.items()}  # one subset test


def _parse_entry(raw: Any, index: int, version: int, path: object) -> TensorEntry:
    # (written for speed, without closures or generator calls: every open parses every entry)
    if not isinstance(raw, dict):
        raise HeaderError(f"tensor #{index} is not a JSON object", path)
    name = raw.get("name")
    # (a lone surrogate, which UTF-8 cannot encode, was refused with the JSON)
    if not isinstance(name, str) or not name or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise HeaderError(f"tensor #{index}: name must be a non-empty string of at most {MAX_NAME_BYTES} bytes", path)
    encoding = raw.get("encoding")  # first: an entry of a later encoding may hold other fields
    if not isinstance(encoding, str):
        raise _entry_error(name, f"encoding must be a string, got {encoding!r:.40}", path)
    if encoding not in ENCODINGS[version]:
        raise _entry_error(name, f"unknown encoding {encoding!r:.80} (in a version {version} file)", path,
                           UnsupportedVersionError)
    if not raw.keys() >= _REQUIRED[encoding]:
        missing = [k for k in ENTRY_KEYS + ENCODING_KEYS[encoding] if k not in raw]
        raise _entry_error(name, f"lacks the key{'s' if len(missing) > 1 else ''} {', '.join(missing)}", path)
    dtype = raw["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:  # (a list or object is not even hashable)
        raise _entry_error(name, f"unknown dtype {dtype!r:.40}", path)
    shape = raw["shape"]
    if type(shape) is not list or len(shape) > MAX_NDIM or not all(
            [type(d) is int and 0 <= d <= MAX_NUMEL for d in shape]):
        raise _entry_error(name, f"shape must be a list of at most {MAX_NDIM} integers in [0, {MAX_NUMEL}]", path)
    # Every accepted shape must be allocatable (numpy, torch): [0, 2**48, 2**48] holds no element,
    # but its strides would overflow. So the limit bounds the product of the non-zero dimensions.
    numel = math.prod(shape)
    extent = numel if numel else math.prod([d for d in shape if d])
    if extent > MAX_NUMEL:
        raise _entry_error(name, f"{extent} elements (the product of the non-zero dimensions) exceed the limit of "
                           f"{MAX_NUMEL}", path)
    role = raw["role"]
    if not isinstance(role, str) or role not in ROLES:
        raise _entry_error(name, f"role {role!r:.40} is not one of {ROLES}", path)
    init = raw["init"]
    if init is not None and type(init) not in (int, float):
        raise _entry_error(name, "init must be a finite number or null", path)
    entry = TensorEntry(name, dtype, tuple(shape), encoding, role, _integer(raw, "offset", name, path),
                        _integer(raw, "length", name, path), _integer(raw, "crc32", name, path, 0xFFFFFFFF),
                        None if init is None else float(init))
    if encoding == ENCODING_DENSE:
        expected = numel * DTYPE_SIZES[dtype]
        if entry.length != expected:
            raise _entry_error(name, f"dense payload of {entry.length} bytes, shape and dtype need {expected}", path)
        return entry
    if dtype not in COMPRESSIBLE_DTYPES:
        raise _entry_error(name, f"encoding {encoding} needs a floating dtype, not {dtype}", path)
    if role != "delta":
        raise _entry_error(name, f"encoding {encoding} stores a delta, its role must be 'delta'", path)
    nnz = entry.nnz = _integer(raw, "nnz", name, path)
    m = entry.golomb_m = _integer(raw, "golomb_m", name, path, MAX_GOLOMB_M)
    if encoding == ENCODING_PACKED:  # one chunk of all its entries
        chunk_size = entry.chunk_size = max(nnz, 1)
    else:
        chunk_size = entry.chunk_size = _integer(raw, "chunk_size", name, path, MAX_CHUNK_SIZE)
    unary_bits = entry.unary_bits = _integer(raw, "unary_bits", name, path)
    high_bits = entry.high_bits = _integer(raw, "high_bits", name, path)
    scale = raw["scale"]
    if type(scale) not in (int, float):
        raise _entry_error(name, f"scale {scale!r:.40} must be a number", path)
    if version == 1:
        # copysign: -0.0 (and the number -0) would decode every kept entry to -0, whatever its sign bit
        if math.copysign(1.0, scale) < 0 or not _is_float32(scale):
            raise _entry_error(name, f"scale {scale!r:.40} must be a finite, non-negative float32 value "
                               "(-0.0 is negative)", path)
        entry.scale = float(scale)
    else:  # version 2: the number rounded to float32; the result must be finite and its sign bit clear
        rounded = _to_float32(float(scale))
        if math.copysign(1.0, rounded) < 0 or math.isinf(rounded):
            raise _entry_error(name, f"scale {scale!r:.40} must round to a finite, non-negative float32 value "
                               "(-0.0 is negative)", path)
        entry.scale = rounded
    if nnz > numel:
        raise _entry_error(name, f"nnz {nnz} exceeds the {numel} elements of shape {list(shape)}", path)
    if encoding == ENCODING_PACKED and nnz > MAX_PACKED_NNZ:
        raise _entry_error(name, f"a packed tensor holds at most {MAX_PACKED_NNZ} entries (one chunk), not {nnz}",
                           path)
    if m < 1 or chunk_size < 1:
        raise _entry_error(name, "golomb_m and chunk_size must be at least 1", path)
    if nnz == 0 and (unary_bits or high_bits):
        raise _entry_error(name, "a tensor with nnz 0 has empty streams (unary_bits and high_bits must be 0)", path)
    if not nnz <= unary_bits <= nnz + numel // m:
        raise _entry_error(name, f"unary_bits {unary_bits} is impossible for nnz {nnz} and {numel} elements", path)
    if high_bits > (nnz if m > 1 else 0):
        raise _entry_error(name, f"high_bits {high_bits} is impossible for nnz {nnz} and m {m}", path)
    expected = golomb_payload_length(nnz, chunk_size, m, unary_bits, high_bits, encoding)
    if entry.length != expected:
        raise _entry_error(name, f"payload of {entry.length} bytes, its stream sizes need {expected}", path)
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
        expected = round_up(expected, t.alignment)
        if t.offset != expected:
            raise LayoutError(f"tensor {t.name!r}: payload at offset {t.offset}, expected {expected} "
                              "(payloads must follow each other without holes or overlaps)", path)
        expected = t.offset + t.length
    expected = round_up(expected, PAYLOAD_ALIGNMENT)
    if data_start + expected != file_length:
        raise LayoutError(f"payloads end at {data_start + expected} but the file is {file_length} bytes "
                          "(the file must be covered exactly)", path)
