"""spec/FORMAT.md section 12 and spec/LIBRARY.md 3.4 as a conformance standard (issue 19).

- spec/vectors/manifest.json lists every vector with its outcome; our reader is run against it the
  way any other implementation would be (valid: decodes bit for bit; invalid: the exact class at
  the stated stage; the library and its invalid catalogs);
- the manifest, the rule tables of the two specs and the files agree with each other;
- each answer section 12 gives to a once-open question holds on both sides of its boundary, and the
  order of checks decides the class of a file that breaks two rules;
- the one JSON reader (compeft/format/json_limits.py) applies the same rules to headers and catalogs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import compeft
import compeft.errors as errors
from compeft.format import TensorEntry, check_payload
from compeft.format.header import MAX_NUMEL
from compeft.format.json_limits import JsonLimits, JsonRuleError, loads
from compeft.library.catalog import CATALOG_JSON, MAX_EXPERTS, parse_catalog
from conftest import load_tool

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text(encoding="utf-8"))
mv = load_tool("make_vectors")
surgery = load_tool("surgery")


def _rule_table(page: Path, start: str, end: str) -> dict[str, str]:
    """rule id -> error class, from a spec's conformance table ('J1–J6' expands to J1 … J6)."""
    text = page.read_text(encoding="utf-8")
    section = text[text.index(start):text.index(end)]
    rules = {}
    for rule, error in re.findall(r"^\| ([A-Z][0-9–A-Z]*) \|.*\| `(\w+)` \|$", section, re.M):
        first, _, last = rule.partition("–")
        if last:
            prefix = first[0]
            rules.update({f"{prefix}{i}": error for i in range(int(first[1:]), int(last[1:]) + 1)})
        else:
            rules[rule] = error
    return rules


FORMAT_RULES = _rule_table(ROOT / "spec" / "FORMAT.md", "## 12. Reader conformance", "## 13.")
LIBRARY_RULES = _rule_table(ROOT / "spec" / "LIBRARY.md", "### 3.4 Reader conformance", "## 4.")


def _bits(t: torch.Tensor) -> torch.Tensor:
    views = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}
    return t.contiguous().view(views[t.dtype]) if t.dtype in views else t


def _raises(cls: type, path: Path, call) -> errors.CompeftError:
    with pytest.raises(errors.CompeftError) as info:
        call()
    assert type(info.value) is cls, f"{path.name}: {type(info.value).__name__}: {info.value}"
    assert info.value.path == str(path) and str(path) in str(info.value)
    return info.value


# ---------------------------------------------------------------------------------------------
# the manifest, the spec tables and the files agree


def test_rule_tables_list_every_rule_once():
    assert {f"P{i}" for i in range(1, 10)} | {"H1", "H2"} | {f"J{i}" for i in range(1, 7)} \
        | {f"D{i}" for i in range(1, 8)} | {f"E{i}" for i in range(1, 14)} | {"L1", "L2", "L3"} \
        | {f"V{i}" for i in range(1, 6)} | {"X1"} == set(FORMAT_RULES)
    assert {f"C{i}" for i in range(1, 12)} == set(LIBRARY_RULES)
    assert set(FORMAT_RULES.values()) | set(LIBRARY_RULES.values()) <= {n for n in dir(errors) if n.endswith("Error")}


def test_manifest_lists_every_file_with_its_digest():
    listed = [item["file"] for item in MANIFEST["valid"] + MANIFEST["invalid"]]
    listed += [item["file"] for item in MANIFEST["library"]["experts"] + MANIFEST["library"]["invalid"]]
    assert len(listed) == len(set(listed))
    on_disk = {p.relative_to(VECTORS).as_posix() for p in VECTORS.rglob("*.cpeft")}
    on_disk |= {p.relative_to(VECTORS).as_posix() for p in (VECTORS / "library" / "invalid").glob("*.json")}
    assert set(listed) == on_disk
    for item in MANIFEST["valid"] + MANIFEST["invalid"] + MANIFEST["library"]["experts"] + MANIFEST["library"]["invalid"]:
        assert hashlib.sha256((VECTORS / item["file"]).read_bytes()).hexdigest() == item["sha256"], item["file"]
        if "expected" in item:
            assert (VECTORS / item["expected"]).is_file()
    assert set(MANIFEST["stages"]) == {"valid", "open", "verify", "open_library"}


