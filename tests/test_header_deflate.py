"""Deflated headers (preamble flag 0x0001): written for large headers, read back, and every
malformed variant rejected with a HeaderError that names the file."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch

import compeft
from compeft.errors import HeaderError, UnsupportedVersionError
from compeft.format.header import DEFLATE_ABOVE, FLAG_DEFLATE, MAX_HEADER_BYTES, PREAMBLE_SIZE
from conftest import load_tool

surgery = load_tool("surgery")


def many_tensors(count: int = 400) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"base_model.model.layers.{i}.self_attn.q_proj.lora_A.weight": torch.randn(4, 8, generator=g)
            for i in range(count)}


def rebuild(blob: bytes, region: bytes, flags: int) -> bytes:
    """The same file with another header region (zero-padded to keep the data section aligned)."""
    preamble = surgery.preamble(blob)
    return surgery.join(region, blob[preamble.data_start:], preamble=preamble, flags=flags, deflate=False, pad=b"\0")


def test_large_header_is_deflated_and_reads_back(tmp_path):
    tv = many_tensors()
    expert = compeft.compress(tv, density=0.25)
    blob = expert.to_bytes()
    flags, header_length = struct.unpack_from("<HI", blob, 10)
    assert flags == FLAG_DEFLATE
    plain = surgery.header_text(blob)  # (version 2: inflated with the preset dictionary)
    assert len(plain) > DEFLATE_ABOVE and header_length < len(plain) / 4  # names repeat: it pays
    path = tmp_path / "e.cpeft"
    expert.save(path)
    reopened = compeft.open(path)
    reopened.verify()
    for name in list(tv)[:5]:
        assert torch.equal(reopened.to_dense(name), expert.to_dense(name))


def test_small_header_stays_plain_json():
    blob = compeft.compress({"w": torch.randn(16)}, density=0.5).to_bytes()
    assert struct.unpack_from("<H", blob, 10)[0] == 0
    assert blob[PREAMBLE_SIZE:PREAMBLE_SIZE + 1] == b"{"


@pytest.fixture
def deflated(tmp_path):
    blob = compeft.compress(many_tensors(), density=0.25).to_bytes()
    return blob, surgery.header_text(blob), tmp_path


def write(tmp_path, blob: bytes):
    path = tmp_path / "bad.cpeft"
    path.write_bytes(blob)
    return path


@pytest.mark.parametrize("case", ["corrupt-stream", "truncated-stream", "trailing-garbage", "bomb"])
def test_malformed_deflated_headers(deflated, case):
    blob, text, tmp = deflated
    if case == "corrupt-stream":
        region = bytearray(zlib.compress(text, 9))
        region[len(region) // 2] ^= 0xFF
    elif case == "truncated-stream":
        region = zlib.compress(text, 9)[:-20]
    elif case == "trailing-garbage":
        region = zlib.compress(text, 9) + b"\x01junk"
    else:  # expands beyond the header limit: refused without inflating it all
        region = zlib.compress(b" " * (MAX_HEADER_BYTES + 1024), 9)
    path = write(tmp, rebuild(blob, bytes(region), FLAG_DEFLATE))
    with pytest.raises(HeaderError) as info:
        compeft.open(path)
    assert str(path) in str(info.value)


def test_plain_json_with_the_deflate_flag_is_rejected(deflated):
    blob, text, tmp = deflated
    path = write(tmp, rebuild(blob, text, FLAG_DEFLATE))
    with pytest.raises(HeaderError):
        compeft.open(path)


def test_the_deflated_vector_is_deflated_and_decodes():
    """spec/vectors/deflated_header.cpeft (FORMAT.md 3): flag 0x0001, a zlib stream then zero bytes,
    the CRC over the stored bytes; it decodes to its expected tensors."""
    from pathlib import Path
    from safetensors.torch import load_file
    vectors = Path(__file__).resolve().parent.parent / "spec" / "vectors"
    blob = (vectors / "deflated_header.cpeft").read_bytes()
    pre = surgery.preamble(blob)
    region = blob[PREAMBLE_SIZE:pre.data_start]
    assert pre.flags == FLAG_DEFLATE and zlib.crc32(region) == pre.header_crc
    inflater = zlib.decompressobj()
    text = inflater.decompress(region)
    assert inflater.eof and not inflater.unused_data.strip(b"\0") and len(text) > DEFLATE_ABOVE
    expert = compeft.open(vectors / "deflated_header.cpeft")
    expert.verify()
    expected = load_file(str(vectors / "deflated_header.expected.safetensors"))
    assert all(torch.equal(expert.to_dense(n), expected[n]) for n in expected)


@pytest.mark.parametrize("old,new,fragment", [
    (b'"nnz":', b'"nnz":0,"nnz":', "duplicate key"),
    (b'"user":{}', b'"user":{},"deep":' + b"[" * 63 + b"]" * 63, "deeper than 64"),
    (b'"user":{}', b'"user":{},"n":1' + b"0" * 400, "overflows a double"),
    (b'"user":{}', b'"user":{},"s":"\\udc00"', "lone surrogate"),
])
def test_json_rules_hold_inside_a_deflated_header(deflated, old, new, fragment):
    blob, text, tmp = deflated
    path = write(tmp, rebuild(blob, zlib.compress(text.replace(old, new, 1), 9), FLAG_DEFLATE))
    with pytest.raises(HeaderError, match=fragment) as info:
        compeft.open(path)
    assert type(info.value) is HeaderError


def test_unknown_flag_is_unsupported(deflated):
    blob, text, tmp = deflated
    path = write(tmp, rebuild(blob, zlib.compress(text, 9), FLAG_DEFLATE | 0x0002))
    with pytest.raises(UnsupportedVersionError):
        compeft.open(path)
