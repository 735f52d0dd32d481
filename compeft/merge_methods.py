"""The formulas of config merges (mergekit's methods) over compressed experts, one tensor group at
a time, with no dense copy of an expert.

Each method works on the task vectors τ̃ᵢ of its operands and returns, per tensor, a float32 τ
such that mergekit's method over the models base + τ̃ᵢ equals c·base + τ (c is 1 except for
``linear`` without normalising and ``passthrough``, see :func:`base_coefficient`). Linear
combinations, TIES elections and re-trims of compressed tensors run in the decode kernels
(:mod:`compeft.plan` plans over ``expert.executor``: one pass per expert over its kept entries);
methods that need norms, ranks or variances (model_stock, nuslerp, sce, della, a re-trim of a
tensor stored dense) decode one tensor of one expert at a time to float32. Reductions run in
numpy float64 (one thread), so every method is bit-identical across thread counts.
docs/merging.md ("mergekit configs") gives each formula and its paper.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from .dtypes import DTYPE_TO_TORCH, magnitude, step
from .errors import InvalidArgumentError
from .expert import CompressedExpert
from .format import ENCODING_DENSE
from .merge_config import Method, TensorParams
from .merge_trim import Cut, Trim, dense_keep, entry_hashes, stream_cut, window_keep
from .merging import Scratch, holder
from .plan import ACCUMULATE, TIES, TensorPlan, drop_key


class Operands:
    """The operands of a merge over one group of tensors: operand j is an expert, or the base
    (``None``: τ = 0); ``indices[j]`` is the expert's index in the config (it seeds its hashes)."""

    def __init__(self, operands: Sequence[CompressedExpert | None], indices: Sequence[int | None], group: list[str],
                 seed: int, scratch: Scratch | None = None) -> None:
        self.operands, self.indices, self.group, self.seed = list(operands), list(indices), group, seed
        experts = [e for e in self.operands if e is not None]
        self.entries = {n: holder(experts, n).entry(n) for n in group}
        self._executors: dict[int, Any] = {}
        self.scratch = scratch  # float32 memory reused group after group (no fresh pages)

    def __len__(self) -> int:
        return len(self.operands)

    def holds(self, j: int, name: str) -> bool:
        expert = self.operands[j]
        return expert is not None and name in expert

    def stored_dense(self, j: int, name: str) -> bool:
        expert = self.operands[j]
        return expert is not None and name in expert and expert.entry(name).encoding == ENCODING_DENSE

    def key(self, j: int, name: str) -> int:
        index = self.indices[j]
        return drop_key(self.seed, -1 if index is None else index, name)

    def run(self, plans: dict[int, list[TensorPlan]]) -> None:
        """Each operand's plans, in operand order (so each position adds in that order)."""
        for j in sorted(plans):
            if plans[j]:
                self.executor(j).run(plans[j])

    def executor(self, j: int) -> Any:
        if j not in self._executors:
            expert = self.operands[j]
            assert expert is not None
            self._executors[j] = expert.executor(None, [n for n in self.group if n in expert], check=False)
        return self._executors[j]

    def zeros(self, name: str, rows: int = 1) -> torch.Tensor:
        """A zeroed float32 accumulator for ``rows`` × the tensor's numel: from the scratch while it
        lasts (so valid until the next group), else fresh memory."""
        numel = self.entries[name].numel
        shape = (rows, numel) if rows > 1 else (numel,)
        got = None if self.scratch is None else self.scratch.take(rows * numel)
        return torch.zeros(shape, dtype=torch.float32) if got is None else got.view(shape)

    def decode(self, j: int, name: str) -> torch.Tensor:
        """τ̃ of operand j as float32 in the tensor's shape (zeros where it holds none)."""
        out = self.zeros(name)
        if self.holds(j, name):
            self.executor(j).run([TensorPlan(name, ACCUMULATE, out, 1.0)])
        return out.reshape(self.entries[name].shape)


def trim_of(method: Method, params: TensorParams, own: dict[str, Any]) -> Trim:
    """Operand ``own``'s re-trim of a tensor under ``method``'s sparsification."""
    return Trim(method.sparsify, own.get("density", 1.0), own.get("gamma", 0.0), own.get("epsilon", 0.0),
                bool(params.shared.get("rescale", False)))