def test_every_invalid_vector_raises_the_class_its_rule_has_in_the_spec():
    for item in MANIFEST["invalid"]:
        assert item["stage"] in ("open", "verify"), item["file"]
        assert FORMAT_RULES[item["rule"]] == item["error"], item["file"]
        assert (item["stage"] == "verify") == item["rule"].startswith("V"), item["file"]
    for item in MANIFEST["library"]["invalid"]:
        assert LIBRARY_RULES[item["rule"]] == item["error"], item["file"]


def test_each_rule_of_issue_19_has_a_vector():
    rules = {item["rule"] for item in MANIFEST["invalid"]}
    assert {"P1", "P2", "P5", "P7", "P8", "H1", "H2", "J4", "J5", "J6", "D2", "D3", "D5", "E3", "E4", "E6",
            "E12", "L1", "V3", "V4"} <= rules
    assert {"J5", "D5", "J2"} <= {item["rule"] for item in MANIFEST["valid"] if "rule" in item}
    assert {"C2", "C4", "C5"} <= {item["rule"] for item in MANIFEST["library"]["invalid"]}
    deflated = [item for item in MANIFEST["valid"] if item["file"] == "deflated_header.cpeft"]
    assert deflated and surgery.preamble((VECTORS / "deflated_header.cpeft").read_bytes()).flags == 0x0001


def test_worked_example_of_format_md_is_generated_from_its_vector():
    """Section 11 shows every byte of the vector worked_example (header included: its CRC can be
    checked from the page); make_vectors.py writes it, so it cannot drift from the bytes."""
    assert mv.format_md_problems(VECTORS) == []
    page = (ROOT / "spec" / "FORMAT.md").read_text(encoding="utf-8")
    section = page[page.index(mv.EXAMPLE_BEGIN):page.index(mv.EXAMPLE_END)]
    blob = (VECTORS / "worked_example.cpeft").read_bytes()
    text = re.search(r"```json\n(.*)\n```", section).group(1).encode()
    pre = surgery.preamble(blob)
    padded = text + b" " * (pre.header_length - len(text))
    assert zlib.crc32(padded) == pre.header_crc and f"{pre.header_crc:#010x}" in section
    dumped = bytes.fromhex("".join(line[10:58] for line in section.splitlines() if re.match(r"^[0-9a-f]{8}  ", line)))
    assert dumped == blob


# ---------------------------------------------------------------------------------------------
# our reader against the manifest


@pytest.mark.parametrize("item", MANIFEST["valid"], ids=[i["file"] for i in MANIFEST["valid"]])
def test_manifest_valid(item):
    expert = compeft.open(VECTORS / item["file"])
    expert.verify()
    expected = load_file(str(VECTORS / item["expected"]))
    got = expert.state_dict()
    assert sorted(got) == sorted(expected)
    for name, tensor in got.items():
        want = expected[name]
        assert (tensor.dtype, tensor.shape) == (want.dtype, want.shape), name
        assert torch.equal(_bits(tensor), _bits(want)), name


@pytest.mark.parametrize("item", MANIFEST["invalid"], ids=[i["file"] for i in MANIFEST["invalid"]])
def test_manifest_invalid(item):
    path = VECTORS / item["file"]
    cls = getattr(errors, item["error"])
    if item["stage"] == "open":
        _raises(cls, path, lambda: compeft.open(path))
        return
    expert = compeft.open(path)
    _raises(cls, path, expert.verify)
    if item["tensor"]:
        _raises(cls, path, lambda: compeft.open(path).to_dense(item["tensor"]))


