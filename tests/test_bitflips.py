"""Integrity: every single-bit flip anywhere in a small valid file is detected.

Each bit of each file is flipped in turn. The damaged file must fail ``verify()`` with a
CompeftError, and decoding it without verifying first must either fail or give exactly the
original tensors (a flip in zero padding changes no tensor; only ``verify`` looks at padding)."""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

import pytest
import torch

from compeft.errors import CompeftError
from compeft.expert import CompressedExpert
from compeft.format import BytesReader
from conftest import load_tool

surgery = load_tool("surgery")
VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
FILES = sorted(p.name[: -len(".cpeft")] for p in VECTORS.glob("*.cpeft"))


def with_deflated_header(blob: bytes) -> bytes:
    """The same container with its header deflated (flag 0x0001), so the inflate path is flipped too."""
    return surgery.with_header(blob, deflate=True)


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def outcome(blob: bytes, original: dict[str, bytes]) -> str:
    """Where a damaged file is caught: 'open', 'decode' or 'verify'; 'missed' if it never is."""
    try:
        expert = CompressedExpert(BytesReader(blob, "<flipped>"))
    except CompeftError:
        return "open"
    caught = None
    try:
        decoded = expert.state_dict()
    except CompeftError:
        caught = "decode"
    else:
        same = decoded.keys() == original.keys() and all(bits(decoded[n]) == original[n] for n in original)
        assert same, "a bit flip silently changed the decoded tensors"
    try:
        CompressedExpert(BytesReader(blob, "<flipped>")).verify()
    except CompeftError:
        return caught or "verify"
    return "missed"


TOTALS: Counter = Counter()


@pytest.mark.parametrize("name", [*FILES, "small_chunks+deflated"])
def test_every_single_bit_flip_is_detected(name):
    blob = (VECTORS / f"{name.split('+')[0]}.cpeft").read_bytes()
    if name.endswith("+deflated"):
        blob = with_deflated_header(blob)
    expert = CompressedExpert(BytesReader(blob, name))
    expert.verify()
    original = {n: bits(t) for n, t in expert.state_dict().items()}
    found: Counter = Counter()
    flipped = bytearray(blob)
    for i in range(len(blob) * 8):
        flipped[i >> 3] ^= 1 << (i & 7)
        found[outcome(bytes(flipped), original)] += 1
        flipped[i >> 3] ^= 1 << (i & 7)
    TOTALS.update(found)
    print(f"\n{name}: {len(blob) * 8} bits flipped, caught at open {found['open']}, at decode {found['decode']}, "
          f"by verify only {found['verify']}, missed {found['missed']} "
          f"(all files so far: {sum(TOTALS.values())} flips, {TOTALS['missed']} missed)")
    assert found["missed"] == 0
    assert sum(found.values()) == len(blob) * 8


def test_padding_flips_change_no_tensor_but_fail_verify():
    """The one place a flip is invisible to decoding: zero padding between payloads (not covered by
    a payload CRC). It must still fail verify()."""
    blob = bytearray((VECTORS / "dense_passthrough.cpeft").read_bytes())
    expert = CompressedExpert(BytesReader(bytes(blob), "x"))
    padded = next(e for e in expert.header.tensors if e.length % 8)  # followed by 8 - length % 8 zero bytes
    pad = expert.header.data_start + padded.offset + padded.length
    assert blob[pad] == 0
    blob[pad] ^= 0x80
    assert outcome(bytes(blob), {n: bits(t) for n, t in expert.state_dict().items()}) == "verify"
    assert struct.unpack_from("<Q", blob, 24)[0] == len(blob)
