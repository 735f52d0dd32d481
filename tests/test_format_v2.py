"""Format version 2 (spec/FORMAT.md 3.2, 3.3, 4, 5.5): the packed encoding, the preset dictionary
of the header and the float32 scale digits, each checked against an independent reading of the spec
(``compeft.codec.reference`` for the packed layout, bit by bit) and against version 1 of the same
data."""

from __future__ import annotations

import hashlib
from decimal import Decimal
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compeft
from compeft import errors
from compeft.codec import golomb
from compeft.codec import reference as ref
from compeft.format.header import (ENCODING_GOLOMB, ENCODING_PACKED, FLAG_DEFLATE, PREAMBLE_SIZE, deflate,
                                   short_float32)
from compeft.format.header_dictionary import HEADER_DICTIONARY, HEADER_DICTIONARY_ID
from conftest import load_tool

surgery = load_tool("surgery")
ROOT = Path(__file__).resolve().parent.parent
FORMAT_MD = (ROOT / "spec" / "FORMAT.md").read_text(encoding="utf-8")


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def sparse(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.3)).to(dtype)


# ---------------------------------------------------------------------------------------------
# 5.5: the packed layout


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 400), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_packed_payload_is_the_reference_packing_and_unpacks_to_the_word_layout(numel, density, seed):
    values = np.random.default_rng(seed).standard_normal(numel).astype(np.float32)
    values[np.random.default_rng(seed + 1).random(numel) > density] = 0
    threshold = float(np.float32(0.5))
    streams = golomb.encode(values, threshold, chunk_size=max(numel, 1))
    words = b"".join(bytes(p) for p in streams.payload_parts())
    args = dict(nnz=streams.nnz, golomb_m=streams.golomb_m, unary_bits=streams.unary_bits,
                high_bits=streams.high_bits)
    packed = streams.packed_payload()
    assert packed == ref.pack_payload(words, **args)  # the reference cuts the streams out bit by bit
    assert len(packed) == -(-sum(streams.stream_bits) // 8)
    assert ref.unpack_payload(packed, **args) == words  # and puts them back at word boundaries
    assert golomb.unpack(packed, streams.nnz, max(streams.nnz, 1), streams.golomb_m, streams.unary_bits,
                         streams.high_bits).tobytes() == words
    # the packed bytes decode, through the reference's own unpacking, to the kept entries
    positions, signs = ref.decode_positions_signs(ref.unpack_payload(packed, **args), numel=numel,
                                                  chunk_size=max(streams.nnz, 1), **args)
    kept = np.flatnonzero((values != 0) & (np.abs(values) >= threshold))
    assert positions == kept.tolist() and signs == (values[kept] < 0).astype(int).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_version_2_decodes_to_the_same_bits_as_version_1(dtype, same):
    tv = {"a.small": sparse(1, (7, 9), dtype), "b.empty": torch.zeros(0, 4, dtype=dtype),
          "c.zeros": torch.zeros(16, dtype=dtype), "d.large": sparse(2, (300, 200), dtype),
          "e.one": torch.tensor([2.5], dtype=dtype)}
    one = compeft.compress(tv, density=0.2, format_version=1)
    two = compeft.compress(tv, density=0.2)
    assert (one.header.version, two.header.version) == (1, 2)
    assert {two.entry(n).encoding for n in ("a.small", "b.empty", "c.zeros", "e.one")} == {ENCODING_PACKED}
    assert two.entry("d.large").encoding == ENCODING_GOLOMB  # its word payload is over PACK_BELOW
    assert {one.entry(n).encoding for n in tv} == {ENCODING_GOLOMB}
    two.verify()
    for name in tv:
        assert same(two.to_dense(name), one.to_dense(name)), name
        assert two.entry(name).scale == one.entry(name).scale
    assert len(two.to_bytes()) < len(one.to_bytes())
    base = {n: torch.randn(t.shape).to(dtype) for n, t in tv.items()}
    a = {n: t.clone() for n, t in base.items()}
    b = {n: t.clone() for n, t in base.items()}
    compeft.apply(one, a)
    compeft.apply(two, b)
    assert all(same(a[n], b[n]) for n in tv)


def test_the_writer_packs_one_chunk_tensors_below_the_threshold_only():
    tv = {"one_chunk": sparse(3, (40, 40)), "many_chunks": sparse(4, (60, 60))}
    expert = compeft.compress(tv, density=0.05, chunk_size=100)
    assert expert.entry("one_chunk").nnz <= 100 < expert.entry("many_chunks").nnz
    assert expert.entry("one_chunk").encoding == ENCODING_PACKED
    assert expert.entry("many_chunks").encoding == ENCODING_GOLOMB
    big = compeft.compress({"w": torch.randn(300, 300)}, density=0.1).entry("w")  # one chunk, ~6.5 KB
    assert big.nnz <= golomb.DEFAULT_CHUNK_SIZE and big.encoding == ENCODING_GOLOMB
    assert 8 * sum(golomb.stream_words(big.nnz, big.chunk_size, big.golomb_m, big.unary_bits,
                                       big.high_bits)) >= golomb.PACK_BELOW


def test_packed_payloads_are_unaligned_and_the_others_aligned():
    expert = compeft.open(ROOT / "spec" / "vectors" / "v2_mixed.cpeft")
    end = 0
    for e in expert.header.tensors:  # the rule of section 4, computed here from the spec's words
        align = 1 if e.encoding == ENCODING_PACKED else 8
        assert e.offset == -(-end // align) * align, e.name
        end = e.offset + e.length
    offsets = {e.name: e.offset for e in expert.header.tensors}
    assert offsets["b.small"] == 5 and offsets["d.chunks"] % 8 == 0
    assert any(e.offset % 8 for e in expert.header.tensors if e.encoding == ENCODING_PACKED)


def test_a_damaged_packed_payload_is_a_clear_error(tmp_path):
    tv = {"w": sparse(5, (20, 20))}
    expert = compeft.compress(tv, density=0.2)
    blob = expert.to_bytes()
    assert expert.entry("w").encoding == ENCODING_PACKED
    rejected = 0
    for byte in range(surgery.read(blob).entry("w")["length"]):
        for bit in range(8):
            damaged = surgery.with_payload(blob, "w", lambda p: p.__setitem__(byte, p[byte] ^ (1 << bit)))
            path = tmp_path / "d.cpeft"
            path.write_bytes(damaged)
            try:
                compeft.open(path).verify()
            except errors.CorruptPayloadError as exc:
                assert str(path) in str(exc) and "tensor 'w'" in str(exc)
                rejected += 1
    assert rejected > 0  # (a flipped sign or low bit is still a valid code: the CRC catches those)


# ---------------------------------------------------------------------------------------------
# 3.3: the preset dictionary


def test_the_dictionary_is_the_spec_file_and_the_spec_names_it():
    assert (ROOT / "spec" / "header-dictionary-2.txt").read_bytes() == HEADER_DICTIONARY
    assert HEADER_DICTIONARY_ID == zlib.adler32(HEADER_DICTIONARY)
    section = FORMAT_MD[FORMAT_MD.index("### 3.3"):FORMAT_MD.index("## 4.")]
    assert f"{len(HEADER_DICTIONARY):,}-byte" in section
    assert f"0x{HEADER_DICTIONARY_ID:08x}" in section
    assert hashlib.sha256(HEADER_DICTIONARY).hexdigest() in section
    assert HEADER_DICTIONARY.isascii()


def test_a_version_2_header_names_the_dictionary_and_version_1_does_not():
    tv = {f"layers.{i}.q_proj.lora_A.weight": sparse(i, (4, 8)) for i in range(40)}
    for version, fdict in ((2, True), (1, False)):
        blob = compeft.compress(tv, format_version=version).to_bytes()
        pre = surgery.preamble(blob)
        region = blob[PREAMBLE_SIZE:pre.data_start]
        assert pre.flags & FLAG_DEFLATE and pre.version == version
        assert bool(region[1] & 0x20) == fdict  # RFC 1950 FLG.FDICT
        if fdict:
            assert int.from_bytes(region[2:6], "big") == HEADER_DICTIONARY_ID
        assert json.loads(surgery.header_text(blob))["format_version"] == version


def test_another_dictionary_is_a_header_error(tmp_path):
    tv = {f"layers.{i}.q_proj.lora_A.weight": sparse(i, (4, 8)) for i in range(40)}
    blob = compeft.compress(tv).to_bytes()
    pre, doc, data = surgery.split(blob)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, zdict=b"another dictionary")
    region = compressor.compress(surgery.encode(doc)) + compressor.flush()
    path = tmp_path / "other.cpeft"
    path.write_bytes(surgery.join(region, data, preamble=pre, flags=FLAG_DEFLATE, deflate=False, pad=b"\0"))
    with pytest.raises(errors.HeaderError, match="preset dictionary .* other than compeft's") as info:
        compeft.open(path)
    assert str(path) in str(info.value)


def test_the_dictionary_pays_on_a_small_adapter_header():
    text = surgery.header_text((ROOT / "spec" / "vectors" / "v2_lora_packed.cpeft").read_bytes())
    assert len(deflate(text, 2)) < 0.9 * len(deflate(text, 1))


# ---------------------------------------------------------------------------------------------
# 3.2: scales in their shortest float32 digits


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 0x7F7FFFFF))
def test_short_float32_is_the_shortest_decimal_that_rounds_back(pattern):
    value = struct.unpack("<f", struct.pack("<I", pattern))[0]
    short = short_float32(value)
    assert f32(short) == value
    digits = len(Decimal(repr(short)).normalize().as_tuple().digits)
    assert digits <= 9
    if digits > 1:  # one significant digit fewer does not round back
        assert f32(float(f"{value:.{digits - 1}g}")) != value


