"""Real sources: PEFT adapter directories (LoRA with a modules_to_save head, (IA)³, a .bin adapter)
and full fine-tunes measured from a sharded safetensors base."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import compeft
from compeft.errors import BaseMismatchError, SourceError

peft = pytest.importorskip("peft")
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict  # noqa: E402


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 16)
        self.ff = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.ff(torch.tanh(self.q_proj(x)) * self.v_proj(x))))


def fresh_base() -> Tiny:
    torch.manual_seed(1234)
    return Tiny().eval()


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["head"])


def ia3_config() -> IA3Config:
    return IA3Config(target_modules=["q_proj", "v_proj", "ff"], feedforward_modules=["ff"])


def save_adapter(config, directory: Path, randomize) -> dict[str, torch.Tensor]:
    model = get_peft_model(fresh_base(), config)
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(randomize(name, p, g))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(directory))
    return load_file(str(directory / "adapter_model.safetensors"))


def peft_model_with(config, adapter_weights: dict[str, torch.Tensor]) -> nn.Module:
    model = get_peft_model(fresh_base(), config)
    result = set_peft_model_state_dict(model, adapter_weights)
    assert not result.unexpected_keys
    return model.eval()


@torch.no_grad()
def outputs(model: nn.Module) -> torch.Tensor:
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(5))
    return model(x)


def load_peft(directory: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(fresh_base(), str(directory)).eval()


# ---------------------------------------------------------------------------------------------
# PEFT adapters


@pytest.mark.parametrize("mode", ["reference", "auto", "glob"])
def test_lora_adapter_roundtrip(workdir, reference, same, mode):
    adapter = workdir / "lora"
    saved = save_adapter(lora_config(), adapter, lambda n, p, g: torch.randn(p.shape, generator=g) * 0.2)
    assert any("head" in n for n in saved) and any("lora_A" in n for n in saved)
    # "reference": every floating tensor compressed; "auto" (the default): the modules_to_save head
    # is a whole weight and stays dense; "glob": the same asked for with keep_dense
    keep_head = mode != "reference"
    keep = ["*head*"] if keep_head else []
    expert = compeft.compress(adapter, density=0.3, alpha=2.0, keep_dense=keep if mode == "glob" else [],
                              auto_dense=mode != "reference", scope="global")
    assert expert.metadata["source"] == "peft"
    assert expert.metadata["adapter_config"]["peft_type"] == "LORA"
    for name in saved:
        assert expert.entry(name).init == (None if keep_head and "head" in name else 0.0)
        assert (expert.entry(name).encoding == "dense") == (keep_head and "head" in name)
    out = compeft.decompress(expert, workdir / "restored")
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads(
        (adapter / "adapter_config.json").read_text())

    # LoRA weights (and the modules_to_save head unless kept dense) are residuals from 0
    ref = reference(saved, 0.3, 2.0, "global", keep)
    restored = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(restored) == sorted(saved)
    for name in saved:
        assert same(restored[name], ref.values[name]), name
    if keep_head:
        assert same(restored["base_model.model.head.weight"], saved["base_model.model.head.weight"])

    loaded = load_peft(out)
    expected = peft_model_with(lora_config(), ref.values)
    assert torch.equal(outputs(loaded), outputs(expected))
    assert not torch.equal(outputs(loaded), outputs(fresh_base()))


def test_ia3_adapter_roundtrip(workdir, reference, same):
    adapter = workdir / "ia3"
    saved = save_adapter(ia3_config(), adapter,
                         lambda n, p, g: 1.0 + torch.randn(p.shape, generator=g) * 0.3)
    assert all("ia3_l" in n for n in saved)
    expert = compeft.compress(adapter, density=0.25, alpha=1.5, scope="global")
    for name in saved:
        assert expert.entry(name).init == 1.0
    # (IA)³ vectors are residuals from 1
    tau = {n: v.float() - 1.0 for n, v in saved.items()}
    ref = reference(tau, 0.25, 1.5)
    for name in saved:
        assert torch.equal(expert.to_dense(name), ref.values[name])  # to_dense gives τ̃, without init
    out = compeft.decompress(expert, workdir / "restored")
    restored = load_file(str(out / "adapter_model.safetensors"))
    want = {n: (ref.values[n].float() + 1.0).to(saved[n].dtype) for n in saved}
    for name in saved:
        assert same(restored[name], want[name]), name
    assert (restored[name] == 1.0).any() and (restored[name] != 1.0).any()
    assert torch.equal(outputs(load_peft(out)), outputs(peft_model_with(ia3_config(), want)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_adapter_keeps_its_dtype(workdir, reference, same, dtype):
    adapter = workdir / "adapter"
    adapter.mkdir()
    g = torch.Generator().manual_seed(3)
    weights = {"base_model.model.q_proj.lora_A.weight": torch.randn(4, 16, generator=g).to(dtype),
               "base_model.model.q_proj.lora_B.weight": torch.randn(16, 4, generator=g).to(dtype)}
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    out = compeft.decompress(compeft.compress(adapter, density=0.5, alpha=1.0, scope="global"), workdir / "restored")
    restored = load_file(str(out / "adapter_model.safetensors"))
    ref = reference(weights, 0.5)
    for name in weights:
        assert same(restored[name], ref.values[name])


def test_bin_adapter_is_loaded(workdir, reference, same):
    adapter = workdir / "lora-bin"
    saved = save_adapter(lora_config(), adapter, lambda n, p, g: torch.randn(p.shape, generator=g))
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(saved, adapter / "adapter_model.bin")
    expert = compeft.compress(adapter, density=0.4, alpha=1.0, scope="global")
    ref = reference(saved, 0.4, keep_dense=["*head*"])  # the modules_to_save head stays dense
    for name in saved:
        assert same(expert.to_dense(name), ref.values[name])
    out = compeft.decompress(expert, workdir / "restored")
    assert torch.equal(outputs(load_peft(out)), outputs(peft_model_with(lora_config(), ref.values)))


class _Payload:
    """Unpickling this would run code: ``torch.load(weights_only=True)`` must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bin_adapter_is_loaded_with_weights_only(workdir):
    adapter = workdir / "evil"
    adapter.mkdir()
    marker = workdir / "code-was-executed"
    torch.save({"base_model.model.q_proj.lora_A.weight": torch.ones(2, 2), "x": _Payload(marker)},
               adapter / "adapter_model.bin")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(SourceError) as info:
        compeft.compress(adapter, alpha=1.0, scope="global")
    assert "adapter_model.bin" in str(info.value)
    assert not marker.exists()


