"""Every size threshold crossed: each code path that works in groups, chunks, parts or pages runs
with more than one of them (thresholds shrunk by monkeypatch where they are module constants, real
ones where that is cheap) and must give exactly what it gives with one.

Thresholds: merge groups (``merging.GROUP_PARAMETERS``, ``GPU_GROUP_PARAMETERS``), chunks of the
code (``golomb.DEFAULT_CHUNK_SIZE`` and ``chunk_size``), remote parts (``remote.PART_SIZE``), the
coalescing of nearby payloads (``expert._GAP``, ``expert._MAX_READ``), the in-memory budget of a
remote reader (``memory_budget``), the header's deflate threshold (``header.DEFLATE_ABOVE``), the
first read at open (``io.FIRST_READ``), the block of whole-file copies (``expert._COPY_BLOCK``) and
the limits on a fine-tune's recorded JSON files (``sources.MODEL_FILE_LIMIT``, ``MODEL_FILES_LIMIT``).
"""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import compeft
from compeft import merging
from compeft.export import merge_to
from compeft.codec import golomb
from compeft.errors import ChecksumError
from compeft.expert import CompressedExpert
from compeft.format import FileReader
from compeft.format.header import DEFLATE_ABOVE, FLAG_DEFLATE, PREAMBLE, PREAMBLE_SIZE
from conftest import apply_reference, load_tool, same_bits

sys.path.insert(0, str(Path(__file__).parent))

DEFAULT_GROUP = merging.GROUP_PARAMETERS
# name -> (shape, dtype); a.weight (1200) is larger than most shrunk groups, g.dense is a delta kept dense
SHAPES: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "a.weight": ((40, 30), torch.float32), "b.weight": ((250,), torch.bfloat16), "c.bias": ((90,), torch.float16),
    "d.weight": ((20, 20), torch.bfloat16), "e.weight": ((700,), torch.float32), "f.weight": ((3,), torch.float32),
    "g.dense": ((64,), torch.float32),
}
SHARDS = {"model-1.safetensors": ["a.weight", "b.weight", "c.bias"], "model-2.safetensors": ["d.weight", "e.weight"],
          "model-3.safetensors": ["f.weight", "g.dense"]}
GROUP_SIZES = [1, 300, 1199, 1200]  # every tensor alone; several per group; a.weight just over / exactly a group
MERGES = [("linear", 0.0), ("task_arithmetic", 0.0), ("ties", 0.0), ("dare_linear", 0.3), ("dare_ties", 0.3)]


def tensors(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(shape, generator=g) * scale).to(dtype) for n, (shape, dtype) in SHAPES.items()}


def make_expert(seed: int, chunk_size: int = 16) -> CompressedExpert:
    return compeft.compress(tensors(seed, 0.01), density=0.3, alpha=1.0, scope="tensor", chunk_size=chunk_size,
                            keep_dense=["g.*"])


def options(method: str, drop_rate: float) -> dict[str, Any]:
    return dict(method=method, weights=[1.0, 0.5, 2.0], lam=0.9, drop_rate=drop_rate, seed=3)


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert same_bits(got[name], want[name]), name


