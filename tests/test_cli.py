"""The ``compeft`` command, run as a real process (``python -m compeft.cli``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import compeft

LORA_NAMES = ("base_model.model.q_proj.lora_A.weight", "base_model.model.q_proj.lora_B.weight",
              "base_model.model.v_proj.lora_A.weight", "base_model.model.v_proj.lora_B.weight")


def cli(*args: object, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "compeft.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    # compeft's own errors, or argparse's for a malformed argument ("compeft compress: error: argument …")
    assert lines[0].startswith("compeft: error:") or lines[0].startswith("compeft ") and ": error: " in lines[0], \
        proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A LoRA adapter directory in the layout PEFT writes."""
    directory = tmp_path_factory.mktemp("cli") / "adapter"
    directory.mkdir()
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(4, 16, generator=g) if "lora_A" in n else torch.randn(16, 4, generator=g)
               for n in LORA_NAMES}
    save_file(weights, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def expert_file(adapter) -> Path:
    out = adapter.parent / "adapter.cpeft"
    proc = cli("compress", adapter, "-o", out, "--density", "0.2", "--alpha", "1.5", "--scope", "global",
               "--meta", "task=sst2", "--keep-dense", "*v_proj.lora_B*")
    assert proc.stdout.startswith(f"wrote {out}: 4 tensors")
    return out


def test_compress(expert_file, adapter, reference):
    expert = compeft.open(expert_file)
    assert expert.names == sorted(LORA_NAMES)
    assert expert.metadata["density"] == 0.2 and expert.metadata["alpha"] == 1.5
    assert expert.metadata["user"] == {"task": "sst2"} and expert.metadata["source"] == "peft"
    assert expert.entry("base_model.model.v_proj.lora_B.weight").encoding == "dense"
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    ref = reference(saved, 0.2, 1.5, "global", ["*v_proj.lora_B*"])
    for name in saved:
        assert torch.equal(expert.to_dense(name), ref.values[name])


def test_inspect_table(expert_file):
    proc = cli("inspect", expert_file)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"{expert_file}: compeft format v2, source=peft, scope=global, density=0.2")
    assert lines[1].split()[:3] == ["name", "dtype", "shape"]
    for name in LORA_NAMES:
        row = next(line for line in lines if line.startswith(name))
        assert "F32" in row
    dense_row = next(line for line in lines if line.startswith("base_model.model.v_proj.lora_B.weight"))
    assert "16x4" in dense_row and " dense " in dense_row
    total = next(i for i, line in enumerate(lines) if line.startswith("total: "))
    assert lines[total].startswith("total: 4 tensors, 256 parameters")
    assert lines[total + 1].startswith("fidelity without data (tensors: ‖τ−τ̃‖/‖τ‖ ")


def test_inspect_json(expert_file):
    summary = json.loads(cli("inspect", expert_file, "--json").stdout)
    expert = compeft.open(expert_file)
    assert summary["format_version"] == 2
    assert summary["metadata"]["density"] == 0.2 and summary["metadata"]["user"] == {"task": "sst2"}
    assert summary["has_adapter_config"] is True and "adapter_config" not in summary["metadata"]
    assert [r["name"] for r in summary["tensors"]] == expert.names
    for row in summary["tensors"]:
        e = expert.entry(row["name"])
        assert row["bytes"] == e.length and row["shape"] == list(e.shape) and row["encoding"] == e.encoding
        assert row["nnz"] == (e.nnz if e.compressed else e.numel)
    totals = summary["totals"]
    assert totals["tensors"] == 4 and totals["parameters"] == 256
    assert totals["file_bytes"] == expert_file.stat().st_size
    assert totals["ratio_vs_16bit"] == pytest.approx(512 / expert_file.stat().st_size)


