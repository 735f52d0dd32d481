"""Round trips through real PEFT and Transformers on tiny models built here (no hub access):
``compeft decompress`` directories, :mod:`compeft.integrations.peft` (adapters loaded and merged
without files), the dense-by-default rule for PEFT weights, and full fine-tunes of a real
Transformers model restored with ``AutoModel.from_pretrained``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import compeft
from compeft.errors import BaseMismatchError, HeaderError, InvalidArgumentError, SourceError
from compeft.sources import dense_reason

peft = pytest.importorskip("peft")
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict  # noqa: E402

from compeft.integrations.peft import adapter_config, adapter_state_dict, load_adapter, merge_into  # noqa: E402


class Tiny(nn.Module):
    """Embedding → two attention-like projections → feed-forward → a task head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.ff = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids).mean(1)
        return self.head(torch.relu(self.ff(torch.tanh(self.q_proj(x)) * self.v_proj(x))))


def fresh_base(width: int = 16) -> Tiny:
    torch.manual_seed(1234)
    return Tiny(width).eval()


IDS = torch.randint(0, 40, (24, 5), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def outputs(model: nn.Module) -> torch.Tensor:
    return model(IDS)


CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["head"]),
    "rslora-embedding": lambda: LoraConfig(r=4, lora_alpha=16, use_rslora=True,
                                           target_modules=["embed", "q_proj", "ff"], modules_to_save=["head"]),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]),
    "lora-bias-all": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], bias="all"),
    "ia3": lambda: IA3Config(target_modules=["q_proj", "v_proj", "ff"], feedforward_modules=["ff"]),
}


