"""Shared helpers for the compeft test-suite.

Mostly exposed through fixtures; a few plain helpers (``bits``, ``same_bits``, ``read_container``,
``build_container``, ``set_payload``, ``load_tool``) are also imported by test modules directly, and
``load_tool("surgery")`` gives tools/surgery.py, the container surgery the helpers below wrap:

- ``reference``: the ComPEFT reference semantics written directly in torch (``reference_compress``);
- ``apply_reference``: the float32 rule of ``compeft.apply`` written directly in torch;
- ``make_tv``: a factory of tiny random task vectors;
- ``roundtrip``: ``expert.save`` to a fresh file, then ``compeft.open`` it;
- ``container``: read/rewrite the preamble, JSON header and data section of a ``.cpeft`` file
  (``read``, ``build``, ``encode_text``, ``set_payload``, ``flip_byte``: tools/surgery.py);
- ``workdir``: a fresh temporary directory (``tmp_path``).
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Triton's CPU interpreter for tests/test_gpu.py: it must be chosen before anything (transformers
    # and peft among them) imports triton, or kernels and their helpers end up compiled differently.
    os.environ.setdefault("TRITON_INTERPRET", "1")

COMPRESSIBLE = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# reference semantics (independent of compeft's histogram selection and Numba codec)


@dataclass
class Reference:
    """What ComPEFT should produce for a task vector."""

    values: dict[str, torch.Tensor]  # τ̃ per compressed tensor, the input itself per dense tensor
    masks: dict[str, torch.Tensor]  # kept entries per compressed tensor
    compressed: list[str]  # names compressed (floating, not matching keep_dense)
    thresholds: dict[str, float] = field(default_factory=dict)  # per compressed tensor (its scope's)
    sigmas: dict[str, float] = field(default_factory=dict)  # per compressed tensor (its scope's)
    scales: dict[str, float] = field(default_factory=dict)  # float32(alpha * sigma) per compressed tensor


def reference_compress(tensors: Mapping[str, torch.Tensor], density: float, alpha: float = 1.0,
                       scope: str = "global", keep_dense: Sequence[str] = (),
                       dtypes: Mapping[str, torch.dtype] | None = None) -> Reference:
    """ComPEFT straight from its definition.

    Flatten the scope's tensors (sorted by name) as float32, threshold = the (d - floor(d*k))-th
    smallest |τ| (``kthvalue``; 0 when that rank is 0), σ = unbiased float64 std over all d
    entries, keep ``τ != 0 and |τ| >= threshold``, kept values = sign(τ)·float32(α·σ) rounded to
    the tensor's dtype (``dtypes[name]`` when given: τ computed in float32 from tensors of that dtype).
    """
    dtypes = {n: t.dtype for n, t in tensors.items()} | dict(dtypes or {})
    names = sorted(tensors)
    compressed = [n for n in names if dtypes[n] in COMPRESSIBLE
                  and not any(fnmatch.fnmatchcase(n, p) for p in keep_dense)]
    groups = [compressed] if scope == "global" else [[n] for n in compressed]
    ref = Reference(values={}, masks={}, compressed=compressed)
    for group in groups:
        flats = [tensors[n].detach().to(torch.float32).reshape(-1) for n in group]
        flat = torch.cat(flats) if flats else torch.zeros(0)
        d = flat.numel()
        rank = d - math.floor(d * density)
        threshold = float(flat.abs().kthvalue(rank).values) if rank > 0 else 0.0
        sigma = _unbiased_std(flat) if d > 1 else 0.0
        scale = float(np.float32(alpha * sigma))
        for n in group:
            t = tensors[n].detach().to(torch.float32)
            keep = (t != 0) & (t.abs() >= threshold)
            dtype = dtypes[n]
            magnitude = torch.tensor(scale, dtype=torch.float32).to(dtype)
            value = torch.zeros(t.shape, dtype=dtype)
            value[keep & (t > 0)] = magnitude
            value[keep & (t < 0)] = -magnitude
            ref.values[n], ref.masks[n] = value, keep
            ref.thresholds[n], ref.sigmas[n], ref.scales[n] = threshold, sigma, scale
    for n in names:
        if n not in ref.values:
            ref.values[n] = tensors[n].detach().clone()
    return ref


def _unbiased_std(flat: torch.Tensor) -> float:
    """Unbiased std in float64 with correctly rounded sums (two passes of ``math.fsum``)."""
    x = flat.double().numpy()
    mean = math.fsum(x) / x.size
    return math.sqrt(math.fsum((x - mean) ** 2) / (x.size - 1))


def apply_reference(weight: torch.Tensor, value: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``dtype(float32(w) + float32(scale) * float32(v))`` in plain torch."""
    s = torch.tensor(scale, dtype=torch.float32)
    return (weight.to(torch.float32) + s * value.to(torch.float32)).to(weight.dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a tensor (for bit-exact comparisons, -0.0 vs 0.0 included)."""
    t = t.detach().contiguous()
    if t.dtype in (torch.float32,):
        return t.view(torch.int32)
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16)
    if t.dtype == torch.float64:
        return t.view(torch.int64)
    return t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


# ---------------------------------------------------------------------------------------------
# task vectors


def make_task_vector(seed: int = 0, shapes: Mapping[str, tuple[int, ...]] | None = None,
                     dtype: torch.dtype = torch.float32, zeros: float = 0.0) -> dict[str, torch.Tensor]:
    """A small random task vector: normal entries with per-tensor scales, a fraction ``zeros`` of zeros."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"layer.0.weight": (16, 12), "layer.0.bias": (16,), "layer.1.weight": (8, 16)}
    out = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        t = torch.randn(shape, generator=g) * (0.5 + i)
        if zeros:
            t[torch.rand(shape, generator=g) < zeros] = 0.0
        out[name] = t.to(dtype)
    return out


# ---------------------------------------------------------------------------------------------
# tools/ scripts, and container surgery (tools/surgery.py)

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str) -> Any:
    """The module ``tools/<name>.py`` (tools are scripts, not a package), registered under ``name`` so
    that tools importing each other (``import surgery``) find it; loaded once."""
    import importlib.util
    import sys

    path = TOOLS / f"{name}.py"
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


