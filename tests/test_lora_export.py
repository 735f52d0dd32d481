"""export-lora (compeft/lora.py): any expert as a PEFT LoRA adapter, checked by loading it into a
real Transformers Llama with PEFT and against an exact SVD of the decoded τ̃."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import compeft
from compeft.cli import main
from compeft.errors import InvalidArgumentError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

RANK = 4
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama() -> "transformers.PreTrainedModel":
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def full_finetune(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama")
    base = tiny_llama()
    base.save_pretrained(str(root / "base"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in base.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    base.save_pretrained(str(root / "tuned"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compeft.compress(root / "tuned", base=root / "base", density=0.3).save(root / "ft.cpeft")
    return {"root": root, "base": root / "base", "expert": root / "ft.cpeft"}


def test_full_finetune_exports_a_lora_that_peft_loads_with_the_svd_tail_as_its_error(full_finetune, tmp_path):
    expert = compeft.open(full_finetune["expert"])
    out = compeft.export_lora(expert, tmp_path / "lora", rank=RANK)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == RANK and config["peft_type"] == "LORA"
    assert len(out.kept) == 2 * len(LINEAR) + 1  # every linear layer of both blocks, and lm_head
    assert "model.norm.weight" in out.left_out and "model.embed_tokens.weight" in out.left_out
    assert 0 < out.left_out_energy < 1

    base = transformers.LlamaForCausalLM.from_pretrained(str(full_finetune["base"])).eval()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged = peft.PeftModel.from_pretrained(base, str(tmp_path / "lora")).merge_and_unload()
    after = dict(merged.named_parameters())
    for module, share in out.kept.items():
        name = f"{module}.weight"
        tau = expert.to_dense(name).float()
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        best = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]
        got = after[name].detach() - before[name]
        assert torch.allclose(got, best, atol=1e-5), module
        tail = float(s[RANK:].double().square().sum())
        assert float((tau - got).double().square().sum()) == pytest.approx(tail, rel=1e-3, abs=1e-9), module
        assert share == pytest.approx(1 - tail / float(tau.double().square().sum()), rel=1e-4)
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"])  # left out: unchanged


def test_a_lora_expert_is_exported_as_its_product(tmp_path):
    model = tiny_llama()
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapted = peft.get_peft_model(model, config)
    adapted.save_pretrained(str(tmp_path / "adapter"))
    expert = compeft.compress(tmp_path / "adapter", density=0.5)
    out = compeft.export_lora(expert, tmp_path / "lora", rank=8)
    assert sorted(out.kept) == sorted(f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj"))
    assert min(out.kept.values()) == pytest.approx(1.0)  # ΔW = 2 · B·A has rank ≤ 8: nothing lost
    from safetensors.torch import load_file  # the factors multiply back to scaling · B̃·Ã of the decoded expert
    factors = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    for module in out.kept:
        prefix = f"base_model.model.{module}"
        want = 2.0 * (expert.to_dense(f"{prefix}.lora_B.weight").float() @ expert.to_dense(f"{prefix}.lora_A.weight").float())
        got = factors[f"{prefix}.lora_B.weight"].float() @ factors[f"{prefix}.lora_A.weight"].float()
        assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max())), module


def test_target_modules_and_strict(full_finetune, tmp_path):
    out = compeft.export_lora(full_finetune["expert"], tmp_path / "q", rank=2, target_modules=["q_proj"])
    assert sorted(out.kept) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert out.left_out["model.layers.0.mlp.up_proj.weight"] == "not in target_modules"
    with pytest.raises(InvalidArgumentError, match="cannot be a LoRA"):
        compeft.export_lora(full_finetune["expert"], tmp_path / "s", rank=2, strict=True)
    assert not (tmp_path / "s").exists()
    with pytest.raises(InvalidArgumentError, match="no module of the expert matches"):
        compeft.export_lora(full_finetune["expert"], tmp_path / "n", rank=2, target_modules=["nope"])
    for bad in (0, -1, 2.5, True, 1 << 20):
        with pytest.raises(InvalidArgumentError, match="rank must be"):
            compeft.export_lora(full_finetune["expert"], tmp_path / "r", rank=bad)


def test_rank_patterns_are_refused(tmp_path):
    model = tiny_llama()
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"layers.0": 2}, init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(InvalidArgumentError, match="rank_pattern"):
        compeft.export_lora(compeft.compress(tmp_path / "adapter"), tmp_path / "lora", rank=4)


def test_randomized_svd_keeps_what_the_exact_one_keeps():
    from compeft import lora

    g = torch.Generator().manual_seed(5)
    low = torch.randn(1500, 12, generator=g) @ torch.randn(12, 1100, generator=g)
    matrix = low + 1e-3 * torch.randn(1500, 1100, generator=g)
    b, a, share = lora.factorize(matrix, 12)  # min side 1100 > EXACT_SVD_BELOW: randomized
    s = torch.linalg.svdvals(matrix)
    assert share == pytest.approx(float(s[:12].double().square().sum() / s.double().square().sum()), rel=1e-6)
    assert torch.allclose(b @ a, low, atol=0.05)


def test_cli_export_lora(full_finetune, tmp_path, capsys):
    assert main(["export-lora", str(full_finetune["expert"]), "--rank", "3", "-o", str(tmp_path / "lora")]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"wrote {tmp_path / 'lora'}: 15 modules at rank 3")
    assert captured.err.count("\n") == 1 and "left out" in captured.err
    assert main(["export-lora", str(full_finetune["expert"]), "--rank", "0", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rank must be" in err
