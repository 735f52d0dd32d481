"""An expert's adapter_config is untrusted (spec/SECURITY.md T19): checked before PEFT sees it.

PEFT evaluates strings of the config as regular expressions with the backtracking ``re`` engine and
reads every field without checking its type. ``compeft.integrations.patterns`` evaluates patterns
in bounded time (compared here with ``re`` on random patterns) and
``compeft.integrations.peft_config.checked_config`` hands PEFT only plain names, tries of the
names a pattern matched, and fields of the types PEFT's dataclasses declare.
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import compeft
from compeft.errors import BaseMismatchError, CompeftError, SourceError
from compeft.integrations.patterns import Budget, Pattern, PatternError, literal_union
from conftest import load_tool

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

from compeft.integrations.peft import adapter_config, load_adapter, merge_into  # noqa: E402
from compeft.integrations.peft_config import checked_config, module_names_of  # noqa: E402

surgery = load_tool("surgery")
LONG = "a" * 48  # a module name on which (a|a)*c backtracks 2**48 times


# ---------------------------------------------------------------------------------------------
# the bounded matcher agrees with re


ATOMS = ["a", "b", ".", r"\.", "[ab]", "[^a]", r"\d", r"\w", r"\s", r"\S", "x", "[a-c]", "[]a]", r"\n", "^", "$",
         r"\A", r"\Z", "{", "-", "é"]
QUANTIFIERS = ["", "", "", "*", "+", "?", "{2}", "{1,3}", "{,2}", "{2,}", "*?", "+?", "??", "{0}", "{,}"]


@st.composite
def patterns(draw, depth: int = 0) -> str:
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.integers(0, 9)) if depth < 3 else 9
        if kind == 0:
            atom = "(" + draw(patterns(depth + 1)) + ")"
        elif kind == 1:
            atom = "(?:" + draw(patterns(depth + 1)) + "|" + draw(patterns(depth + 1)) + ")"
        elif kind == 2:
            atom = "(?P<g" + str(depth) + ">" + draw(patterns(depth + 1)) + ")"
        else:
            atom = draw(st.sampled_from(ATOMS))
        parts.append(atom + draw(st.sampled_from(QUANTIFIERS)))
    return "".join(parts)


@settings(max_examples=400, deadline=None)
@given(patterns(), st.lists(st.text(alphabet="ab.x1 \n_c{é-", max_size=8), min_size=1, max_size=6))
def test_bounded_matcher_agrees_with_re(pattern, texts):
    try:
        expected = re.compile(pattern)
    except re.error:
        with pytest.raises(PatternError):
            Pattern(pattern)
        return
    ours = Pattern(pattern)
    for text in texts:
        assert ours.fullmatch(text, Budget()) == (expected.fullmatch(text) is not None), (pattern, text)
        assert ours.match(text, Budget()) == (expected.match(text) is not None), (pattern, text)


@pytest.mark.parametrize("pattern", [r"(a|a)*c", r"(a+)+c", r"(.*)*c", r"(?:a|aa)*c", r"(a*)*$c", r"(.*a){30}c"])
def test_catastrophic_patterns_take_linear_time(pattern):
    """Each would take 2**48 steps or more under re on LONG; here one pass over the name."""
    compiled = Pattern(pattern)
    budget = Budget()
    started = time.perf_counter()
    assert not compiled.fullmatch(LONG, budget) and not compiled.match(LONG, budget)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("pattern,problem", [
    (r"(a)\1", "escape"), (r"(?=a)a", "group"), (r"(?i)a", "group"), (r"\bq", "escape"), ("a*+", "possessive"),
    ("(" * 70 + ")" * 70, "nested"), ("a{30000}", "repeat count"), ("(?:a{100}){300}", "states"), ("(", "valid"),
])
def test_patterns_that_need_backtracking_or_are_too_large_are_refused(pattern, problem):
    with pytest.raises(PatternError, match=problem):
        Pattern(pattern)


def test_the_budget_bounds_the_work_of_a_pattern_with_an_exploding_dfa():
    compiled = Pattern(r"[ab]*a[ab]{14}x")
    budget = Budget(200_000)
    started = time.perf_counter()
    with pytest.raises(PatternError, match="more work than allowed"):
        for i in range(10_000):
            compiled.fullmatch(format(i * 2654435761 % 2 ** 40, "040b").replace("0", "a").replace("1", "b"), budget)
    assert time.perf_counter() - started < 5


@settings(max_examples=200, deadline=None)
@given(st.sets(st.text(alphabet="ab.(|*)\\", max_size=10), max_size=12), st.text(alphabet="ab.(|*)\\", max_size=10))
def test_literal_union_matches_exactly_its_names(names, other):
    union = literal_union(names)
    assert all(re.fullmatch(union, n) for n in names)
    assert (re.fullmatch(union, other) is not None) == (other in names)


def test_literal_union_of_deep_names_stays_shallow():
    deep = ".".join(["a"] * 400)
    union = literal_union([deep, deep[:201], "b"])
    assert union.count("(") <= 40
    assert re.fullmatch(union, deep) and re.fullmatch(union, deep[:201]) and not re.fullmatch(union, deep[:203])


# ---------------------------------------------------------------------------------------------
# checked_config


LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": ["head"], "task_type": None, "bias": "none"}
NAMES = ["", "embed", "q_proj", "v_proj", "ff", "head", LONG]


def check(**changes) -> dict:
    return checked_config(dict(LORA, **changes), NAMES, 16, "e.cpeft")


def test_a_regular_expression_is_replaced_by_the_names_it_matches():
    config = check(target_modules=r"(?:(q|q)*_proj|v_proj|(a|a)*c)", exclude_modules=r"v_pr[o]j")
    assert re.fullmatch(config["target_modules"], "q_proj") and re.fullmatch(config["target_modules"], "v_proj")
    assert not re.fullmatch(config["target_modules"], LONG) and not re.fullmatch(config["target_modules"], "ff")
    assert [n for n in NAMES if re.fullmatch(config["exclude_modules"], n)] == ["v_proj"]
    assert check(target_modules="q_proj")["target_modules"] == "q_proj"  # plain: handed on unchanged
    assert check(target_modules="all-linear")["target_modules"] == "all-linear"


def test_pattern_keys_resolve_as_peft_matches_them():
    config = check(rank_pattern={r"q_pr(o)+j": 2, "v_proj": 3}, alpha_pattern={r"(a|a)*c": 1.0})
    (resolved, value), plain = list(config["rank_pattern"].items())
    assert value == 2 and plain == ("v_proj", 3)
    assert re.match(rf"(.*\.)?({resolved})$", "q_proj") and not re.match(rf"(.*\.)?({resolved})$", "v_proj")
    assert config["alpha_pattern"] == {}  # matched no module


@pytest.mark.parametrize("changes,message", [
    ({"r": "4"}, "r: expected int"),
    ({"r": 4.0}, "r: expected int"),
    ({"r": True}, "r: expected int"),
    ({"r": 10 ** 400}, "r: expected int"),
    ({"r": 4096}, "larger than any dimension"),
    ({"target_modules": [1, 2]}, "target_modules"),
    ({"target_modules": {"q_proj": 1}}, "target_modules"),
    ({"target_modules": ["q_proj"] * 2000}, "target_modules"),
    ({"lora_alpha": [8]}, "lora_alpha"),
    ({"use_dora": 1}, "use_dora"),
    ({"bias": "most"}, "bias"),
    ({"layers_to_transform": "0"}, "layers_to_transform"),
    ({"rank_pattern": {"q_proj": "x"}}, "not a number"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern"),
    ({"modules_to_save": ["(a+)+$"]}, "not a plain module name"),
    ({"modules_to_save": "head"}, "modules_to_save"),
    ({"layers_pattern": "lay(ers)*"}, "not a plain module name"),
    ({"target_modules": "(a)\\1"}, "not evaluated here"),
    ({"target_modules": "\ud800"}, "target_modules"),
    ({"peft_type": ["LORA"]}, "peft_type"),
    ({"peft_type": "NOPE"}, "peft_type"),
    ({"peft_type": "XLORA"}, "not loaded from a file"),
    ({"init_lora_weights": "eva"}, "caches or data"),
    ({"megatron_config": {"a": 1}}, "megatron_config"),
])
def test_fields_of_the_wrong_type_or_reach_are_refused(changes, message):
    with pytest.raises(SourceError, match=re.escape(message)) as info:
        check(**changes)
    assert "e.cpeft" in str(info.value) and len(str(info.value).splitlines()) == 1


def test_unknown_fields_and_runtime_config_are_dropped_and_prompt_inits_read_nothing():
    config = check(from_a_newer_peft=[1], runtime_config={"ephemeral_gpu_offload": True})
    assert "from_a_newer_peft" not in config and "runtime_config" not in config
    prompt = checked_config({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "token_dim": 16,
                             "prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "someone/remote-code",
                             "tokenizer_kwargs": {"trust_remote_code": True}}, NAMES, 16, "e.cpeft")
    assert prompt["prompt_tuning_init"] == "RANDOM" and "tokenizer_kwargs" not in prompt


def test_module_names_of_saved_tensors():
    assert module_names_of(["base_model.model.a.q_proj.lora_A.weight"]) == [
        "a", "a.q_proj", "a.q_proj.lora_A", "a.q_proj.lora_A.weight"]


# ---------------------------------------------------------------------------------------------
# through real PEFT


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 16)
        self.ff = nn.Linear(16, 16)
        self.add_module(LONG, nn.Linear(16, 16))  # where a catastrophic pattern would hang PEFT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(torch.tanh(self.q_proj(x)) * self.v_proj(x))


X = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))


def base() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture(scope="module")
def lora_expert(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  rank_pattern={"v_proj": 2}))
        for p in model.parameters():
            if p.requires_grad:
                p.data += 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
        model.save_pretrained(str(directory))
    path = directory / "e.cpeft"
    compeft.compress(directory, density=0.5).save(path)
    return path


def with_config(path: Path, tmp_path: Path, **changes) -> Path:
    """A copy of the expert whose header's adapter_config has ``changes`` (header CRC recomputed)."""
    def edit(doc: dict) -> None:
        doc["metadata"]["adapter_config"].update(changes)
    out = tmp_path / "edited.cpeft"
    out.write_bytes(surgery.with_header(path.read_bytes(), edit))
    return out