def test_manifest_library():
    library = MANIFEST["library"]
    opened = compeft.open_library(VECTORS / library["root"])
    assert sorted(opened) == sorted(e["name"] for e in library["experts"])
    for item in library["experts"]:
        expected = load_file(str(VECTORS / item["expected"]))
        got = opened[item["name"]].state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(_bits(got[k]), _bits(expected[k])) for k in got)
    for item in library["invalid"]:
        path = VECTORS / item["file"]
        _raises(getattr(errors, item["error"]), path, lambda: compeft.open_library(path))


# ---------------------------------------------------------------------------------------------
# the answers of section 12, on both sides of each boundary


def golomb_entry(name: str, shape: list[int], **fields) -> dict:
    entry = {"name": name, "dtype": "F32", "shape": shape, "encoding": "ternary-golomb", "role": "delta",
             "init": None, "offset": 0, "length": 0, "crc32": 0, "nnz": 0, "scale": 0.5, "golomb_m": 1,
             "chunk_size": 16384, "unary_bits": 0, "high_bits": 0}
    entry.update(fields)
    return entry


def header(tensors: list[dict] | None = None, **metadata) -> dict:
    return {"format": "compeft", "format_version": 1, "metadata": {"density": 0.1, **metadata},
            "tensors": [golomb_entry("w", [4])] if tensors is None else tensors}


def write(tmp_path: Path, raw: bytes) -> Path:
    path = tmp_path / "case.cpeft"
    path.write_bytes(raw)
    return path


def opens(tmp_path: Path, raw: bytes) -> compeft.CompressedExpert:
    expert = compeft.open(write(tmp_path, raw))
    expert.verify()
    return expert


def rejects(tmp_path: Path, raw: bytes, cls: type, fragment: str = "") -> None:
    path = write(tmp_path, raw)
    err = _raises(cls, path, lambda: compeft.open(path).verify())
    assert fragment in str(err), str(err)


def with_text(container, doc: dict, old: bytes, new: bytes) -> bytes:
    text = container.encode_text(doc)
    assert text.count(old) == 1, old
    return container.build(text=text.replace(old, new))


def test_j5_nesting_counts_from_the_header_object(tmp_path, container):
    def nested(levels: int) -> list:
        value: list = []
        for _ in range(levels - 1):
            value = [value]
        return value

    opens(tmp_path, container.build(header(extra=nested(62))))  # 1 header + 1 metadata + 62 = 64
    rejects(tmp_path, container.build(header(extra=nested(63))), errors.HeaderError, "deeper than 64")
    entry = golomb_entry("w", [4], note=nested(61))  # 1 header + 1 tensors + 1 entry + 61 = 64
    opens(tmp_path, container.build(header([entry])))
    entry["note"] = nested(62)
    rejects(tmp_path, container.build(header([entry])), errors.HeaderError, "deeper than 64")


@pytest.mark.parametrize("number,ok", [
    (b"1" + b"0" * 308, True), (b"2" + b"0" * 308, False), (b"-2" + b"0" * 308, False), (b"9" * 400, False),
    (b"1.7976931348623157e308", True), (b"1.7976931348623159e308", False), (b"1e999", False), (b"5e-400", True),
])
def test_j4_every_number_must_be_a_finite_double(tmp_path, container, number, ok):
    assert ok == math.isfinite(float(number.decode()))  # the rule is exactly IEEE-754 rounding
    raw = with_text(container, header(extra=0), b'"extra":0', b'"extra":' + number)
    if ok:
        opens(tmp_path, raw)
    else:
        rejects(tmp_path, raw, errors.HeaderError, 'after "extra") overflows a double')


def test_j4_minus_zero_is_a_double_not_an_integer():
    doc = loads(b'{"a": -0, "b": 0, "c": -0.0, "d": [-0]}', CATALOG_JSON)
    assert type(doc["a"]) is float and math.copysign(1.0, doc["a"]) < 0
    assert type(doc["b"]) is int and type(doc["d"][0]) is float