def test_bin_adapter_that_is_not_a_dict(workdir):
    adapter = workdir / "list"
    adapter.mkdir()
    torch.save([torch.ones(2)], adapter / "adapter_model.bin")
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(SourceError):
        compeft.compress(adapter, alpha=1.0, scope="global")


@pytest.mark.parametrize("problem", ["no-weights", "bad-config", "config-not-object", "bad-safetensors",
                                     "not-a-peft-dir", "missing"])
def test_bad_adapter_directories(workdir, problem):
    adapter = workdir / "adapter"
    adapter.mkdir()
    if problem != "not-a-peft-dir":
        (adapter / "adapter_config.json").write_text(
            {"bad-config": "{oops", "config-not-object": "[1, 2]"}.get(problem, '{"peft_type": "LORA"}'))
    if problem in ("bad-config", "config-not-object"):
        save_file({"w": torch.ones(2)}, str(adapter / "adapter_model.safetensors"))
    if problem == "bad-safetensors":
        (adapter / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    target = workdir / "nope" if problem == "missing" else adapter
    with pytest.raises(SourceError) as info:
        compeft.compress(target, alpha=1.0, scope="global")
    assert str(target) in str(info.value)


# ---------------------------------------------------------------------------------------------
# full fine-tunes

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def base_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(32, 8, generator=g),
        "layers.0.attn.weight": torch.randn(8, 8, generator=g).bfloat16(),
        "layers.0.attn.bias": torch.randn(8, generator=g).bfloat16(),
        "layers.1.mlp.weight": torch.randn(16, 8, generator=g).half(),
        "layers.1.mlp.bias": torch.randn(16, generator=g),
        "position_ids": torch.arange(32).reshape(1, 32),
    }


