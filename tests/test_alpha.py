"""Choosing α: the closed-form (L2-optimal) α and the ``tune_alpha`` sweep (API and CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import compeft
import compeft.tuning
from compeft.errors import InvalidArgumentError

PAPER_GRID = [0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]


def l2_error(tau: dict[str, torch.Tensor], expert: compeft.CompressedExpert) -> float:
    return sum(float(((tau[n].double() - expert.to_dense(n).double()) ** 2).sum()) for n in tau)


def brute_force_alpha(tau: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], sigma: float) -> float:
    """argmin over a fine grid of Σ_kept (|τ| − ασ)² + Σ_dropped τ² (the dropped part is constant)."""
    kept = torch.cat([tau[n].double().abs()[masks[n]] for n in sorted(tau)])
    grid = torch.linspace(0, 10, 200001, dtype=torch.float64)
    errors = ((kept[None, :] - grid[:, None] * sigma) ** 2).sum(1) if kept.numel() < 2000 else torch.stack(
        [((kept - a * sigma) ** 2).sum() for a in grid[::100]])
    step = grid[1] - grid[0] if kept.numel() < 2000 else grid[100] - grid[0]
    return float(grid[int(errors.argmin())] if kept.numel() < 2000 else grid[::100][int(errors.argmin())]), float(step)


@pytest.mark.parametrize("density", [0.05, 0.1, 0.3, 1.0])
def test_closed_form_alpha_is_the_brute_force_minimum_global(make_tv, reference, density):
    tau = make_tv(seed=3, shapes={"a": (30, 20), "b": (50,), "c": (7, 9)})
    ref = reference(tau, density)
    expert = compeft.compress(tau, density=density, alpha="l2", scope="global")
    sigma = ref.sigmas["a"]
    found, step = brute_force_alpha(tau, ref.masks, sigma)
    alpha = expert.metadata["alpha"]
    assert expert.metadata["alpha_rule"] == "l2"
    assert abs(alpha - found) <= step
    # the stored magnitude is float32(mean kept |τ|) = float32(α*·σ)
    kept = torch.cat([tau[n].double().abs()[ref.masks[n]] for n in sorted(tau)])
    assert expert.entry("a").scale == float(np.float32(kept.mean()))
    assert alpha == pytest.approx(float(kept.mean()) / sigma, rel=1e-12)
    # and the reconstruction is no worse than any grid α (the paper's grid included)
    best = l2_error(tau, expert)
    for a in PAPER_GRID + [alpha * 0.99, alpha * 1.01]:
        assert best <= l2_error(tau, compeft.compress(tau, density=density, alpha=a, scope="global")) * (1 + 1e-9)
    # the mask is the one of every other α: only values change
    for name in tau:
        assert torch.equal(expert.to_dense(name) != 0, ref.masks[name])


def test_closed_form_alpha_per_tensor(make_tv, reference):
    tau = make_tv(seed=4, shapes={"a": (40, 10), "b": (64,)})
    tau["b"] = tau["b"] * 0.01  # a much smaller tensor gets its own, much smaller magnitude
    expert = compeft.compress(tau, density=0.2, alpha="l2", scope="tensor")
    ref = reference(tau, 0.2, scope="tensor")
    assert expert.metadata["alpha"] is None and expert.metadata["alpha_rule"] == "l2"
    for name in tau:
        kept = tau[name].double().abs()[ref.masks[name]]
        assert expert.entry(name).scale == float(np.float32(kept.mean()))
        found, step = brute_force_alpha({name: tau[name]}, ref.masks, ref.sigmas[name])
        assert abs(expert.entry(name).scale / ref.sigmas[name] - found) <= step * 1.01


def test_closed_form_alpha_low_precision(make_tv, reference, same):
    tau = make_tv(seed=5, dtype=torch.bfloat16)
    expert = compeft.compress(tau, density=0.1, alpha="l2", scope="global")
    ref = reference(tau, 0.1)
    kept = torch.cat([tau[n].double().abs()[ref.masks[n]] for n in sorted(tau)])
    magnitude = torch.tensor(float(np.float32(kept.mean()))).bfloat16()
    for name in tau:
        want = torch.zeros_like(tau[name])
        want[ref.masks[name] & (tau[name] > 0)] = magnitude
        want[ref.masks[name] & (tau[name] < 0)] = -magnitude
        assert same(expert.to_dense(name), want)


def test_closed_form_alpha_of_an_all_zero_vector():
    expert = compeft.compress({"z": torch.zeros(10)}, density=0.5, alpha="l2", scope="global")
    assert expert.entry("z").nnz == 0 and expert.entry("z").scale == 0.0
    assert expert.metadata["alpha"] == 0.0


def test_closed_form_alpha_leaves_other_containers_unchanged(make_tv):
    tau = make_tv(seed=6)
    plain = compeft.compress(tau, density=0.1, alpha=2.0, scope="global")
    assert "alpha_rule" not in plain.metadata and plain.metadata["alpha"] == 2.0


@pytest.mark.parametrize("alpha", ["L2", "auto", -1.0, float("nan"), True])
def test_bad_alpha(alpha, make_tv):
    with pytest.raises(InvalidArgumentError, match="alpha"):
        compeft.compress(make_tv(), alpha=alpha)


# ---------------------------------------------------------------------------------------------
# tune_alpha


def test_tune_alpha_picks_the_best_point_and_records_it(make_tv, roundtrip):
    tau = make_tv(seed=7)
    seen = []

    def evaluate(expert):
        m = expert.metadata
        seen.append((m["density"], m.get("alpha_rule") or m["alpha"]))
        # a made-up validation score, best at density 0.2 and alpha 3
        return -(m["alpha"] - 3.0) ** 2 - 10 * (m["density"] - 0.2) ** 2

    result = compeft.tune_alpha(tau, evaluate, densities=[0.1, 0.2, 0.5], scope="global")
    assert (result.density, result.alpha) == (0.2, 3.0)
    assert result.score == 0.0
    # the default grid: the paper's, then the default rule (so tuning never does worse than the default)
    assert seen == [(d, a) for d in (0.1, 0.2, 0.5) for a in [*PAPER_GRID, "unbiased"]]
    assert [s[:2] for s in result.scores] == seen
    assert result.expert.metadata["density"] == 0.2 and result.expert.metadata["alpha"] == 3.0
    tuning = roundtrip(result.expert).metadata["tuning"]
    assert tuning["chosen"] == {"density": 0.2, "alpha": 3.0, "score": 0.0}
    assert tuning["alphas"] == [*PAPER_GRID, "unbiased"] and tuning["densities"] == [0.1, 0.2, 0.5]
    assert len(tuning["scores"]) == 30 and tuning["scores"][0][:2] == [0.1, 0.5]
    # the chosen expert is the one compress gives for that point
    direct = compeft.compress(tau, density=0.2, alpha=3.0, scope="global")
    for name in tau:
        assert torch.equal(result.expert.to_dense(name), direct.to_dense(name))


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_tune_candidates_are_byte_identical_to_compress(make_tv, scope):
    tau = make_tv(seed=8, dtype=torch.float16)
    candidates = {}

    def evaluate(expert):
        candidates[(expert.metadata["density"], expert.metadata["alpha"], expert.metadata.get("alpha_rule"))] = \
            expert.to_bytes()
        return 0.0

    compeft.tune_alpha(tau, evaluate, densities=[0.05, 0.3], alphas=[0.5, 2.0, "l2"], scope=scope)
    for (density, alpha, rule), blob in candidates.items():
        want = compeft.compress(tau, density=density, alpha="l2" if rule else alpha, scope=scope)
        assert blob == want.to_bytes()


def test_tune_alpha_encodes_once_per_density(make_tv, monkeypatch):
    calls = []
    original = compeft.tuning.encode_source

    def counting(*args, **kwargs):
        calls.append(kwargs["density"])
        return original(*args, **kwargs)

    monkeypatch.setattr(compeft.tuning, "encode_source", counting)
    compeft.tune_alpha(make_tv(seed=9), lambda e: 1.0, densities=[0.1, 0.2], scope="global")
    assert calls == [0.1, 0.2]


def test_tune_alpha_ties_go_to_the_first_point(make_tv):
    result = compeft.tune_alpha(make_tv(), lambda e: 1.0, densities=[0.3, 0.1], alphas=[2.0, 1.0], scope="global")
    assert (result.density, result.alpha) == (0.3, 2.0)


def test_tune_alpha_with_the_closed_form_in_the_grid(make_tv):
    tau = make_tv(seed=10)
    result = compeft.tune_alpha(tau, lambda e: -l2_error(tau, e), densities=[0.1], alphas=[1.0, 2.0, "l2"], scope="global")
    assert result.alpha == "l2"
    assert result.expert.metadata["alpha_rule"] == "l2"
    assert result.expert.metadata["tuning"]["chosen"]["alpha"] == "l2"


@pytest.mark.parametrize("score", [float("nan"), "high", None, True])
def test_tune_alpha_rejects_scores_that_are_not_numbers(make_tv, score):
    with pytest.raises(InvalidArgumentError, match="finite number"):
        compeft.tune_alpha(make_tv(), lambda e: score, alphas=[1.0])


@pytest.mark.parametrize("kwargs", [dict(densities=[]), dict(alphas=[]), dict(densities=[1.5]),
                                    dict(alphas=[1.0, -2.0]), dict(alphas=["fast"])])
def test_tune_alpha_bad_grids(make_tv, kwargs):
    with pytest.raises(InvalidArgumentError):
        compeft.tune_alpha(make_tv(), lambda e: 0.0, **kwargs)


def test_tune_alpha_needs_a_callable(make_tv):
    with pytest.raises(InvalidArgumentError, match="callable"):
        compeft.tune_alpha(make_tv(), 3.0)


# ---------------------------------------------------------------------------------------------
# the CLI


REPO = Path(__file__).resolve().parent.parent


def cli(*args: object) -> subprocess.CompletedProcess:
    # the score scripts import compeft too: make this checkout importable whether installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "compeft.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.fixture
def adapter_dir(tmp_path):
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    directory = tmp_path / "adapter"
    directory.mkdir()
    save_file({"base_model.model.q.lora_A.weight": torch.randn(4, 32, generator=g),
               "base_model.model.q.lora_B.weight": torch.randn(32, 4, generator=g) * 0.1},
              str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    return directory


def test_cli_tune_alpha_with_a_score_command(tmp_path, adapter_dir):
    script = tmp_path / "score.py"
    # scores a candidate from its own header: best at alpha 4 (a real script would measure a task);
    # reading only the header keeps torch out of each of these processes
    script.write_text(textwrap.dedent("""
        import sys
        from compeft.format import FileReader, read_header
        m = read_header(FileReader(sys.argv[1])).metadata
        print("evaluating", m["alpha"])
        print(-abs(m["alpha"] - 4) - m["density"])
    """))
    out = tmp_path / "best.cpeft"
    proc = cli("tune-alpha", adapter_dir, "-o", out, "--densities", "0.1,0.2", "--alphas", "1,4,l2", "--scope", "global",
               "--score-command", f"{sys.executable} {script} {{expert}}")
    assert proc.returncode == 0, proc.stderr
    assert "chosen" in proc.stdout and "alpha 4.0" in proc.stdout
    expert = compeft.open(out)
    assert expert.metadata["alpha"] == 4.0 and expert.metadata["density"] == 0.1
    assert expert.metadata["tuning"]["chosen"]["alpha"] == 4.0
    assert len(expert.metadata["tuning"]["scores"]) == 6
    assert expert.metadata["adapter_config"]["peft_type"] == "LORA"


def test_cli_tune_alpha_with_a_score_function(tmp_path, adapter_dir):
    script = tmp_path / "myscore.py"
    script.write_text("def evaluate(expert):\n    return -abs(expert.metadata['alpha'] - 2)\n")
    out = tmp_path / "best.cpeft"
    proc = cli("tune-alpha", adapter_dir, "-o", out, "--score-function", f"{script}:evaluate", "--json", "-q",
               "--scope", "global")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["chosen"] == {"density": 0.1, "alpha": 2.0, "score": 0.0}
    assert record["alphas"] == [*PAPER_GRID, "unbiased"]
    assert compeft.open(out).metadata["alpha"] == 2.0


@pytest.mark.parametrize("hook", ["fails", "prints-text", "missing-function", "missing-file", "bad-spec", "raises"])
def test_cli_tune_alpha_hook_errors_are_one_line(tmp_path, adapter_dir, hook):
    script = tmp_path / "s.py"
    script.write_text("import sys\nprint('nope')\nsys.exit(3 if 'fail' in sys.argv[1] else 0)\n")
    args = {
        "fails": ["--score-command", f"{sys.executable} {script} fail"],
        "prints-text": ["--score-command", f"{sys.executable} {script}"],
        "missing-function": ["--score-function", f"{script}:evaluate"],
        "missing-file": ["--score-function", f"{tmp_path / 'none.py'}:evaluate"],
        "bad-spec": ["--score-function", "no-colon-here"],
        "raises": ["--score-function", f"{tmp_path / 'raises.py'}:evaluate"],
    }[hook]
    (tmp_path / "raises.py").write_text("def evaluate(expert):\n    raise RuntimeError('no GPU')\n")
    proc = cli("tune-alpha", adapter_dir, "-o", tmp_path / "x.cpeft", "--alphas", "1", *args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("compeft: error:"), proc.stderr
    assert not (tmp_path / "x.cpeft").exists()


def test_cli_compress_with_the_closed_form_alpha(tmp_path, adapter_dir):
    out = tmp_path / "e.cpeft"
    proc = cli("compress", adapter_dir, "-o", out, "--alpha", "l2", "-q")
    assert proc.returncode == 0, proc.stderr
    assert compeft.open(out).metadata["alpha_rule"] == "l2"
    proc = cli("compress", adapter_dir, "-o", out, "--alpha", "big")
    assert proc.returncode == 2 and "alpha" in proc.stderr
