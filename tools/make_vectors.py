#!/usr/bin/env python3
"""Build the compeft format-v1 test vectors under spec/vectors/ (deterministically).

Every vector NAME is made of

- ``NAME.input.safetensors``    the task-vector mapping given to :func:`compeft.compress`;
- ``NAME.cpeft``                the container ``compeft.compress(inputs, **params).save()`` writes;
- ``NAME.expected.safetensors`` ``compeft.open(NAME.cpeft).to_dense(name)`` of every tensor;

and ``invalid/*.cpeft`` are valid vectors with one precise edit each (see ``invalid/README.md``).
``library/`` is an expert library (spec/LIBRARY.md): two experts built the way ``compeft library
build`` builds them, their expected tensors, ``catalog.json``, and ``library/invalid/*.json``
catalogs with one precise edit each.
Both README files are generated here too, from the same tables that drive the build, so the
recipes they print are exactly the code that ran.

Inputs come only from ``torch.Generator().manual_seed(seed)`` (never the global RNG). Each input
tensor is given as a Python expression, evaluated with ``torch`` and ``g = lambda seed:
torch.Generator().manual_seed(seed)`` in scope.

Usage::

    python tools/make_vectors.py             # (re)write spec/vectors/
    python tools/make_vectors.py --check     # rebuild in a temp dir, compare byte for byte (exit 1 on difference)
    python tools/make_vectors.py --out DIR   # write somewhere else
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import math
import struct
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import compeft
import surgery  # tools/surgery.py, beside this script
from compeft.format.header import PREAMBLE_SIZE

ROOT = Path(__file__).resolve().parent.parent
VECTORS_DIR = ROOT / "spec" / "vectors"


def g(seed: int) -> torch.Generator:
    """The only source of randomness: a fresh, seeded CPU generator."""
    return torch.Generator().manual_seed(seed)


def _evaluate(expr: str) -> torch.Tensor:
    value = eval(expr, {"torch": torch, "g": g})  # noqa: S307 - constant recipes below
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"recipe {expr!r} did not produce a tensor")
    return value.contiguous()


# ---------------------------------------------------------------------------------------------
# the valid vectors


@dataclass(frozen=True)
class Vector:
    name: str
    inputs: dict[str, str]  # tensor name -> Python expression (see the module docstring)
    params: dict[str, Any]  # keyword arguments of compeft.compress
    exercises: str

    def make_inputs(self) -> dict[str, torch.Tensor]:
        return {name: _evaluate(expr) for name, expr in self.inputs.items()}


VECTORS: tuple[Vector, ...] = (
    Vector(
        "f32_global",
        {
            "layer0.attn.weight": "torch.randn(16, 24, generator=g(101))",
            "layer0.attn.bias": "torch.randn(24, generator=g(102)) * 1.5",
            "layer1.mlp.weight": "torch.randn(12, 16, generator=g(103)) * 1.25",
            "layer1.mlp.bias": "torch.randn(16, generator=g(104)) * 0.05",
        },
        dict(density=0.1, alpha=1.0, scope="global",
             metadata={"purpose": "compeft test vector", "note": "UTF-8 ✓ ÄÖÜ, quotes \" and \\ backslash"}),
        "Several fp32 tensors at very different scales sharing one global threshold and one sigma "
        "(metadata.threshold/sigma present, every tensor has the same scale); the 0.05-scaled bias falls "
        "entirely below the threshold (nnz 0) while the others keep entries at different rates, so their "
        "golomb_m differ. User metadata with non-ASCII "
        "text, a quote and a backslash (the header is UTF-8 JSON, ensure_ascii=False).",
    ),
    Vector(
        "bf16_fp16_tensor_scope",
        {
            "enc.weight": "torch.randn(20, 12, generator=g(201)).to(torch.bfloat16)",
            "enc.bias": "(torch.randn(12, generator=g(202)) * 0.5).to(torch.bfloat16)",
            "dec.weight": "(torch.randn(12, 20, generator=g(203)) * 0.02).to(torch.float16)",
            "dec.bias": "torch.randn(20, generator=g(204)).to(torch.float16)",
        },
        dict(density=0.15, alpha=2.5, scope="tensor"),
        "bfloat16 and float16 inputs, scope 'tensor' (each tensor its own threshold and sigma, no "
        "metadata.threshold/sigma), alpha 2.5: the float32 scale alpha*sigma is rounded to the tensor's "
        "dtype on decode (bf16 / f16 bit patterns of ±scale).",
    ),
    Vector(
        "empty_and_scalar",
        {
            "empty": "torch.zeros(0, 5)",
            "empty_bf16": "torch.zeros(0, dtype=torch.bfloat16)",
            "scalar": "torch.tensor(-4.0)",
            "w": "torch.randn(10, 10, generator=g(301))",
        },
        dict(density=0.25, alpha=1.0, scope="global"),
        "A 0-element fp32 tensor of shape [0, 5], a 0-element bf16 tensor of shape [0], a 0-d (shape []) "
        "tensor whose |value| is the largest of the scope (so it is kept), among an ordinary tensor. "
        "Empty tensors have nnz 0 and a 0-byte payload at the same offset as the next tensor.",
    ),
    Vector(
        "nnz_zero",
        {
            "a.zeros": "torch.zeros(8, 8).index_fill_(1, torch.tensor([1, 5]), -0.0)",
            "b.live": "torch.randn(8, 8, generator=g(401))",
        },
        dict(density=0.1, alpha=1.0, scope="tensor"),
        "Scope 'tensor' with a tensor that is all zeros (two of its columns are -0.0, which is zero too): "
        "its threshold is 0, sigma 0, scale 0, nnz 0, a 0-byte payload (crc32 0) and golomb_m 1; it "
        "decodes to +0.0 everywhere. The second tensor is ordinary.",
    ),
    Vector(
        "density_one",
        {
            "w": "torch.randn(6, 10, generator=g(501)).index_fill_(1, torch.tensor([0, 3, 7]), 0.0)",
            "v": "torch.randn(40, generator=g(502)).to(torch.bfloat16).index_fill_(0, torch.tensor([2, 3, 39]), 0.0)",
        },
        dict(density=1.0, alpha=1.0, scope="global"),
        "density 1.0: the threshold is 0 and every non-zero entry is kept (nnz = number of non-zeros), "
        "exact zeros are not kept (decode to 0). Gaps are mostly 0, so golomb_m is 1 (no low or high bits).",
    ),
    Vector(
        "dense_passthrough",
        {
            "mask": "torch.tensor([True, False, True, True, False])",
            "norm.bias": "torch.randn(3, generator=g(601)).to(torch.float16)",
            "norm.weight": "torch.randn(5, generator=g(602))",
            "proj.weight": "torch.randn(8, 12, generator=g(603))",
            "step": "torch.tensor([7, -1, 1 << 40], dtype=torch.int64)",
        },
        dict(density=0.2, alpha=1.0, scope="global", keep_dense=["norm.*"]),
        "Encoding 'dense': the int64 and bool tensors are not floating, so they are stored verbatim with "
        "role 'value'; the fp16 and fp32 'norm.*' tensors are excluded by the keep_dense glob and stored "
        "verbatim with role 'delta'; only 'proj.weight' is ternary-golomb (the global scope is that tensor "
        "alone). 'mask' (5 bytes) and 'norm.bias' (6 bytes) are followed by zero padding to the next "
        "multiple of 8.",
    ),
    Vector(
        "small_chunks",
        {
            "w": "torch.randn(10, 30, generator=g(7))",
        },
        dict(density=0.2, alpha=1.0, scope="global", chunk_size=7),
        "chunk_size 7: nnz 61 gives 9 chunks (the last one partial), so the chunk table has several rows "
        "with non-zero unary/high bit offsets. golomb_m is 3, not a power of two, so remainders use "
        "the truncated-binary code: a 1-bit low field, plus a high bit for the long form (r >= 1).",
    ),
    Vector(
        "ties_at_threshold",
        {
            "w": "torch.randint(1, 5, (12, 16), generator=g(801)).float() * 0.125 "
                 "* (torch.randint(0, 2, (12, 16), generator=g(802)).float() * 2 - 1)",
            "h": "(torch.randint(1, 4, (40,), generator=g(803)).float() * 0.25).to(torch.float16)",
        },
        dict(density=0.1, alpha=1.0, scope="global"),
        "Magnitudes take only a few values (multiples of 0.125, all exactly representable), so many entries "
        "have exactly the threshold's magnitude: every one of them is kept (|v| >= threshold), so nnz is far "
        "above count - rank + 1 = 232 - 209 + 1 = 24. Exercises tie handling of the exact two-pass "
        "histogram selection.",
    ),
)


def compress_bytes(inputs: dict[str, torch.Tensor], params: dict[str, Any]) -> bytes:
    """The container bytes of ``compeft.compress(inputs, **params)``."""
    return compeft.compress(inputs, **params).to_bytes()


def build_vector(vector: Vector, out: Path, inputs: dict[str, torch.Tensor] | None = None) -> None:
    """Write NAME.input.safetensors, NAME.cpeft and NAME.expected.safetensors into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    if inputs is None:
        inputs = vector.make_inputs()
    (out / f"{vector.name}.input.safetensors").write_bytes(st_save(inputs))
    path = out / f"{vector.name}.cpeft"
    compeft.compress(inputs, **vector.params).save(path)
    expert = compeft.open(path)
    expected = {name: expert.to_dense(name).contiguous() for name in expert.names}
    (out / f"{vector.name}.expected.safetensors").write_bytes(st_save(expected))