def needs_dense(method: Method, ops: Operands, name: str, params: TensorParams) -> bool:
    """Whether a GTA tensor is computed by decoding: DELLA, a re-trim of a tensor stored dense, or
    mergekit's TIES consensus over a tensor stored dense (its weighted count needs one magnitude)."""
    trims = [trim_of(method, params, own) for own in params.per_operand]
    dense = [ops.stored_dense(j, name) for j in range(len(ops))]
    return any(not t.identity and (method.sparsify == "della" or d) for t, d in zip(trims, dense)) or (
        method.consensus and method.family != "peft_ties" and any(dense))


def f32(x: float) -> float:
    return float(np.float32(x))


# ---------------------------------------------------------------------------------------------
# linear and passthrough (one pass)


def base_coefficient(method: Method, params: TensorParams) -> float:
    """c in mergekit's result c·base + τ: Σ weights for ``linear`` without normalising (the base
    is in every model), the scale for ``passthrough``, 1 otherwise."""
    if method.family == "linear" and not params.shared["normalize"]:
        return math.fsum(own["weight"] for own in params.per_operand)
    if method.family == "passthrough":
        scale = params.per_operand[0]["scale"]
        return 1.0 if scale is None else scale
    return 1.0


def linear(method: Method, ops: Operands, params: dict[str, TensorParams]) -> dict[str, torch.Tensor]:
    """``linear`` (Wortsman et al. 2022): Σⱼ wⱼ τ̃ⱼ / Σⱼ wⱼ over every input (the base's τ̃ is 0),
    not divided without ``normalize``; ``passthrough``: scale · τ̃ of its one input."""
    out = {n: ops.zeros(n) for n in ops.group}
    plans: dict[int, list[TensorPlan]] = {j: [] for j in range(len(ops))}
    for n in ops.group:
        p = params[n]
        if method.family == "passthrough":
            coefficients = [base_coefficient(method, p)]
        else:
            weights = [own["weight"] for own in p.per_operand]
            total = math.fsum(weights) if p.shared["normalize"] else 1.0
            coefficients = [w / total for w in weights]
        for j, c in enumerate(coefficients):
            if ops.holds(j, n) and c:
                plans[j].append(TensorPlan(n, ACCUMULATE, out[n], c))
    ops.run(plans)
    return {n: out[n].reshape(ops.entries[n].shape) for n in ops.group}


# ---------------------------------------------------------------------------------------------
# the generalised task arithmetic family (task_arithmetic, ties, dare_*, breadcrumbs*, della*) and
# PEFT's TIES rule


def _normalized(method: Method, p: TensorParams, mixed: torch.Tensor, divisor: torch.Tensor | None) -> torch.Tensor:
    """mixed ÷ divisor (``normalize``; a zero divisor divides by 1), then × λ; in place."""
    if method.family == "peft_ties":
        assert divisor is not None
        mixed.div_(divisor.clamp_(min=1.0))
    elif p.shared["normalize"]:
        if divisor is None:  # no consensus: the sum of the weights (|sum| < 1e-8 divides by 1)
            total = float(np.sum(np.array([own["weight"] for own in p.per_operand], dtype=np.float32)))
            mixed.div_(1.0 if abs(total) < 1e-8 else total)
        else:
            mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
    lam = p.shared["lambda"]
    return mixed.mul_(f32(lam)) if lam != 1 else mixed


def count_step(ops: Operands, j: int, name: str, w: float) -> float:
    """What operand j adds to Σ wᵢ·[agrees] where it agrees, all weights being positive: |w| as
    the kernels' step (float32(float32(|w|/magnitude)·magnitude); |w| itself for a tensor stored
    dense), so that one TIES pass sums the weights."""
    if ops.stored_dense(j, name):
        return f32(abs(w))
    mag = magnitude_of(ops, j, name)
    return step(abs(w) / mag, mag)


def divisor_kind(method: Method, weights: set[float]) -> str:
    """How Σ wᵢ·[agrees] is summed: PEFT's count; count × w (one weight); one pass of count steps
    (positive weights); one count pass per distinct weight, exactly (a negative weight, whose
    cancellations must give exactly 0 as in mergekit)."""
    if method.family == "peft_ties":
        return "count"
    if len(weights) <= 1:
        return "single"
    return "steps" if all(w > 0 for w in weights) else "distinct"


