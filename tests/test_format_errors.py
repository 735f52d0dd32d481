"""Malformed containers: every kind of damage gives its own CompeftError naming the file."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import compeft
from compeft.errors import (ChecksumError, CompeftError, CorruptPayloadError, HeaderError, InvalidArgumentError,
                            LayoutError, NotACompeftFileError, TruncatedFileError, UnsupportedVersionError)


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    """A small valid container: a multi-chunk golomb tensor "a", a dense int8 "b", a golomb bf16 "c"."""
    g = torch.Generator().manual_seed(0)
    tv = {"a": torch.randn(200, generator=g), "b": torch.tensor([1, 2, 3], dtype=torch.int8),
          "c": torch.randn(6, 5, generator=g).bfloat16()}
    path = tmp_path_factory.mktemp("valid") / "valid.cpeft"
    compeft.compress(tv, density=0.3, chunk_size=8).save(path)
    compeft.open(path).verify()
    return path


@pytest.fixture
def mutate(valid, tmp_path, container):
    """``mutate(edit)``: write a copy of the valid file changed by ``edit(container) -> bytes | None``."""

    def run(edit=None, *, raw: bytes | None = None) -> Path:
        out = tmp_path / "mutated.cpeft"
        if raw is not None:
            out.write_bytes(raw)
            return out
        c = container.read(valid)
        result = edit(c)
        out.write_bytes(result if result is not None else container.build(c.doc, c.data))
        return out

    return run


def expect(error, path, action=None):
    """``action(path)`` (default: open + verify) raises exactly ``error`` whose message names the file."""
    with pytest.raises(error) as info:
        if action is None:
            compeft.open(path).verify()
        else:
            action(path)
    assert isinstance(info.value, CompeftError)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)
    return info.value


def test_unmodified_rebuild_is_valid(valid, mutate, container):
    path = mutate(lambda c: None)
    assert path.read_bytes() == valid.read_bytes()  # the surgery helpers are faithful


# ---------------------------------------------------------------------------------------------
# preamble


def test_wrong_magic(valid, mutate):
    raw = bytearray(valid.read_bytes())
    raw[1:6] = b"XPEFT"
    expect(NotACompeftFileError, mutate(raw=bytes(raw)))


@pytest.mark.parametrize("content", [b"hello world, this is plainly not a container at all", b"{}" * 40,
                                     b"PK\x03\x04" + bytes(100)])
def test_other_files_are_not_compeft_files(mutate, content):
    expect(NotACompeftFileError, mutate(raw=content))


def test_safetensors_file_is_not_a_compeft_file(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    expect(NotACompeftFileError, path)


@pytest.mark.parametrize("version", [0, 3, 65535])
def test_future_version(mutate, container, version):
    expect(UnsupportedVersionError, mutate(lambda c: container.build(c.doc, c.data, version=version)))


def test_future_header_format_version(mutate):
    def edit(c):
        c.doc["format_version"] = 3
    expect(UnsupportedVersionError, mutate(edit))


@pytest.mark.parametrize("value", [1.0, True, "1", None])
def test_header_format_version_that_is_not_an_integer(mutate, value):
    def edit(c):
        c.doc["format_version"] = value
    err = expect(HeaderError, mutate(edit))
    assert type(err) is HeaderError and "must be an integer" in str(err)


@pytest.mark.parametrize("field,value", [("flags", 0x0002), ("flags", 0x8000), ("reserved", 1)])
def test_unknown_flags(mutate, container, field, value):
    expect(UnsupportedVersionError, mutate(lambda c: container.build(c.doc, c.data, **{field: value})))


def test_deflate_flag_on_a_plain_header_is_rejected(mutate, container):
    expect(HeaderError, mutate(lambda c: container.build(c.doc, c.data, flags=0x0001)))


def test_unknown_encoding(mutate):
    def edit(c):
        c.entry("a")["encoding"] = "ternary-zstd"
    err = expect(UnsupportedVersionError, mutate(edit))
    assert "ternary-zstd" in str(err)


@pytest.mark.parametrize("cut", [1, 8, 100])
def test_truncated_file(valid, mutate, cut):
    raw = valid.read_bytes()
    err = expect(TruncatedFileError, mutate(raw=raw[:-cut]))
    assert "truncated" in str(err)


@pytest.mark.parametrize("keep", [0, 5, 8, 31])
def test_file_shorter_than_preamble(valid, mutate, keep):
    expect(TruncatedFileError, mutate(raw=valid.read_bytes()[:keep]))


@pytest.mark.parametrize("extra", [b"\0", b"\0" * 8, b"garbage!"])
def test_trailing_bytes(valid, mutate, extra):
    err = expect(TruncatedFileError, mutate(raw=valid.read_bytes() + extra))
    assert "trailing" in str(err)


def test_file_shrinking_after_open_gives_truncated_error(valid, tmp_path):
    path = tmp_path / "shrinks.cpeft"
    path.write_bytes(valid.read_bytes())
    expert = compeft.open(path)
    with open(path, "r+b") as handle:
        handle.truncate(expert.header.data_start + 4)
    for name in ("a", "b"):  # a golomb payload (read) and a dense one (readinto)
        with pytest.raises(TruncatedFileError) as info:
            expert.to_dense(name)
        assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------
# header: size, checksum, JSON


def test_header_length_over_the_limit(mutate, container):
    def edit(c):
        hl = 64 * 1024 * 1024 + 32  # keeps the data section aligned: only the limit is wrong
        return container.build(c.doc, c.data, header_length=hl, file_length=32 + hl + len(c.data))
    err = expect(HeaderError, mutate(edit))
    assert not isinstance(err, LayoutError) and "limit" in str(err)


def test_header_length_not_aligned(mutate, container):
    expect(LayoutError, mutate(lambda c: container.build(c.doc, c.data, header_length=c.preamble.header_length - 8)))


def test_header_bit_flip(valid, mutate):
    raw = bytearray(valid.read_bytes())
    raw[40] ^= 0x04  # inside the JSON header
    err = expect(HeaderError, mutate(raw=bytes(raw)))
    assert "checksum" in str(err)


def test_header_crc_field_bit_flip(valid, mutate):
    raw = bytearray(valid.read_bytes())
    raw[16] ^= 0x01  # the header_crc32 field of the preamble
    expect(HeaderError, mutate(raw=bytes(raw)))


@pytest.mark.parametrize("text", [b"{not json", b"", b"[]", b'"compeft"', b'{"format": "other"}',
                                  b'\xff\xfe{"format": "compeft"}', b'{"format":"compeft","format_version":1}'])
def test_bad_json(mutate, container, text):
    def edit(c):
        return container.build(text=text, data=c.data)
    expect(HeaderError, mutate(edit))


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_in_json(mutate, container, constant):
    def edit(c):
        c.doc["metadata"]["alpha"] = "@@"
        text = container.encode_text(c.doc).replace(b'"@@"', constant.encode())
        assert constant.encode() in text
        return container.build(text=text, data=c.data)
    expect(HeaderError, mutate(edit))


def test_nan_in_tensor_scale(mutate, container):
    def edit(c):
        c.entry("a")["scale"] = float("nan")
        return container.build(text=container.encode_text(c.doc, allow_nan=True), data=c.data)
    expect(HeaderError, mutate(edit))


@pytest.mark.parametrize("depth", [70, 100_000])
def test_deep_json(mutate, container, depth):
    def edit(c):
        c.doc["metadata"]["extra"] = "@@"
        text = container.encode_text(c.doc).replace(b'"@@"', b"[" * depth + b"]" * depth)
        return container.build(text=text, data=c.data)
    expect(HeaderError, mutate(edit))


def test_json_depth_within_limit_is_accepted(mutate, container):
    def edit(c):
        c.doc["metadata"]["extra"] = "@@"
        text = container.encode_text(c.doc).replace(b'"@@"', b"[" * 40 + b"]" * 40)
        return container.build(text=text, data=c.data)
    path = mutate(edit)
    compeft.open(path).verify()


# ---------------------------------------------------------------------------------------------
# header: names, fields, metadata


def test_duplicate_names(mutate):
    def edit(c):
        c.doc["tensors"].insert(1, copy.deepcopy(c.doc["tensors"][0]))
    err = expect(HeaderError, mutate(edit))
    assert "unique" in str(err)


def test_unsorted_names(mutate):
    def edit(c):
        t = c.doc["tensors"]
        t[0]["name"], t[2]["name"] = t[2]["name"], t[0]["name"]  # "c", "b", "a" with offsets in file order
    err = expect(HeaderError, mutate(edit))
    assert "sorted" in str(err)
    assert type(err) is HeaderError  # a header rule (FORMAT.md 12, L1), not a LayoutError


@pytest.mark.parametrize("name", ["", None, 7, "x" * 1025])
def test_bad_names(mutate, name):
    def edit(c):
        c.entry("a")["name"] = name
    expect(HeaderError, mutate(edit))


@pytest.mark.parametrize("tensor,field,value", [
    ("a", "offset", -8), ("a", "offset", 0.0), ("a", "offset", "0"), ("a", "offset", True),
    ("b", "length", -3), ("b", "length", 3.5), ("a", "crc32", -1), ("a", "crc32", 1 << 32),
    ("a", "nnz", -1), ("a", "nnz", 1.5), ("a", "golomb_m", 0), ("a", "golomb_m", "2"),
    ("a", "chunk_size", 0), ("a", "chunk_size", -8), ("a", "chunk_size", (1 << 20) + 1),
    ("a", "unary_bits", -1), ("a", "high_bits", None), ("a", "scale", -1.0), ("a", "scale", "1"),
    ("a", "scale", 1e39), ("a", "shape", [-200]), ("a", "shape", [200.0]), ("a", "shape", "200"),
    ("a", "shape", [1] * 17), ("a", "shape", [2**40, 2**40]), ("a", "shape", [True, 200]), ("a", "dtype", "F8"), ("a", "dtype", "I32"), ("a", "role", "value"),
    ("a", "role", "weight"), ("b", "init", "0"), ("b", "init", True),
    ("a", "scale", -0.0), ("a", "shape", [0, 2**48, 2**48]), ("a", "encoding", 7), ("a", "encoding", None),
])
def test_bad_fields(mutate, tensor, field, value):
    def edit(c):
        c.entry(tensor)[field] = value
    err = expect(HeaderError, mutate(edit))
    assert repr(tensor) in str(err) or "#" in str(err)


@pytest.mark.parametrize("field", ["offset", "length", "crc32", "nnz", "golomb_m", "scale", "unary_bits", "init",
                                   "high_bits", "chunk_size", "dtype", "shape", "role"])
def test_missing_fields(mutate, field):
    def edit(c):
        del c.entry("a")[field]
    expect(HeaderError, mutate(edit))


@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.5, 1.0000001, "0.5", True, [0.5]])
def test_metadata_density_outside_range(mutate, density):
    def edit(c):
        c.doc["metadata"]["density"] = density
    err = expect(HeaderError, mutate(edit))
    assert "density" in str(err)


@pytest.mark.parametrize("key,value", [("scope", "layer"), ("source", "lora"), ("user", {"k": 1}),
                                       ("user", ["x"]), ("adapter_config", "r=4"), ("scope", None),
                                       ("source", None), ("density", None), ("created_by", None)])
def test_bad_metadata(mutate, key, value):
    def edit(c):
        c.doc["metadata"][key] = value
    expect(HeaderError, mutate(edit))


@pytest.mark.parametrize("key", ["metadata", "tensors"])
def test_missing_sections(mutate, key):
    def edit(c):
        del c.doc[key]
    expect(HeaderError, mutate(edit))


# ---------------------------------------------------------------------------------------------
# layout


@pytest.mark.parametrize("shift", [8, 64])
def test_offsets_with_holes(mutate, shift):
    def edit(c):
        c.entry("c")["offset"] += shift
    err = expect(LayoutError, mutate(edit))
    assert "offset" in str(err)


@pytest.mark.parametrize("shift", [-8, -1])
def test_offsets_overlapping(mutate, shift):
    def edit(c):
        c.entry("c")["offset"] += shift
    expect(LayoutError, mutate(edit))


def test_data_not_covered_exactly(mutate, container):
    def edit(c):  # one more aligned block of zeros than the tensors account for
        return container.build(c.doc, c.data + bytes(8))
    expect(LayoutError, mutate(edit))


def test_declared_file_length_shorter_than_header(mutate, container):
    expect(LayoutError, mutate(lambda c: container.build(c.doc, c.data, file_length=40)))


def test_nnz_greater_than_numel(mutate):
    def edit(c):
        c.entry("c")["nnz"] = 31  # shape [6, 5]
    err = expect(HeaderError, mutate(edit))
    assert "nnz" in str(err)


@pytest.mark.parametrize("shape", [[4], [2], [1, 3, 1, 2]])
def test_dense_shape_inconsistent_with_payload_length(mutate, shape):
    def edit(c):
        c.entry("b")["shape"] = shape  # 3 int8 bytes
    err = expect(HeaderError, mutate(edit))
    assert "payload" in str(err)


@pytest.mark.parametrize("field,delta", [("unary_bits", 64), ("high_bits", 64), ("nnz", 64), ("chunk_size", 1)])
def test_golomb_stream_sizes_inconsistent_with_payload_length(mutate, field, delta):
    def edit(c):
        c.entry("a")[field] += delta
    expect(HeaderError, mutate(edit))


def test_nnz_off_by_one_is_caught_by_the_payload_check(mutate):
    def edit(c):  # same payload length, header ranges still plausible: the decoder finds the mismatch
        c.entry("a")["nnz"] += 1
    path = mutate(edit)
    compeft.open(path)
    expect(CorruptPayloadError, path)
    expect(CorruptPayloadError, path, lambda p: compeft.open(p).to_dense("a"))


def test_golomb_shape_too_small_for_stream_sizes(mutate):
    def edit(c):
        c.entry("a")["shape"] = [10]  # nnz 61 of 10 elements
    expect(HeaderError, mutate(edit))


# ---------------------------------------------------------------------------------------------
# payloads: checksums and structure


def test_payload_bit_flip(valid, mutate, container):
    start, end = container.read(valid).payload_range("a")
    raw = bytearray(valid.read_bytes())
    raw[start + 30] ^= 0x80
    path = mutate(raw=bytes(raw))
    expect(ChecksumError, path)
    expect(ChecksumError, path, lambda p: compeft.open(p).to_dense("a"))
    expert = compeft.open(path)
    assert expert.to_dense("c").dtype == torch.bfloat16  # the other tensors still decode


def test_dense_payload_bit_flip(valid, mutate, container):
    start, end = container.read(valid).payload_range("b")
    raw = bytearray(valid.read_bytes())
    raw[start] ^= 0x01
    path = mutate(raw=bytes(raw))
    expect(ChecksumError, path, lambda p: compeft.open(p).to_dense("b"))


def _words(c, name):
    e = c.entry(name)
    return np.frombuffer(c.data[e["offset"]:e["offset"] + e["length"]], dtype="<i8").copy()


def chunk_table_edit(container, change):
    def edit(c):
        e = c.entry("a")
        words = _words(c, "a")
        n_chunks = -(-e["nnz"] // e["chunk_size"])
        assert n_chunks >= 3
        change(words, n_chunks)
        container.set_payload(c, "a", words.astype("<i8").tobytes())  # valid CRC: only the structure is wrong
    return edit


def set_word(index, value):
    def change(words, n_chunks):
        words[index(n_chunks) if callable(index) else index] = value
    return change


@pytest.mark.parametrize("change", [
    set_word(3, 0),  # chunk 1 base == chunk 0 base
    set_word(0, 1),  # first chunk does not start at 0
    set_word(3, 10_000),  # a base outside the tensor
    set_word(3, -5),  # a negative base
    set_word(4, 1 << 40),  # a unary offset far outside its stream
    set_word(5, 1 << 40),  # a high-bit offset far outside its stream
    set_word(lambda n: 3 * (n - 1), 199),  # the last chunk runs past the tensor end
    lambda w, n: w.__setitem__(slice(3 * n, None), 0),  # streams zeroed: the unary stream runs out
    lambda w, n: w.__setitem__(3 * n, w[3 * n] ^ 0xFF),  # unary bits scrambled
    lambda w, n: w.__setitem__(4, w[4] + 1),  # chunk 0 unary bits do not end at chunk 1
], ids=["base-repeat", "first-base", "base-out", "base-negative", "unary-offset", "high-offset",
        "last-chunk", "streams-zero", "unary-scrambled", "unary-end"])
def test_chunk_table_corruption_with_valid_crc(mutate, container, change, same):
    path = mutate(chunk_table_edit(container, change))
    expert = compeft.open(path)  # the header is fine
    expect(CorruptPayloadError, path)  # verify
    expect(CorruptPayloadError, path, lambda p: compeft.open(p).to_dense("a"))
    state = {"a": torch.randn(200), "b": torch.zeros(3, dtype=torch.int8), "c": torch.randn(6, 5).bfloat16()}
    before = {k: v.clone() for k, v in state.items()}
    expect(CorruptPayloadError, path, lambda p: compeft.apply(p, state))
    for k in state:
        assert same(state[k], before[k])
    assert expert.to_dense("c").shape == (6, 5)


def test_errors_from_in_memory_experts_name_no_file():
    expert = compeft.compress({"w": torch.randn(10)}, density=0.5)
    with pytest.raises(InvalidArgumentError) as info:
        expert.to_dense("x")
    assert "<in-memory expert>" in str(info.value)


# ---------------------------------------------------------------------------------------------
# compress arguments


@pytest.mark.parametrize("kwargs", [
    dict(density=0), dict(density=0.0), dict(density=1.5), dict(density=float("nan")), dict(density=-0.5),
    dict(density=float("inf")), dict(density="0.1"), dict(density=None),
    dict(alpha=-1.0), dict(alpha=-1e-30), dict(alpha=float("nan")), dict(alpha=float("inf")), dict(alpha="1"),
    dict(scope="layer"), dict(scope="Global"), dict(scope=None),
    dict(chunk_size=0), dict(chunk_size=-1), dict(chunk_size=(1 << 20) + 1), dict(chunk_size=2.0),
], ids=lambda kw: f"{next(iter(kw))}={next(iter(kw.values()))!r}")
def test_compress_argument_errors(kwargs):
    with pytest.raises(InvalidArgumentError) as info:
        compeft.compress({"w": torch.randn(10)}, **kwargs)
    assert isinstance(info.value, ValueError)
    assert next(iter(kwargs)) in str(info.value)


def test_compress_rejects_base_with_a_mapping(tmp_path):
    with pytest.raises(InvalidArgumentError):
        compeft.compress({"w": torch.randn(10)}, base=tmp_path)