@pytest.fixture(scope="module")
def experts() -> list[CompressedExpert]:
    out = [make_expert(10 + i) for i in range(3)]
    assert all(out[0].entry(n).n_chunks > 1 for n in ("a.weight", "e.weight"))  # several chunks per tensor too
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base model in three shards (with an index); the first shard holds three tensors."""
    directory = tmp_path_factory.mktemp("boundaries") / "base"
    directory.mkdir()
    base = tensors(1)
    weight_map = {}
    for shard, names in SHARDS.items():
        save_file({n: base[n] for n in names}, str(directory / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in names})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text("{}")
    return directory


@pytest.fixture(scope="module")
def unshrunk(experts: list[CompressedExpert], base_dir: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, Any]:
    """Every merge with the default group size (one group): in memory, into a state dict, onto the base."""
    assert merging.GROUP_PARAMETERS == DEFAULT_GROUP  # computed before any test shrinks it
    assert len(merging.tensor_groups(experts[0], experts[0].names, DEFAULT_GROUP)) == 1
    root = tmp_path_factory.mktemp("unshrunk")
    out: dict[str, Any] = {}
    for method, drop in MERGES:
        state = tensors(1)
        compeft.merge(experts, into=state, **options(method, drop))
        onto = merge_to(experts, root / method, base=base_dir, **options(method, drop))
        out[method] = {"merge": dict(compeft.merge(experts, **options(method, drop))), "into": state,
                       "onto": {s: load_file(str(onto / s)) for s in SHARDS}}
    return out


# ---------------------------------------------------------------------------------------------
# merge groups


@pytest.mark.parametrize("small_groups", GROUP_SIZES, indirect=True)
@pytest.mark.parametrize("method, drop", MERGES)
def test_merge_in_many_groups_is_bit_identical(unshrunk, experts, small_groups, method, drop):
    assert len(merging.tensor_groups(experts[0], experts[0].names, merging.GROUP_PARAMETERS)) > 1
    got = compeft.merge(experts, **options(method, drop))
    assert_same_state(dict(got), unshrunk[method]["merge"])


@pytest.mark.parametrize("small_groups", GROUP_SIZES, indirect=True)
@pytest.mark.parametrize("method, drop", MERGES)
def test_merge_into_a_state_dict_in_many_groups(unshrunk, experts, small_groups, method, drop):
    state = tensors(1)
    result = compeft.merge(experts, into=state, **options(method, drop))
    assert len(result) == 0
    assert_same_state(state, unshrunk[method]["into"])
    # and that is base + the merged τ, rounded once to each weight's dtype
    merged = unshrunk[method]["merge"]
    assert_same_state(state, {n: (w.float() + merged[n]).to(w.dtype) for n, w in tensors(1).items()})


@pytest.mark.parametrize("small_groups", GROUP_SIZES, indirect=True)
@pytest.mark.parametrize("method, drop", MERGES)
def test_merge_onto_a_sharded_base_in_many_groups(unshrunk, experts, base_dir, tmp_path, small_groups, method, drop):
    """A shard holding several merge groups (the shipped crash: the second group of a shard)."""
    first = SHARDS["model-1.safetensors"]
    assert len(merging.tensor_groups(experts[0], first, merging.GROUP_PARAMETERS)) > 1
    out = merge_to(experts, tmp_path / "merged", base=base_dir, **options(method, drop))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base_dir.iterdir())
    for shard in SHARDS:
        assert_same_state(load_file(str(out / shard)), unshrunk[method]["onto"][shard])



@pytest.mark.parametrize("part", [1, 300, 1199, 1200, 1 << 22])  # every tensor alone; several per part; default
def test_shards_written_in_parts_are_byte_identical(unshrunk, experts, base_dir, tmp_path, monkeypatch, part):
    """onto_base streams each shard a part at a time (export.SHARD_PART_PARAMETERS): decompress,
    flag merges and config merges write the same bytes for any part size."""
    from compeft import export
    from compeft.merge_run import merge_from_config

    def outputs(root: Path) -> dict[str, bytes]:
        compeft.decompress(experts[0], root / "restored", base=base_dir)
        merge_to(experts, root / "merged", base=base_dir, **options("ties", 0.0))
        merge_from_config({"merge_method": "ties", "base_model": str(base_dir), "dtype": "float32",
                           "parameters": {"density": 1.0, "normalize": True},
                           "models": [{"model": e.path, "parameters": {"weight": w}}
                                      for e, w in zip(experts, (1.0, 0.5, 2.0))]}, root / "config")
        return {f"{d}/{s}": (root / d / s).read_bytes() for d in ("restored", "merged", "config") for s in SHARDS}

    saved = {}
    for i, e in enumerate(experts):
        saved[i] = tmp_path / f"e{i}.cpeft"
        e.save(saved[i])
    experts = [compeft.open(saved[i]) for i in range(len(experts))]
    want = outputs(tmp_path / "one-part")  # each shard in one part (shards here are far below 2**22)
    monkeypatch.setattr(export, "SHARD_PART_PARAMETERS", part)
    got = outputs(tmp_path / "parts")
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == want[key], key
    merged = load_file(str(tmp_path / "parts" / "merged" / "model-1.safetensors"))
    assert_same_state(merged, unshrunk["ties"]["onto"]["model-1.safetensors"])

def test_merge_with_a_corrupt_later_group_writes_nothing(experts, tmp_path, small_groups):
    """into= over several groups: every group is checked before the first is written."""
    broken = bytearray(experts[1].to_bytes())
    e = experts[1].entry("e.weight")  # in a later group than a.weight
    broken[experts[1].header.data_start + e.offset + e.length - 9] ^= 0x10
    path = tmp_path / "broken.cpeft"
    path.write_bytes(bytes(broken))
    state = tensors(1)
    before = {n: t.clone() for n, t in state.items()}
    assert len(merging.tensor_groups(experts[0], experts[0].names, merging.GROUP_PARAMETERS)) > 2
    with pytest.raises(ChecksumError):
        compeft.merge([experts[0], compeft.open(path), experts[2]], into=state, method="ties")
    assert_same_state(state, before)


def test_gpu_merge_in_many_groups_matches_cpu(unshrunk, experts, small_groups):
    """The Triton kernels (Triton's CPU interpreter without a GPU) over several device groups."""
    pytest.importorskip("triton")
    from compeft.gpu import interpreted

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not interpreted():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    assert len(merging.tensor_groups(experts[0], experts[0].names, merging.GPU_GROUP_PARAMETERS)) > 1
    start = time.monotonic()
    for method, drop in (("dare_ties", 0.3),):
        got = compeft.merge(experts, device=device, **options(method, drop))
        assert_same_state({n: t.cpu() for n, t in got.items()}, unshrunk[method]["merge"])
    assert time.monotonic() - start < 60


# ---------------------------------------------------------------------------------------------
# chunks of the code


@pytest.fixture(scope="module")
def by_chunks() -> dict[int, CompressedExpert]:
    """One task vector compressed with one chunk per tensor, a few, and one entry per chunk."""
    out = {size: compeft.compress(tensors(20, 0.01), density=0.3, alpha=1.0, scope="tensor", chunk_size=size,
                                  keep_dense=["g.*"]) for size in (1 << 20, 16, 1)}
    for name in ("a.weight", "e.weight"):
        assert [out[s].entry(name).n_chunks for s in (1 << 20, 16)] == [1, -(-out[16].entry(name).nnz // 16)]
        assert out[1].entry(name).n_chunks == out[1].entry(name).nnz > 16
    return out


def test_decode_is_the_same_for_any_chunk_count(by_chunks):
    want = by_chunks[1 << 20].state_dict()
    for size in (16, 1):
        assert_same_state(by_chunks[size].state_dict(), want)


@pytest.mark.parametrize("scale", [1.0, -0.7])
def test_apply_and_restore_for_any_chunk_count(by_chunks, scale):
    one = by_chunks[1 << 20]
    want = {n: apply_reference(w, one.to_dense(n), scale) if one.entry(n).role == "delta" else w
            for n, w in tensors(2).items()}
    for size, expert in by_chunks.items():
        state = tensors(2)
        undo = compeft.apply(expert, state, scale=scale, restorable=True)
        assert_same_state(state, want)
        undo.restore()
        assert_same_state(state, tensors(2))


def test_decompress_onto_a_sharded_base_for_any_chunk_count(by_chunks, base_dir, tmp_path):
    base = tensors(1)
    one = by_chunks[1 << 20]
    for size, expert in by_chunks.items():
        out = compeft.decompress(expert, tmp_path / f"restored-{size}", base=base_dir)
        for shard, names in SHARDS.items():
            got = load_file(str(out / shard))
            assert sorted(got) == sorted(names)
            for name in names:
                assert same_bits(got[name], apply_reference(base[name], one.to_dense(name))), (size, name)


def test_merge_for_any_chunk_count(by_chunks, small_groups):
    pairs = {size: [e, by_chunks[1 << 20]] for size, e in by_chunks.items()}
    want = compeft.merge(pairs[1 << 20], method="dare_ties", drop_rate=0.3, seed=1)
    for size, pair in pairs.items():
        assert_same_state(dict(compeft.merge(pair, method="dare_ties", drop_rate=0.3, seed=1)), dict(want))


@pytest.mark.parametrize("nnz, chunks", [(golomb.DEFAULT_CHUNK_SIZE, 1), (golomb.DEFAULT_CHUNK_SIZE + 1, 2),
                                         (3 * golomb.DEFAULT_CHUNK_SIZE, 3)])
def test_default_chunk_size_boundary(nnz, chunks):
    """Kept entries exactly filling one default chunk, one more, and three full chunks."""
    g = torch.Generator().manual_seed(nnz)
    tau = torch.randn(nnz, generator=g)
    tau[tau == 0] = 1.0
    expert = compeft.compress({"w": tau}, density=1.0, alpha=1.0)  # density 1 keeps every non-zero entry
    e = expert.entry("w")
    assert (e.nnz, e.chunk_size, e.n_chunks) == (nnz, golomb.DEFAULT_CHUNK_SIZE, chunks)
    dense = expert.to_dense("w")
    magnitude = torch.tensor(e.scale, dtype=torch.float32)
    assert torch.equal(dense, torch.where(tau > 0, magnitude, -magnitude))
    weights = {"w": torch.zeros(nnz, dtype=torch.bfloat16)}
    compeft.apply(expert, weights)
    assert same_bits(weights["w"], dense.to(torch.bfloat16))
    assert torch.equal(compeft.merge([expert, expert], method="ties")["w"], dense)


surgery = load_tool("surgery")


# ---------------------------------------------------------------------------------------------
# the header: deflated above 2 KiB; read in one first read when it fits


def header_of(expert: CompressedExpert) -> tuple[int, bytes]:
    """(flags, plain JSON text) of an expert's header."""
    blob = expert.to_bytes()
    _, _, flags, length, *_ = PREAMBLE.unpack(blob[:PREAMBLE_SIZE])
    region = blob[PREAMBLE_SIZE:PREAMBLE_SIZE + length]
    return flags, surgery.header_text(blob)  # (inflated with version 2's preset dictionary)


def padded(n: int) -> CompressedExpert:
    return compeft.compress({"w": torch.linspace(-1, 1, 64)}, density=0.5, alpha=1.0, metadata={"pad": "x" * n})


@pytest.mark.parametrize("over", [-1, 0, 1, 2])
def test_header_just_below_and_above_the_deflate_threshold(over, tmp_path):
    flags, text = header_of(padded(100))
    assert flags == 0
    n = 100 + DEFLATE_ABOVE - len(text) + over
    expert = padded(n)
    flags, text = header_of(expert)
    assert len(text) == DEFLATE_ABOVE + over
    assert flags == (FLAG_DEFLATE if over > 0 else 0)
    expert.save(tmp_path / "e.cpeft")
    reopened = compeft.open(tmp_path / "e.cpeft")
    reopened.verify()
    assert reopened.metadata["user"]["pad"] == "x" * n
    assert torch.equal(reopened.to_dense("w"), expert.to_dense("w"))


class ReadCounter:
    """Counts FileReader.read calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = FileReader.read
        counter = self

        def read(self: FileReader, offset: int, length: int) -> bytes:
            counter.calls += 1
            return real(self, offset, length)

        monkeypatch.setattr(FileReader, "read", read)


@pytest.mark.parametrize("deflated", [False, True])
@pytest.mark.parametrize("shift, reads", [(0, 1), (64, 1), (-1, 2)])
def test_first_read_just_holds_the_header_or_not(deflated, shift, reads, tmp_path, monkeypatch):
    from compeft.format import io

    expert = padded(DEFLATE_ABOVE + 10 if deflated else 100)
    path = tmp_path / "e.cpeft"
    expert.save(path)
    data_start = compeft.open(path).header.data_start
    assert struct.unpack_from("<H", path.read_bytes(), 10)[0] == (FLAG_DEFLATE if deflated else 0)
    monkeypatch.setattr(io, "FIRST_READ", data_start + shift)
    counter = ReadCounter(monkeypatch)
    opened = compeft.open(path)
    assert counter.calls == reads
    assert opened.metadata == expert.metadata
    assert torch.equal(opened.to_dense("w"), expert.to_dense("w"))


# ---------------------------------------------------------------------------------------------
# whole-file copies in blocks


def test_save_and_to_bytes_in_many_blocks(experts, tmp_path, monkeypatch):
    from compeft import expert as expert_module

    path = tmp_path / "e.cpeft"
    experts[0].save(path)
    original = path.read_bytes()
    monkeypatch.setattr(expert_module, "_COPY_BLOCK", 100)
    assert len(original) > 3 * 100 and len(original) % 100
    opened = compeft.open(path)  # blocks read from the file
    assert opened.to_bytes() == original
    opened.save(tmp_path / "copy.cpeft")
    assert (tmp_path / "copy.cpeft").read_bytes() == original


# ---------------------------------------------------------------------------------------------
# a fine-tune's JSON files: per-file and total limits


def test_model_file_limits(tmp_path, monkeypatch):
    from compeft import sources

    monkeypatch.setattr(sources, "MODEL_FILE_LIMIT", 100)
    monkeypatch.setattr(sources, "MODEL_FILES_LIMIT", 250)
    (tmp_path / "a.json").write_text("x" * 100)  # exactly the per-file limit: kept
    (tmp_path / "b.json").write_text("y" * 101)  # one byte over: left to the base
    (tmp_path / "c.json").write_text("z" * 100)  # 200 in all: kept
    (tmp_path / "d.json").write_text("w" * 51)  # 251 in all: over the total, not recorded
    (tmp_path / "e.json").write_text("v" * 10)
    files = sources.model_files(tmp_path)
    assert sorted(files) == ["a.json", "c.json"]
    assert files["a.json"] == "x" * 100


# ---------------------------------------------------------------------------------------------
# remote reads: real 4 MiB parts, coalesced ranges, the memory budget


@pytest.fixture
def http():
    pytest.importorskip("aiohttp", reason="the HTTP file system of fsspec needs aiohttp (compeft[remote])")
    from servers import object_server

    with object_server() as server:
        yield server


def test_a_payload_of_several_real_parts(http):
    """A 10 MB dense tensor: three parts of the real PART_SIZE (4 MiB), fetched and joined exactly."""
    from compeft import remote

    g = torch.Generator().manual_seed(5)
    tv = {"big": torch.randn(2_500_000, generator=g), "small": torch.randn(100, generator=g)}
    expert = compeft.compress(tv, density=0.5, alpha=1.0, keep_dense=["big"])
    blob = expert.to_bytes()
    opened = compeft.open(http.put("big.cpeft", blob))
    http.reset_counts()
    assert torch.equal(opened.to_dense("big"), tv["big"])
    length = opened.entry("big").length
    assert length > 2 * remote.PART_SIZE
    assert http.gets == -(-length // remote.PART_SIZE) == 3
    assert http.bytes_served == length
    http.reset_counts()
    state = opened.state_dict()  # the rest: one more request (big is held in memory)
    assert torch.equal(state["big"], tv["big"]) and torch.equal(state["small"], expert.to_dense("small"))
    assert http.gets == 1


@pytest.fixture(scope="module")
def many() -> CompressedExpert:
    g = torch.Generator().manual_seed(6)
    return compeft.compress({f"t.{i:02d}": torch.randn(4000, generator=g) for i in range(30)}, density=0.2,
                            alpha=1.0, scope="tensor")


def test_nearby_payloads_are_coalesced_and_far_ones_not(http, many, monkeypatch):
    from compeft import expert as expert_module

    url = http.put("many.cpeft", many.to_bytes())
    wanted = many.names[::2]  # every other tensor: gaps of one payload
    lengths = [many.entry(n).length for n in wanted]
    span = many.entry(wanted[-1]).offset + many.entry(wanted[-1]).length - many.entry(wanted[0]).offset
    want = {n: many.to_dense(n) for n in wanted}

    opened = compeft.open(url)
    http.reset_counts()
    assert_same_state(opened.state_dict(wanted), want)
    assert http.gets == 1 and http.bytes_served == span  # one run over the gaps (each < 64 KiB)

    gap = min(many.entry(n).length for n in many.names[1::2])  # the smallest gap between wanted payloads
    monkeypatch.setattr(expert_module, "_GAP", gap - 1)
    opened = compeft.open(url)
    http.reset_counts()
    assert_same_state(opened.state_dict(wanted), want)
    assert http.gets > 1 and http.bytes_served < span  # runs cut where the gap is over the threshold

    monkeypatch.setattr(expert_module, "_GAP", 0)  # only payloads that touch stay together
    opened = compeft.open(url)
    http.reset_counts()
    assert_same_state(opened.state_dict(wanted), want)
    assert http.gets == len(wanted) and http.bytes_served == sum(lengths)


def test_coalesced_runs_are_bounded_and_cut_into_parts(http, many, monkeypatch):
    from compeft import expert as expert_module
    from compeft import remote

    url = http.put("many.cpeft", many.to_bytes())
    want = many.state_dict()
    body = many.header.file_length - many.header.data_start
    longest = max(many.entry(n).length for n in many.names)
    monkeypatch.setattr(expert_module, "_MAX_READ", 3 * longest)  # runs of about three payloads
    opened = compeft.open(url)
    http.reset_counts()
    assert_same_state(opened.state_dict(), want)
    assert len(many.names) // 3 <= http.gets <= len(many.names)
    assert http.bytes_served <= body

    monkeypatch.setattr(expert_module, "_MAX_READ", 256 << 20)
    monkeypatch.setattr(remote, "PART_SIZE", 1000)  # one coalesced run, many parts
    opened = compeft.open(url)
    http.reset_counts()
    assert_same_state(opened.state_dict(), want)
    first, last = many.entry(many.names[0]), many.entry(many.names[-1])
    assert http.gets == -(-(last.offset + last.length - first.offset) // 1000) > 1


@pytest.mark.parametrize("budget", [1 << 30, 1000])
def test_memory_budget_keeps_or_forgets_fetched_bytes(http, many, budget):
    from compeft import remote

    url = http.put("many.cpeft", many.to_bytes())
    fs, path = remote.resolve(url)
    opened = CompressedExpert(remote.RemoteReader(fs, path, url, memory_budget=budget))
    want = many.state_dict()
    http.reset_counts()
    assert_same_state(opened.state_dict(), want)
    once = http.bytes_served
    assert once > 1000
    for _ in range(3):
        assert_same_state(opened.state_dict(), want)
    if budget > once:
        assert http.bytes_served == once  # everything kept: read once
    else:
        assert http.bytes_served >= 2 * once  # over the budget: forgotten and fetched again