def test_inspect_imports_neither_torch_nor_numba(expert_file):
    code = textwrap.dedent(f"""
        import sys, io, contextlib
        import compeft.cli
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            rc = compeft.cli.main(["inspect", {str(expert_file)!r}])
            rc2 = compeft.cli.main(["inspect", "--json", {str(expert_file)!r}])
        assert rc == 0 and rc2 == 0 and "total:" in buffer.getvalue()
        print("torch" in sys.modules, "numba" in sys.modules, "numpy" in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    torch_loaded, numba_loaded, _ = proc.stdout.split()
    assert torch_loaded == "False" and numba_loaded == "False"


def test_verify_ok(expert_file):
    proc = cli("verify", expert_file)
    assert proc.stdout.strip() == f"{expert_file}: OK (4 tensors, every checksum and structure verified)"


def test_decompress_to_dir_and_safetensors(expert_file, tmp_path, same):
    expert = compeft.open(expert_file)
    out_dir = tmp_path / "restored"
    out_file = tmp_path / "tau.safetensors"
    assert cli("decompress", expert_file, "-o", out_dir).stdout.strip() == f"wrote {out_dir}"
    assert cli("decompress", "-q", expert_file, "-o", out_file).stdout == ""
    restored = load_file(str(out_dir / "adapter_model.safetensors"))
    tau = load_file(str(out_file))
    assert json.loads((out_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    for name in expert.names:
        assert same(restored[name], expert.to_dense(name))
        assert same(tau[name], expert.to_dense(name))


def test_quick_exit_skips_teardown_but_flushes_output(expert_file, tmp_path, same):
    """decompress ends with os._exit after flushing (block-buffered pipes included): no exit handler
    runs, the message and the file are whole; inspect (not in QUICK_EXIT) exits normally."""
    code = ("import atexit, sys; atexit.register(lambda: print('exit handler ran'))\n"
            "from compeft.cli import entry_point\nentry_point()")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    out = tmp_path / "tau.safetensors"

    def run(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=120)

    proc = run("decompress", expert_file, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"wrote {out}\n"
    tau = load_file(str(out))
    assert all(same(tau[n], compeft.open(expert_file).to_dense(n)) for n in LORA_NAMES)
    bad = run("decompress", tmp_path / "missing.cpeft", "-o", out)
    assert bad.returncode == 2 and bad.stderr.startswith("compeft: error:") and bad.stdout == ""
    assert run("inspect", expert_file).stdout.endswith("exit handler ran\n")


def test_full_finetune_compress_and_decompress_with_base(tmp_path, same):
    g = torch.Generator().manual_seed(1)
    base = {"a.weight": torch.randn(8, 8, generator=g), "b.weight": torch.randn(8, generator=g).bfloat16()}
    tuned = {n: (t.float() + 0.1 * torch.randn(t.shape, generator=g)).to(t.dtype) for n, t in base.items()}
    for name, tensors in (("base", base), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text('{"name": "%s"}' % name)
    expert_path = tmp_path / "ft.cpeft"
    cli("compress", tmp_path / "tuned", "--base", tmp_path / "base", "-o", expert_path, "--density", "0.5",
        "--scope", "tensor", "-q")
    cli("decompress", expert_path, "--base", tmp_path / "base", "-o", tmp_path / "out", "-q")
    restored = load_file(str(tmp_path / "out" / "model.safetensors"))
    # the fine-tune's config files are recorded in the header and replace the base's copies
    assert (tmp_path / "out" / "config.json").read_text() == '{"name": "tuned"}'
    expected = {n: t.clone() for n, t in base.items()}
    compeft.apply(expert_path, expected)
    for name in base:
        assert same(restored[name], expected[name])
    # a different base is refused unless --force
    other = {n: t + 1 for n, t in base.items()}
    (tmp_path / "other").mkdir()
    save_file(other, str(tmp_path / "other" / "model.safetensors"))
    proc = cli("decompress", expert_path, "--base", tmp_path / "other", "-o", tmp_path / "out2", check=False)
    assert_one_line_error(proc, "--force", str(tmp_path / "other"))
    assert not (tmp_path / "out2").exists()


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_file(tmp_path):
    missing = tmp_path / "missing.cpeft"
    assert_one_line_error(cli("inspect", missing, check=False), str(missing))
    assert_one_line_error(cli("decompress", missing, "-o", tmp_path / "out", check=False), str(missing))


def test_missing_source(tmp_path):
    missing = tmp_path / "no-adapter"
    assert_one_line_error(cli("compress", missing, "-o", tmp_path / "x.cpeft", check=False), str(missing))
    assert not (tmp_path / "x.cpeft").exists()


def test_corrupt_file(expert_file, tmp_path, container):
    bad = tmp_path / "corrupt.cpeft"
    bad.write_bytes(expert_file.read_bytes())
    start, _ = container.read(bad).payload_range("base_model.model.q_proj.lora_A.weight")
    container.flip_byte(bad, start + 3)
    proc = cli("verify", bad, check=False)
    assert_one_line_error(proc, str(bad), "CRC")
    assert proc.stdout == ""


def test_not_a_compeft_file(adapter, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("these are not the bytes you are looking for\n" * 4)
    assert_one_line_error(cli("inspect", text, check=False), str(text), "magic")
    weights = adapter / "adapter_model.safetensors"
    assert_one_line_error(cli("inspect", weights, check=False), str(weights))


def test_directory_instead_of_file_is_one_line(adapter):
    assert_one_line_error(cli("inspect", adapter, check=False))


def test_directory_instead_of_file_names_the_path(adapter):
    assert_one_line_error(cli("inspect", adapter, check=False), str(adapter))


def test_bad_density(adapter, tmp_path):
    proc = cli("compress", adapter, "-o", tmp_path / "x.cpeft", "--density", "2", check=False)
    assert_one_line_error(proc, "density")
    assert not (tmp_path / "x.cpeft").exists()


def test_version_and_usage():
    assert cli("--version").stdout.strip() == f"compeft {compeft.__version__}"
    proc = cli(check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_demo_quiet():
    proc = cli("demo", "--quiet", timeout=300)
    assert proc.returncode == 0
    assert proc.stdout == ""


@pytest.fixture(scope="module")
def full_experts(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A sharded base model and two full fine-tunes of it, compressed."""
    root = tmp_path_factory.mktemp("merge")
    g = torch.Generator().manual_seed(3)
    base = {"layer.a": torch.randn(64, 32, generator=g), "layer.b": torch.randn(100, generator=g).bfloat16(),
            "head.c": torch.randn(40, 8, generator=g)}
    (root / "base").mkdir()
    save_file({k: base[k] for k in ("layer.a", "layer.b")}, str(root / "base" / "model-1.safetensors"))
    save_file({"head.c": base["head.c"]}, str(root / "base" / "model-2.safetensors"))
    (root / "base" / "config.json").write_text("{}")
    experts = []
    for k in range(2):
        tuned = {n: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype) for n, v in base.items()}
        (root / f"ft{k}").mkdir()
        save_file(tuned, str(root / f"ft{k}" / "model.safetensors"))
        experts.append(root / f"e{k}.cpeft")
        cli("compress", root / f"ft{k}", "--base", root / "base", "-o", experts[-1], "--density", "0.2", "-q")
    return root, experts


