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
    plain = zlib.decompress(blob[PREAMBLE_SIZE:PREAMBLE_SIZE + header_length].rstrip(b"\0"))
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


def test_unknown_flag_is_unsupported(deflated):
    blob, text, tmp = deflated
    path = write(tmp, rebuild(blob, zlib.compress(text, 9), FLAG_DEFLATE | 0x0002))
    with pytest.raises(UnsupportedVersionError):
        compeft.open(path)
