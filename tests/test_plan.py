"""The CPU/GPU seam (compeft/plan.py): plans are checked before any kernel runs, and each
operation does what the module docstring says, on compressed and dense-stored tensors alike."""

from __future__ import annotations

import pytest
import torch

import compeft
from compeft.errors import InvalidArgumentError
from compeft.plan import ACCUMULATE, ADD, DECODE, TIES, TensorPlan, drop_key


@pytest.fixture
def expert() -> compeft.CompressedExpert:
    g = torch.Generator().manual_seed(3)
    tv = {"w": torch.randn(40, 50, generator=g).to(torch.bfloat16), "d": torch.randn(7, generator=g)}
    return compeft.compress(tv, density=0.2, keep_dense=["d"])


def test_decode_plan_matches_state_dict(expert):
    executor = expert.executor()
    out = torch.empty(40, 50, dtype=torch.bfloat16)
    dense = torch.empty(7)
    executor.run([TensorPlan("w", DECODE, out), TensorPlan("d", DECODE, dense)])
    want = expert.state_dict()
    assert torch.equal(out.view(torch.int16), want["w"].view(torch.int16))
    assert torch.equal(dense, want["d"])


@pytest.mark.parametrize("operation, out, message", [
    (DECODE, torch.zeros(40, 50, dtype=torch.float32), "decode needs an output of torch.bfloat16"),
    (ADD, torch.zeros(40, 50, dtype=torch.float64), "add needs an output of"),
    (ACCUMULATE, torch.zeros(40, 50, dtype=torch.bfloat16), "accumulate needs an output of torch.float32"),
    (TIES, torch.zeros(40, 50, dtype=torch.float32), "must hold 4000 entries"),
    (ADD, torch.zeros(50, 40, dtype=torch.float32).t(), "contiguous"),
    (DECODE, torch.zeros(41, 50, dtype=torch.bfloat16), "must hold 2000 entries"),
    ("scatter", torch.zeros(40, 50, dtype=torch.bfloat16), "unknown operation"),
])
def test_a_plan_that_does_not_fit_its_output_is_refused(expert, operation, out, message):
    before = out.clone()
    with pytest.raises(InvalidArgumentError, match=message):
        expert.executor().run([TensorPlan("w", operation, out)])
    assert torch.equal(out, before)  # nothing written


def test_a_plan_for_a_tensor_the_executor_does_not_hold_is_refused(expert):
    with pytest.raises(InvalidArgumentError, match="not held"):
        expert.executor(names=["d"]).run([TensorPlan("w", DECODE, torch.empty(40, 50, dtype=torch.bfloat16))])


@pytest.mark.parametrize("name", ["w", "d"])
def test_accumulate_and_ties_follow_their_rules(expert, name):
    tau = expert.to_dense(name).float().reshape(-1)
    executor = expert.executor()
    acc = torch.zeros(1, tau.numel())
    executor.run([TensorPlan(name, ACCUMULATE, acc, 0.5)])
    assert torch.equal(acc[0], torch.where(tau != 0, tau * 0.5, torch.zeros_like(tau)))
    elected = torch.where(torch.arange(tau.numel()) % 2 == 0, 1.0, -1.0)
    both = torch.zeros(2, tau.numel())
    executor.run([TensorPlan(name, TIES, both, 2.0, aux=elected)])
    agree = (tau != 0) & ((tau < 0) == (elected < 0))
    assert torch.equal(both[0], torch.where(agree, tau * 2.0, torch.zeros_like(tau)))
    assert torch.equal(both[1], agree.float())


def test_dare_drops_depend_on_the_key_only(expert):
    executor = expert.executor()
    runs = []
    for _ in range(2):
        acc = torch.zeros(1, 2000)
        executor.run([TensorPlan("w", ACCUMULATE, acc, 1.0, drop_key=drop_key(7, 0, "w"), drop_cut=1 << 62)])
        runs.append(acc)
    kept = int((expert.to_dense("w") != 0).sum())
    survivors = int((runs[0] != 0).sum())
    assert torch.equal(runs[0], runs[1]) and 0.3 * kept < survivors < 0.7 * kept  # p = 0.5


@pytest.mark.parametrize("name", ["w", "d"])
@pytest.mark.parametrize("scale", [1.0, -2.5, 0.0, 3e38, float("nan")])
@pytest.mark.parametrize("cut", [0, 1 << 62])
def test_a_fresh_accumulate_leaves_what_accumulating_into_zeros_leaves(expert, name, scale, cut):
    """A merge's first expert per tensor writes its sum whole (fresh) instead of adding into
    zero-filled memory: the same bits, whatever the step (0 gives +0.0 where -0.0 would be wrong,
    an infinite or NaN step), with DARE drops (those zero first) and for dense-stored tensors."""
    numel = 2000 if name == "w" else 7
    key = drop_key(0, 0, name) if cut else 0
    zeros = torch.zeros(numel)
    expert.executor().run([TensorPlan(name, ACCUMULATE, zeros, scale, None, key, cut)])
    garbage = torch.full((numel,), -0.0)
    garbage[::3] = float("nan")
    garbage[1::3] = 12345.0
    expert.executor().run([TensorPlan(name, ACCUMULATE, garbage, scale, None, key, cut, True)])
    assert torch.equal(garbage.view(torch.int32), zeros.view(torch.int32))


def test_only_accumulate_takes_a_fresh_output(expert):
    with pytest.raises(InvalidArgumentError, match="only accumulate takes a fresh output"):
        expert.executor().run([TensorPlan("w", ADD, torch.zeros(40, 50), 1.0, fresh=True)])
