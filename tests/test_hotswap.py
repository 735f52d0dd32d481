"""hotswap (compeft/integrations/hotswap.py) and merge --lora-rank (compeft/lora_merge.py), on a
tiny real Llama with real PEFT adapters: a swap equals loading the adapter fresh, keeps every
module and parameter object, does not recompile a compiled model, and leaves the live adapter
bit-for-bit untouched on a corrupt or mismatched expert; a merge of LoRA products equals PEFT's
dense merge of the products, truncated by SVD."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import compeft
from compeft.cli import main
from compeft.errors import BaseMismatchError, CompeftError, InvalidArgumentError

from conftest import read_container, flip_byte

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft.utils import merge_utils  # noqa: E402
from peft.utils.hotswap import prepare_model_for_compiled_hotswap  # noqa: E402

from compeft.integrations.peft import hotswap, load_adapter  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


def tiny_llama() -> "transformers.PreTrainedModel":
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def save_adapter(path: Path, seed: int, r: int, alpha: int, targets: list[str] = TARGETS,
                 dtype: torch.dtype = torch.float32) -> Path:
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(tiny_llama().to(dtype), config, autocast_adapter_dtype=False).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hotswap")
    specs = {"a": (1, 4, 8, TARGETS), "b": (2, 4, 16, TARGETS), "c": (3, 8, 8, TARGETS),
             "wide": (4, 16, 16, TARGETS), "other": (5, 4, 8, ["k_proj", "v_proj"]), "bf16": (6, 4, 8, TARGETS)}
    out = {}
    for key, (seed, r, alpha, targets) in specs.items():
        dtype = torch.bfloat16 if key == "bf16" else torch.float32
        adapter = save_adapter(root / f"{key}-adapter", seed, r, alpha, targets, dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compeft.compress(adapter, density=0.5).save(root / f"{key}.cpeft")
        out[key] = root / f"{key}.cpeft"
    return out


def inputs() -> torch.Tensor:
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(7))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs()).logits


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def scalings(model: torch.nn.Module) -> list[float]:
    return [float(m.scaling["live"]) for m in model.modules() if isinstance(getattr(m, "scaling", None), dict) and "live" in m.scaling]


def test_a_swap_equals_loading_the_expert_fresh_and_keeps_every_object(experts):
    model = load_adapter(tiny_llama(), experts["a"], "live")
    modules = {n: m for n, m in model.named_modules()}
    params = {n: (p, p.data_ptr()) for n, p in model.named_parameters()}
    before = logits(model)
    assert hotswap(model, experts["b"], "live") is model  # same rank, another lora_alpha
    fresh = load_adapter(tiny_llama(), experts["b"], "live")
    after = logits(model)
    assert not torch.equal(after, before)
    assert torch.equal(after, logits(fresh))
    fresh_state = adapter_state(fresh)
    assert all(torch.equal(v, fresh_state[k]) for k, v in adapter_state(model).items())  # every entry rewritten
    assert scalings(model) == scalings(fresh) == [4.0] * 4
    assert all(m is modules[n] for n, m in model.named_modules())
    assert all(p is params[n][0] and p.data_ptr() == params[n][1] for n, p in model.named_parameters())


def test_a_smaller_rank_is_padded_into_a_model_prepared_for_a_target_rank(experts):
    model = load_adapter(tiny_llama(), experts["a"], "live")  # r = 4
    prepare_model_for_compiled_hotswap(model, target_rank=8, config=model.peft_config)
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    hotswap(model, experts["c"], "live")  # r = 8: fills the prepared rank
    assert torch.allclose(logits(model), logits(load_adapter(tiny_llama(), experts["c"], "live")), atol=1e-6)
    hotswap(model, experts["b"], "live")  # r = 4 again: padded with zeros, as PEFT pads
    assert torch.allclose(logits(model), logits(load_adapter(tiny_llama(), experts["b"], "live")), atol=1e-6)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers
    b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["live"].weight
    assert b.shape == (32, 8) and not b[:, 4:].any()
    fresh_b = load_adapter(tiny_llama(), experts["b"], "live").base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(b[:, :4], fresh_b.lora_B["live"].weight)


@pytest.mark.parametrize("prepared", [False, True])
def test_a_bf16_expert_into_float32_parameters_equals_peft_widening_it(experts, prepared):
    model = load_adapter(tiny_llama(), experts["a"], "live")
    if prepared:  # lora_A widened into its leading rows, lora_B through a scratch copy
        prepare_model_for_compiled_hotswap(model, target_rank=8, config=model.peft_config)
    hotswap(model, experts["bf16"], "live")
    fresh = load_adapter(tiny_llama(), experts["bf16"], "live")
    fresh_state = adapter_state(fresh)
    for key, value in adapter_state(model).items():
        assert value.dtype == torch.float32
        rows, cols = fresh_state[key].shape
        assert torch.equal(value[:rows, :cols], fresh_state[key]) and not value[rows:].any() \
            and not value[:, cols:].any(), key
    assert torch.allclose(logits(model), logits(fresh), atol=1e-6)


def test_a_compiled_model_is_not_recompiled(experts):
    model = load_adapter(tiny_llama(), experts["a"], "live")
    prepare_model_for_compiled_hotswap(model, target_rank=8, config=model.peft_config)  # scalings as tensors
    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):  # counts compilations
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    first = logits(compiled)
    compiled_count = len(graphs)
    assert compiled_count >= 1
    for key in ("c", "b"):  # another rank and another alpha
        hotswap(compiled, experts[key], "live")
        assert torch.allclose(logits(compiled), logits(load_adapter(tiny_llama(), experts[key], "live")), atol=1e-6)
    assert not torch.equal(first, logits(compiled))
    assert len(graphs) == compiled_count  # the swaps recompiled nothing
    torch._dynamo.reset()


def corrupt_copies(path: Path, tmp_path: Path) -> list[Path]:
    """A flipped payload byte (CRC fails) in the last tensor in file order, and a payload whose
    CRC is right but whose streams are garbage (structure fails)."""
    c = read_container(path)
    last = max(c.doc["tensors"], key=lambda e: e["offset"])["name"]
    flipped = tmp_path / "flipped.cpeft"
    flipped.write_bytes(path.read_bytes())
    start, end = c.payload_range(last)
    flip_byte(flipped, (start + end) // 2)
    compressed = next(e["name"] for e in sorted(c.doc["tensors"], key=lambda e: -e["offset"])
                      if e["encoding"] != "dense" and e["length"] > 8)
    c.set_payload(compressed, bytes([0xFF]) * len(c.payload(compressed)))
    garbage = tmp_path / "garbage.cpeft"
    garbage.write_bytes(c.to_bytes())
    return [flipped, garbage]


def test_a_corrupt_or_mismatched_expert_leaves_the_adapter_untouched(experts, tmp_path):
    model = load_adapter(tiny_llama(), experts["a"], "live")
    prepare_model_for_compiled_hotswap(model, target_rank=8, config=model.peft_config)
    state, scales, out = adapter_state(model), scalings(model), logits(model)
    bad = [*corrupt_copies(experts["b"], tmp_path), experts["wide"], experts["other"]]
    for path in bad:
        with pytest.raises(CompeftError) as info:
            hotswap(model, path, "live")
        assert str(path) in str(info.value)
        after = adapter_state(model)
        assert all(torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)) for k, v in state.items()), path
        assert scalings(model) == scales and torch.equal(logits(model), out)
    with pytest.raises(BaseMismatchError, match="larger rank"):
        hotswap(model, experts["wide"], "live")
    with pytest.raises(BaseMismatchError, match="other modules"):
        hotswap(model, experts["other"], "live")
    with pytest.raises(InvalidArgumentError, match="no adapter named"):
        hotswap(model, experts["b"], "missing")


def test_a_swap_from_a_url_and_a_non_lora_expert_is_refused(experts):
    model = load_adapter(tiny_llama(), experts["a"], "live")
    hotswap(model, f"file://{experts['b']}", "live")
    assert torch.equal(logits(model), logits(load_adapter(tiny_llama(), experts["b"], "live")))
    full = compeft.compress({"model.layers.0.self_attn.q_proj.weight": torch.randn(32, 32)})
    with pytest.raises(InvalidArgumentError, match="PEFT adapter"):
        hotswap(model, full, "live")


def products(path: Path) -> dict[str, torch.Tensor]:
    """module -> lora_alpha / r · B·A of a LoRA expert, decoded."""
    expert = compeft.open(path)
    config = expert.metadata["adapter_config"]
    scaling = config["lora_alpha"] / config["r"]
    out = {}
    for name in expert.names:
        if ".lora_A." in name:
            module = name[:name.index(".lora_A.")].removeprefix("base_model.model.")
            b = expert.to_dense(name.replace(".lora_A.", ".lora_B.")).float()
            out[module] = b @ expert.to_dense(name).float() * scaling
    return out


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_merge_lora_rank_equals_peft_dense_merge_truncated(experts, tmp_path, method):
    paths = [experts["a"], experts["c"]]  # ranks 4 and 8: PEFT's factor-wise merges refuse these
    weights = [0.7, 1.3]
    rank = 6
    out = tmp_path / "merged-lora"
    assert main(["merge", *map(str, paths), "--method", method, "--weights", "0.7,1.3", "--lora-rank", str(rank),
                 "-o", str(out), "-q"]) == 0
    assert main(["merge", *map(str, paths), "--method", method, "--weights", "0.7,1.3", "--lora-rank", str(rank),
                 "-o", str(tmp_path / "dense.safetensors"), "-q"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == rank and config["lora_alpha"] == rank
    from safetensors.torch import load_file

    dense = load_file(str(tmp_path / "dense.safetensors"))
    each = [products(p) for p in paths]
    base = tiny_llama()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged_model = peft.PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    after = dict(merged_model.named_parameters())
    for module in each[0]:
        stacked = [e[module] for e in each]
        w = torch.tensor(weights)
        if method == "ties":
            reference = merge_utils.ties(stacked, w, density=1.0, majority_sign_method="total")
        else:
            reference = merge_utils.task_arithmetic(stacked, w)
        assert torch.allclose(dense[f"{module}.weight"], reference, atol=1e-6), module
        s = torch.linalg.svdvals(reference)
        tail = float(s[rank:].double().square().sum())
        got = after[f"{module}.weight"].detach() - before[f"{module}.weight"]
        assert float((reference - got).double().square().sum()) == pytest.approx(tail, rel=1e-3, abs=1e-9), module


def test_merge_lora_rank_refuses_mismatched_experts_and_writes_nothing(experts, tmp_path, capsys):
    out = tmp_path / "merged"
    code = main(["merge", str(experts["a"]), str(experts["other"]), "--lora-rank", "4", "-o", str(out)])
    assert code != 0 and not out.exists()
    assert str(experts["other"]) in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no stage left behind