def gta_stream(method: Method, ops: Operands, names: list[str], params: dict[str, TensorParams]
               ) -> dict[str, torch.Tensor]:
    """The family on compressed tensors, in the kernels: each operand's re-trim is a drop cut
    (:func:`compeft.merge_trim.stream_cut`) and a rescale; with consensus, pass 1 sums Σ wᵢδᵢ (the
    election), pass 2 sums the agreeing wᵢδᵢ and counts them, and when the weights differ, one
    more pass (or one per distinct weight, see :func:`divisor_kind`) gives Σ wᵢ·[agrees]."""
    peft = method.family == "peft_ties"  # PEFT elects from the unweighted experts, and counts a weight 0
    held: dict[str, list[tuple[int, float, Cut]]] = {n: [] for n in names}
    for n in names:
        p = params[n]
        for j, own in enumerate(p.per_operand):
            if not ops.holds(j, n) or not (own["weight"] or peft):
                continue
            e = ops.operands[j].entry(n)  # type: ignore[union-attr]
            if ops.stored_dense(j, n):  # untrimmed here (see needs_dense): its non-zero entries are its kept ones
                held[n].append((j, own["weight"], Cut(0, e.numel, 1.0)))
                continue
            mag = magnitude_of(ops, j, n)
            cut = stream_cut(trim_of(method, p, own), ops.key(j, n), e.numel, e.nnz, mag)
            if cut.kept and mag:
                held[n].append((j, own["weight"], cut))

    def plans(operation: str, out: dict[str, torch.Tensor], scale: Any, aux: dict[str, torch.Tensor] | None = None,
              only: Any = None) -> dict[int, list[TensorPlan]]:
        made: dict[int, list[TensorPlan]] = {}
        for n in out:
            for j, w, cut in held[n]:
                if only is None or only(w):
                    sign = None if aux is None else aux[n] if w > 0 or peft else flipped[n]
                    made.setdefault(j, []).append(TensorPlan(n, operation, out[n], scale(j, n, w, cut), sign,
                                                             ops.key(j, n), cut.cut))
        return made

    if not method.consensus:
        mixed = {n: ops.zeros(n) for n in names}
        ops.run(plans(ACCUMULATE, mixed, lambda j, n, w, cut: w * cut.factor))
        return {n: _normalized(method, params[n], mixed[n], None).reshape(ops.entries[n].shape) for n in names}
    elected = {n: ops.zeros(n) for n in names}
    ops.run(plans(ACCUMULATE, elected, lambda j, n, w, cut: cut.factor if peft else w * cut.factor))
    flipped = {n: torch.where(elected[n] >= 0, -1.0, 1.0) for n in names if not peft and any(
        w < 0 for _, w, _ in held[n])}  # agreeing with E for a negative weight: the opposite stored sign
    sums = {n: ops.zeros(n, 2) for n in names}
    ops.run(plans(TIES, sums, lambda j, n, w, cut: w * cut.factor, elected))
    kinds = {n: divisor_kind(method, {w for _, w, _ in held[n]}) for n in names}
    divisors = {}
    for n in names:
        if kinds[n] in ("count", "single"):
            divisors[n] = sums[n][1] if kinds[n] == "count" else sums[n][1].mul_(f32(held[n][0][1] if held[n] else 1))
    stepped = {n: ops.zeros(n, 2) for n in names if kinds[n] == "steps"}
    if stepped:  # the agreeing entries all have E's sign: |Σ ±step| = Σ |w|
        ops.run(plans(TIES, stepped, lambda j, n, w, cut: count_step(ops, j, n, w) / magnitude_of(ops, j, n), elected))
        divisors.update({n: t[0].abs_() for n, t in stepped.items()})
    exact = [n for n in names if kinds[n] == "distinct"]
    for n in exact:
        divisors[n] = torch.zeros_like(sums[n][1])
        for w in sorted({w for _, w, _ in held[n]}):
            counts = {n: ops.zeros(n, 2)}
            ops.run(plans(TIES, counts, lambda j, n, w, cut: 1.0, elected, only=lambda v, w=w: v == w))
            divisors[n] += counts[n][1] * f32(w)
    return {n: _normalized(method, params[n], sums[n][0], divisors[n]).reshape(ops.entries[n].shape)
            for n in names}