def load_inputs(directory: Path, vector: Vector) -> dict[str, torch.Tensor]:
    return st_load((directory / f"{vector.name}.input.safetensors").read_bytes())


# ---------------------------------------------------------------------------------------------
# the invalid vectors


@dataclass(frozen=True)
class Invalid:
    name: str
    source: str  # the valid vector it is derived from
    error: str  # class name in compeft.errors (raised exactly, not a subclass)
    stage: str  # "open" | "verify" (verify also implies to_dense of ``tensor`` raises when given)
    edit: Callable[[bytes], tuple[bytes, str]]  # -> (new bytes, precise description)
    tensor: str | None = None  # for stage "verify": a tensor whose to_dense raises too


def _bad_magic(blob: bytes) -> tuple[bytes, str]:
    return surgery.patch(blob, 1, b"X"), "byte 1 (magic 'C', 0x43) replaced by 'X' (0x58)"


def _version_2(blob: bytes) -> tuple[bytes, str]:
    return surgery.with_preamble(blob, version=2), "preamble version u16 at byte 8 set to 2"


def _flags(blob: bytes) -> tuple[bytes, str]:
    return (surgery.with_preamble(blob, flags=0x8000),
            "preamble flags u16 at byte 10 set to 0x8000 (an unknown flag; 0x0001 means a deflated header)")