@pytest.mark.parametrize("text,ok", [
    (b'{"a": "\\ud83d\\ude00"}', True),  # a surrogate pair is one character
    (b'{"a": "\\\\ud800"}', True),  # an escaped backslash, then plain text
    (b'{"a": "\\ud800"}', False), (b'{"a": "x\\uDFFFy"}', False), (b'{"\\udc00": 1}', False),
    (b'{"a": ["\\ud83d"]}', False), (b'{"a": "\\ude00\\ud83d"}', False),
])
def test_j6_strings_are_unicode_text(text, ok):
    limits = JsonLimits(max_bytes=1 << 20, max_containers=100)
    if ok:
        loads(text, limits)
    else:
        with pytest.raises(JsonRuleError, match="lone surrogate"):
            loads(text, limits)


@pytest.mark.parametrize("text,ok", [
    (b' \t\r\n{"a": 1}\n ', True), (b'\xef\xbb\xbf{"a": 1}', False), (b'{"a": 1} {"b": 2}', False),
    (b'{"a": "\xed\xa0\x80"}', False), (b'{"a": "\xc0\xaf"}', False), (b'{"a": "\x01"}', False),
])
def test_j2_utf8_and_one_json_value(text, ok):
    limits = JsonLimits(max_bytes=1 << 20, max_containers=100)
    if ok:
        assert loads(text, limits) == {"a": 1}
    else:
        with pytest.raises(JsonRuleError, match="not valid UTF-8 JSON"):
            loads(text, limits)


def test_j1_values_are_counted_where_limited():
    limits = JsonLimits(max_bytes=1 << 20, max_containers=4, max_values=7)
    # 7 values (the array, 1, the string, [], {}, [""], ""; keys do not count) and 4 containers:
    # commas and brackets inside strings count for nothing
    assert loads(b'[1, "a,b,c,[d],{e}", [], {"k": [""]}]', limits)
    with pytest.raises(JsonRuleError, match="more than 7 JSON values"):
        loads(b"[1, 2, 3, 4, 5, 6, 7]", limits)
    with pytest.raises(JsonRuleError, match="more than 4 JSON objects and arrays"):
        loads(b"[[], [], [], []]", limits)


@pytest.mark.parametrize("value,cls", [
    (1, None), (2, None), (3, errors.UnsupportedVersionError), (0, errors.UnsupportedVersionError),
    (1.0, errors.HeaderError), (True, errors.HeaderError), ("1", errors.HeaderError), (None, errors.HeaderError),
    ("absent", errors.HeaderError),
])
def test_d2_d3_format_version_is_an_integer(tmp_path, container, value, cls):
    doc = header()
    if value == "absent":
        del doc["format_version"]
    else:
        doc["format_version"] = value
    if cls is None:
        opens(tmp_path, container.build(doc))
    else:
        rejects(tmp_path, container.build(doc), cls, "format_version")


@pytest.mark.parametrize("key,value,ok", [
    ("created_by", None, False), ("created_by", "someone", True), ("scope", None, False), ("source", None, False),
    ("density", None, False), ("user", None, False), ("sigma", None, False), ("alpha", None, True),
    ("base_fingerprint", None, True), ("adapter_config", None, True), ("alpha", -0.0, True),
    ("alpha_rule", 7, True), ("tuning", [], True), ("build", "x", True), ("fidelity", 1, True),
    ("model_files", None, True), ("unknown", {"a": [1]}, True),
])
def test_d5_metadata_keys_are_typed_when_present(tmp_path, container, key, value, ok):
    raw = container.build(header(**{key: value}))
    if ok:
        opens(tmp_path, raw)
    else:
        rejects(tmp_path, raw, errors.HeaderError, f"metadata {key} must be")


@pytest.mark.parametrize("encoding,key", [("ternary-golomb", k) for k in (
    "name", "dtype", "shape", "encoding", "role", "init", "offset", "length", "crc32", "nnz", "scale", "golomb_m",
    "chunk_size", "unary_bits", "high_bits")] + [("dense", k) for k in ("init", "role", "crc32")])