def magnitude_of(ops: Operands, j: int, name: str) -> float:
    """The float32 magnitude every kept entry of operand j's compressed tensor decodes to."""
    e = ops.operands[j].entry(name)  # type: ignore[union-attr]
    return magnitude(e.scale, DTYPE_TO_TORCH[e.dtype])


def gta_dense(method: Method, ops: Operands, name: str, p: TensorParams) -> torch.Tensor:
    """The family on decoded tensors (DELLA's row ranks, or a tensor stored dense): the same
    float32 operations as :func:`gta_stream` in the same order, the trims by
    :func:`compeft.merge_trim.dense_keep` (equal to the stream's cuts on a compressed tensor)."""
    peft = method.family == "peft_ties"

    def delta(j: int) -> tuple[torch.Tensor, float] | None:
        own = p.per_operand[j]
        if not ops.holds(j, name) or not (own["weight"] or peft):
            return None
        x = ops.decode(j, name)
        mask, factor = dense_keep(trim_of(method, p, own), ops.key(j, name), x)
        if mask is not None:
            x = torch.where(mask, x, torch.zeros_like(x))
        return (x, factor) if bool(x.any()) else None  # as the stream: nothing kept, not an operand

    shape = ops.entries[name].shape
    mixed = torch.zeros(shape, dtype=torch.float32)
    deltas = {j: got for j in range(len(ops)) if (got := delta(j)) is not None}
    weights = {j: p.per_operand[j]["weight"] for j in deltas}
    if not method.consensus:
        for j, (x, factor) in deltas.items():
            mixed += x * f32(weights[j] * factor)
        return _normalized(method, p, mixed, None)
    elected = torch.zeros(shape, dtype=torch.float32)
    for j, (x, factor) in deltas.items():
        elected += x * f32(factor if peft else weights[j] * factor)
    kind = divisor_kind(method, set(weights.values()))
    counts: dict[float, torch.Tensor] = {}
    stepped = torch.zeros(shape, dtype=torch.float32)
    for j, (x, factor) in deltas.items():
        w = weights[j]
        sign = (x < 0) if (w > 0 or peft) else (x > 0)  # the sign of w·δ
        agree = (x != 0) & (sign == (elected < 0))
        mixed += torch.where(agree, x * f32(w * factor), torch.zeros_like(x))
        counts[w] = counts.get(w, torch.zeros(shape, dtype=torch.float32)) + agree.float()
        if kind == "steps":
            stepped += torch.where(agree, count_step(ops, j, name, w), 0.0)
    if kind == "count":
        divisor = sum(counts.values(), torch.zeros(shape, dtype=torch.float32))
    elif kind == "single":
        divisor = next(iter(counts.values()), torch.zeros(shape)) * f32(next(iter(weights.values()), 1.0))
    elif kind == "steps":
        divisor = stepped
    else:
        divisor = torch.zeros(shape, dtype=torch.float32)
        for w in sorted(counts):
            divisor += counts[w] * f32(w)
    return _normalized(method, p, mixed, divisor)


# ---------------------------------------------------------------------------------------------
# model_stock, nuslerp, sce (decoded, one tensor at a time)


def rows_of(x: torch.Tensor, by_row: bool) -> np.ndarray:
    """x as float64 [rows, length]: its last dimension's rows, or one row."""
    flat = x.numpy().astype(np.float64)
    return flat.reshape(-1, x.shape[-1]) if by_row and x.dim() >= 2 else flat.reshape(1, -1)