def _truncated(blob: bytes) -> tuple[bytes, str]:
    return blob[:-8], f"last 8 bytes removed ({len(blob)} -> {len(blob) - 8} bytes; file_length still {len(blob)})"


def _truncated_preamble(blob: bytes) -> tuple[bytes, str]:
    return blob[:20], "only the first 20 bytes kept (shorter than the 32-byte preamble)"


def _trailing_byte(blob: bytes) -> tuple[bytes, str]:
    return blob + b"\0", f"one zero byte appended ({len(blob)} -> {len(blob) + 1} bytes)"


def _header_crc(blob: bytes) -> tuple[bytes, str]:
    text = surgery.header_text(blob)
    at = text.index(b'"density":0.1') + len(b'"density":0.')
    pos = PREAMBLE_SIZE + at
    return (surgery.patch(blob, pos, b"2"),
            f"header byte at file offset {pos} changed from '1' to '2' (\"density\":0.1 -> 0.2), "
            "header_crc32 left unchanged")


def _bad_json(blob: bytes) -> tuple[bytes, str]:
    text = surgery.header_text(blob)
    assert text.endswith(b"}")
    pos = PREAMBLE_SIZE + len(text) - 1
    return (surgery.recrc(surgery.patch(blob, pos, b" ")),  # same header_length
            f"the JSON's closing '}}' at file offset {pos} replaced by a space (unbalanced object); "
            "header_crc32 recomputed over the edited header")


def _format_version_2(blob: bytes) -> tuple[bytes, str]:
    def change(doc: dict[str, Any]) -> None:
        doc["format_version"] = 2
    return surgery.with_header(blob, change), 'header "format_version" set to 2, header CRC recomputed'


def _payload_crc(blob: bytes) -> tuple[bytes, str]:
    start, end = surgery.read(blob).payload_range("layer0.attn.weight")
    assert end > start
    pos = end - 1  # last byte of the sign stream
    return (surgery.flip(blob, pos, 0x01),
            f"bit 0 of byte {pos} flipped (the last byte of tensor 'layer0.attn.weight''s payload, in its "
            "sign stream); its crc32 left unchanged")


def _overlap(blob: bytes) -> tuple[bytes, str]:
    doc = surgery.split(blob)[1]
    first, second = doc["tensors"][0], doc["tensors"][1]
    new = first["offset"] + 8
    assert first["length"] > 8

    def change(d: dict[str, Any]) -> None:
        d["tensors"][1]["offset"] = new
    return (surgery.with_header(blob, change),
            f"tensor {second['name']!r} \"offset\" {second['offset']} -> {new} (inside the payload of "
            f"{first['name']!r}, which spans [{first['offset']}, {first['offset'] + first['length']})); "
            "header CRC recomputed")


def _nnz_gt_numel(blob: bytes) -> tuple[bytes, str]:
    t = surgery.read(blob).entry("layer1.mlp.bias")
    numel = math.prod(t["shape"])

    def change(d: dict[str, Any]) -> None:
        surgery.entry(d, "layer1.mlp.bias")["nnz"] = numel + 1
    return (surgery.with_header(blob, change),
            f"tensor 'layer1.mlp.bias' \"nnz\" {t['nnz']} -> {numel + 1} (numel {numel}); header CRC recomputed")