def test_e4_every_key_of_the_encoding_is_required(tmp_path, container, encoding, key):
    entry = golomb_entry("w", [4]) if encoding == "ternary-golomb" else {
        "name": "w", "dtype": "I8", "shape": [0], "encoding": "dense", "role": "value", "init": None,
        "offset": 0, "length": 0, "crc32": 0}
    opens(tmp_path, container.build(header([entry])))
    del entry[key]
    rejects(tmp_path, container.build(header([entry])), errors.HeaderError)


def test_e4_a_dense_entry_needs_no_golomb_key(tmp_path, container):
    entry = {"name": "b", "dtype": "BOOL", "shape": [2], "encoding": "dense", "role": "value", "init": None,
             "offset": 0, "length": 2, "crc32": zlib.crc32(b"\x01\x00")}
    expert = opens(tmp_path, container.build(header([entry]), b"\x01\x00" + bytes(6)))
    assert expert.to_dense("b").tolist() == [True, False]


@pytest.mark.parametrize("shape,ok", [
    ([0, 2 ** 48], True), ([0, 2 ** 24, 2 ** 24], True), ([2 ** 24, 0, 2 ** 24, 1], True), ([0, 2 ** 48, 2], False),
    ([0, 2 ** 48, 2 ** 48], False), ([0, 0, 2 ** 48 + 1], False),
])
def test_e6_every_accepted_shape_is_allocatable(tmp_path, container, shape, ok):
    raw = container.build(header([golomb_entry("w", shape)]))
    if not ok:
        rejects(tmp_path, raw, errors.HeaderError)
        return
    expert = opens(tmp_path, raw)
    assert math.prod(d for d in shape if d) <= MAX_NUMEL
    out = expert.to_dense("w")  # torch can hold it: no stride overflows
    assert tuple(out.shape) == tuple(shape) and out.numel() == 0


@pytest.mark.parametrize("text,ok", [(b"0", True), (b"0.0", True), (b"0.5", True), (b"-0.0", False), (b"-0", False),
                                     (b"-0e0", False), (b"-0.5", False)])
def test_e12_the_scale_has_its_sign_bit_clear(tmp_path, container, text, ok):
    raw = with_text(container, header(), b'"scale":0.5', b'"scale":' + text)
    if ok:
        opens(tmp_path, raw)
    else:
        rejects(tmp_path, raw, errors.HeaderError, "scale")


def test_e3_an_unknown_encoding_is_checked_before_the_fields_it_defines(tmp_path, container):
    entry = {"name": "w", "encoding": "ternary-zstd", "dtype": ["not", "a", "dtype"], "future_field": 1}
    rejects(tmp_path, container.build(header([entry])), errors.UnsupportedVersionError, "ternary-zstd")
    entry["encoding"] = 7
    rejects(tmp_path, container.build(header([entry])), errors.HeaderError, "encoding must be a string")


@pytest.mark.parametrize("name", ["w\x00", "w\x1b[31m", "w\u202e", "\U0001f600", "é" * 512])
def test_names_are_any_unicode_text(tmp_path, container, name):
    assert opens(tmp_path, container.build(header([golomb_entry(name, [4])]))).names == [name]


def test_l1_unsorted_names_are_a_header_error_not_a_layout_error(tmp_path, container):
    raw = container.build(header([golomb_entry("b", [4]), golomb_entry("a", [4])]))
    rejects(tmp_path, raw, errors.HeaderError, "unique and sorted")


