#!/usr/bin/env python3
"""Build the compeft format-v1 test vectors under spec/vectors/ (deterministically).

Every vector NAME is made of

- ``NAME.input.safetensors``    the task-vector mapping given to :func:`compeft.compress`;
- ``NAME.cpeft``                the container ``compeft.compress(inputs, **params).save()`` writes;
- ``NAME.expected.safetensors`` ``compeft.open(NAME.cpeft).to_dense(name)`` of every tensor;

and ``invalid/*.cpeft`` are valid vectors with one precise edit each (see ``invalid/README.md``),
``accepted/*.cpeft`` valid vectors with one edit a reader must still accept, and ``manifest.json``
lists every file with its expected outcome (the rules are FORMAT.md section 12). Section 11 of
``spec/FORMAT.md`` (the worked example) is written from the ``worked_example`` vector.
``library/`` is an expert library (spec/LIBRARY.md): two experts built the way ``compeft library
build`` builds them, their expected tensors, ``catalog.json``, and ``library/invalid/*.json``
catalogs with one precise edit each.
Both README files are generated here too, from the same tables that drive the build, so the
recipes they print are exactly the code that ran.

Inputs come only from ``torch.Generator().manual_seed(seed)`` (never the global RNG). Each input
tensor is given as a Python expression, evaluated with ``torch`` and ``g = lambda seed:
torch.Generator().manual_seed(seed)`` in scope.

Usage::

    python tools/make_vectors.py             # (re)write spec/vectors/ and FORMAT.md's worked example
    python tools/make_vectors.py --check     # rebuild in a temp dir, compare byte for byte (exit 1 on difference)
    python tools/make_vectors.py --out DIR   # write somewhere else
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import itertools
import json
import math
import struct
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

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
        dict(format_version=1, density=0.1, alpha=1.0, scope="global",
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
        dict(format_version=1, density=0.15, alpha=2.5, scope="tensor"),
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
        dict(format_version=1, density=0.25, alpha=1.0, scope="global"),
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
        dict(format_version=1, density=0.1, alpha=1.0, scope="tensor"),
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
        dict(format_version=1, density=1.0, alpha=1.0, scope="global"),
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
        dict(format_version=1, density=0.2, alpha=1.0, scope="global", keep_dense=["norm.*"]),
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
        dict(format_version=1, density=0.2, alpha=1.0, scope="global", chunk_size=7),
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
        dict(format_version=1, density=0.1, alpha=1.0, scope="global"),
        "Magnitudes take only a few values (multiples of 0.125, all exactly representable), so many entries "
        "have exactly the threshold's magnitude: every one of them is kept (|v| >= threshold), so nnz is far "
        "above count - rank + 1 = 232 - 209 + 1 = 24. Exercises tie handling of the exact two-pass "
        "histogram selection.",
    ),
    Vector(
        "deflated_header",
        {f"base_model.model.layers.{layer:02d}.self_attn.{proj}_proj.lora_{ab}.weight":
            (f"torch.randn(2, 4, generator=g({900 + 4 * layer + 2 * (proj == 'v') + (ab == 'B')}))" if ab == "A" else
             f"torch.randn(4, 2, generator=g({900 + 4 * layer + 2 * (proj == 'v') + (ab == 'B')})) / 50")
         for layer in range(16) for proj in ("q", "v") for ab in ("A", "B")},
        dict(format_version=1, density=0.5, alpha=1.5, scope="tensor"),
        "64 small LoRA tensors with long, repetitive names: the JSON text of the header is longer than "
        "2 KiB, so the writer deflates it (preamble flag 0x0001: a zlib stream, then zero bytes up to the "
        "64-byte boundary). The only version 1 vector with a deflated header; the header CRC covers the stored "
        "(deflated) bytes.",
    ),
    Vector(
        "worked_example",
        {"w": "torch.tensor([[0.5, 0, 0, -3, 0, 0, 0, 1], [0, 0, 0, 0, 0, -2, 0, 0]], dtype=torch.float16)"},
        dict(format_version=1, density=0.25, alpha=1.0, scope="global", chunk_size=2),
        "The worked example of FORMAT.md section 11, which make_vectors.py generates from this file "
        "(every byte of it, with the values the encoder derived): four kept entries of a 2 x 8 float16 "
        "tensor, m = 2 (b = 1, w = 0: an empty low stream), two chunks of two entries.",
    ),
    Vector(
        "v2_lora_packed",
        {f"base_model.model.layers.{layer:02d}.self_attn.{proj}_proj.lora_{ab}.weight":
            (f"torch.randn(2, 4, generator=g({900 + 4 * layer + 2 * (proj == 'v') + (ab == 'B')}))" if ab == "A" else
             f"torch.randn(4, 2, generator=g({900 + 4 * layer + 2 * (proj == 'v') + (ab == 'B')})) / 50")
         for layer in range(16) for proj in ("q", "v") for ab in ("A", "B")},
        dict(density=0.5, alpha=1.5, scope="tensor"),
        "Version 2, the inputs of 'deflated_header': every tensor is one small chunk, so the writer packs "
        "it (encoding 'ternary-golomb-packed': no chunk table, the four streams bit-contiguous, each "
        "payload right after the previous one, unaligned), writes each scale in its shortest float32 "
        "digits, and deflates the header with the preset dictionary (the zlib stream's FDICT bit set, "
        "DICTID the dictionary's Adler-32). Compare its size with 'deflated_header'.",
    ),
    Vector(
        "v2_mixed",
        {
            "a.mask": "torch.tensor([True, False, True, True, False])",
            "b.small": "torch.randn(6, 5, generator=g(1001))",
            "c.empty": "torch.zeros(0, 3)",
            "d.chunks": "torch.randn(10, 30, generator=g(1002))",
            "e.small_bf16": "(torch.randn(3, 7, generator=g(1003)) * 2).to(torch.bfloat16)",
            "f.step": "torch.tensor([7, -1, 1 << 40], dtype=torch.int64)",
        },
        dict(density=0.2, alpha=1.0, scope="global", chunk_size=7),
        "Version 2, every encoding in one file, with a plain (not deflated) header: a dense bool of 5 "
        "bytes; 'b.small' packed right after it at offset 5; an empty packed tensor (nnz 0, 0 bytes); "
        "'d.chunks' with more kept entries than chunk_size 7, so ternary-golomb with a chunk table, at "
        "the next multiple of 8; another packed tensor right after it; then a dense int64 at the next "
        "multiple of 8.",
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
    rule: str  # the rule of spec/FORMAT.md section 12 it breaks (P1, J4, E12, V3, ...)
    tensor: str | None = None  # for stage "verify": a tensor whose to_dense raises too


def _bad_magic(blob: bytes) -> tuple[bytes, str]:
    return surgery.patch(blob, 1, b"X"), "byte 1 (magic 'C', 0x43) replaced by 'X' (0x58)"


def _version_3(blob: bytes) -> tuple[bytes, str]:
    return surgery.with_preamble(blob, version=3), "preamble version u16 at byte 8 set to 3"


def _version_mismatch(blob: bytes) -> tuple[bytes, str]:
    return (surgery.with_preamble(blob, version=2),
            "preamble version u16 at byte 8 set to 2; the header's \"format_version\" is still 1")


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


def _format_version_3(blob: bytes) -> tuple[bytes, str]:
    def change(doc: dict[str, Any]) -> None:
        doc["format_version"] = 3
    return surgery.with_header(blob, change), 'header "format_version" set to 3, header CRC recomputed'


def _format_version_mismatch(blob: bytes) -> tuple[bytes, str]:
    def change(doc: dict[str, Any]) -> None:
        doc["format_version"] = 2
    return (surgery.with_header(blob, change),
            'header "format_version" set to 2, header CRC recomputed; the preamble version is still 1')


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
    old = struct.unpack_from("<Q", blob, pos)[0]
    new = value(old)
    return (surgery.with_payload(blob, "w", lambda payload: struct.pack_into("<Q", payload, word, new)),
            f"tensor 'w' chunk table row {row} {what} (u64 at file offset {pos}) {old} -> {new}; the "
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


# -- edits for the rules of issue 19 (FORMAT.md 12: each ambiguity an independent reader met)


def _short_not_magic(blob: bytes) -> tuple[bytes, str]:
    return (surgery.patch(blob, 1, b"X")[:5],
            "only the first 5 bytes kept, byte 1 (magic 'C') replaced by 'X': shorter than the preamble, but "
            "not a prefix of the magic")


def _short_magic_prefix(blob: bytes) -> tuple[bytes, str]:
    return blob[:5], "only the first 5 bytes kept (a prefix of the magic): shorter than the 32-byte preamble"


def _reserved(blob: bytes) -> tuple[bytes, str]:
    return surgery.with_preamble(blob, reserved=1), "preamble reserved u32 at byte 20 set to 1"


def _header_misaligned(blob: bytes) -> tuple[bytes, str]:
    old = surgery.preamble(blob).header_length
    return (surgery.with_preamble(blob, header_length=old - 8),
            f"preamble header_length (u32 at byte 12) {old} -> {old - 8}: 32 + H is no longer a multiple of 64 "
            "(header CRC left as it was: the alignment is checked first)")


def _file_length_short(blob: bytes) -> tuple[bytes, str]:
    pre = surgery.preamble(blob)
    new = pre.data_start - 8
    return (surgery.with_preamble(blob, file_length=new),
            f"preamble file_length (u64 at byte 24) {pre.file_length} -> {new}, less than 32 + H = {pre.data_start} "
            "(checked before the file's real size is compared)")


def _deflate_corrupt(blob: bytes) -> tuple[bytes, str]:
    pre = surgery.preamble(blob)
    inflater = zlib.decompressobj()
    region = blob[PREAMBLE_SIZE:pre.data_start]
    inflater.decompress(region)
    stream = len(region) - len(inflater.unused_data)  # the zlib stream, without its zero padding
    pos = PREAMBLE_SIZE + stream // 2
    return (surgery.recrc(surgery.flip(blob, pos, 0xFF)),
            f"byte {pos} (inside the {stream}-byte zlib stream of the deflated header, flags {pre.flags:#06x}) "
            "inverted; header_crc32 recomputed over the edited header, so only the stream is corrupt")


def _nested_lists(levels: int) -> Any:
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value


def _too_deep(blob: bytes) -> tuple[bytes, str]:
    def change(d: dict[str, Any]) -> None:
        d["metadata"]["extra"] = _nested_lists(63)
    return (surgery.with_header(blob, change),
            'metadata gets an unknown key "extra" holding 63 nested arrays ([[[…]]]): with the header object at '
            "level 1 and metadata at level 2 the innermost array is at level 65; header CRC recomputed")


def _integer_overflow(blob: bytes) -> tuple[bytes, str]:
    def change(d: dict[str, Any]) -> None:
        d["metadata"]["sigma"] = 10 ** 400
    return (surgery.with_header(blob, change),
            'metadata "sigma" -> 1 followed by 400 zeros (an integer no double can hold); header CRC recomputed')


def _lone_surrogate(blob: bytes) -> tuple[bytes, str]:
    return (_raw_header_edit(blob, b'"name":"w"', b'"name":"\\ud800"'),
            'tensor \'w\' "name" -> "\\ud800" (a JSON escape of a lone UTF-16 surrogate: valid JSON syntax, '
            "but not Unicode text, so UTF-8 cannot encode it); header CRC recomputed")


def _format_version_float(blob: bytes) -> tuple[bytes, str]:
    return (_raw_header_edit(blob, b'"format_version":1,', b'"format_version":1.0,'),
            'header "format_version" 1 -> 1.0 (a number with a fraction is not an integer); header CRC recomputed')


def _created_by_null(blob: bytes) -> tuple[bytes, str]:
    def change(d: dict[str, Any]) -> None:
        d["metadata"]["created_by"] = None
    return (surgery.with_header(blob, change),
            'metadata "created_by" -> null (a string when present); header CRC recomputed')


def _missing_init(blob: bytes) -> tuple[bytes, str]:
    def change(d: dict[str, Any]) -> None:
        del surgery.entry(d, "w")["init"]
    return (surgery.with_header(blob, change),
            "tensor 'w' loses its \"init\" key (required, null is its value for a residual measured from a base); "
            "header CRC recomputed")


def _encoding_unknown(blob: bytes) -> tuple[bytes, str]:
    def change(d: dict[str, Any]) -> None:
        surgery.entry(d, "layer0.attn.bias")["encoding"] = "ternary-zstd"
    return (surgery.with_header(blob, change),
            "tensor 'layer0.attn.bias' \"encoding\" -> \"ternary-zstd\" (an encoding of some later version); "
            "header CRC recomputed")


def _shape_zero_huge(blob: bytes) -> tuple[bytes, str]:
    huge = [0, 2 ** 48, 2 ** 48]

    def change(d: dict[str, Any]) -> None:
        surgery.entry(d, "empty")["shape"] = huge
    return (surgery.with_header(blob, change),
            f"tensor 'empty' \"shape\" [0, 5] -> {huge}: no element, but the non-zero dimensions multiply to "
            "2^96 (> 2^48), so no array library could allocate it (its strides overflow); header CRC recomputed")


def _scale_negative_zero(blob: bytes) -> tuple[bytes, str]:
    def change(d: dict[str, Any]) -> None:
        surgery.entry(d, "w")["scale"] = -0.0
    return (surgery.with_header(blob, change),
            "tensor 'w' \"scale\" -> -0.0 (its sign bit would make every kept entry decode to -0); header CRC "
            "recomputed")


def _names_unsorted(blob: bytes) -> tuple[bytes, str]:
    def change(d: dict[str, Any]) -> None:
        first, second = d["tensors"][0], d["tensors"][1]
        first["name"], second["name"] = second["name"], first["name"]
    doc = surgery.split(blob)[1]
    a, b = doc["tensors"][0]["name"], doc["tensors"][1]["name"]
    return (surgery.with_header(blob, change),
            f"the names of the first two tensors swapped ({a!r} <-> {b!r}; offsets, lengths and every other field "
            "stay in place, so only the order of the names is wrong); header CRC recomputed")


def _bool_byte(blob: bytes) -> tuple[bytes, str]:
    start = surgery.read(blob).payload_range("mask")[0]

    def change(payload: bytearray) -> None:
        assert payload[1] == 0
        payload[1] = 2
    return (surgery.with_payload(blob, "mask", change),
            f"tensor 'mask' (BOOL, dense) element 1 (file offset {start + 1}) 0x00 -> 0x02; its crc32 and the "
            "header CRC recomputed, so every checksum is valid")


def _chunk_high_bit(blob: bytes) -> tuple[bytes, str]:
    return _chunk_table(blob, 1, 0, lambda old: 1 << 63, "base position")


# -- edits for the rules of version 2


def _packed_in_version_1(blob: bytes) -> tuple[bytes, str]:
    def change(doc: dict[str, Any]) -> None:
        doc["format_version"] = 1
    return (surgery.with_header(blob, change, version=1),
            'preamble version and header "format_version" set to 1: version 1 has no encoding '
            "'ternary-golomb-packed' (tensor 'b.small' is the first that uses it); header CRC recomputed")


def _dictionary_in_version_1(blob: bytes) -> tuple[bytes, str]:
    return (surgery.with_preamble(blob, version=1),
            "preamble version u16 at byte 8 set to 1 (nothing else changed): the header's zlib stream asks "
            "for the preset dictionary, which version 1 has not; the header CRC still matches")


def _packed_length(blob: bytes) -> tuple[bytes, str]:
    old = surgery.read(blob).entry("b.small")["length"]

    def change(doc: dict[str, Any]) -> None:
        surgery.entry(doc, "b.small")["length"] = old + 1
    return (surgery.with_header(blob, change),
            f"tensor 'b.small' \"length\" {old} -> {old + 1}, one byte more than its streams' bits need "
            "(rounded up to a byte); header CRC recomputed")


def _packed_too_many(blob: bytes) -> tuple[bytes, str]:
    numel = (1 << 20) + 2

    def change(doc: dict[str, Any]) -> None:
        surgery.entry(doc, "c.empty")["shape"] = [numel]
        surgery.entry(doc, "c.empty")["nnz"] = numel - 1
    return (surgery.with_header(blob, change),
            f"tensor 'c.empty' \"shape\" [0, 3] -> [{numel}] and \"nnz\" 0 -> {numel - 1}: a packed tensor is "
            "one chunk, of at most 2^20 entries; header CRC recomputed")


def _packed_aligned(blob: bytes) -> tuple[bytes, str]:
    doc = surgery.split(blob)[1]
    old = surgery.entry(doc, "b.small")["offset"]
    assert old % 8

    def change(d: dict[str, Any]) -> None:
        surgery.entry(d, "b.small")["offset"] = 8
    return (surgery.with_header(blob, change),
            f"tensor 'b.small' \"offset\" {old} -> 8: a packed payload follows the previous payload directly "
            "(here the 5-byte 'a.mask'), a hole before it is a layout error; header CRC recomputed")


def _scale_rounds_negative(blob: bytes) -> tuple[bytes, str]:
    def change(d: dict[str, Any]) -> None:
        surgery.entry(d, "d.chunks")["scale"] = -1e-50
    return (surgery.with_header(blob, change),
            "tensor 'd.chunks' \"scale\" -> -1e-50, which rounds to the float32 -0.0 (sign bit set); header "
            "CRC recomputed")


def _scale_rounds_infinite(blob: bytes) -> tuple[bytes, str]:
    def change(d: dict[str, Any]) -> None:
        surgery.entry(d, "d.chunks")["scale"] = 3.4028236e38
    return (surgery.with_header(blob, change),
            "tensor 'd.chunks' \"scale\" -> 3.4028236e38, past the largest float32 by more than half a unit "
            "in the last place: it rounds to infinity; header CRC recomputed")


def _packed_unary_runs_out(blob: bytes) -> tuple[bytes, str]:
    """Clear the last terminating 1 bit of tensor 'b.small''s unary stream (bit unary_bits − 1 of
    its payload): its last entry finds no 1 bit."""
    last = surgery.read(blob).entry("b.small")["unary_bits"] - 1

    def clear(payload: bytearray) -> None:
        assert payload[last >> 3] >> (last & 7) & 1
        payload[last >> 3] &= ~(1 << (last & 7)) & 0xFF
    return (surgery.with_payload(blob, "b.small", clear),
            f"tensor 'b.small' (packed): bit {last} of its payload, the unary stream's last 1 bit, cleared, so "
            "its last entry finds no terminating 1 bit; its crc32 recomputed")


INVALID: tuple[Invalid, ...] = (
    Invalid("bad_magic", "f32_global", "NotACompeftFileError", "open", _bad_magic, "P1"),
    Invalid("version_3", "f32_global", "UnsupportedVersionError", "open", _version_3, "P3"),
    Invalid("flags_set", "f32_global", "UnsupportedVersionError", "open", _flags, "P4"),
    Invalid("format_version_3", "f32_global", "UnsupportedVersionError", "open", _format_version_3, "D3"),
    Invalid("truncated", "f32_global", "TruncatedFileError", "open", _truncated, "P9"),
    Invalid("truncated_preamble", "f32_global", "TruncatedFileError", "open", _truncated_preamble, "P2"),
    Invalid("trailing_byte", "f32_global", "TruncatedFileError", "open", _trailing_byte, "P9"),
    Invalid("header_crc", "f32_global", "HeaderError", "open", _header_crc, "H1"),
    Invalid("bad_json", "f32_global", "HeaderError", "open", _bad_json, "J2"),
    Invalid("overlapping_offsets", "f32_global", "LayoutError", "open", _overlap, "L2"),
    Invalid("nnz_gt_numel", "f32_global", "HeaderError", "open", _nnz_gt_numel, "E13"),
    Invalid("file_length_hole", "f32_global", "LayoutError", "open", _file_length, "L3"),
    Invalid("dense_length", "dense_passthrough", "HeaderError", "open", _dense_length, "E9"),
    Invalid("payload_crc", "f32_global", "ChecksumError", "verify", _payload_crc, "V2", tensor="layer0.attn.weight"),
    Invalid("chunk_table_order", "small_chunks", "CorruptPayloadError", "verify", _chunk_order, "V4", tensor="w"),
    Invalid("chunk_base_shifted", "small_chunks", "CorruptPayloadError", "verify", _chunk_shift, "V5", tensor="w"),
    Invalid("chunk_unary_offset", "small_chunks", "CorruptPayloadError", "verify", _chunk_unary, "V5", tensor="w"),
    Invalid("nonzero_padding", "dense_passthrough", "LayoutError", "verify", _nonzero_padding, "V1"),
    Invalid("duplicate_key", "f32_global", "HeaderError", "open", _duplicate_key, "J3"),
    Invalid("number_overflow", "f32_global", "HeaderError", "open", _number_overflow, "J4"),
    Invalid("dtype_not_a_string", "small_chunks", "HeaderError", "open", _dtype_not_a_string, "E5"),
    Invalid("fingerprint_not_a_string", "small_chunks", "HeaderError", "open", _fingerprint_type, "D5"),
    Invalid("scale_beyond_float32", "small_chunks", "HeaderError", "open", _scale_beyond_float32, "E12"),
    Invalid("chunk_offset_outside_stream", "small_chunks", "CorruptPayloadError", "verify", _chunk_outside, "V4",
            tensor="w"),
    Invalid("gap_past_end", "small_chunks", "CorruptPayloadError", "verify", _gap_past_end, "V5", tensor="w"),
    # issue 19: the rules an independent reader met as ambiguities (FORMAT.md 12), one vector each
    Invalid("short_not_magic", "f32_global", "NotACompeftFileError", "open", _short_not_magic, "P1"),
    Invalid("short_magic_prefix", "f32_global", "TruncatedFileError", "open", _short_magic_prefix, "P2"),
    Invalid("reserved_set", "f32_global", "UnsupportedVersionError", "open", _reserved, "P5"),
    Invalid("header_misaligned", "f32_global", "LayoutError", "open", _header_misaligned, "P7"),
    Invalid("file_length_short", "f32_global", "LayoutError", "open", _file_length_short, "P8"),
    Invalid("deflate_corrupt", "deflated_header", "HeaderError", "open", _deflate_corrupt, "H2"),
    Invalid("json_too_deep", "f32_global", "HeaderError", "open", _too_deep, "J5"),
    Invalid("integer_overflow", "f32_global", "HeaderError", "open", _integer_overflow, "J4"),
    Invalid("name_lone_surrogate", "small_chunks", "HeaderError", "open", _lone_surrogate, "J6"),
    Invalid("format_version_float", "f32_global", "HeaderError", "open", _format_version_float, "D2"),
    Invalid("created_by_null", "small_chunks", "HeaderError", "open", _created_by_null, "D5"),
    Invalid("encoding_unknown", "f32_global", "UnsupportedVersionError", "open", _encoding_unknown, "E3"),
    Invalid("missing_init", "small_chunks", "HeaderError", "open", _missing_init, "E4"),
    Invalid("shape_zero_huge", "empty_and_scalar", "HeaderError", "open", _shape_zero_huge, "E6"),
    Invalid("scale_negative_zero", "small_chunks", "HeaderError", "open", _scale_negative_zero, "E12"),
    Invalid("names_unsorted", "f32_global", "HeaderError", "open", _names_unsorted, "L1"),
    Invalid("bool_byte_2", "dense_passthrough", "CorruptPayloadError", "verify", _bool_byte, "V3", tensor="mask"),
    Invalid("chunk_word_high_bit", "small_chunks", "CorruptPayloadError", "verify", _chunk_high_bit, "V4",
            tensor="w"),
    # version 2 (issue 16): the rules it added
    Invalid("version_mismatch", "f32_global", "HeaderError", "open", _version_mismatch, "D7"),
    Invalid("format_version_mismatch", "f32_global", "HeaderError", "open", _format_version_mismatch, "D7"),
    Invalid("packed_in_version_1", "v2_mixed", "UnsupportedVersionError", "open", _packed_in_version_1, "E3"),
    Invalid("dictionary_in_version_1", "v2_lora_packed", "HeaderError", "open", _dictionary_in_version_1, "H2"),
    Invalid("packed_length", "v2_mixed", "HeaderError", "open", _packed_length, "E13"),
    Invalid("packed_too_many_entries", "v2_mixed", "HeaderError", "open", _packed_too_many, "E13"),
    Invalid("packed_offset_aligned", "v2_mixed", "LayoutError", "open", _packed_aligned, "L2"),
    Invalid("scale_rounds_negative", "v2_mixed", "HeaderError", "open", _scale_rounds_negative, "E12"),
    Invalid("scale_rounds_infinite", "v2_mixed", "HeaderError", "open", _scale_rounds_infinite, "E12"),
    Invalid("packed_unary_runs_out", "v2_mixed", "CorruptPayloadError", "verify", _packed_unary_runs_out, "V5",
            tensor="b.small"),
)


def build_edited(directory: Path, folder: str, specs: Sequence[Any]) -> list[tuple[Any, str]]:
    """Write ``folder``/*.cpeft, each an edit of a valid container in ``directory``; return
    (spec, description) per file."""
    out = directory / folder
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for spec in specs:
        blob = (directory / f"{spec.source}.cpeft").read_bytes()
        edited, description = spec.edit(blob)
        assert edited != blob
        (out / f"{spec.name}.cpeft").write_bytes(edited)
        done.append((spec, description))
    return done


def build_invalid(directory: Path) -> list[tuple[Invalid, str]]:
    """Write invalid/*.cpeft from the valid containers in ``directory``; return (spec, description)."""
    return build_edited(directory, "invalid", INVALID)


# ---------------------------------------------------------------------------------------------
# edited files a reader must accept (the other side of a rule's boundary)


@dataclass(frozen=True)
class Accepted:
    """A valid vector with one edit that keeps it valid: a reader MUST open, verify and decode it to
    the source's expected tensors. Pins where a rule stops (the deepest nesting allowed, ...)."""

    name: str
    source: str
    edit: Callable[[bytes], tuple[bytes, str]]
    rule: str  # the rule of spec/FORMAT.md section 12 whose boundary it pins


def _depth_64(blob: bytes) -> tuple[bytes, str]:
    def change(d: dict[str, Any]) -> None:
        d["metadata"]["extra"] = _nested_lists(62)
    return (surgery.with_header(blob, change),
            'metadata gets an unknown key "extra" holding 62 nested arrays: the innermost is at level 64 (the '
            "header object is level 1), the deepest nesting allowed; header CRC recomputed")


def _informative_keys(blob: bytes) -> tuple[bytes, str]:
    def change(d: dict[str, Any]) -> None:
        d["metadata"].update(alpha_rule=7, tuning="not an object", model_files=[1], fidelity={"overall": "x"},
                             build=None, later_key={"nested": [1, 2.5, None]})
        d["x-later"] = {"written": ["by", "a", "later", "writer"]}
        for entry in d["tensors"]:
            entry["note"] = {"unknown": True}
    return (surgery.with_header(blob, change),
            'metadata "alpha_rule" 7, "tuning" "not an object", "model_files" [1], "fidelity" {"overall": "x"}, '
            '"build" null and an unknown key; an unknown top-level key "x-later"; an unknown key "note" in every '
            "tensor entry (informative and unknown keys never make a file invalid); header CRC recomputed")


def _json_spelling(blob: bytes) -> tuple[bytes, str]:
    def change(d: dict[str, Any]) -> bytes:
        scale = surgery.entry(d, "w")["scale"]
        text = json.dumps(d, indent=1, sort_keys=True, ensure_ascii=True).encode()
        mantissa, exponent = f"{scale:.15e}".split("e")
        assert float(f"{mantissa.rstrip('0')}E{int(exponent)}") == scale
        for old, new in ((b'"name": "w"', b'"name": "\\u0077"'),
                         (f'"scale": {scale!r}'.encode(), f'"scale": {mantissa.rstrip("0")}E{int(exponent)}'.encode())):
            assert text.count(old) == 1
            text = text.replace(old, new)
        return b"\t\r\n " + text
    return (surgery.with_header(blob, change),
            "the header re-serialised as other JSON writers might: tab, CR, LF and a space before the object, "
            "keys sorted, one key per line (indent 1), the name \"w\" spelled \"\\u0077\", the scale in "
            "exponent form with a capital E; the same document, so the same file to a reader; header CRC "
            "recomputed")


def _scale_digits_v2(blob: bytes) -> tuple[bytes, str]:
    doc = surgery.split(blob)[1]
    short = surgery.entry(doc, "d.chunks")["scale"]
    exact = float(struct.unpack("<f", struct.pack("<f", short))[0])
    nudged = math.nextafter(exact, math.inf)
    assert exact != short and struct.unpack("<f", struct.pack("<f", nudged))[0] == exact

    def change(d: dict[str, Any]) -> None:
        surgery.entry(d, "d.chunks")["scale"] = nudged
        surgery.entry(d, "b.small")["scale"] = float(struct.unpack("<f", struct.pack("<f", surgery.entry(
            d, "b.small")["scale"]))[0])
    return (surgery.with_header(blob, change),
            f"version 2: tensor 'd.chunks' \"scale\" {short!r} -> {nudged!r} (the next double after its float32 "
            f"value {exact!r}: not a float32 value, but it rounds to the same one) and tensor 'b.small' "
            "\"scale\" written with every digit of its float32 value; header CRC recomputed")


ACCEPTED: tuple[Accepted, ...] = (
    Accepted("depth_64", "f32_global", _depth_64, "J5"),
    Accepted("informative_keys", "f32_global", _informative_keys, "D5"),
    Accepted("json_spelling", "small_chunks", _json_spelling, "J2"),
    Accepted("scale_digits_v2", "v2_mixed", _scale_digits_v2, "E12"),
)


def build_accepted(directory: Path) -> list[tuple[Accepted, str]]:
    """Write accepted/*.cpeft from the valid containers in ``directory``; return (spec, description)."""
    return build_edited(directory, "accepted", ACCEPTED)


# ---------------------------------------------------------------------------------------------
# README files


def _fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items())


def vectors_readme(directory: Path) -> str:
    lines = [
        "# compeft format v1 and v2 test vectors",
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
        "Invalid containers derived from these are described in [invalid/README.md](invalid/README.md),",
        "edited containers a reader must still accept in [accepted/](#accepted-edited-files-a-reader-must-accept)",
        "below, and an expert library in [library/README.md](library/README.md).",
        "[`manifest.json`](manifest.json) lists every file with its expected outcome, for any",
        "implementation to run (the rule ids are those of FORMAT.md section 12):",
        "",
        "- `valid`: open, verify and decode every tensor; each must equal the tensor of the same name in",
        "  `expected` bit for bit (the valid vectors below, and `accepted/`);",
        "- `invalid`: `error` (a class of `compeft.errors`, exactly) at `stage` (see invalid/README.md);",
        "- `library`: the expert library and its invalid catalogs.",
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


def accepted_section(done: list[tuple[Accepted, str]]) -> str:
    lines = [
        "## accepted/: edited files a reader must accept",
        "",
        "Each is a valid vector with one edit that keeps it valid: a reader must open, verify and decode it",
        "to the source's expected tensors (`SOURCE.expected.safetensors`). They pin the other side of a",
        "rule's boundary, and the freedom FORMAT.md gives writers.",
        "",
        "| file | from | rule | edit |",
        "|---|---|---|---|",
    ]
    for spec, description in done:
        lines.append(f"| `{spec.name}.cpeft` | `{spec.source}.cpeft` | {spec.rule} | {description.replace('|', chr(92) + '|')} |")
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
        "The rule column names the first rule of FORMAT.md section 12 the file breaks, in the order of",
        "checks there (a shortened header_length, say, also spoils the header CRC, checked later);",
        "`../manifest.json` lists the same table for machines.",
        "",
        "\"Header CRC recomputed\" means the edit re-serialises the header JSON (compact separators,",
        "UTF-8), re-pads it with spaces to a multiple of 64 bytes from the file start, and rewrites",
        "header_length, header_crc32 and file_length in the preamble so that only the named defect remains.",
        "",
        "| file | from | stage | exception | tensor | rule | edit |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec, description in done:
        desc = description.replace("|", "\\|")
        lines.append(f"| `{spec.name}.cpeft` | `{spec.source}.cpeft` | {spec.stage} | `{spec.error}` | "
                     f"{'`' + spec.tensor + '`' if spec.tensor else '-'} | {spec.rule} | {desc} |")
    lines.append("")
    return "\n".join(lines)


def parse_invalid_readme(text: str) -> list[dict[str, str | None]]:
    """The table of invalid/README.md as dicts (file, from, stage, exception, tensor, rule, edit)."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        file, source, stage, error, tname, rule = (c.strip("`") for c in cells[:6])
        rows.append(dict(file=file, source=source, stage=stage, exception=error,
                         tensor=None if tname == "-" else tname, rule=rule, edit=" | ".join(cells[6:])))
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
    rule: str  # the rule of spec/LIBRARY.md 3.3 it breaks (C1 ...)
    raw: Callable[[bytes], bytes] | None = None  # or edits the bytes (for what JSON cannot express)


def _entry(doc: dict[str, Any], name: str = "math") -> dict[str, Any]:
    return next(e for e in doc["experts"] if e["name"] == name)


INVALID_CATALOGS: tuple[InvalidCatalog, ...] = (
    InvalidCatalog("format_version_2", "UnsupportedVersionError",
                   lambda d: (d.update(format_version=2), '"format_version" 1 -> 2')[1], "C5"),
    InvalidCatalog("not_a_catalog", "CatalogError",
                   lambda d: (d.update(format="compeft"), '"format" "compeft-library" -> "compeft"')[1], "C3"),
    InvalidCatalog("duplicate_name", "CatalogError",
                   lambda d: (d["experts"].append(dict(_entry(d))), "the entry of 'math' appended a second time")[1],
                   "C11"),
    InvalidCatalog("file_outside_root", "CatalogError",
                   lambda d: (_entry(d).update(file="../math.cpeft"), "'math' \"file\" -> \"../math.cpeft\"")[1], "C9"),
    InvalidCatalog("bad_name", "CatalogError",
                   lambda d: (_entry(d).update(name="../math", file="../math.cpeft"),
                              "'math' \"name\" -> \"../math\" and \"file\" -> \"../math.cpeft\"")[1], "C8"),
    InvalidCatalog("size_not_an_integer", "CatalogError",
                   lambda d: (_entry(d).update(size=float(_entry(d)["size"])), "'math' \"size\" as a float")[1], "C7"),
    InvalidCatalog("missing_sha256", "CatalogError",
                   lambda d: (_entry(d).pop("sha256"), "'math' \"sha256\" removed")[1], "C7"),
    InvalidCatalog("sha256_upper_case", "CatalogError",
                   lambda d: (_entry(d).update(sha256=_entry(d)["sha256"].upper()), "'math' \"sha256\" upper-cased")[1],
                   "C10"),
    InvalidCatalog("duplicate_key", "CatalogError", lambda d: 'a second "format" key ("other") after the first', "C2",
                   raw=lambda b: b.replace(b'"format": ', b'"format": "other", "format": ', 1)),
    # issue 19: the JSON rules of headers (FORMAT.md 12, J1-J6) hold for catalogs too
    InvalidCatalog("format_version_float", "CatalogError",
                   lambda d: (d.update(format_version=1.0), '"format_version" 1 -> 1.0 (not an integer)')[1], "C4"),
    InvalidCatalog("number_overflow", "CatalogError",
                   lambda d: (_entry(d).update(size=10 ** 400),
                              "'math' \"size\" -> 1 followed by 400 zeros (an integer no double can hold)")[1], "C2"),
    InvalidCatalog("lone_surrogate", "CatalogError",
                   lambda d: (_entry(d).update(origin="s3://example-raw/\ud800"),
                              "'math' \"origin\" ends in \"\\ud800\" (a lone surrogate: not Unicode text)")[1], "C2"),
    InvalidCatalog("too_deep", "CatalogError",
                   lambda d: (_entry(d).update(extra=_nested_lists(62)),
                              "'math' gets an unknown key \"extra\" holding 62 nested arrays: the catalog object is "
                              "level 1, \"experts\" level 2, the entry level 3, the innermost array level 65")[1], "C2"),
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
        "`compeft.errors`, naming the file (rule: LIBRARY.md 3.3):",
        "",
        "| file | exception | rule | edit |",
        "|---|---|---|---|",
    ]
    for spec, description in done:
        lines.append(f"| `{spec.name}.json` | `{spec.error}` | {spec.rule} | {description.replace('|', chr(92) + '|')} |")
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# manifest.json: every file with its expected outcome, for any implementation to run

STAGES = {
    "valid": "open, verify and decode every tensor: each equals the tensor of the same name in `expected` "
             "bit for bit (dtype, shape and bits, the sign of zero included), and no other tensor exists",
    "open": "reading the preamble and header (compeft.open) raises `error`",
    "verify": "opening succeeds; verifying (padding, every payload CRC, every payload's structure, decoding "
              "without output) raises `error`; when `tensor` is given, decoding that tensor after a fresh open "
              "raises it too",
    "open_library": "opening the library whose catalog is `file` (compeft.open_library) raises `error`",
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(directory: Path, accepted: list[tuple[Accepted, str]], invalid: list[tuple[Invalid, str]],
             catalogs: list[tuple[InvalidCatalog, str]]) -> str:
    """manifest.json: the valid, accepted and invalid containers and the library, each with what a
    reader must do with it; paths relative to spec/vectors/."""
    def item(path: str, **fields: Any) -> dict[str, Any]:
        return {"file": path, "sha256": _sha256(directory / path), **fields}

    valid = [item(f"{v.name}.cpeft", expected=f"{v.name}.expected.safetensors", edit=None) for v in VECTORS]
    valid += [item(f"accepted/{a.name}.cpeft", expected=f"{a.source}.expected.safetensors", source=f"{a.source}.cpeft",
                   rule=a.rule, edit=description) for a, description in accepted]
    bad = [item(f"invalid/{i.name}.cpeft", source=f"{i.source}.cpeft", stage=i.stage, error=i.error, tensor=i.tensor,
                rule=i.rule, edit=description) for i, description in invalid]
    library = {
        "root": "library",
        "catalog": "library/catalog.json",
        "experts": [item(f"library/{name}.cpeft", name=name, expected=f"library/{name}.expected.safetensors")
                    for name in LIBRARY_EXPERTS],
        "invalid": [item(f"library/invalid/{c.name}.json", stage="open_library", error=c.error, rule=c.rule,
                         edit=description) for c, description in catalogs],
    }
    doc = {
        "format": "compeft-test-vectors",
        "format_version": 1,
        "about": "Generated by tools/make_vectors.py; paths are relative to this file. Rules: spec/FORMAT.md "
                 "section 12 (P, H, J, D, E, L, V, X) and spec/LIBRARY.md section 3.4 (C). Errors are class names "
                 "of compeft.errors, to be raised exactly (not a subclass).",
        "stages": STAGES,
        "valid": valid,
        "invalid": bad,
        "library": library,
    }
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------------
# FORMAT.md section 11: the worked example, written from the vector (no number typed by hand)

FORMAT_MD = ROOT / "spec" / "FORMAT.md"
EXAMPLE_BEGIN = ("<!-- generated by tools/make_vectors.py from vectors/worked_example.cpeft "
                 "(python tools/make_vectors.py rewrites it; --check compares it): edit the generator -->")
EXAMPLE_END = "<!-- end of the generated worked example -->"


def _bits_of(word_bits: list[int]) -> str:
    return ", ".join(map(str, word_bits)) if word_bits else "none"


def _runs(values: list[float]) -> str:
    """'0 ×12, 0.5, 1, 2, 3' for a sorted list."""
    out: list[str] = []
    for value in values:
        shown = f"{value:g}"
        if out and out[-1].split(" ×")[0] == shown:
            count = int(out[-1].split(" ×")[1]) + 1 if " ×" in out[-1] else 2
            out[-1] = f"{shown} ×{count}"
        else:
            out.append(shown)
    return ", ".join(out)


def _hexdump(blob: bytes) -> list[str]:
    """``hexdump -C`` lines: offset, 16 bytes in two groups of 8, printable ASCII between bars."""
    lines = []
    for at in range(0, len(blob), 16):
        row = blob[at:at + 16]
        hexes = " ".join(f"{b:02x}" for b in row[:8]) + "  " + " ".join(f"{b:02x}" for b in row[8:])
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
        lines.append(f"{at:08x}  {hexes:<48}  |{text}|")
    return lines


def _wrapped(paragraph: str, indent: str = "") -> list[str]:
    import textwrap
    return textwrap.wrap(paragraph, width=100, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)


def _golomb_cost(gaps: list[int], m: int) -> tuple[int, int, int]:
    """(unary bits, low bits, high bits) of ``gaps`` coded with parameter m (FORMAT.md 5.2)."""
    from compeft.format.header import golomb_fields
    b, w, cut, _ = golomb_fields(m)
    unary = sum(g // m + 1 for g in gaps)
    high = sum(1 for g in gaps if b > 0 and g % m >= cut)
    return unary, len(gaps) * w, high


def worked_example(directory: Path) -> str:
    """The body of FORMAT.md section 11, every number taken from (and checked against) the
    ``worked_example`` vector in ``directory``."""
    from compeft.format.header import golomb_fields
    vector = next(v for v in VECTORS if v.name == "worked_example")
    blob = (directory / "worked_example.cpeft").read_bytes()
    (name, tensor), = load_inputs(directory, vector).items()
    expected = st_load((directory / "worked_example.expected.safetensors").read_bytes())[name]
    pre, doc, data = surgery.split(blob)
    meta, entry = doc["metadata"], doc["tensors"][0]
    text = surgery.header_text(blob)
    region = blob[PREAMBLE_SIZE:pre.data_start]
    assert pre.flags == 0 and region == text + b" " * (len(region) - len(text)) and text.isascii()

    # selection and scale (7.2, 7.3)
    flat = tensor.float().reshape(-1).tolist()
    d, density, alpha = len(flat), vector.params["density"], vector.params["alpha"]
    kept_count = math.floor(d * density)
    rank = d - kept_count
    magnitudes = sorted(abs(x) for x in flat)
    threshold = magnitudes[rank - 1] if rank else 0.0
    assert threshold == meta["threshold"]
    positions = [i for i, x in enumerate(flat) if x != 0 and abs(x) >= threshold]
    signs = [flat[p] < 0 for p in positions]
    nnz, numel = len(positions), d
    assert nnz == entry["nnz"] and numel == math.prod(entry["shape"])
    mean = sum(flat) / d
    sigma = math.sqrt(sum((x - mean) ** 2 for x in flat) / (d - 1))
    assert abs(sigma - meta["sigma"]) <= 1e-15 * sigma
    scale = entry["scale"]
    assert scale == struct.unpack("<f", struct.pack("<f", alpha * meta["sigma"]))[0]
    v_bits = int(torch.tensor(scale, dtype=torch.float32).to(tensor.dtype).view(torch.int16)) & 0xFFFF
    v_shown = float(torch.tensor(scale, dtype=torch.float32).to(tensor.dtype))

    # gaps and the choice of m (5.2)
    gaps = [p - (positions[i - 1] + 1 if i else 0) for i, p in enumerate(positions)]
    p = nnz / numel
    m_star = math.ceil(math.log(2 - p) / -math.log(1 - p))
    low = 2 ** math.floor(math.log2(m_star))
    candidates = sorted({c for c in (m_star - 1, m_star, m_star + 1, low, 2 * low) if c >= 1})
    costs = {c: sum(_golomb_cost(gaps, c)) for c in candidates}
    m = min(candidates, key=lambda c: (costs[c], c))
    assert m == entry["golomb_m"], (m, entry["golomb_m"])
    b, w, cut, half = golomb_fields(m)
    quotients = [g // m for g in gaps]
    remainders = [g - q * m for g, q in zip(gaps, quotients)]
    long_form = [b > 0 and r >= cut for r in remainders]
    lows = [(r if r < cut else cut + (r - cut) % half) if b else 0 for r in remainders]
    highs = [(r - cut) // half for r, lf in zip(remainders, long_form) if lf]

    # the streams (5.1) and the chunk table (5.3), rebuilt here and compared with the payload
    codes = ["0" * q + "1" for q in quotients]
    unary_ones = list(itertools.accumulate(q + 1 for q in quotients))
    unary_ones = [u - 1 for u in unary_ones]
    low_bits = [i * w + j for i, x in enumerate(lows) for j in range(w) if x >> j & 1]
    high_ones = [i for i, h in enumerate(highs) if h]
    sign_ones = [i for i, s in enumerate(signs) if s]
    chunk = entry["chunk_size"]
    rows = []
    for c in range(-(-nnz // chunk)):
        first = c * chunk
        rows.append((positions[first - 1] + 1 if first else 0, sum(q + 1 for q in quotients[:first]),
                     sum(long_form[:first])))

    def words(ones: list[int], bits: int) -> list[int]:
        out = [0] * -(-bits // 64)
        for bit in ones:
            out[bit // 64] |= 1 << (bit % 64)
        return out

    streams = [("chunk table", [x for row in rows for x in row]),
               ("U (unary)", words(unary_ones, sum(q + 1 for q in quotients))),
               ("L (low)", words(low_bits, nnz * w)),
               ("H (high)", words(high_ones, len(highs))),
               ("S (signs)", words(sign_ones, nnz))]
    payload = data[entry["offset"]:entry["offset"] + entry["length"]]
    assert b"".join(struct.pack(f"<{len(ws)}Q", *ws) for _, ws in streams) == payload
    assert (sum(q + 1 for q in quotients), len(highs)) == (entry["unary_bits"], entry["high_bits"])
    assert zlib.crc32(region) == pre.header_crc and zlib.crc32(payload) == entry["crc32"]

    shape = " × ".join(map(str, entry["shape"]))
    dtype = str(tensor.dtype).replace("torch.", "")
    values = json.dumps(tensor.float().tolist()).replace(".0,", ",").replace(".0]", "]")
    call = f"compeft.compress({{{name!r}: t}}, {_fmt_params(vector.params)})"
    same_form = len(set(long_form)) == 1
    forms = (f" (all {'long' if long_form[0] else 'short'} form: cut = {cut})" if same_form else
             f" ({', '.join('long' if lf else 'short' for lf in long_form)} form)")
    bullets = [
        f"* Selection (7.2): d = {d}, ⌊{d} · {density}⌋ = {kept_count}, r = {rank}; the sorted |τ| are "
        f"{_runs(magnitudes)}, so t = {threshold:g} and the {nnz} non-zero entries with |τ| ≥ t are kept "
        "(zeros never are).",
        f"* Scale (7.3): σ (unbiased, {d} entries) = {meta['sigma']!r} (`sigma`), scale = float32(α·σ) = "
        f"{scale!r}, v = {dtype}(scale) = `{v_bits:#06x}`.",
        f"* Positions {', '.join(map(str, positions))}; gaps {', '.join(map(str, gaps))}. For p = nnz / numel = "
        f"{p:g}, m* = {m_star}; the candidates {{{', '.join(map(str, candidates))}}} cost "
        f"{', '.join(str(costs[c]) for c in candidates)} bits (unary + low + high); m = {m} is the cheapest, "
        f"the smallest on ties (b = {b}, w = {w}, cut = {cut}, half = {half}): quotients "
        f"{', '.join(map(str, quotients))}, remainders {', '.join(map(str, remainders))}" + (forms if b else "") + ".",
        f"* U: {', '.join(f'`{c}`' for c in codes)} → one bits at {_bits_of(unary_ones)}, `unary_bits` = "
        f"{entry['unary_bits']}, words {', '.join(f'`{x:#x}`' for x in streams[1][1])}.",
        f"* L: " + (f"{nnz} fields of {w} bits {lows} → bits {_bits_of(low_bits)} set, words "
                    f"{', '.join(f'`{x:#x}`' for x in streams[2][1])}." if w else f"empty (w = {w})."),
        f"* H: " + (f"{', '.join(map(str, highs))} → bits {_bits_of(high_ones)}, `high_bits` = {entry['high_bits']}, "
                    f"words {', '.join(f'`{x:#x}`' for x in streams[3][1])}." if highs else "empty (no long form)."),
        f"* S: signs {', '.join('−' if s else '+' for s in signs)} → bits {_bits_of(sign_ones)}, words "
        f"{', '.join(f'`{x:#x}`' for x in streams[4][1])}.",
        f"* Chunks (C = {chunk}): " + "; ".join(
            f"row {c} = ({r[0]}, {r[1]}, {r[2]})" + (f" (entry {c * chunk} is position {positions[c * chunk]})"
                                                       if c else "") for c, r in enumerate(rows)) + ".",
    ]
    intro = (f"A {shape} {dtype} task vector `{values}` compressed with `{call}`: the vector `worked_example` "
             f"of `vectors/` ({len(blob)} bytes). `tools/make_vectors.py` writes this section from that file, "
             "checking every figure against its bytes: nothing here is typed by hand.")
    lines = [
        *_wrapped(intro),
        "",
        *(line for bullet in bullets for line in _wrapped(bullet, "  ")),
        "",
        "**Preamble** (bytes 0–31):",
        "",
        "| bytes | field | value |",
        "|---|---|---|",
        f"| 0–7 | `magic` | `{blob[:8].hex(' ')}` |",
        f"| 8–9 | `version` | {pre.version} |",
        f"| 10–11 | `flags` | {pre.flags} (plain JSON) |",
        f"| 12–15 | `header_length` H | {pre.header_length} (32 + H = {pre.data_start} = {pre.data_start // 64} · 64) |",
        f"| 16–19 | `header_crc32` | `{pre.header_crc:#010x}` |",
        f"| 20–23 | `reserved` | {pre.reserved} |",
        f"| 24–31 | `file_length` | {pre.file_length} |",
        "",
        *_wrapped(f"**Header** (bytes 32–{pre.data_start - 1}): the {len(text)}-byte JSON text below (ASCII, one "
                  f"line in the file), then {len(region) - len(text)} spaces (0x20). `zlib.crc32` of these "
                  f"{len(region)} bytes is `{pre.header_crc:#010x}`, the `header_crc32`."),
        "",
        "```json",
        text.decode("ascii"),
        "```",
        "",
        *_wrapped(f"**Data section** (bytes {pre.data_start}–{pre.file_length - 1}): the payload of `{name}`, "
                  f"{entry['length']} bytes with CRC-32 {entry['crc32']} (`crc32`); it ends at the file's end, a "
                  "multiple of 8."),
        "",
        "| bytes | part | u64 words |",
        "|---|---|---|",
    ]
    at = pre.data_start + entry["offset"]
    for part, ws in streams:
        if part == "chunk table":
            for c, row in enumerate(rows):
                lines.append(f"| {at}–{at + 23} | chunk table row {c} | ({row[0]}, {row[1]}, {row[2]}) |")
                at += 24
            continue
        shown = ", ".join(f"`{x:#x}`" for x in ws) if ws else f"none: the stream is empty"
        lines.append(f"| {f'{at}–{at + 8 * len(ws) - 1}' if ws else '–'} | {part} | {shown} |")
        at += 8 * len(ws)
    assert at == pre.file_length
    decoded = expected.reshape(-1).view(torch.int16).tolist()
    cells = ["v" if x & 0xFFFF == v_bits else "−v" if x & 0xFFFF == v_bits | 0x8000 else "0" for x in decoded]
    assert all(x & 0xFFFF in (0, v_bits, v_bits | 0x8000) for x in decoded)
    rows_shown = [cells[i:i + entry["shape"][-1]] for i in range(0, len(cells), entry["shape"][-1])]
    lines += [
        "",
        "The whole file (`hexdump -C`: offset, 16 bytes, printable ASCII):",
        "",
        "```",
        *_hexdump(blob),
        "```",
        "",
        f"Decoded: `{json.dumps(rows_shown, ensure_ascii=False).replace(chr(34), '')}` with v = {v_shown:.4g} "
        f"(`{v_bits:#06x}`, −v = `{v_bits | 0x8000:#06x}`).",
        "The vector `small_chunks` exercises a non-empty L (m = 3, w = 1) and several chunks, `deflated_header`",
        "a deflated header.",
        "",
    ]
    return "\n".join(lines)


def with_worked_example(page: str, section: str) -> str:
    """``page`` (FORMAT.md) with the text between its worked-example markers replaced by ``section``."""
    head, rest = page.split(EXAMPLE_BEGIN)
    _, tail = rest.split(EXAMPLE_END)
    return f"{head}{EXAMPLE_BEGIN}\n{section}{EXAMPLE_END}{tail}"


# ---------------------------------------------------------------------------------------------
# driver


def build_all(directory: Path) -> None:
    """Write every vector, every invalid and accepted file, the READMEs and manifest.json into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for vector in VECTORS:
        build_vector(vector, directory)
    done = build_invalid(directory)
    accepted = build_accepted(directory)
    (directory / "README.md").write_text(vectors_readme(directory) + "\n" + accepted_section(accepted),
                                         encoding="utf-8")
    (directory / "invalid" / "README.md").write_text(invalid_readme(done), encoding="utf-8")
    catalogs = build_library_vectors(directory)
    (directory / "library" / "README.md").write_text(library_readme(directory, catalogs), encoding="utf-8")
    (directory / "manifest.json").write_text(manifest(directory, accepted, done, catalogs), encoding="utf-8")


def format_md_problems(directory: Path) -> list[str]:
    """[] when FORMAT.md's worked example is the one the vectors in ``directory`` give."""
    page = FORMAT_MD.read_text(encoding="utf-8")
    if page != with_worked_example(page, worked_example(directory)):
        return [f"differs: {FORMAT_MD.relative_to(ROOT)} section 11 (the worked example)"]
    return []


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
            if args.out.resolve() == VECTORS_DIR.resolve():
                problems += format_md_problems(Path(tmp))
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
    if args.out.resolve() == VECTORS_DIR.resolve():  # FORMAT.md section 11 is written from these vectors
        page = FORMAT_MD.read_text(encoding="utf-8")
        FORMAT_MD.write_text(with_worked_example(page, worked_example(args.out)), encoding="utf-8")
    for name in sorted(_files(args.out)):
        print(f"{(args.out / name).stat().st_size:8d}  {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