@pytest.mark.parametrize("scale,version,ok", [
    (0.1, 2, True), (0.1, 1, False), (1e-50, 2, True), (-1e-50, 2, False), (3.4028235e38, 2, True),
    (3.4028236e38, 2, False), (1e39, 1, False), (-0.0, 2, False), (0.5, 1, True), (0.5, 2, True),
])
def test_scale_rule_by_version(tmp_path, container, scale, version, ok):
    doc = {"format": "compeft", "format_version": version, "metadata": {"density": 0.1},
           "tensors": [{"name": "w", "dtype": "F32", "shape": [4], "encoding": "ternary-golomb", "role": "delta",
                        "init": None, "offset": 0, "length": 0, "crc32": 0, "nnz": 0, "scale": scale,
                        "golomb_m": 1, "chunk_size": 16384, "unary_bits": 0, "high_bits": 0}]}
    path = tmp_path / "s.cpeft"
    path.write_bytes(container.build(doc))
    if ok:
        assert compeft.open(path).entry("w").scale == f32(scale)
    else:
        with pytest.raises(errors.HeaderError, match="scale"):
            compeft.open(path)


def test_written_scales_are_short_and_exact():
    expert = compeft.compress({"w": sparse(7, (30, 30)), "v": sparse(8, (5000,))}, density=0.1)
    doc = json.loads(surgery.header_text(expert.to_bytes()))
    for entry in doc["tensors"]:
        assert f32(entry["scale"]) == expert.entry(entry["name"]).scale
        assert len(repr(entry["scale"])) <= len(repr(expert.entry(entry["name"]).scale))


# ---------------------------------------------------------------------------------------------
# choosing the version


def test_format_version_argument(tmp_path):
    tv = {"w": sparse(9, (10, 10))}
    with pytest.raises(errors.InvalidArgumentError, match="format_version"):
        compeft.compress(tv, format_version=3)
    with pytest.raises(errors.InvalidArgumentError, match="format_version"):
        compeft.compress(tv, format_version=True)
    assert surgery.preamble(compeft.compress(tv, format_version=1).to_bytes()).version == 1
    assert surgery.preamble(compeft.compress(tv).to_bytes()).version == 2
