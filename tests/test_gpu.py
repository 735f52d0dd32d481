"""The GPU decoder (compeft.gpu, Triton kernels) against the CPU decoder, bit for bit.

With a CUDA device these run the compiled kernels; without one they run the same kernels in
Triton's CPU interpreter (TRITON_INTERPRET=1, CPU tensors standing in for device ones), so CI
checks the kernels' logic too. Without triton installed they skip.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # must be set before triton compiles anything in this process
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import compeft  # noqa: E402
from compeft.errors import CorruptPayloadError, InvalidArgumentError  # noqa: E402
from compeft.expert import DeviceExpert  # noqa: E402
from conftest import bits, build_container, read_container, same_bits, set_payload  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def task_vector(seed: int, dtype: torch.dtype, numel: int = 1500) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    heavy = torch.randn(numel, generator=g) / torch.rand(numel, generator=g).add_(0.05)  # heavy tails
    return {"a.weight": heavy.reshape(30, numel // 30).to(dtype),
            "b.weight": torch.randn(numel // 3, generator=g).to(dtype),
            "empty": torch.zeros(0, 4, dtype=dtype),
            "tiny": torch.randn(3, generator=g).to(dtype)}


def cpu_state(expert: compeft.CompressedExpert) -> dict[str, torch.Tensor]:
    return expert.state_dict()


def on_device(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.to(DEVICE) for n, t in state.items()}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert same_bits(got[name].cpu(), want[name]), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.01, 0.1, 0.5, 1.0])
def test_decode_matches_cpu(dtype, density):
    expert = compeft.compress(task_vector(1, dtype), density=density, scope="tensor", chunk_size=64)
    assert_same(expert.to_device(DEVICE).state_dict(), cpu_state(expert))


def test_decode_global_scope_and_default_chunks():
    expert = compeft.compress(task_vector(2, torch.bfloat16, numel=30000), density=0.1)
    device_expert = expert.to_device(DEVICE)
    assert device_expert is expert.to_device(DEVICE)  # the bytes are copied once per device
    assert 0 < device_expert.nbytes <= expert.header.file_length
    assert_same(device_expert.state_dict(), cpu_state(expert))


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA (the public device= path)")
def test_public_device_arguments():
    expert = compeft.compress(task_vector(3, torch.float16), density=0.2)
    name = expert.names[0]
    got = expert.to_dense(name, device="cuda")
    assert got.device.type == "cuda"
    assert same_bits(got.cpu(), expert.to_dense(name))
    assert_same(expert.state_dict(device="cuda"), cpu_state(expert))


@pytest.mark.parametrize("name", sorted(p.stem for p in VECTORS.glob("*.cpeft")))
def test_spec_vectors_decode_exactly(name):
    from safetensors.torch import load_file

    expert = compeft.open(VECTORS / f"{name}.cpeft")
    expected = load_file(str(VECTORS / f"{name}.expected.safetensors"))
    got = expert.to_device(DEVICE).state_dict()
    for key, want in expected.items():
        assert same_bits(got[key].cpu(), want), key


@pytest.mark.parametrize("path", sorted((VECTORS / "invalid").glob("*.cpeft")), ids=lambda p: p.name)
def test_invalid_vectors_fail_as_on_the_cpu(path):
    try:
        compeft.open(path).verify()
    except CorruptPayloadError:
        with pytest.raises(CorruptPayloadError):
            compeft.open(path).to_device(DEVICE).state_dict()
    except compeft.CompeftError:
        pass  # refused before any payload is decoded: the same code path for both decoders
    else:
        pytest.fail(f"{path.name} verified on the CPU")


def device_expert(expert: compeft.CompressedExpert, wide: bool) -> DeviceExpert:
    """A device copy; ``wide`` forces the kernel's int64 arithmetic (chosen otherwise only for
    chunks spanning 2**30 positions or more)."""
    placed = expert.to_device(DEVICE)
    if wide:
        placed.executor.narrow[:] = False
    return placed


@pytest.mark.parametrize("dtype", DTYPES)
def test_wide_index_arithmetic_matches_cpu(dtype):
    expert = compeft.compress(task_vector(13, dtype), density=0.15, scope="tensor", chunk_size=64)
    assert_same(device_expert(expert, wide=True).state_dict(), cpu_state(expert))


def corrupt_variants(expert: compeft.CompressedExpert, tmp_path: Path) -> list[Path]:
    """Copies of ``expert`` with one payload bit flipped in a compressed tensor and its CRC fixed:
    bits the checksum no longer guards, so only the decoder's own checks stand."""
    source = tmp_path / "source.cpeft"
    expert.save(source)
    name = max(expert.names, key=lambda n: expert.entry(n).nnz)
    paths = []
    container = read_container(source)
    entry = container.entry(name)
    payload = container.data[entry["offset"]:entry["offset"] + entry["length"]]
    for k, bit in enumerate(range(0, 8 * len(payload), max(1, 8 * len(payload) // 40))):
        flipped = bytearray(payload)
        flipped[bit // 8] ^= 1 << (bit % 8)
        variant = read_container(source)
        set_payload(variant, name, bytes(flipped))
        path = tmp_path / f"flip{k}.cpeft"
        path.write_bytes(build_container(variant.doc, variant.data))
        paths.append(path)
    return paths


@pytest.mark.parametrize("wide", [False, True], ids=["int32", "int64"])
def test_corrupt_bits_behave_as_on_the_cpu(tmp_path, wide):
    expert = compeft.compress(task_vector(4, torch.bfloat16), density=0.2, scope="tensor", chunk_size=64)
    errors = 0
    for path in corrupt_variants(expert, tmp_path):
        try:
            want = compeft.open(path).state_dict()
        except CorruptPayloadError:
            errors += 1
            with pytest.raises(CorruptPayloadError, match=r"tensor '"):
                device_expert(compeft.open(path), wide).state_dict()
        else:  # the flip still decodes: the GPU must decode the same thing
            assert_same(device_expert(compeft.open(path), wide).state_dict(), want)
    assert errors >= 10


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, -0.37])
def test_add_matches_apply(dtype, scale):
    expert = compeft.compress(task_vector(5, dtype), density=0.3, scope="tensor", chunk_size=64)
    base = {n: torch.randn(t.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
            for n, t in task_vector(5, dtype).items()}
    flat = base["a.weight"].view(-1)
    flat[:8] = torch.tensor([math.nan, -math.nan, math.inf, -math.inf, 65504, -65504, 1e-8, -0.0]).to(dtype)
    want = {n: t.clone() for n, t in base.items()}
    compeft.apply(expert, want, scale=scale)
    got = on_device(base)
    compeft.apply(expert, got, scale=scale)
    assert_same(got, want)


def test_add_checks_every_chunk_before_writing(tmp_path):
    expert = compeft.compress(task_vector(6, torch.float16), density=0.3, scope="tensor", chunk_size=64)
    for path in corrupt_variants(expert, tmp_path):
        try:
            compeft.open(path).state_dict()
        except CorruptPayloadError:
            weights = on_device({n: torch.ones(t.shape, dtype=torch.float16) for n, t in task_vector(6, torch.float16).items()})
            before = {n: t.clone() for n, t in weights.items()}
            with pytest.raises(CorruptPayloadError):
                compeft.open(path).to_device(DEVICE).add_into(weights)
            assert_same(weights, {n: t.cpu() for n, t in before.items()})
            return
    pytest.fail("no corrupt variant found")


@pytest.mark.parametrize("dtype", DTYPES)
def test_restorable_apply_is_bit_exact(dtype):
    first = compeft.compress(task_vector(7, dtype), density=0.2, scope="tensor", chunk_size=64)
    second = compeft.compress(task_vector(8, dtype), density=0.05, scope="tensor", chunk_size=64)
    base = on_device({n: torch.randn(t.shape).to(dtype) for n, t in task_vector(7, dtype).items()})
    original = {n: t.clone() for n, t in base.items()}
    handle = compeft.apply(first, base, scale=2.0, restorable=True)
    want = {n: t.cpu().clone() for n, t in original.items()}
    compeft.apply(first, want, scale=2.0)
    assert_same(base, want)
    handle.restore()
    assert_same(base, {n: t.cpu() for n, t in original.items()})
    compeft.apply(second, base, restorable=True).restore()  # swap in another expert and out again
    assert_same(base, {n: t.cpu() for n, t in original.items()})
    with pytest.raises(InvalidArgumentError, match="already restored"):
        handle.restore()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "linear"])
def test_merge_on_device_matches_cpu(method):
    experts = [compeft.compress(task_vector(10 + i, torch.bfloat16), density=0.2, scope="tensor", chunk_size=64)
               for i in range(3)]
    options = dict(method=method, weights=[1.0, 0.5, 2.0], lam=0.8, check_base=False)
    if method.startswith("dare"):
        options.update(drop_rate=0.3, seed=5)
    want = compeft.merge(experts, **options)
    got = compeft.merge(experts, device=DEVICE, **options)
    assert set(got) == set(want)
    for name in want:
        assert got[name].device.type == DEVICE
        assert torch.equal(bits(got[name].cpu()), bits(want[name])), name


def test_device_argument_errors():
    expert = compeft.compress(task_vector(12, torch.float32), density=0.1)
    with pytest.raises(InvalidArgumentError, match="CUDA"):
        expert.to_device("meta")
    weights = {n: torch.zeros(t.shape) for n, t in task_vector(12, torch.float32).items()}
    if ON_GPU:  # CPU weights given to a device expert
        with pytest.raises(InvalidArgumentError, match="must be a contiguous tensor on"):
            expert.to_device(DEVICE).add_into(weights)