surgery = load_tool("surgery")
read_container = surgery.read  # path or bytes -> Container (preamble, doc, data; entry, payload_range, ...)
encode_text = surgery.encode  # compact UTF-8 JSON, as compeft writes headers


def build_container(doc: Any = None, data: bytes = b"", *, text: bytes | None = None, **preamble: Any) -> bytes:
    """A fresh file (MAGIC, flags 0 unless given; the version the document's — or the text's —
    ``format_version`` says when it is 1 or 2, else 1) of a header document, or raw header ``text``, and a data
    section; the header is never deflated. Lengths and the header CRC are computed unless given
    (``header_length=``, ``header_crc=``, ``file_length=``: ``surgery.join``)."""
    declared = surgery.declared_version(text) if text is not None else (
        doc.get("format_version") if isinstance(doc, dict) else None)
    preamble.setdefault("version", declared if type(declared) is int and declared in (1, 2) else 1)
    return surgery.join(doc if text is None else text, data, deflate=False, **preamble)


def set_payload(container: surgery.Container, name: str, payload: bytes) -> None:
    """Replace a payload of the same length and fix its CRC-32 in the header (structure only wrong)."""
    container.set_payload(name, payload)


def flip_byte(path: Path | str, offset: int, mask: int = 0x01) -> None:
    Path(path).write_bytes(surgery.flip(Path(path).read_bytes(), offset, mask))


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def reference() -> Callable[..., Reference]:
    return reference_compress


@pytest.fixture(scope="session")
def apply_ref() -> Callable[..., torch.Tensor]:
    return apply_reference


@pytest.fixture(scope="session")
def same() -> Callable[[torch.Tensor, torch.Tensor], bool]:
    """Bit-exact tensor equality (dtype, shape and every bit)."""
    return same_bits


@pytest.fixture(scope="session")
def make_tv() -> Callable[..., dict[str, torch.Tensor]]:
    return make_task_vector


@pytest.fixture(scope="session")
def roundtrip(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Any], Any]:
    """``roundtrip(expert)``: save to a fresh file and reopen it with ``compeft.open``."""
    import compeft

    directory = tmp_path_factory.mktemp("roundtrip")
    counter = itertools.count()

    def run(expert: Any) -> Any:
        path = directory / f"expert-{next(counter)}.cpeft"
        expert.save(path)
        return compeft.open(path)

    return run


@pytest.fixture(scope="session")
def container() -> Any:
    """Helpers to take a container apart and put it back together."""

    class _Helpers:
        read = staticmethod(read_container)
        build = staticmethod(build_container)
        encode_text = staticmethod(encode_text)
        set_payload = staticmethod(set_payload)
        flip_byte = staticmethod(flip_byte)

    return _Helpers


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def small_groups(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> int:
    """Merge groups shrunk to a few hundred parameters (``compeft.merging.GROUP_PARAMETERS`` and
    ``GPU_GROUP_PARAMETERS``; 300 unless parametrised indirectly), so that every merge of a small
    model crosses many groups, and tensors larger than a group stand alone. Returns the size."""
    import compeft.merging

    size = getattr(request, "param", 300)
    monkeypatch.setattr(compeft.merging, "GROUP_PARAMETERS", size)
    monkeypatch.setattr(compeft.merging, "GPU_GROUP_PARAMETERS", size)
    return size