def test_merge_onto_base_keeps_sharding_and_adds_the_merge(full_experts):
    root, experts = full_experts
    cli("merge", *experts, "--method", "ties", "--weights", "1,0.5", "--lambda", "0.8", "--base", root / "base",
        "-o", root / "merged", "-q")
    assert sorted(p.name for p in (root / "merged").iterdir()) == ["config.json", "model-1.safetensors",
                                                                    "model-2.safetensors"]
    merged = compeft.merge([compeft.open(p) for p in experts], method="ties", weights=[1, 0.5], lam=0.8)
    for shard in ("model-1.safetensors", "model-2.safetensors"):
        base = load_file(str(root / "base" / shard))
        out = load_file(str(root / "merged" / shard))
        for name, w in base.items():
            assert torch.equal(out[name], (w.float() + merged[name]).to(w.dtype))


def test_merge_to_safetensors_and_recompressed(full_experts):
    root, experts = full_experts
    cli("merge", *experts, "--method", "task_arithmetic", "--lambda", "0.4", "-o", root / "tv.safetensors", "-q")
    merged = compeft.merge([compeft.open(p) for p in experts], method="task_arithmetic", lam=0.4)
    tv = load_file(str(root / "tv.safetensors"))
    assert tv.keys() == merged.keys() and all(torch.equal(tv[n], merged[n]) for n in tv)
    cli("merge", *experts, "--method", "dare_ties", "--drop-rate", "0.3", "--seed", "7", "-o",
        root / "m.cpeft", "--density", "0.1", "-q")
    record = json.loads(compeft.open(root / "m.cpeft").metadata["user"]["merge"])
    assert record["method"] == "dare_ties" and record["seed"] == 7 and record["drop_rate"] == 0.3
    assert compeft.open(root / "m.cpeft").metadata["density"] == 0.1


@pytest.mark.parametrize("args, fragment", [
    (["--method", "ties", "-o", "out.txt"], "must end in"),
    (["--weights", "1,2,3", "-o", "x.safetensors"], "--weights"),
    (["--method", "ties", "--drop-rate", "0.5", "-o", "x.safetensors"], "drop_rate"),
])
def test_merge_errors_are_one_line(full_experts, args, fragment):
    root, experts = full_experts
    assert_one_line_error(cli("merge", *experts, *args, check=False), fragment)