@torch.no_grad()
def outputs(model: nn.Module) -> torch.Tensor:
    return model(X)


def test_a_catastrophic_target_pattern_loads_in_bounded_time(lora_expert, tmp_path):
    """PEFT would run re.fullmatch('(?:q_proj|v_proj|(a|a)*c)', 'aaa…a') — 2**48 steps — and hang;
    compeft evaluates it, hands PEFT the two names it matches, and the adapter is the same."""
    expected = outputs(load_adapter(base(), lora_expert))
    hostile = with_config(lora_expert, tmp_path, target_modules=r"(?:q_proj|v_proj|(a|a)*c)",
                          rank_pattern={r"(?:v_pr(o|o)*j|(a|a)*c)": 2})
    started = time.perf_counter()
    loaded = load_adapter(base(), hostile)
    assert time.perf_counter() - started < 30
    assert torch.equal(outputs(loaded), expected)
    assert re.fullmatch(adapter_config(compeft.open(hostile)).target_modules, "q_proj")


@pytest.mark.parametrize("changes", [{"r": "4"}, {"target_modules": [1, 2]}, {"rank_pattern": {"v_proj": "2"}},
                                     {"layers_to_transform": "x"}, {"modules_to_save": ["(a+)+$"]},
                                     {"exclude_modules": 3}, {"lora_alpha": None}, {"use_rslora": "yes"},
                                     {"target_modules": "(a)\\1"}, {"peft_type": "BOGUS"}])
def test_odd_fields_never_escape_as_type_or_attribute_errors(lora_expert, tmp_path, changes):
    hostile = with_config(lora_expert, tmp_path, **changes)
    for call in (lambda: load_adapter(base(), hostile), lambda: merge_into(base(), hostile),
                 lambda: adapter_config(compeft.open(hostile))):
        with pytest.raises(CompeftError) as info:
            call()
        assert str(hostile) in str(info.value)


def test_a_pattern_matching_nothing_is_a_base_mismatch(lora_expert, tmp_path):
    with pytest.raises(BaseMismatchError, match="does not fit"):
        load_adapter(base(), with_config(lora_expert, tmp_path, target_modules=r"(a|a)*c"))