def finetuned_from(base: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in base.items():
        if t.is_floating_point():
            out[name] = (t.float() + torch.randn(t.shape, generator=g) * 0.05).to(t.dtype)
        else:
            out[name] = t + 1  # a non-floating tensor the fine-tune changed: stored as a value
    return out


def write_model(directory: Path, tensors: dict[str, torch.Tensor], *, sharded: bool = True) -> Path:
    directory.mkdir(parents=True)
    names = sorted(tensors)
    if sharded:
        split = {SHARDS[0]: names[: len(names) // 2], SHARDS[1]: names[len(names) // 2:]}
        weight_map = {}
        for file, part in split.items():
            save_file({n: tensors[n].contiguous() for n in part}, str(directory / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    else:
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 8}))
    (directory / "generation_config.json").write_text("{}")
    return directory


def read_model(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def full_reference(base, tuned, reference, apply_ref, density, alpha=1.0):
    floating = [n for n in base if base[n].is_floating_point()]
    tau = {n: tuned[n].float() - base[n].float() for n in floating}
    ref = reference(tau, density, alpha, dtypes={n: tuned[n].dtype for n in floating})
    want = {n: apply_ref(base[n], ref.values[n]) for n in floating}
    want.update({n: tuned[n] for n in base if n not in floating})
    return ref, want


@pytest.fixture
def models(workdir):
    base = base_tensors()
    tuned = finetuned_from(base)
    return base, tuned, write_model(workdir / "base", base), write_model(workdir / "tuned", tuned)


def test_full_finetune_roundtrip(workdir, models, reference, apply_ref, same):
    base, tuned, base_dir, tuned_dir = models
    expert = compeft.compress(tuned_dir, base=base_dir, density=0.2, alpha=1.5, scope="global")
    assert expert.metadata["source"] == "full"
    assert expert.metadata["base_fingerprint"].startswith("cpeft-fp1:")
    assert expert.entry("position_ids").encoding == "dense" and expert.entry("position_ids").role == "value"
    ref, want = full_reference(base, tuned, reference, apply_ref, 0.2, 1.5)
    for name in ref.compressed:
        assert torch.equal(expert.to_dense(name), ref.values[name]), name

    saved = workdir / "e.cpeft"
    expert.save(saved)
    out = compeft.decompress(saved, workdir / "restored", base=base_dir)
    assert out == workdir / "restored"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base_dir.iterdir())
    for extra in ("model.safetensors.index.json", "config.json", "generation_config.json"):
        assert (out / extra).read_bytes() == (base_dir / extra).read_bytes()
    for shard in SHARDS:  # the base's sharding and shard metadata
        assert set(load_file(str(out / shard))) == set(load_file(str(base_dir / shard)))
        with safe_open(str(out / shard), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
    restored = read_model(out)
    assert sorted(restored) == sorted(base)
    for name in base:
        assert same(restored[name], want[name]), name
    # apply on an in-memory base gives the same weights
    state = {n: t.clone() for n, t in base.items()}
    compeft.apply(saved, state)
    for name in base:
        assert same(state[name], want[name]), name


def test_full_finetune_single_files(workdir, reference, apply_ref, same):
    base = base_tensors(2)
    tuned = finetuned_from(base, 3)
    save_file(base, str(workdir / "base.safetensors"))
    save_file(tuned, str(workdir / "tuned.safetensors"))
    expert = compeft.compress(workdir / "tuned.safetensors", base=workdir / "base.safetensors", density=0.5,
                              scope="tensor", alpha=1.0)
    out = compeft.decompress(expert, workdir / "restored.safetensors", base=workdir / "base.safetensors")
    restored = load_file(str(out))
    floating = [n for n in base if base[n].is_floating_point()]
    for name in floating:
        ref = reference({name: tuned[name].float() - base[name].float()}, 0.5, 1.0, "tensor",
                        dtypes={name: tuned[name].dtype})
        assert same(restored[name], apply_ref(base[name], ref.values[name])), name
    assert torch.equal(restored["position_ids"], tuned["position_ids"])


def test_full_finetune_unsharded_dir_into_dir(workdir, reference, apply_ref, same):
    base = base_tensors(4)
    tuned = finetuned_from(base, 5)
    base_dir = write_model(workdir / "base", base, sharded=False)
    tuned_dir = write_model(workdir / "tuned", tuned, sharded=False)
    out = compeft.decompress(compeft.compress(tuned_dir, base=base_dir, density=0.1, alpha=1.0, scope="global"), workdir / "out", base=base_dir)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    _, want = full_reference(base, tuned, reference, apply_ref, 0.1)
    restored = load_file(str(out / "model.safetensors"))
    for name in base:
        assert same(restored[name], want[name]), name


def test_full_finetune_with_different_tensor_sets(workdir):
    base = base_tensors()
    tuned = finetuned_from(base)
    tuned["extra.weight"] = torch.randn(2, 2)
    base_dir = write_model(workdir / "base", base)
    tuned_dir = write_model(workdir / "tuned", tuned)
    with pytest.raises(BaseMismatchError, match="extra.weight") as info:
        compeft.compress(tuned_dir, base=base_dir, alpha=1.0, scope="global")
    assert str(base_dir) in str(info.value)
    del tuned["extra.weight"], tuned["embed.weight"]
    write_model(workdir / "tuned2", tuned)
    with pytest.raises(BaseMismatchError, match="embed.weight"):
        compeft.compress(workdir / "tuned2", base=base_dir, alpha=1.0, scope="global")


def test_full_finetune_with_different_shapes(workdir):
    base = base_tensors()
    tuned = finetuned_from(base)
    tuned["layers.1.mlp.bias"] = torch.randn(17)
    base_dir = write_model(workdir / "base", base)
    tuned_dir = write_model(workdir / "tuned", tuned)
    with pytest.raises(BaseMismatchError, match="shape"):
        compeft.compress(tuned_dir, base=base_dir, alpha=1.0, scope="global")


def test_applying_to_a_different_base(workdir, models, apply_ref, same):
    base, tuned, base_dir, tuned_dir = models
    expert = compeft.compress(tuned_dir, base=base_dir, density=0.2, alpha=1.0, scope="global")
    other = base_tensors(seed=7)
    other_dir = write_model(workdir / "other", other)
    with pytest.raises(BaseMismatchError) as info:
        compeft.decompress(expert, workdir / "out", base=other_dir)
    assert str(other_dir) in str(info.value)
    assert not (workdir / "out").exists()  # nothing written
    state = {n: t.clone() for n, t in other.items()}
    with pytest.raises(BaseMismatchError, match="fingerprint"):
        compeft.apply(expert, state)
    for n in other:
        assert same(state[n], other[n])

    out = compeft.decompress(expert, workdir / "out", base=other_dir, force=True)
    restored = read_model(out)
    for name in other:
        if other[name].is_floating_point():
            assert same(restored[name], apply_ref(other[name], expert.to_dense(name))), name
    compeft.apply(expert, state, check_base=False)
    for name in other:
        assert same(state[name], restored[name]), name


def test_decompress_onto_a_base_missing_tensors(workdir, models):
    base, tuned, base_dir, tuned_dir = models
    expert = compeft.compress(tuned_dir, base=base_dir, density=0.2, alpha=1.0, scope="global")
    smaller = {n: t for n, t in base.items() if n != "embed.weight"}
    small_dir = write_model(workdir / "small", smaller)
    with pytest.raises(BaseMismatchError, match="not in the base"):
        compeft.decompress(expert, workdir / "out", base=small_dir, force=True)


def test_decompress_onto_base_checks_payloads_before_writing(workdir, models, container):
    base, tuned, base_dir, tuned_dir = models
    path = workdir / "e.cpeft"
    compeft.compress(tuned_dir, base=base_dir, density=0.2, alpha=1.0, scope="global").save(path)
    start, end = container.read(path).payload_range("layers.1.mlp.weight")
    container.flip_byte(path, start + 20)
    with pytest.raises(compeft.errors.ChecksumError):
        compeft.decompress(path, workdir / "out", base=base_dir)
    assert not (workdir / "out").exists() or not any((workdir / "out").iterdir())


def test_compress_reads_the_base_once(models, monkeypatch):
    """The base fingerprint reuses the base bytes the residuals read (a tensor the encoder never
    reads from the base, the integer position_ids stored as a value, is read for it at the end):
    each base tensor is read once, and the fingerprint is the one of all of them."""
    from compeft.sources import fingerprint
    from compeft.weights import SafetensorsFile

    base, tuned, base_dir, tuned_dir = models
    reads: list[str] = []
    real_get = SafetensorsFile.get_tensor

    def counted(self, name, into=None):
        if Path(self.path).parent == base_dir:
            reads.append(name)
        return real_get(self, name, into)

    monkeypatch.setattr(SafetensorsFile, "get_tensor", counted)
    expert = compeft.compress(tuned_dir, base=base_dir, density=0.2)
    assert sorted(reads) == sorted(base)
    assert expert.metadata["base_fingerprint"] == fingerprint((n, base[n]) for n in sorted(base))


@pytest.mark.parametrize("part", [1, 1 << 22])  # every tensor in a part of its own; the default
def test_decompress_onto_base_reads_the_base_once(workdir, models, monkeypatch, part):
    """The base fingerprint comes from the bytes the write pass reads, so each base tensor is read
    once; a different base is still refused, with nothing left behind, for a sharded directory and
    for a single file written to a .safetensors file."""
    from compeft import export
    from compeft.weights import SafetensorsFile

    base, tuned, base_dir, tuned_dir = models
    monkeypatch.setattr(export, "SHARD_PART_PARAMETERS", part)
    expert = compeft.compress(tuned_dir, base=base_dir, density=0.2)
    reads: list[str] = []
    real_get = SafetensorsFile.get_tensor
    monkeypatch.setattr(SafetensorsFile, "get_tensor",
                        lambda self, name, into=None: reads.append(name) or real_get(self, name, into))
    out = compeft.decompress(expert, workdir / "out", base=base_dir)
    assert sorted(reads) == sorted(base)
    want = {n: t.clone() for n, t in base.items()}
    compeft.apply(expert, want)
    got = read_model(out)
    assert all(torch.equal(got[n], want[n]) for n in want)

    other = {n: t.clone() for n, t in base.items()}
    other["layers.1.mlp.weight"].view(-1)[-1] += 1  # one weight of a tensor in the last shard
    other_dir = write_model(workdir / "other", other)
    single = write_model(workdir / "single", other, sharded=False) / "model.safetensors"
    before = sorted(p.name for p in workdir.iterdir())
    for source, target in ((other_dir, workdir / "wrong"), (single, workdir / "wrong.safetensors")):
        with pytest.raises(BaseMismatchError, match="--force") as caught:
            compeft.decompress(expert, target, base=source)
        assert str(source) in str(caught.value)
        assert sorted(p.name for p in workdir.iterdir()) == before  # no output, no hidden stage or temporary file
    forced = compeft.decompress(expert, workdir / "forced.safetensors", base=single, check_base=False)
    assert set(load_file(str(forced))) == set(base)


def test_finetune_without_base_is_not_a_peft_dir(models):
    base, tuned, base_dir, tuned_dir = models
    with pytest.raises(SourceError, match="base"):
        compeft.compress(tuned_dir, alpha=1.0, scope="global")


def test_bad_safetensors_index(workdir, models):
    base, tuned, base_dir, tuned_dir = models
    (tuned_dir / "model.safetensors.index.json").write_text('{"weight_map": {"x": "../escape.safetensors"}}')
    with pytest.raises(SourceError):
        compeft.compress(tuned_dir, base=base_dir, alpha=1.0, scope="global")
    (tuned_dir / "model.safetensors.index.json").write_text("not json")
    with pytest.raises(SourceError):
        compeft.compress(tuned_dir, base=base_dir, alpha=1.0, scope="global")


# ---------------------------------------------------------------------------------------------
# weight files read with pread (SafetensorsFile): equal to safetensors, and every bad file refused


def test_safetensors_file_reads_what_safetensors_wrote(tmp_path):
    from safetensors.torch import save_file
    from compeft.sources import SafetensorsFile
    tensors = {"bf": torch.randn(5, 7).bfloat16(), "i": torch.arange(12).reshape(3, 4), "empty": torch.zeros(0, 3),
               "scalar": torch.tensor(1.5), "h": torch.randn(33).half(), "flag": torch.tensor([True, False])}
    save_file(tensors, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "w.safetensors")
    assert sorted(f.keys()) == sorted(tensors) and f.metadata() == {"format": "pt"}
    for name, t in tensors.items():
        assert f.dtype_shape(name) == (t.dtype, tuple(t.shape))
        got = f.get_tensor(name)
        assert got.dtype == t.dtype and torch.equal(got, t)


def _raw_safetensors(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data


@pytest.mark.parametrize("case", ["short", "length", "json", "not-object", "offsets", "size", "dtype", "metadata",
                                  "shape"])
def test_safetensors_file_refuses_bad_files(tmp_path, case):
    from compeft.sources import SafetensorsFile
    good = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    blobs = {
        "short": b"\x05\x00",
        "length": _raw_safetensors(good, bytes(8), length=10**9),
        "json": (5).to_bytes(8, "little") + b"{nope" + bytes(8),
        "not-object": _raw_safetensors([1, 2]),  # type: ignore[arg-type]
        "offsets": _raw_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}, bytes(8)),
        "size": _raw_safetensors({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
        "dtype": _raw_safetensors({"w": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
        "metadata": _raw_safetensors({**good, "__metadata__": {"a": 1}}, bytes(8)),
        "shape": _raw_safetensors({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)),
    }
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blobs[case])
    with pytest.raises(SourceError, match="bad.safetensors"):
        SafetensorsFile(path)


def test_safetensors_file_refuses_a_fifo_without_blocking(tmp_path):
    from compeft.sources import SafetensorsFile
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(SourceError, match="not a regular file"):
        SafetensorsFile(fifo)


def test_safetensors_file_truncated_after_opening(tmp_path):
    from safetensors.torch import save_file
    from compeft.sources import SafetensorsFile
    save_file({"w": torch.randn(1000)}, str(tmp_path / "w.safetensors"))
    f = SafetensorsFile(tmp_path / "w.safetensors")
    with open(tmp_path / "w.safetensors", "r+b") as handle:
        handle.truncate(200)
    with pytest.raises(SourceError, match="shorter than its header says"):
        f.get_tensor("w")


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_write_safetensors_is_read_back_by_safetensors(tmp_path, metadata):
    from compeft.weights import SafetensorsFile, write_safetensors
    tensors = {"bf": torch.randn(5, 7).bfloat16(), "i": torch.arange(12).reshape(3, 4), "empty": torch.zeros(0, 3),
               "scalar": torch.tensor(1.5), "h": torch.randn(33).half(), "flag": torch.tensor([True, False]),
               "strided": torch.randn(6, 4).t()}
    write_safetensors(tensors, tmp_path / "w.safetensors", metadata)
    back = load_file(str(tmp_path / "w.safetensors"))
    assert sorted(back) == sorted(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as handle:
        assert handle.metadata() == metadata
    mine = SafetensorsFile(tmp_path / "w.safetensors")
    assert all(torch.equal(mine.get_tensor(n), t) for n, t in tensors.items())
    write_safetensors({}, tmp_path / "empty.safetensors")
    assert load_file(str(tmp_path / "empty.safetensors")) == {}