def model_stock(ops: Operands, name: str, p: TensorParams) -> torch.Tensor:
    """Model Stock (Jang et al. 2024): cos θ = the mean over expert pairs of cos(τ̃ᵢ, τ̃ⱼ) (per row
    with ``filter_wise``), t = N·cos θ / (1 + (N − 1)·cos θ) (0 where the denominator is below
    1e-6), result t · mean τ̃ᵢ. The pairwise sum is (‖Σ uᵢ‖² − Σ‖uᵢ‖²) / 2 over the unit vectors
    uᵢ = τ̃ᵢ/‖τ̃ᵢ‖, one expert at a time; mergekit clamps ‖τ̃ᵢ‖‖τ̃ⱼ‖ at 1e-6, so a pair below that
    is computed pairwise instead."""
    by_row = bool(p.shared["filter_wise"])
    count = len(ops)
    shape = ops.entries[name].shape
    total = torch.zeros(shape, dtype=torch.float32)
    unit: np.ndarray | None = None
    norms = []
    for j in range(count):
        x = ops.decode(j, name)
        total += x
        r = rows_of(x, by_row)
        n = np.sqrt(np.sum(r * r, axis=1))
        norms.append(n)
        u = np.divide(r, n[:, None], out=np.zeros_like(r), where=n[:, None] > 0)
        unit = u if unit is None else unit + u
    assert unit is not None
    ns = np.stack(norms)
    products = ns[:, None, :] * ns[None, :, :]
    pairs = np.triu(np.ones((count, count), dtype=bool), 1)
    if np.any((products[pairs] > 0) & (products[pairs] < 1e-6)):
        stacked = [rows_of(ops.decode(j, name), by_row) for j in range(count)]
        cos = np.mean([np.clip(np.sum(stacked[a] * stacked[b], axis=1) / np.maximum(ns[a] * ns[b], 1e-6), -1, 1)
                       for a in range(count) for b in range(a + 1, count)], axis=0)
    else:
        cos = (np.sum(unit * unit, axis=1) - np.sum(ns > 0, axis=0)) / 2 / (count * (count - 1) / 2)
    cos = cos.astype(np.float32)
    denominator = 1 + (count - 1) * cos
    singular = np.abs(denominator) < 1e-6
    t = np.where(singular, 0, count * cos / np.where(singular, 1, denominator))
    mean = (total / count).reshape(-1, shape[-1]) if by_row and len(shape) >= 2 else (total / count).reshape(1, -1)
    return (mean * torch.from_numpy(t.astype(np.float32))[:, None]).reshape(shape)


def nuslerp(ops: Operands, name: str, p: TensorParams) -> torch.Tensor:
    """NuSLERP (mergekit): spherical interpolation of the two task vectors at t = w₁ / (w₀ + w₁)
    (0.5 when |w₀ + w₁| < 1e-6): over the whole tensor (``nuslerp_flatten``, default), else per row
    (per column with ``nuslerp_row_wise``); linear where the vectors are colinear."""
    x0, x1 = ops.decode(0, name), ops.decode(1, name)
    w0, w1 = (own["weight"] for own in p.per_operand)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    shape = x0.shape
    if p.shared["nuslerp_flatten"]:
        v0, v1 = x0.reshape(1, -1), x1.reshape(1, -1)
    else:
        turned = [x.transpose(0, -1) if p.shared["nuslerp_row_wise"] and x.dim() > 1 else x for x in (x0, x1)]
        v0, v1 = (v.reshape(-1, v.shape[-1]) if v.dim() else v.reshape(1, 1) for v in turned)
    a, b = v0.numpy().astype(np.float64), v1.numpy().astype(np.float64)
    na, nb = np.sqrt(np.sum(a * a, axis=1)), np.sqrt(np.sum(b * b, axis=1))
    ua, ub = a / np.maximum(na, 1e-7)[:, None], b / np.maximum(nb, 1e-7)[:, None]
    cos = np.clip(np.sum(ua * ub, axis=1), -1, 1).astype(np.float32)[:, None]
    colinear = (1 - cos * cos) <= 1e-16
    theta = np.arccos(np.where(colinear, np.float32(0), cos))
    sin_theta = np.sin(theta)
    va, vb = v0.numpy(), v1.numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        spherical = (np.sin((1 - t) * theta) * va + np.sin(t * theta) * vb) / sin_theta
    result = np.where(colinear, (1 - t) * va + t * vb, spherical).astype(np.float32)
    out = torch.from_numpy(result)
    if not p.shared["nuslerp_flatten"] and p.shared["nuslerp_row_wise"] and len(shape) > 1:
        turned_shape = x0.transpose(0, -1).shape
        return out.reshape(turned_shape).transpose(0, -1).contiguous()
    return out.reshape(shape)


