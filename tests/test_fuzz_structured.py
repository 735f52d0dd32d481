"""Structure-aware fuzzing with hypothesis: edit header fields, chunk tables and preamble fields of
the committed vectors (with checksums repaired or not) and run the fuzz target of tools/fuzz.py on
the result. Only CompeftError subclasses may escape; a file that verifies must decode.

``COMPEFT_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz_structured.py`` runs a longer session
(tools/README.md)."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import load_tool  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"


fuzz = load_tool("fuzz")
surgery = load_tool("surgery")
SEEDS = {p.name: p.read_bytes() for p in sorted(VECTORS.glob("*.cpeft"))}
EXAMPLES = int(os.environ.get("COMPEFT_FUZZ_EXAMPLES", "300"))

TENSOR_FIELDS = ["name", "dtype", "shape", "encoding", "role", "init", "offset", "length", "crc32", "nnz", "scale",
                 "golomb_m", "chunk_size", "unary_bits", "high_bits"]
META_FIELDS = ["density", "alpha", "scope", "source", "sigma", "threshold", "base_fingerprint", "adapter_config",
               "user", "created_by"]
PREAMBLE_FIELDS = ["version", "flags", "header_length", "reserved", "file_length"]  # edited raw

# Integers near every boundary the reader checks: zero, one, the limits, the word sizes.
EDGES = [0, 1, 2, 3, 7, 8, 63, 64, 65, 1023, 1024, 1025, 2**20, 2**20 + 1, 2**31 - 1, 2**31, 2**32, 2**48 - 1,
         2**48, 2**48 + 1, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64, 10**12]


def numbers(old):
    """Values an integer field is edited to: near its old value, near a boundary, negative, or huge."""
    near = [old + d for d in (-64, -8, -1, 1, 8, 64)] if isinstance(old, int) and not isinstance(old, bool) else []
    return st.one_of(st.sampled_from(EDGES + near), st.sampled_from(EDGES).map(lambda v: -v),
                     st.integers(-(2**70), 2**70))


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                  st.dictionaries(st.text(max_size=4), inner,
                                                                                  max_size=4)), max_leaves=12)


def field_value(old):
    """A replacement for a header value: a number near a boundary, or a value of another type."""
    shapes = st.lists(st.sampled_from(EDGES + [0, 1, 2, 5]), max_size=18)
    return st.one_of(numbers(old), json_values, shapes, st.just(str(old)), st.floats(-1e300, 1e300))


@st.composite
def edited_files(draw) -> bytes:
    """A vector with 1-3 structural edits; CRCs repaired unless the draw says otherwise."""
    blob = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
    preamble, doc, data = surgery.split(blob)
    tensors = doc["tensors"]
    data = bytearray(data)
    # compressed payloads as the unedited header places them: (entry, offset, length, table words)
    streams = [(t, t["offset"], t["length"], 3 * -(-t["nnz"] // t["chunk_size"])) for t in tensors
               if t["encoding"] == "ternary-golomb" and t["length"] >= 8]
    raw_preamble = {}
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["tensor", "tensor", "tensor", "table", "table", "metadata", "preamble",
                                     "structure"]))
        if kind == "tensor" and tensors:
            entry = tensors[draw(st.integers(0, len(tensors) - 1))]
            key = draw(st.sampled_from(TENSOR_FIELDS))
            if draw(st.integers(0, 9)) == 0:
                entry.pop(key, None)
            else:
                entry[key] = draw(field_value(entry.get(key)))
        elif kind == "table" and streams:  # a chunk-table word (or any payload word) of a compressed tensor
            entry, offset, length, table_words = draw(st.sampled_from(streams))
            word = draw(st.integers(0, length // 8 - 1))
            if draw(st.booleans()):
                word = min(word, table_words - 1)
            at = offset + 8 * word
            new = draw(numbers(struct.unpack_from("<q", data, at)[0])) % 2**64
            struct.pack_into("<Q", data, at, new)
            if draw(st.integers(0, 4)):  # usually fix the payload CRC: test the structure checks
                entry["crc32"] = zlib.crc32(data[offset:offset + length])
        elif kind == "metadata":
            doc["metadata"][draw(st.sampled_from(META_FIELDS))] = draw(field_value(None))
        elif kind == "preamble":
            raw_preamble[draw(st.sampled_from(sorted(PREAMBLE_FIELDS)))] = draw(numbers(0))
        else:  # reorder, duplicate or drop entries; or a top-level key
            choice = draw(st.sampled_from(["swap", "duplicate", "drop", "format_version", "tensors"]))
            if choice == "swap" and len(tensors) > 1:
                i, j = draw(st.integers(0, len(tensors) - 1)), draw(st.integers(0, len(tensors) - 1))
                tensors[i], tensors[j] = tensors[j], tensors[i]
            elif choice == "duplicate" and tensors:
                tensors.append(dict(tensors[-1]))
            elif choice == "drop" and tensors:
                tensors.pop(draw(st.integers(0, len(tensors) - 1)))
            elif choice in ("format_version", "tensors"):
                doc[choice] = draw(json_values)
    fix_crc = draw(st.integers(0, 9)) > 0  # a plain JSON header, lengths recomputed, its CRC usually too
    out = surgery.join(doc, bytes(data), preamble=preamble, deflate=False, allow_nan=True,
                       header_crc=None if fix_crc else preamble.header_crc)
    return surgery.with_preamble(out, wrap=True, **raw_preamble)  # raw edits after the lengths were recomputed


@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 300,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(edited_files())
def test_header_edits_raise_only_compeft_errors(blob):
    fuzz.exercise(blob)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_repair_keeps_valid_files_valid(name):
    """The fuzz harness's repair step is an identity on valid files (it only fixes what edits break)."""
    assert fuzz.repair(SEEDS[name]) == SEEDS[name] or name == "f32_global.cpeft"
    fuzz.exercise(fuzz.repair(SEEDS[name]))