def train_like(model: nn.Module, seed: int) -> None:
    """Move every trainable tensor as training would (LoRA B leaves 0, heads and magnitudes move)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def save_adapter(kind: str, directory: Path, seed: int = 99) -> dict[str, torch.Tensor]:
    model = get_peft_model(fresh_base(), CONFIGS[kind]())
    train_like(model, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(directory))
    return load_file(str(directory / "adapter_model.safetensors"))


def model_with(kind: str, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A PeftModel with exactly ``weights`` as its adapter (the expected result)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(fresh_base(), CONFIGS[kind]())
    result = set_peft_model_state_dict(model, weights)
    assert not result.unexpected_keys
    return model.eval()


def expected_weights(kind: str, saved: dict[str, torch.Tensor], reference, density: float, alpha: float = 1.0):
    """Reference ComPEFT of an adapter: residuals from init (1 for (IA)³), weights kept verbatim."""
    config = json.loads(json.dumps(CONFIGS[kind]().to_dict(), default=str))
    peft_type = str(config["peft_type"]).split(".")[-1].upper()
    keep = [n for n in saved if dense_reason(n, peft_type, config.get("modules_to_save") or [])]
    init = 1.0 if peft_type == "IA3" else 0.0
    tau = {n: t.float() - init if init else t for n, t in saved.items()}
    ref = reference(tau, density, alpha, keep_dense=keep, dtypes={n: t.dtype for n, t in saved.items()})
    return {n: saved[n] if n in keep else (ref.values[n].float() + init).to(saved[n].dtype) for n in saved}, keep


def load_dir(directory: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(fresh_base(), str(directory)).eval()


# ---------------------------------------------------------------------------------------------
# decompress → PeftModel.from_pretrained, and load_adapter without files


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_adapter_roundtrip_through_peft(workdir, reference, kind):
    adapter = workdir / "adapter"
    saved = save_adapter(kind, adapter)
    expert_path = workdir / "e.cpeft"
    compeft.compress(adapter, density=0.25, alpha=1.5, scope="global").save(expert_path)
    want, kept_dense = expected_weights(kind, saved, reference, 0.25, 1.5)
    expected = outputs(model_with(kind, want))
    assert not torch.equal(expected, outputs(fresh_base()))

    # 1. a directory PEFT loads unchanged, with the original adapter_config.json
    out = compeft.decompress(expert_path, workdir / "restored")
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads(
        (adapter / "adapter_config.json").read_text())
    restored = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(restored) == sorted(saved)
    for name in saved:
        assert torch.equal(restored[name], want[name]), name
    assert torch.equal(outputs(load_dir(out)), expected)

    # 2. the same adapter straight from the container, no files written
    loaded = load_adapter(fresh_base(), expert_path, "task")
    assert list(loaded.peft_config) == ["task"] and not loaded.training
    assert torch.equal(outputs(loaded), expected)
    for name, tensor in adapter_state_dict(compeft.open(expert_path)).items():
        assert torch.equal(tensor, want[name])

    # 3. merged into the plain model's weights (PEFT's merge: equal up to float rounding)
    base = fresh_base()
    assert merge_into(base, expert_path) is base
    assert type(base) is Tiny and not any("lora" in n or "ia3" in n for n, _ in base.named_parameters())
    assert torch.allclose(outputs(base), expected, atol=1e-5)


def test_which_tensors_stay_dense_by_default(workdir):
    expected = {
        "lora": {"base_model.model.head.weight", "base_model.model.head.bias"},
        "rslora-embedding": {"base_model.model.head.weight", "base_model.model.head.bias"},
        "dora": {"base_model.model.q_proj.lora_magnitude_vector", "base_model.model.v_proj.lora_magnitude_vector"},
        "lora-bias-all": "every base-layer bias",
        "ia3": set(),
    }
    for kind, dense in expected.items():
        saved = save_adapter(kind, workdir / kind)
        if kind == "lora-bias-all":
            dense = {n for n in saved if n.endswith(".bias")}
            assert "base_model.model.q_proj.base_layer.bias" in dense
        expert = compeft.compress(workdir / kind, density=0.1)
        got = {n for n in expert.names if expert.entry(n).encoding == "dense"}
        assert got == dense and dense <= set(saved), kind
        for name in got:
            assert expert.entry(name).role == "value"
            assert torch.equal(expert.to_dense(name), saved[name])
        # --compress-all / auto_dense=False: the reference rule, every floating tensor compressed
        everything = compeft.compress(workdir / kind, density=0.1, auto_dense=False)
        assert all(everything.entry(n).compressed for n in everything.names)


@pytest.mark.parametrize("name, peft_type, modules, dense", [
    ("base_model.model.q.lora_A.weight", "LORA", [], False),
    ("base_model.model.q.lora_embedding_B", "LORA", [], False),
    ("base_model.model.q.lora_magnitude_vector", "LORA", [], True),
    ("base_model.model.classifier.weight", "LORA", ["classifier"], True),
    ("base_model.model.score.dense.weight", "LORA", ["score.dense"], True),
    ("base_model.model.q.bias", "LORA", [], True),
    ("base_model.model.q.lora_E", "ADALORA", [], False),
    ("base_model.model.q.ranknum", "ADALORA", [], True),
    ("base_model.model.q.ia3_l", "IA3", [], False),
    ("prompt_embeddings", "PROMPT_TUNING", [], True),
    ("base_model.model.q.hada_w1_a", "LOHA", [], False),
    ("base_model.model.embed.token_adapter.trainable_tokens_delta", "LORA", [], True),
    ("base_model.model.q.vera_lambda_b", "VERA", [], False),
    ("base_model.vera_A", "VERA", [], True),
])
def test_dense_rule(name, peft_type, modules, dense):
    assert (dense_reason(name, peft_type, modules) is not None) == dense


def test_two_named_adapters_on_one_model(workdir, reference):
    first, second = workdir / "a", workdir / "b"
    saved_a = save_adapter("lora", first, seed=1)
    saved_b = save_adapter("lora", second, seed=2)
    model = load_adapter(fresh_base(), compeft.compress(first, density=0.5, alpha=1.0, scope="global"), "a")
    model = load_adapter(model, compeft.compress(second, density=0.5, alpha=1.0, scope="global"), "b")
    assert sorted(model.peft_config) == ["a", "b"]
    for name, saved in (("a", saved_a), ("b", saved_b)):
        model.set_adapter(name)
        want, _ = expected_weights("lora", saved, reference, 0.5)
        assert torch.equal(outputs(model.eval()), outputs(model_with("lora", want)))
    with pytest.raises(InvalidArgumentError, match="already has an adapter named 'a'"):
        load_adapter(model, compeft.compress(first, density=0.5), "a")


def test_trainable_adapter(workdir):
    save_adapter("lora", workdir / "a")
    model = load_adapter(fresh_base(), compeft.compress(workdir / "a"), "x", is_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A.x" in n for n in trainable) and any("modules_to_save.x" in n for n in trainable)


def test_adapter_config_object(workdir):
    save_adapter("rslora-embedding", workdir / "a")
    config = adapter_config(compeft.compress(workdir / "a"))
    assert isinstance(config, LoraConfig) and config.use_rslora and config.r == 4 and config.inference_mode


# ---------------------------------------------------------------------------------------------
# errors


def test_base_with_other_shapes(workdir):
    save_adapter("lora", workdir / "a")
    expert = compeft.compress(workdir / "a")
    expert.save(workdir / "e.cpeft")
    with pytest.raises(BaseMismatchError, match="shape") as info:
        load_adapter(fresh_base(width=24), workdir / "e.cpeft")
    assert "e.cpeft" in str(info.value)


def test_base_without_the_target_modules(workdir):
    save_adapter("lora", workdir / "a")
    other = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(BaseMismatchError, match="does not fit"):
        load_adapter(other, compeft.compress(workdir / "a"))


def test_expert_with_extra_and_missing_tensors(workdir):
    saved = save_adapter("lora", workdir / "a")
    extra = dict(saved)
    extra["base_model.model.ff.lora_A.weight"] = torch.randn(4, 16)
    (workdir / "extra").mkdir()
    save_file(extra, str(workdir / "extra" / "adapter_model.safetensors"))
    (workdir / "extra" / "adapter_config.json").write_text((workdir / "a" / "adapter_config.json").read_text())
    compeft.compress(workdir / "extra").save(workdir / "extra.cpeft")
    with pytest.raises(SourceError, match="not parameters of the adapter") as info:
        load_adapter(fresh_base(), workdir / "extra.cpeft")
    assert "extra.cpeft" in str(info.value) and "ff.lora_A" in str(info.value)

    missing = {n: t for n, t in saved.items() if "v_proj.lora_B" not in n}
    (workdir / "missing").mkdir()
    save_file(missing, str(workdir / "missing" / "adapter_model.safetensors"))
    (workdir / "missing" / "adapter_config.json").write_text((workdir / "a" / "adapter_config.json").read_text())
    with pytest.raises(BaseMismatchError, match="lacks 1 tensors") as info:
        load_adapter(fresh_base(), compeft.compress(workdir / "missing"))
    assert "v_proj.lora_B" in str(info.value)


def test_not_a_peft_expert():
    expert = compeft.compress({"w": torch.randn(4, 4)})
    with pytest.raises(InvalidArgumentError, match="not made from a PEFT adapter"):
        load_adapter(fresh_base(), expert)
    with pytest.raises(BaseMismatchError, match="not in the model"):
        merge_into(fresh_base(), expert)


# ---------------------------------------------------------------------------------------------
# full fine-tunes of a real Transformers model


transformers = pytest.importorskip("transformers")


def tiny_bert() -> "transformers.PreTrainedModel":
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(config).eval()


def test_full_finetune_of_a_transformers_model(workdir, reference, apply_ref, same):
    from transformers import AutoModelForSequenceClassification
    base = tiny_bert()
    base.save_pretrained(str(workdir / "base"), max_shard_size="20KB")
    assert (workdir / "base" / "model.safetensors.index.json").is_file()
    tuned = tiny_bert()
    train_like(tuned, seed=3)
    tuned.config.id2label = {0: "negative", 1: "positive"}  # the fine-tune changed its config too
    tuned.config.label2id = {"negative": 0, "positive": 1}
    tuned.save_pretrained(str(workdir / "tuned"), max_shard_size="30KB")

    compeft.compress(workdir / "tuned", base=workdir / "base", density=0.2, alpha="l2", scope="global").save(workdir / "ft.cpeft")
    expert = compeft.open(workdir / "ft.cpeft")
    assert "config.json" in expert.metadata["model_files"]
    out = compeft.decompress(expert, workdir / "restored", base=workdir / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        restored = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert restored.config.id2label == {0: "negative", 1: "positive"}
    # the weights are base + τ̃ with τ̃ the reference compression of tuned − base
    base_state = {n: t for n, t in base.state_dict().items()}
    tuned_state = tuned.state_dict()
    tau = {n: tuned_state[n].float() - base_state[n].float() for n in expert.names}
    ref = reference(tau, 0.2)
    restored_state = restored.state_dict()
    for name in expert.names:
        e = expert.entry(name)
        assert e.scale == expert.entry(expert.names[0]).scale  # one global magnitude ...
        assert same(restored_state[name], apply_ref(base_state[name], expert.to_dense(name))), name
        assert torch.equal(expert.to_dense(name) != 0, ref.masks[name]), name

    # merge_into on the live model gives the same weights
    live = tiny_bert()
    merge_into(live, expert)
    for name in expert.names:
        assert same(live.state_dict()[name], restored_state[name]), name


def test_full_finetune_with_a_bad_model_file_name(workdir, container):
    base = {"w": torch.zeros(4)}
    (workdir / "base").mkdir()
    (workdir / "tuned").mkdir()
    save_file(base, str(workdir / "base" / "model.safetensors"))
    save_file({"w": torch.ones(4)}, str(workdir / "tuned" / "model.safetensors"))
    (workdir / "tuned" / "config.json").write_text("{}")
    path = workdir / "e.cpeft"
    compeft.compress(workdir / "tuned", base=workdir / "base").save(path)
    # a header naming a path instead of a file name is refused before anything is written
    parsed = container.read(path)
    parsed.doc["metadata"]["model_files"] = {"../evil.json": "{}"}
    path.write_bytes(container.build(parsed.doc, parsed.data))
    with pytest.raises(HeaderError, match="evil.json"):
        compeft.decompress(path, workdir / "out", base=workdir / "base")
    assert not (workdir / "out").exists() and not (workdir / "evil.json").exists()


def test_adapters_with_regular_expressions_load_as_peft_loads_them(workdir):
    """Legitimate patterns (a regex target_modules, regex rank_pattern keys) are evaluated by compeft
    within a budget and handed to PEFT as the names they match (spec/SECURITY.md T19): the adapter
    is the one PEFT builds from the original config."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*(q|v)_proj", rank_pattern={r"v_pr.j": 2},
                        alpha_pattern={r"^q_\w+$": 16})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(fresh_base(), config)
    train_like(model, 7)
    model.save_pretrained(str(workdir / "a"))
    expert = compeft.compress(workdir / "a", density=0.5)
    loaded = load_adapter(fresh_base(), expert)
    peft_loaded = load_dir(compeft.decompress(expert, workdir / "restored"))
    assert torch.equal(outputs(loaded), outputs(peft_loaded))
    assert loaded.base_model.model.v_proj.lora_A["default"].weight.shape[0] == 2
    assert loaded.base_model.model.q_proj.scaling["default"] == 4.0