def sce(ops: Operands, name: str, p: TensorParams) -> torch.Tensor:
    """SCE (Wan et al. 2024, FuseChat): with ``select_topk`` < 1, keep the positions of the
    ⌊topk · #(non-zero variance)⌋ largest variances across the experts (ties: the larger position
    hash, splitmix64(key + position) with key ``drop_key(seed, -1, name)``); elect the sign of
    Σ τ̃ᵢ there; weight expert i by mean(τ̃ᵢ²) / Σ (uniform when that sum is below 1e-6); result
    Σ wᵢ τ̃ᵢ [agrees] / max(Σ wᵢ [agrees], 1e-6)."""
    count, shape = len(ops), ops.entries[name].shape
    numel = ops.entries[name].numel
    topk = p.shared["select_topk"]
    mask: torch.Tensor | None = None
    if topk < 1:
        total = np.zeros(numel)
        for j in range(count):
            total += ops.decode(j, name).reshape(-1).numpy()
        mean = total / count
        var = np.zeros(numel)
        for j in range(count):
            d = ops.decode(j, name).reshape(-1).numpy() - mean
            var += d * d
        var /= count
        k = int(np.count_nonzero(var) * topk) if topk > 0 else 0
        keep = window_keep(var, entry_hashes(drop_key(ops.seed, -1, name), 0, numel), numel - k, numel)
        mask = torch.from_numpy(keep).reshape(shape)

    def masked(j: int) -> torch.Tensor:
        x = ops.decode(j, name)
        return x if mask is None else torch.where(mask, x, torch.zeros_like(x))

    elected = torch.zeros(shape, dtype=torch.float32)
    squares = []
    for j in range(count):
        x = masked(j)
        elected += x
        r = x.numpy().astype(np.float64)
        squares.append(float(np.sum(r * r)) / numel if numel else 0.0)
    total_sq = float(np.sum(np.array(squares, dtype=np.float32)))
    weights = [1.0 / count] * count if abs(total_sq) < 1e-6 else [s / total_sq for s in squares]
    merged = torch.zeros(shape, dtype=torch.float32)
    divisor = torch.zeros(shape, dtype=torch.float32)
    for j in range(count):
        x = masked(j)
        agree = (x != 0) & ((x < 0) == (elected < 0))
        w = f32(weights[j])
        merged += torch.where(agree, x * w, torch.zeros_like(x))
        divisor += agree.float() * w
    return merged / divisor.clamp(min=1e-6)


def combine(method: Method, ops: Operands, params: dict[str, TensorParams]) -> dict[str, torch.Tensor]:
    """The merged τ of every tensor of the group (float32, in the tensor's shape)."""
    if method.family in ("linear", "passthrough"):
        return linear(method, ops, params)
    if method.family in ("gta", "peft_ties"):
        dense = [n for n in ops.group if needs_dense(method, ops, n, params[n])]
        out = gta_stream(method, ops, [n for n in ops.group if n not in dense], params)
        out.update({n: gta_dense(method, ops, n, params[n]) for n in dense})
        return {n: out[n] for n in ops.group}
    formula = {"model_stock": model_stock, "nuslerp": nuslerp, "sce": sce}[method.family]
    return {n: formula(ops, n, params[n]) for n in ops.group}


def check_tensor(method: Method, name: str, shape: Sequence[int], p: TensorParams, models: Sequence[str]) -> None:
    """What a method cannot do with a tensor, refused before any payload is read (DELLA's
    density ± ε must stay in (0, 1), its rows need two entries or more)."""
    if method.sparsify == "della":
        for own, model in zip(p.per_operand, models):
            d, eps = own.get("density", 1.0), own.get("epsilon", 0.0)
            if 0 < d < 1 and not (0 < d - eps and d + eps < 1):
                raise InvalidArgumentError(f"della: density ± epsilon must be in (0, 1); model {model!r}, tensor "
                                           f"{name!r} has density {d:g}, epsilon {eps:g}")
            row = shape[1] if len(shape) >= 2 else math.prod(shape)
            if 0 < d < 1 and row < 2:
                raise InvalidArgumentError(f"della ranks entries within rows (along dimension 1): tensor {name!r} of "
                                           f"shape {list(shape)} has rows of {row} entry")
    if method.family == "linear" and p.shared["normalize"] and math.fsum(o["weight"] for o in p.per_operand) == 0:
        raise InvalidArgumentError(f"linear: the weights of tensor {name!r} sum to 0 (normalize divides by their sum)")