def test_v3_check_payload_refuses_bool_bytes_other_than_0_and_1():
    def entry(data: bytes, dtype: str = "BOOL") -> TensorEntry:
        return TensorEntry("m", dtype, (len(data),), "dense", "value", 0, len(data), zlib.crc32(data))

    check_payload(entry(b"\x00\x01\x01"), memoryview(b"\x00\x01\x01"), "f")
    check_payload(entry(b"\x02", "U8"), b"\x02", "f")  # other dtypes: every byte is a value
    with pytest.raises(errors.CorruptPayloadError, match="BOOL element 2 is the byte 0xff"):
        check_payload(entry(b"\x00\x01\xff"), b"\x00\x01\xff", "f")
    with pytest.raises(errors.ChecksumError):  # the CRC comes first
        check_payload(entry(b"\x00"), b"\x02", "f")


# ---------------------------------------------------------------------------------------------
# the order of checks: the first rule broken decides the class


def test_order_of_checks(tmp_path, container):
    good = container.build(header())
    pre = surgery.preamble(good)
    # P5 (reserved) before P7 (alignment) before P9 (size)
    rejects(tmp_path, surgery.with_preamble(good, reserved=1, header_length=pre.header_length - 8),
            errors.UnsupportedVersionError)
    rejects(tmp_path, surgery.with_preamble(good, header_length=pre.header_length - 8) + b"\0",
            errors.LayoutError)
    # P8 (file_length < 32 + H) before P9 (the real size)
    rejects(tmp_path, surgery.with_preamble(good, file_length=40), errors.LayoutError)
    # H1 (header CRC) before the JSON
    rejects(tmp_path, container.build(text=b"{not json", header_crc=0), errors.HeaderError, "checksum")
    # D3 (format_version) before L1 (names)
    doc = header([golomb_entry("b", [4]), golomb_entry("a", [4])])
    doc["format_version"] = 3
    rejects(tmp_path, container.build(doc), errors.UnsupportedVersionError)
    # D7 (the two versions differ) before L1
    doc["format_version"] = 2
    rejects(tmp_path, container.build(doc, version=1), errors.HeaderError, "differs from the preamble")
    # every entry's fields (E3 in the second entry) before the order of the names (L1)
    doc = header([golomb_entry("b", [4]), golomb_entry("a", [4], encoding="later")])
    rejects(tmp_path, container.build(doc), errors.UnsupportedVersionError)


# ---------------------------------------------------------------------------------------------
# the same JSON reader for catalogs, with the catalog's limits


def test_catalog_json_limits_refuse_container_bombs():
    """3.4 MB of "{}," would cost ~100 MB to parse; 256 MiB of it ~7 GB: refused before parsing."""
    head = b'{"format": "compeft-library", "format_version": 1, "experts": [], "x": ['
    bomb = head + b"{}," * (MAX_EXPERTS + 65536) + b"{}]}"
    with pytest.raises(errors.CatalogError, match="JSON objects and arrays"):
        parse_catalog(bomb, "catalog.json")
    parse_catalog(head + b"{}," * 1000 + b"{}]}", "catalog.json")  # unknown keys are fine within the limits


def test_catalog_limits_are_the_documented_ones():
    page = (ROOT / "spec" / "LIBRARY.md").read_text(encoding="utf-8")
    assert (CATALOG_JSON.max_containers, CATALOG_JSON.max_values, CATALOG_JSON.max_depth) == (
        2 ** 20 + 65536, 24 * 2 ** 20 + 65536, 64)
    assert "1 114 112" in page and "25 231 360" in page and f"{CATALOG_JSON.max_bytes:,}".replace(",", " ") in page


@pytest.mark.parametrize("text,fragment", [
    (b'{"format": "compeft-library", "format_version": true, "experts": []}', "must be an integer"),
    (b'{"format": "compeft-library", "experts": []}', "must be an integer"),
    (b'{"format": "compeft-library", "format_version": 1, "experts": [], "n": ' + b"9" * 310 + b"}", "overflows"),
    (b'{"format": "compeft-library", "format_version": 1, "experts": [], "s": "\\udfff"}', "lone surrogate"),
])
def test_catalog_json_rules(text, fragment):
    with pytest.raises(errors.CatalogError, match=fragment) as info:
        parse_catalog(text, "catalog.json")
    assert type(info.value) is errors.CatalogError
