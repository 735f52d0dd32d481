"""The committed format-v1 test vectors (spec/vectors/, built by tools/make_vectors.py).

- encoder direction: rebuilding gives byte-identical files;
- decoder direction: every tensor decodes to the committed expected tensor, bit for bit;
- semantics: the expected tensors are what ComPEFT means (checked from the inputs with numpy, not
  with compeft's own selection code);
- invalid files raise exactly the documented exception, naming the file;
- the vectors really exercise what their README says (several chunks, non-power-of-two m, ...).
"""

from __future__ import annotations

import math
from pathlib import Path

import numba
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import compeft
# Not "from compeft import errors": compeft.__getattr__('errors') recurses forever (reported to the owner).
import compeft.errors as errors

from conftest import load_tool  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
INVALID = VECTORS / "invalid"


mv = load_tool("make_vectors")
BY_NAME = {v.name: v for v in mv.VECTORS}
NAMES = sorted(BY_NAME)
REQUIRED = {"f32_global", "bf16_fp16_tensor_scope", "empty_and_scalar", "nnz_zero", "density_one",
            "dense_passthrough", "small_chunks", "ties_at_threshold"}

# Invalid file -> (exception class name, a fragment of the message that proves the intended check fired).
# Kept in sync with invalid/README.md by test_invalid_table_matches_readme.
INVALID_EXPECTED = {
    "bad_magic.cpeft": ("NotACompeftFileError", "wrong magic"),
    "version_3.cpeft": ("UnsupportedVersionError", "format version 3"),
    "flags_set.cpeft": ("UnsupportedVersionError", "unknown flags"),
    "format_version_3.cpeft": ("UnsupportedVersionError", "format_version 3"),
    "truncated.cpeft": ("TruncatedFileError", "truncated"),
    "truncated_preamble.cpeft": ("TruncatedFileError", "shorter than the 32-byte preamble"),
    "trailing_byte.cpeft": ("TruncatedFileError", "trailing bytes"),
    "header_crc.cpeft": ("HeaderError", "checksum mismatch"),
    "bad_json.cpeft": ("HeaderError", "not valid UTF-8 JSON"),
    "overlapping_offsets.cpeft": ("LayoutError", "without holes or overlaps"),
    "nnz_gt_numel.cpeft": ("HeaderError", "nnz 17 exceeds"),
    "file_length_hole.cpeft": ("LayoutError", "covered exactly"),
    "dense_length.cpeft": ("HeaderError", "dense payload of 24 bytes"),
    "payload_crc.cpeft": ("ChecksumError", "CRC-32 mismatch"),
    "chunk_table_order.cpeft": ("CorruptPayloadError", "not strictly increasing"),
    "chunk_base_shifted.cpeft": ("CorruptPayloadError", "next chunk's base"),
    "chunk_unary_offset.cpeft": ("CorruptPayloadError", "unary bits do not end"),
    "nonzero_padding.cpeft": ("LayoutError", "non-zero padding"),
    "duplicate_key.cpeft": ("HeaderError", "duplicate key 'dtype'"),
    "number_overflow.cpeft": ("HeaderError", "overflows a double"),
    "dtype_not_a_string.cpeft": ("HeaderError", "unknown dtype ['F32']"),
    "fingerprint_not_a_string.cpeft": ("HeaderError", "base_fingerprint must be a string"),
    "scale_beyond_float32.cpeft": ("HeaderError", "must be a finite, non-negative float32 value"),
    "chunk_offset_outside_stream.cpeft": ("CorruptPayloadError", "lies outside the tensor or its stream"),
    "gap_past_end.cpeft": ("CorruptPayloadError", "chunk 8 is corrupt: a decoded position lies outside"),
    # issue 19 (FORMAT.md 12)
    "short_not_magic.cpeft": ("NotACompeftFileError", "wrong magic"),
    "short_magic_prefix.cpeft": ("TruncatedFileError", "shorter than the 32-byte preamble"),
    "reserved_set.cpeft": ("UnsupportedVersionError", "reserved preamble field"),
    "header_misaligned.cpeft": ("LayoutError", "does not align the data section"),
    "file_length_short.cpeft": ("LayoutError", "shorter than preamble + header"),
    "deflate_corrupt.cpeft": ("HeaderError", "deflated header is corrupt"),
    "json_too_deep.cpeft": ("HeaderError", "nesting deeper than 64 levels"),
    "integer_overflow.cpeft": ("HeaderError", '(after "sigma") overflows a double'),
    "name_lone_surrogate.cpeft": ("HeaderError", "lone surrogate"),
    "format_version_float.cpeft": ("HeaderError", "format_version must be an integer, got 1.0"),
    "created_by_null.cpeft": ("HeaderError", "metadata created_by must be a string, got None"),
    "encoding_unknown.cpeft": ("UnsupportedVersionError", "unknown encoding 'ternary-zstd'"),
    "missing_init.cpeft": ("HeaderError", "lacks the key init"),
    "shape_zero_huge.cpeft": ("HeaderError", "the product of the non-zero dimensions"),
    "scale_negative_zero.cpeft": ("HeaderError", "scale -0.0 must be"),
    "names_unsorted.cpeft": ("HeaderError", "must be unique and sorted"),
    "bool_byte_2.cpeft": ("CorruptPayloadError", "BOOL element 1 is the byte 0x02"),
    "chunk_word_high_bit.cpeft": ("CorruptPayloadError", "lies outside the tensor or its stream"),
    # version 2 (issue 16)
    "version_mismatch.cpeft": ("HeaderError", "format_version 1 differs from the preamble's version 2"),
    "format_version_mismatch.cpeft": ("HeaderError", "format_version 2 differs from the preamble's version 1"),
    "packed_in_version_1.cpeft": ("UnsupportedVersionError", "'ternary-golomb-packed' (in a version 1 file)"),
    "dictionary_in_version_1.cpeft": ("HeaderError", "preset dictionary (Adler-32 0x"),
    "packed_length.cpeft": ("HeaderError", "payload of 4 bytes, its stream sizes need 3"),
    "packed_too_many_entries.cpeft": ("HeaderError", "a packed tensor holds at most 1048576 entries"),
    "packed_offset_aligned.cpeft": ("LayoutError", "payload at offset 8, expected 5"),
    "scale_rounds_negative.cpeft": ("HeaderError", "scale -1e-50 must round to a finite, non-negative float32"),
    "scale_rounds_infinite.cpeft": ("HeaderError", "must round to a finite, non-negative float32"),
    "packed_unary_runs_out.cpeft": ("CorruptPayloadError", "unary quotient stream ends inside a chunk"),
}
INVALID_ROWS = mv.parse_invalid_readme((INVALID / "README.md").read_text(encoding="utf-8"))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view of the tensor's bits (so -0.0 != +0.0 and NaN == NaN by pattern)."""
    views = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}
    return t.contiguous().view(views[t.dtype]) if t.dtype in views else t