def _file_length(blob: bytes) -> tuple[bytes, str]:
    file_length = surgery.preamble(blob).file_length + 8
    return (surgery.with_preamble(blob, file_length=file_length) + bytes(8),
            f"8 zero bytes appended and file_length (u64 at byte 24) raised to {file_length} to match: "
            "the payloads no longer cover the data section exactly")


def _chunk_table(blob: bytes, row: int, column: int, value: Callable[[int], int], what: str) -> tuple[bytes, str]:
    word = 8 * (3 * row + column)
    pos = surgery.read(blob).payload_range("w")[0] + word
    old = struct.unpack_from("<q", blob, pos)[0]
    new = value(old)
    return (surgery.with_payload(blob, "w", lambda payload: struct.pack_into("<q", payload, word, new)),
            f"tensor 'w' chunk table row {row} {what} (int64 at file offset {pos}) {old} -> {new}; the "
            "tensor's crc32 and the header CRC recomputed, so every checksum is valid")


def _chunk_order(blob: bytes) -> tuple[bytes, str]:
    return _chunk_table(blob, 2, 0, lambda old: 0, "base position")


def _chunk_shift(blob: bytes) -> tuple[bytes, str]:
    return _chunk_table(blob, 3, 0, lambda old: old + 1, "base position")


def _chunk_unary(blob: bytes) -> tuple[bytes, str]:
    return _chunk_table(blob, 4, 1, lambda old: old + 1, "unary bit offset")


def _nonzero_padding(blob: bytes) -> tuple[bytes, str]:
    pos = surgery.read(blob).payload_range("norm.bias")[1]  # first padding byte after the 6-byte payload
    assert blob[pos] == 0
    return (surgery.patch(blob, pos, b"\x01"),
            f"padding byte at file offset {pos} (right after tensor 'norm.bias''s 6-byte payload) set to 0x01")


def _dense_length(blob: bytes) -> tuple[bytes, str]:
    def change(d: dict[str, Any]) -> None:
        surgery.entry(d, "step")["shape"] = [4]
    return (surgery.with_header(blob, change),
            "tensor 'step' \"shape\" [3] -> [4] (24-byte I64 payload needs 32); header CRC recomputed")


def _raw_header_edit(blob: bytes, old: bytes, new: bytes) -> bytes:
    """Replace ``old`` by ``new`` in the header's JSON text (edits json.dumps cannot express), re-pad
    it and recompute header_length, the header CRC and file_length."""
    def change(doc: dict[str, Any]) -> bytes:
        text = surgery.encode(doc)
        assert text.count(old) == 1
        return text.replace(old, new)
    return surgery.with_header(blob, change)


def _duplicate_key(blob: bytes) -> tuple[bytes, str]:
    t = surgery.read(blob).entry("layer1.mlp.bias")
    old = f'"name":"layer1.mlp.bias","dtype":"F32","shape":{json.dumps(t["shape"], separators=(",", ":"))}'.encode()
    new = old.replace(b'"dtype":"F32"', b'"dtype":"F32","dtype":"F16"')
    return (_raw_header_edit(blob, old, new),
            "tensor 'layer1.mlp.bias' gets a second \"dtype\" key (\"F16\") after its \"F32\" one; header CRC "
            "recomputed")


def _number_overflow(blob: bytes) -> tuple[bytes, str]:
    return (_raw_header_edit(blob, b'"alpha":1.0', b'"alpha":1e999'),
            'metadata "alpha" 1.0 -> 1e999 (parses to infinity); header CRC recomputed')


def _dtype_not_a_string(blob: bytes) -> tuple[bytes, str]:
    def change(d: dict[str, Any]) -> None:
        surgery.entry(d, "w")["dtype"] = ["F32"]
    return (surgery.with_header(blob, change),
            'tensor \'w\' "dtype" "F32" -> ["F32"] (a list; found by tests/test_fuzz_structured.py); header CRC '
            "recomputed")


def _scale_beyond_float32(blob: bytes) -> tuple[bytes, str]:
    def change(d: dict[str, Any]) -> None:
        surgery.entry(d, "w")["scale"] = 3.4028235677973366e+38
    return (surgery.with_header(blob, change),
            "tensor 'w' \"scale\" -> 3.4028235677973366e+38 (a finite double just beyond float32's range, which "
            "once raised OverflowError; found by tests/test_fuzz_structured.py); header CRC recomputed")


def _fingerprint_type(blob: bytes) -> tuple[bytes, str]:
    def change(d: dict[str, Any]) -> None:
        d["metadata"]["base_fingerprint"] = 12345
    return (surgery.with_header(blob, change),
            'metadata "base_fingerprint" null -> 12345 (a number); header CRC recomputed')


def _chunk_outside(blob: bytes) -> tuple[bytes, str]:
    return _chunk_table(blob, 5, 1, lambda old: 1 << 62, "unary bit offset")


def _gap_past_end(blob: bytes) -> tuple[bytes, str]:
    """Move the last terminating 1 bit of tensor 'w''s unary stream 6 bits on: the last quotient grows
    by 6, so the last gap runs 18 positions (m = 3) past the end of the tensor."""
    t = surgery.read(blob).entry("w")
    unary = 8 * 3 * -(-t["nnz"] // t["chunk_size"])  # the unary stream follows the chunk table
    last = t["unary_bits"] - 1
    assert last + 6 < 128

    def move_bit(payload: bytearray) -> None:
        assert payload[unary + (last >> 3)] >> (last & 7) & 1
        payload[unary + (last >> 3)] &= ~(1 << (last & 7)) & 0xFF
        payload[unary + ((last + 6) >> 3)] |= 1 << ((last + 6) & 7)

    def change(d: dict[str, Any]) -> None:
        surgery.entry(d, "w")["unary_bits"] = t["unary_bits"] + 6
    return (surgery.with_header(surgery.with_payload(blob, "w", move_bit), change),
            f"tensor 'w' unary stream: the last 1 bit moved from bit {last} to {last + 6} and \"unary_bits\" "
            f"{t['unary_bits']} -> {t['unary_bits'] + 6}, so the last gap runs past the tensor's end; crc32 and "
            "header CRC recomputed")


INVALID: tuple[Invalid, ...] = (
    Invalid("bad_magic", "f32_global", "NotACompeftFileError", "open", _bad_magic),
    Invalid("version_2", "f32_global", "UnsupportedVersionError", "open", _version_2),
    Invalid("flags_set", "f32_global", "UnsupportedVersionError", "open", _flags),
    Invalid("format_version_2", "f32_global", "UnsupportedVersionError", "open", _format_version_2),
    Invalid("truncated", "f32_global", "TruncatedFileError", "open", _truncated),
    Invalid("truncated_preamble", "f32_global", "TruncatedFileError", "open", _truncated_preamble),
    Invalid("trailing_byte", "f32_global", "TruncatedFileError", "open", _trailing_byte),
    Invalid("header_crc", "f32_global", "HeaderError", "open", _header_crc),
    Invalid("bad_json", "f32_global", "HeaderError", "open", _bad_json),
    Invalid("overlapping_offsets", "f32_global", "LayoutError", "open", _overlap),
    Invalid("nnz_gt_numel", "f32_global", "HeaderError", "open", _nnz_gt_numel),
    Invalid("file_length_hole", "f32_global", "LayoutError", "open", _file_length),
    Invalid("dense_length", "dense_passthrough", "HeaderError", "open", _dense_length),
    Invalid("payload_crc", "f32_global", "ChecksumError", "verify", _payload_crc, tensor="layer0.attn.weight"),
    Invalid("chunk_table_order", "small_chunks", "CorruptPayloadError", "verify", _chunk_order, tensor="w"),
    Invalid("chunk_base_shifted", "small_chunks", "CorruptPayloadError", "verify", _chunk_shift, tensor="w"),
    Invalid("chunk_unary_offset", "small_chunks", "CorruptPayloadError", "verify", _chunk_unary, tensor="w"),
    Invalid("nonzero_padding", "dense_passthrough", "LayoutError", "verify", _nonzero_padding),
    Invalid("duplicate_key", "f32_global", "HeaderError", "open", _duplicate_key),
    Invalid("number_overflow", "f32_global", "HeaderError", "open", _number_overflow),
    Invalid("dtype_not_a_string", "small_chunks", "HeaderError", "open", _dtype_not_a_string),
    Invalid("fingerprint_not_a_string", "small_chunks", "HeaderError", "open", _fingerprint_type),
    Invalid("scale_beyond_float32", "small_chunks", "HeaderError", "open", _scale_beyond_float32),
    Invalid("chunk_offset_outside_stream", "small_chunks", "CorruptPayloadError", "verify", _chunk_outside,
            tensor="w"),
    Invalid("gap_past_end", "small_chunks", "CorruptPayloadError", "verify", _gap_past_end, tensor="w"),
)


def build_invalid(directory: Path) -> list[tuple[Invalid, str]]:
    """Write invalid/*.cpeft from the valid containers in ``directory``; return (spec, description)."""
    out = directory / "invalid"
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for spec in INVALID:
        blob = (directory / f"{spec.source}.cpeft").read_bytes()
        edited, description = spec.edit(blob)
        assert edited != blob
        (out / f"{spec.name}.cpeft").write_bytes(edited)
        done.append((spec, description))
    return done


# ---------------------------------------------------------------------------------------------
# README files


def _fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items())