def assert_identical(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.equal(a, b), f"{what}: values differ"
    assert torch.equal(_bits(a), _bits(b)), f"{what}: bit patterns differ"


# ---------------------------------------------------------------------------------------------
# inventory


def test_required_vectors_exist_and_are_small():
    assert REQUIRED <= set(NAMES)
    for name in NAMES:
        for suffix in (".cpeft", ".input.safetensors", ".expected.safetensors"):
            path = VECTORS / f"{name}{suffix}"
            assert path.is_file(), path
            assert path.stat().st_size <= 20 * 1024, path
        assert f"## {name}" in (VECTORS / "README.md").read_text(encoding="utf-8")
    assert any(v.params.get("metadata") for v in mv.VECTORS), "no vector carries user metadata"


# ---------------------------------------------------------------------------------------------
# (a) encoder direction


def test_generator_rebuilds_every_file_byte_identical(tmp_path):
    mv.build_all(tmp_path)
    assert mv.compare(VECTORS, tmp_path) == []


@pytest.mark.parametrize("name", NAMES)
def test_encoder_from_committed_inputs(name):
    """Independent of torch's RNG: compressing the committed input gives the committed container."""
    v = BY_NAME[name]
    inputs = load_file(str(VECTORS / f"{name}.input.safetensors"))
    for tname, expr in v.inputs.items():  # the recipes still produce the committed inputs
        assert_identical(mv._evaluate(expr), inputs[tname], f"{name}:{tname} recipe")
    assert mv.compress_bytes(inputs, v.params) == (VECTORS / f"{name}.cpeft").read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_encoder_independent_of_thread_count(name):
    """The container must not depend on how many threads Numba uses (every machine writes the same bytes)."""
    v = BY_NAME[name]
    inputs = load_file(str(VECTORS / f"{name}.input.safetensors"))
    committed = (VECTORS / f"{name}.cpeft").read_bytes()
    before = numba.get_num_threads()
    try:
        for threads in range(1, numba.config.NUMBA_NUM_THREADS + 1):
            numba.set_num_threads(threads)
            blob = compeft.compress(inputs, **v.params).to_bytes()
            assert blob == committed, f"{name}: different bytes with {threads} Numba thread(s)"
    finally:
        numba.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# (b) decoder direction


@pytest.mark.parametrize("name", NAMES)
def test_decoder_matches_expected(name):
    path = VECTORS / f"{name}.cpeft"
    expert = compeft.open(path)
    expected = load_file(str(VECTORS / f"{name}.expected.safetensors"))
    inputs = load_file(str(VECTORS / f"{name}.input.safetensors"))
    assert expert.names == sorted(inputs) == sorted(expected)
    expert.verify()
    for tname in expert.names:
        got = expert.to_dense(tname)
        assert_identical(got, expected[tname], f"{name}:{tname}")
        assert tuple(got.shape) == tuple(inputs[tname].shape) and got.dtype == inputs[tname].dtype
    # state_dict and a second decode agree (nothing cached wrongly)
    for tname, t in expert.state_dict().items():
        assert_identical(t, expected[tname], f"{name}:{tname} (state_dict)")


def _kth_threshold(values: np.ndarray, density: float) -> float:
    """Reference ComPEFT: the rank-th smallest |v|, rank = d - floor(d * density) (0 keeps everything)."""
    d = values.size
    rank = d - math.floor(d * density)
    if rank == 0 or d == 0:
        return 0.0
    return float(np.sort(np.abs(values))[rank - 1])


@pytest.mark.parametrize("name", NAMES)
def test_expected_tensors_follow_compeft_semantics(name):
    """Recompute kept sets, signs and scales from the inputs with numpy (not compeft's selection)."""
    v = BY_NAME[name]
    expert = compeft.open(VECTORS / f"{name}.cpeft")
    meta = expert.metadata
    inputs = load_file(str(VECTORS / f"{name}.input.safetensors"))
    expected = load_file(str(VECTORS / f"{name}.expected.safetensors"))
    density, alpha, scope = v.params["density"], v.params.get("alpha", 1.0), v.params.get("scope", "global")
    assert (meta["density"], meta["alpha"], meta["scope"]) == (density, alpha, scope)
    assert meta["user"] == v.params.get("metadata", {})
    golomb = [n for n in expert.names if expert.entry(n).encoding in ("ternary-golomb", "ternary-golomb-packed")]
    flat = {n: inputs[n].float().reshape(-1).numpy() for n in golomb}
    if scope == "global":
        everything = np.concatenate([flat[n] for n in golomb]) if golomb else np.zeros(0, np.float32)
        threshold = _kth_threshold(everything, density)
        assert meta["threshold"] == threshold
        sigma = float(np.std(everything.astype(np.float64), ddof=1)) if everything.size > 1 else 0.0
        assert meta["sigma"] == pytest.approx(sigma, rel=1e-9, abs=1e-12)
    for n in expert.names:
        e, x, out = expert.entry(n), inputs[n], expected[n]
        if e.encoding == "dense":
            assert_identical(out, x, f"{name}:{n} dense")
            assert e.role == ("delta" if x.is_floating_point() else "value")
            continue
        values = flat[n]
        if scope == "tensor":
            threshold = _kth_threshold(values, density)
            sigma = float(np.std(values.astype(np.float64), ddof=1)) if values.size > 1 else 0.0
        assert e.scale == float(np.float32(e.scale))
        assert e.scale == pytest.approx(alpha * sigma, rel=1e-6, abs=1e-12)
        kept = (values != 0) & (np.abs(values) >= np.float32(threshold))
        assert e.nnz == int(kept.sum())
        magnitude = torch.tensor(e.scale, dtype=torch.float32).to(x.dtype)
        want = torch.zeros(x.numel(), dtype=x.dtype)
        idx = torch.from_numpy(np.flatnonzero(kept))
        negative = torch.from_numpy(values[kept] < 0)
        want[idx] = torch.where(negative, -magnitude, magnitude).to(x.dtype)
        assert_identical(out, want.reshape(x.shape), f"{name}:{n} semantics")


# ---------------------------------------------------------------------------------------------
# (c) invalid vectors


def test_invalid_table_matches_readme_and_files():
    listed = {row["file"] for row in INVALID_ROWS}
    on_disk = {p.name for p in INVALID.glob("*.cpeft")}
    assert listed == on_disk == set(INVALID_EXPECTED)
    for row in INVALID_ROWS:
        assert row["exception"] == INVALID_EXPECTED[row["file"]][0], row["file"]
        assert row["stage"] in ("open", "verify")
        assert hasattr(errors, row["exception"])
        assert row["rule"] and row["rule"][0] in "PHJDELVX"
        assert (VECTORS / row["source"]).is_file()
        assert row["edit"]


@pytest.mark.parametrize("row", INVALID_ROWS, ids=[r["file"] for r in INVALID_ROWS])
def test_invalid_vector_raises_exactly(row):
    path = INVALID / row["file"]
    cls = getattr(errors, row["exception"])
    fragment = INVALID_EXPECTED[row["file"]][1]

    def check(call):
        with pytest.raises(errors.CompeftError) as info:
            call()
        assert type(info.value) is cls, f"{row['file']}: {type(info.value).__name__}: {info.value}"
        assert str(path) in str(info.value)
        assert info.value.path == str(path)
        assert fragment in str(info.value)

    if row["stage"] == "open":
        check(lambda: compeft.open(path))
        return
    expert = compeft.open(path)
    check(expert.verify)
    if row["tensor"]:
        check(lambda: expert.to_dense(row["tensor"]))
        check(lambda: compeft.open(path).to_dense(row["tensor"]))


@pytest.mark.parametrize("spec", mv.INVALID, ids=[s.name for s in mv.INVALID])
def test_invalid_vector_is_the_documented_edit_of_its_source(spec):
    """Re-applying the edit to the committed valid vector gives the committed invalid file."""
    good = (VECTORS / f"{spec.source}.cpeft").read_bytes()
    edited, description = spec.edit(good)
    assert edited != good
    assert edited == (INVALID / f"{spec.name}.cpeft").read_bytes()
    row = next(r for r in INVALID_ROWS if r["file"] == f"{spec.name}.cpeft")
    assert row["edit"] == description.replace("|", "\\|")
    assert (row["source"], row["stage"], row["exception"], row["tensor"], row["rule"]) == (
        f"{spec.source}.cpeft", spec.stage, spec.error, spec.tensor, spec.rule)


# ---------------------------------------------------------------------------------------------
# (d) the vectors exercise what they claim


def _header(name):
    return compeft.open(VECTORS / f"{name}.cpeft")


def _is_pow2(m: int) -> bool:
    return m & (m - 1) == 0


def test_f32_global_header():
    ex = _header("f32_global")
    entries = [ex.entry(n) for n in ex.names]
    assert len(entries) >= 3 and all(e.dtype == "F32" and e.encoding == "ternary-golomb" for e in entries)
    assert len({e.scale for e in entries}) == 1
    assert {"threshold", "sigma"} <= set(ex.metadata)
    assert sum(e.nnz > 0 for e in entries) >= 3
    assert any(ord(c) > 127 for c in "".join(ex.metadata["user"].values()))


def test_bf16_fp16_tensor_scope_header():
    ex = _header("bf16_fp16_tensor_scope")
    entries = [ex.entry(n) for n in ex.names]
    assert {e.dtype for e in entries} == {"BF16", "F16"}
    assert ex.metadata["scope"] == "tensor" and ex.metadata["alpha"] == 2.5
    assert "threshold" not in ex.metadata
    assert len({e.scale for e in entries}) == len(entries)
    # the scale does not survive rounding to bf16/f16 exactly: decoding must round it
    assert any(float(torch.tensor(e.scale).to({"BF16": torch.bfloat16, "F16": torch.float16}[e.dtype]).float())
               != e.scale for e in entries)


def test_empty_and_scalar_header():
    ex = _header("empty_and_scalar")
    shapes = {n: ex.entry(n).shape for n in ex.names}
    assert () in shapes.values()
    assert any(0 in s for s in shapes.values())
    for n in ex.names:
        e = ex.entry(n)
        if e.numel == 0:
            assert e.nnz == 0 and e.length == 0 and e.crc32 == 0
    scalar = next(n for n, s in shapes.items() if s == ())
    assert ex.entry(scalar).nnz == 1


def test_nnz_zero_header():
    ex = _header("nnz_zero")
    entries = [ex.entry(n) for n in ex.names]
    zero = [e for e in entries if e.nnz == 0]
    assert len(zero) == 1 and zero[0].numel > 0
    assert zero[0].length == 0 and zero[0].crc32 == 0 and zero[0].n_chunks == 0 and zero[0].scale == 0.0
    assert any(e.nnz > 0 for e in entries)
    assert len({e.offset for e in entries}) == 1  # the empty payload takes no space


def test_density_one_header():
    ex = _header("density_one")
    inputs = load_file(str(VECTORS / "density_one.input.safetensors"))
    assert ex.metadata["density"] == 1.0 and ex.metadata["threshold"] == 0.0
    for n in ex.names:
        e = ex.entry(n)
        zeros = int((inputs[n] == 0).sum())
        assert zeros > 0 and e.nnz == e.numel - zeros


def test_dense_passthrough_header():
    ex = _header("dense_passthrough")
    encodings = {n: (ex.entry(n).encoding, ex.entry(n).role, ex.entry(n).dtype) for n in ex.names}
    assert ("dense", "value", "I64") in encodings.values()
    assert any(enc == "dense" and role == "delta" and dt in ("F32", "F16") for enc, role, dt in encodings.values())
    assert any(enc == "ternary-golomb" for enc, _, _ in encodings.values())
    # at least one payload is followed by alignment padding
    assert any(ex.entry(n).length % 8 for n in ex.names)


def test_small_chunks_header():
    ex = _header("small_chunks")
    e = ex.entry("w")
    assert e.chunk_size == 7
    assert e.n_chunks > 1 and e.nnz % e.chunk_size != 0
    assert not _is_pow2(e.golomb_m), e.golomb_m
    table = ex.payloads(["w"])["w"].table
    assert table.shape == (e.n_chunks, 3)
    assert (np.diff(table[:, 0]) > 0).all() and (table[1:, 1:] > 0).all()


def test_ties_at_threshold_header():
    ex = _header("ties_at_threshold")
    inputs = load_file(str(VECTORS / "ties_at_threshold.input.safetensors"))
    count = sum(t.numel() for t in inputs.values())
    density = ex.metadata["density"]
    untied = count - (count - math.floor(count * density)) + 1
    total = sum(ex.entry(n).nnz for n in ex.names)
    assert total > untied
    everything = torch.cat([t.float().reshape(-1) for t in inputs.values()]).abs()
    assert int((everything == ex.metadata["threshold"]).sum()) >= 10


def test_check_mode_passes():
    assert mv.main(["--check"]) == 0