def vectors_readme(directory: Path) -> str:
    lines = [
        "# compeft format v1 test vectors",
        "",
        "Generated by `python tools/make_vectors.py` (check with `python tools/make_vectors.py --check`);",
        "do not edit by hand. For every vector `NAME`:",
        "",
        "- `NAME.input.safetensors`: the task-vector mapping (name -> tensor) given to `compeft.compress`;",
        "- `NAME.cpeft`: `compeft.compress(inputs, **params).save(path)`;",
        "- `NAME.expected.safetensors`: `compeft.open(NAME.cpeft).to_dense(name)` for every tensor.",
        "",
        "A decoder is conformant when it reproduces every expected tensor bit for bit (dtype, shape and",
        "bits, including the sign of zero); an encoder when it reproduces the `.cpeft` bytes from the",
        "input and parameters. The header records `created_by` (the compeft version), so encoder-direction",
        "equality also pins that string.",
        "",
        "Inputs are Python expressions evaluated with `torch` and",
        "`g = lambda seed: torch.Generator().manual_seed(seed)` in scope (no global RNG). Parameters not",
        "listed take `compress`'s defaults (keep_dense=(), chunk_size=16384, metadata=None; every vector",
        "names its density, alpha and scope). Each container's metadata holds the informative `fidelity`",
        "figures (FORMAT.md 7.6). `count - rank + 1` with rank = count - floor(count * density) is the reference",
        "ComPEFT number of kept entries absent ties.",
        "",
        "Invalid containers derived from these are described in [invalid/README.md](invalid/README.md).",
        "",
    ]
    for v in VECTORS:
        path = directory / f"{v.name}.cpeft"
        expert = compeft.open(path)
        meta = expert.metadata
        lines += [f"## {v.name}", "", v.exercises, "", "Inputs:", ""]
        lines += [f"- `{name}` = `{expr}`" for name, expr in v.inputs.items()]
        lines += ["", f"Parameters: `compeft.compress(inputs, {_fmt_params(v.params)})`", ""]
        sizes = ", ".join(f"`{v.name}{suffix}` {(directory / (v.name + suffix)).stat().st_size} B"
                          for suffix in (".cpeft", ".input.safetensors", ".expected.safetensors"))
        lines += [f"Files: {sizes}.", ""]
        extra = ""
        if meta.get("scope") == "global":
            extra = f" threshold={meta.get('threshold')!r}, sigma={meta.get('sigma')!r}"
        lines += [f"Resulting header: scope={meta.get('scope')!r}, density={meta.get('density')!r}, "
                  f"alpha={meta.get('alpha')!r},{extra} user={meta.get('user')!r}", ""]
        lines += ["| tensor | dtype | shape | encoding | role | nnz | golomb_m | chunks | scale | offset | length |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in expert.header.tensors:
            golomb = e.encoding != "dense"
            lines.append(f"| `{e.name}` | {e.dtype} | {list(e.shape)} | {e.encoding} | {e.role} | "
                         + (f"{e.nnz} | {e.golomb_m} | {e.n_chunks} | {e.scale!r}" if golomb else "- | - | - | -")
                         + f" | {e.offset} | {e.length} |")
        lines.append("")
    return "\n".join(lines)


def invalid_readme(done: list[tuple[Invalid, str]]) -> str:
    lines = [
        "# Invalid compeft containers",
        "",
        "Generated by `python tools/make_vectors.py`; each file is a valid vector from `..` with one",
        "precise edit. A reader must raise exactly the listed class from `compeft.errors` (not a",
        "subclass), with the file path in the message:",
        "",
        "- stage `open`: `compeft.open(path)` raises;",
        "- stage `verify`: `compeft.open(path)` succeeds, `expert.verify()` raises, and so does",
        "  `expert.to_dense(tensor)` when a tensor is named.",
        "",
        "\"Header CRC recomputed\" means the edit re-serialises the header JSON (compact separators,",
        "UTF-8), re-pads it with spaces to a multiple of 64 bytes from the file start, and rewrites",
        "header_length, header_crc32 and file_length in the preamble so that only the named defect remains.",
        "",
        "| file | from | stage | exception | tensor | edit |",
        "|---|---|---|---|---|---|",
    ]
    for spec, description in done:
        desc = description.replace("|", "\\|")
        lines.append(f"| `{spec.name}.cpeft` | `{spec.source}.cpeft` | {spec.stage} | `{spec.error}` | "
                     f"{'`' + spec.tensor + '`' if spec.tensor else '-'} | {desc} |")
    lines.append("")
    return "\n".join(lines)


def parse_invalid_readme(text: str) -> list[dict[str, str | None]]:
    """The table of invalid/README.md as dicts (file, from, stage, exception, tensor, edit)."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        file, source, stage, error, tname = (c.strip("`") for c in cells[:5])
        rows.append(dict(file=file, source=source, stage=stage, exception=error,
                         tensor=None if tname == "-" else tname, edit=" | ".join(cells[5:])))
    return rows


# ---------------------------------------------------------------------------------------------
# expert library (spec/LIBRARY.md)

# Two LoRA adapters, as a library build reads them (adapter_config.json + adapter_model.safetensors).
LIBRARY_EXPERTS: dict[str, dict[str, str]] = {
    "code": {"base_model.model.l0.q_proj.lora_A.weight": "torch.randn(4, 96, generator=g(11)).to(torch.bfloat16)",
             "base_model.model.l0.q_proj.lora_B.weight": "(torch.randn(96, 4, generator=g(12)) / 50).to(torch.bfloat16)"},
    "math": {"base_model.model.l0.q_proj.lora_A.weight": "torch.randn(4, 96, generator=g(21)).to(torch.bfloat16)",
             "base_model.model.l0.q_proj.lora_B.weight": "(torch.randn(96, 4, generator=g(22)) / 50).to(torch.bfloat16)"},
}
LIBRARY_CONFIG = {"peft_type": "LORA", "base_model_name_or_path": "example/tiny-base", "r": 4, "lora_alpha": 8,
                  "target_modules": ["q_proj"]}
LIBRARY_SETTINGS = dict(density=0.25, alpha=2.0, scope="tensor", keep_dense=(), auto_dense=True, chunk_size=64,
                        base=None)


@dataclass(frozen=True)
class InvalidCatalog:
    name: str
    error: str  # class name in compeft.errors (raised exactly) by compeft.open_library(path)
    edit: Callable[[dict[str, Any]], str]  # edits the parsed catalog in place -> description
    raw: Callable[[bytes], bytes] | None = None  # or edits the bytes (for what JSON cannot express)


def _entry(doc: dict[str, Any], name: str = "math") -> dict[str, Any]:
    return next(e for e in doc["experts"] if e["name"] == name)


INVALID_CATALOGS: tuple[InvalidCatalog, ...] = (
    InvalidCatalog("format_version_2", "UnsupportedVersionError",
                   lambda d: (d.update(format_version=2), '"format_version" 1 -> 2')[1]),
    InvalidCatalog("not_a_catalog", "CatalogError",
                   lambda d: (d.update(format="compeft"), '"format" "compeft-library" -> "compeft"')[1]),
    InvalidCatalog("duplicate_name", "CatalogError",
                   lambda d: (d["experts"].append(dict(_entry(d))), "the entry of 'math' appended a second time")[1]),
    InvalidCatalog("file_outside_root", "CatalogError",
                   lambda d: (_entry(d).update(file="../math.cpeft"), "'math' \"file\" -> \"../math.cpeft\"")[1]),
    InvalidCatalog("bad_name", "CatalogError",
                   lambda d: (_entry(d).update(name="../math", file="../math.cpeft"),
                              "'math' \"name\" -> \"../math\" and \"file\" -> \"../math.cpeft\"")[1]),
    InvalidCatalog("size_not_an_integer", "CatalogError",
                   lambda d: (_entry(d).update(size=float(_entry(d)["size"])), "'math' \"size\" as a float")[1]),
    InvalidCatalog("missing_sha256", "CatalogError",
                   lambda d: (_entry(d).pop("sha256"), "'math' \"sha256\" removed")[1]),
    InvalidCatalog("sha256_upper_case", "CatalogError",
                   lambda d: (_entry(d).update(sha256=_entry(d)["sha256"].upper()), "'math' \"sha256\" upper-cased")[1]),
    InvalidCatalog("duplicate_key", "CatalogError", lambda d: 'a second "format" key ("other") after the first',
                   raw=lambda b: b.replace(b'"format": ', b'"format": "other", "format": ', 1)),
)


def build_library_vectors(directory: Path) -> list[tuple[InvalidCatalog, str]]:
    """library/: the experts, their expected tensors, the catalog, and invalid catalogs."""
    from compeft import library
    from compeft.library.build import encoding_settings
    from compeft.library.worker import catalog_entry, compress_source

    out = directory / "library"
    (out / "invalid").mkdir(parents=True, exist_ok=True)
    settings = encoding_settings(**LIBRARY_SETTINGS)
    entries = {}
    for name, exprs in LIBRARY_EXPERTS.items():
        inputs = {n: _evaluate(e) for n, e in exprs.items()}
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "adapter_model.safetensors").write_bytes(st_save(inputs))
            (Path(tmp) / "adapter_config.json").write_text(json.dumps(LIBRARY_CONFIG))
            record = {"name": name, "origin": f"s3://example-raw/adapters/{name}",
                      "source_id": hashlib.sha256(st_save(inputs)).hexdigest(), "settings": settings}
            data = compress_source(tmp, None, settings, record).to_bytes()
        (out / f"{name}.cpeft").write_bytes(data)
        expert = compeft.open(out / f"{name}.cpeft")
        expected = {n: expert.to_dense(n).contiguous() for n in expert.names}
        (out / f"{name}.expected.safetensors").write_bytes(st_save(expected))
        entries[name] = library.CatalogEntry(**catalog_entry(expert, data, name, record))
    text = library.catalog_bytes(entries)
    (out / "catalog.json").write_bytes(text)
    done = []
    for spec in INVALID_CATALOGS:
        doc = json.loads(text)
        description = spec.edit(doc)
        edited = spec.raw(text) if spec.raw else json.dumps(doc).encode()
        assert edited != text
        (out / "invalid" / f"{spec.name}.json").write_bytes(edited)
        done.append((spec, description))
    return done


def library_readme(directory: Path, done: list[tuple[InvalidCatalog, str]]) -> str:
    lines = [
        "# An expert library (spec/LIBRARY.md)",
        "",
        "Generated by `python tools/make_vectors.py`; do not edit by hand. Two LoRA adapters, each an",
        "`adapter_config.json` of",
        "",
        f"    {json.dumps(LIBRARY_CONFIG)}",
        "",
        "and an `adapter_model.safetensors` of the tensors below (expressions as in `../README.md`),",
        "compressed as `compeft library build` compresses them with",
        f"`{_fmt_params({k: v for k, v in LIBRARY_SETTINGS.items() if k != 'base'})}`. Each container's",
        "`build` record names its origin `s3://example-raw/adapters/NAME` and, as `source_id`, the",
        "SHA-256 of the adapter's safetensors bytes (a real build digests the source files' names,",
        "sizes and validators instead: spec/LIBRARY.md 5).",
        "",
    ]
    for name, exprs in LIBRARY_EXPERTS.items():
        lines += [f"- `{name}`: " + "; ".join(f"`{n}` = `{e}`" for n, e in exprs.items())]
    lines += [
        "",
        "Files: `NAME.cpeft` (the experts), `NAME.expected.safetensors` (their decoded tensors),",
        "`catalog.json`. A conformant reader lists exactly these entries, opens each expert by name,",
        "and finds each file's size and SHA-256 equal to its entry; a conformant writer reproduces",
        "`catalog.json` byte for byte from the entries.",
        "",
        "## invalid/",
        "",
        "Each is `catalog.json` with one edit (re-serialised with `json.dumps` defaults unless the edit",
        "is to the bytes). `compeft.open_library(path)` must raise exactly the listed class from",
        "`compeft.errors`, naming the file:",
        "",
        "| file | exception | edit |",
        "|---|---|---|",
    ]
    for spec, description in done:
        lines.append(f"| `{spec.name}.json` | `{spec.error}` | {description.replace('|', chr(92) + '|')} |")
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# driver


def build_all(directory: Path) -> None:
    """Write every vector, every invalid file and both READMEs into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for vector in VECTORS:
        build_vector(vector, directory)
    done = build_invalid(directory)
    (directory / "README.md").write_text(vectors_readme(directory), encoding="utf-8")
    (directory / "invalid" / "README.md").write_text(invalid_readme(done), encoding="utf-8")
    catalogs = build_library_vectors(directory)
    (directory / "library" / "README.md").write_text(library_readme(directory, catalogs), encoding="utf-8")


def _files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def compare(expected_dir: Path, actual_dir: Path) -> list[str]:
    """Differences between two vector trees (missing, extra or differing files)."""
    want, have = _files(expected_dir), _files(actual_dir)
    problems = [f"missing from {actual_dir}: {n}" for n in sorted(want - have)]
    problems += [f"not produced by the generator: {n}" for n in sorted(have - want)]
    problems += [f"differs: {n}" for n in sorted(want & have)
                 if not filecmp.cmp(expected_dir / n, actual_dir / n, shallow=False)]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare with --out")
    parser.add_argument("--out", type=Path, default=VECTORS_DIR, help="the vectors directory (default spec/vectors)")
    args = parser.parse_args(argv)
    # several vectors pin the reference semantics (global scope) on purpose: their warnings are expected
    warnings.simplefilter("ignore", compeft.errors.FidelityWarning)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            build_all(Path(tmp))
            problems = compare(Path(tmp), args.out)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print(f"{len(problems)} difference(s): run python tools/make_vectors.py", file=sys.stderr)
            return 1
        print(f"{args.out}: all vectors identical")
        return 0
    # Rebuild from scratch so that stale files do not survive.
    for name in _files(args.out) if args.out.exists() else ():
        (args.out / name).unlink()
    build_all(args.out)
    for name in sorted(_files(args.out)):
        print(f"{(args.out / name).stat().st_size:8d}  {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
