"""Merging many compressed experts straight from their streams (task arithmetic, soups, TIES, DARE).

Every method is one small function over an :class:`Accumulator` (registered in :data:`METHODS`);
it works tensor group by tensor group on float32 accumulators (one to three per parameter of the
group, whatever the number of experts); each expert's kept entries are added by the decode kernel,
one expert after another, so no dense copy of any expert is made and the result does not depend on
the thread count (each position is written by one thread per pass).

Semantics (docs/merging.md):

* ``linear`` (soup): λ · Σ (wᵢ / Σ w) τ̃ᵢ (``normalize=False``: λ · Σ wᵢ τ̃ᵢ);
* ``task_arithmetic``: λ · Σ wᵢ τ̃ᵢ;
* ``ties`` (Yadav et al. 2023): per parameter, the sign of Σ τ̃ᵢ (unweighted; a zero sum elects +)
  is elected; the result is λ · (Σ of wᵢ τ̃ᵢ over the experts whose entry has that sign) / (how
  many do), 0 where none does — as ``peft.utils.merge_utils.ties`` with majority_sign_method
  "total" and density 1 (compressed experts are already trimmed);
* ``dare_linear`` / ``dare_ties`` (Yu et al. 2023): each kept entry of expert i is dropped with
  probability p (``drop_rate``) and survivors are scaled by 1 / (1 − p), then ``linear`` (weights
  not normalised, as in DARE) or ``ties``. The drop of entry e of tensor t of expert i is
  ``splitmix64(key(seed, i, t) + e) >> 1 < p · 2^63``: reproducible from the seed alone (a delta
  kept dense draws its drops from a torch generator seeded with the same key).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, MutableMapping, Sequence

import torch

from . import gpu
from .dtypes import added
from .errors import BaseMismatchError, InvalidArgumentError
from .expert import CompressedExpert, allocate, as_expert, check_state
from .format.header import TensorEntry
from .plan import ACCUMULATE, TIES, CpuExecutor, TensorPlan, drop_key
from .progress import progress_bar

Executor = CpuExecutor | gpu.DeviceExecutor
GROUP_PARAMETERS = 1 << 24  # accumulators for at most this many parameters at a time (64 MiB each)
GPU_GROUP_PARAMETERS = 1 << 28  # on a GPU: fewer, larger launches (1 GiB per accumulator)


class Scratch:
    """Float32 accumulator memory reused group after group (and, passed to several
    :func:`merge` calls, call after call): zeroing warm pages costs a fraction of faulting in
    fresh ones, the fixed cost of a merge. Allocated on first use, ``rows`` × the largest group
    asked for; what it hands out is valid until the next group."""

    def __init__(self, rows: int = 3) -> None:
        self.rows = rows
        self.memory: torch.Tensor | None = None
        self.size = 0
        self.used = 0
        self.path: object = None

    def reset(self, numel: int, path: object) -> None:
        """Hand out up to ``rows`` × ``numel`` values, from the start again."""
        self.size, self.used, self.path = max(self.size, self.rows * numel), 0, path

    def take(self, numel: int, zero: bool = True) -> torch.Tensor | None:
        """``numel`` float32 values (zeroed unless not ``zero``), or None when they do not fit."""
        if self.used + numel > self.size:
            return None
        if self.memory is None or self.memory.numel() < self.size:
            self.memory = None  # (the old block is freed before the larger one is allocated)
            entry = TensorEntry("merge scratch", "F32", (self.size,), "dense", "delta", 0, 0, 0)
            self.memory = allocate(entry, (self.size,), torch.float32, self.path)
        out = self.memory[self.used:self.used + numel]
        self.used += numel
        return out.zero_() if zero else out


class Accumulator:
    """The primitives a merge method combines, over one group of tensors: each runs one pass per
    expert over its kept entries (DARE drops and the 1 / (1 − p) rescale already applied) and
    returns name -> float32 tensor. ``executors[i]`` runs expert i's plans (:mod:`compeft.plan`),
    on the CPU or a GPU alike. Intermediate results (``final=False``) come from ``scratch``."""

    def __init__(self, experts: Sequence[CompressedExpert], executors: Sequence[Executor] | LazyExecutors, group: list[str],
                 weights: list[float], scale: float, drop_rate: float, seed: int, device: torch.device,
                 scratch: Scratch | None = None) -> None:
        self.experts, self.executors, self.group, self.device = experts, executors, group, device
        self.weights, self.scale, self.seed = weights, scale, seed
        self.keep = 1.0 - drop_rate
        self.cut = int(drop_rate * 2.0 ** 63)
        self.scratch = scratch

    def _buffer(self, e: TensorEntry, rows: int, final: bool, zero: bool) -> torch.Tensor:
        got = None if final or self.scratch is None else self.scratch.take(rows * e.numel, zero)
        if got is not None:
            return got.view(rows, e.numel)
        return allocate(e, (rows, e.numel), torch.float32, self.experts[0].path, zero=zero, device=self.device)

    def _run(self, operation: str, scales: Sequence[float], elected: dict[str, torch.Tensor] | None = None,
             final: bool = True) -> dict[str, torch.Tensor]:
        rows = 2 if operation == TIES else 1  # TIES also counts, in a second row
        entries = {n: holder(self.experts, n).entry(n) for n in self.group}
        # A sum is written whole by the first expert holding its tensor (a fresh ACCUMULATE), so its
        # memory is not zero-filled first (task arithmetic of 8 × 100M: ~3 % faster in a new process).
        fresh = operation == ACCUMULATE
        out = {n: self._buffer(e, rows, final, zero=not fresh) for n, e in entries.items()}
        first = {n: next(i for i, x in enumerate(self.experts) if n in x) for n in self.group} if fresh else {}
        for i, expert in enumerate(self.experts):
            scale = scales[i] / self.keep
            self.executors[i].run([  # (with union=True, an expert lacking a tensor adds nothing to it)
                TensorPlan(n, operation, out[n], scale, None if elected is None else elected[n],
                           drop_key(self.seed, i, n) if self.cut else 0, self.cut, first.get(n) == i)
                for n in self.group if n in expert])
        shapes = {n: e.shape for n, e in entries.items()}
        return {n: out[n].reshape((rows, *shapes[n])) if rows > 1 else out[n].reshape(shapes[n]) for n in self.group}

    def weighted_sum(self, scales: Sequence[float], final: bool = True) -> dict[str, torch.Tensor]:
        """Σᵢ scalesᵢ · τ̃ᵢ (``final``: in memory of its own, else in the scratch)."""
        return self._run(ACCUMULATE, scales, final=final)

    def agreeing(self, elected: dict[str, torch.Tensor], scales: Sequence[float]) -> dict[str, torch.Tensor]:
        """Per tensor a [2, *shape] tensor (in the scratch): Σᵢ scalesᵢ · τ̃ᵢ over the entries whose
        sign is that of ``elected`` (>= 0 counts as +), and how many experts have such an entry."""
        return self._run(TIES, scales, elected, final=False)


def weighted_sum(acc: Accumulator) -> dict[str, torch.Tensor]:
    """Task arithmetic (and, with normalised weights, a soup): λ · Σ wᵢ τ̃ᵢ."""
    return acc.weighted_sum([acc.scale * w for w in acc.weights])


def ties(acc: Accumulator) -> dict[str, torch.Tensor]:
    """TIES: elect the sign of Σ τ̃ᵢ, then λ · the mean of the weighted entries that agree."""
    elected = acc.weighted_sum([1.0] * len(acc.weights), final=False)
    agreeing = acc.agreeing(elected, acc.weights)
    # A new tensor per result, so that the [2, …] sum-and-count buffer is freed with the group.
    return {n: torch.div(agreeing[n][0], agreeing[n][1].clamp_(min=1.0)).mul_(acc.scale) for n in acc.group}


@dataclass(frozen=True)
class MergeMethod:
    """A registry entry: the combining function, whether the weights are normalised to sum 1
    (unless the caller says not to), and whether DARE drops apply."""

    combine: Callable[[Accumulator], dict[str, torch.Tensor]]
    normalize: bool = False
    dare: bool = False


METHODS: dict[str, MergeMethod] = {
    "linear": MergeMethod(weighted_sum, normalize=True),
    "task_arithmetic": MergeMethod(weighted_sum),
    "ties": MergeMethod(ties),
    "dare_linear": MergeMethod(weighted_sum, dare=True),
    "dare_ties": MergeMethod(ties, dare=True),
}


class MergeResult(dict):  # type: ignore[type-arg]
    """name -> merged τ (float32), with ``metadata``: the method, weights, λ, drop rate and seed."""

    metadata: dict[str, Any]


def holder(experts: Sequence[CompressedExpert], name: str) -> CompressedExpert:
    """The first expert that holds tensor ``name`` (the first expert itself raises when none does)."""
    return next((e for e in experts if name in e), experts[0])


def merged_names(experts: Sequence[CompressedExpert], union: bool = False) -> list[str]:
    """The tensors a merge covers: the first expert's, or with ``union`` every expert's (first
    appearance order)."""
    if not union:
        return list(experts[0].names)
    return list(dict.fromkeys(n for e in experts for n in e.names))


def check_compatible(experts: Sequence[CompressedExpert], check_base: bool, names: Sequence[str] | None = None,
                     union: bool = False, values: bool = False) -> None:
    """Experts merge when they hold the same tensors (``union``: any tensors) with the same shapes,
    carry the same base fingerprint (unless not ``check_base``) and hold only deltas (of ``names``);
    with ``values`` (a merge onto weights), also tensors every expert holding them stores as a value."""
    first = experts[0]
    for other in experts[1:]:
        if other.names != first.names and not union:
            missing = sorted(set(first.names) ^ set(other.names))
            raise BaseMismatchError(f"experts hold different tensors (e.g. {missing[:3]} differ from {first.path}); "
                                    "union=True / --union merges them, an expert lacking a tensor counting as 0 "
                                    "there", other.path)
        for name in other.names:
            reference = holder(experts, name)
            a, b = reference.entry(name), other.entry(name)
            if a.shape != b.shape:
                raise BaseMismatchError(f"tensor {name!r}: shape {list(b.shape)} here, {list(a.shape)} in "
                                        f"{reference.path}", other.path)
        if check_base:
            check_same_base(first, other)
    for e in experts:
        for name in e.names if names is None else names:  # values outside ``names`` (a head) are not merged
            if name not in e or e.entry(name).role == "delta":
                continue
            if not values:
                raise InvalidArgumentError(f"tensor {name!r} is stored as a value, not a delta: only task vectors "
                                           "can be merged (merging onto a base copies the values every expert "
                                           "agrees on; or leave it out with names=)", e.path)
            other = next((x for x in experts if name in x and x.entry(name).role == "delta"), None)
            if other is not None:
                raise InvalidArgumentError(f"tensor {name!r} is stored as a value here and as a delta in "
                                           f"{other.path}: they cannot be merged", e.path)


def agreed_values(experts: Sequence[CompressedExpert], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """name -> the value every expert holding it stores (their bytes equal), for tensors stored as
    values (an integer buffer such as ``position_ids``, which a full fine-tune leaves as it was):
    a merge onto a base copies them, as ``apply`` does. Experts storing different values raise."""
    out: dict[str, torch.Tensor] = {}
    for name in names:
        first = holder(experts, name)
        value = first.payloads([name])[name]
        assert isinstance(value, torch.Tensor)  # (a value is stored dense)
        for other in experts:
            if other is first or name not in other:
                continue
            theirs = other.payloads([name])[name]
            assert isinstance(theirs, torch.Tensor)
            if (theirs.dtype != value.dtype or theirs.shape != value.shape
                    or not torch.equal(theirs.view(-1).view(torch.uint8), value.view(-1).view(torch.uint8))):
                raise InvalidArgumentError(f"tensor {name!r} is stored as a value, and the experts store different "
                                           f"values ({first.path} and here): a merge cannot choose one", other.path)
        out[name] = value
    return out


def check_same_base(first: CompressedExpert, other: CompressedExpert) -> None:
    """Raise :class:`BaseMismatchError` unless both experts carry the same base fingerprint."""
    if first.metadata.get("base_fingerprint") != other.metadata.get("base_fingerprint"):
        raise BaseMismatchError(f"built on a different base than {first.path} (fingerprints differ); "
                                "pass check_base=False (--force) to merge anyway", other.path)


def tensor_groups(expert: CompressedExpert | Sequence[CompressedExpert], names: Sequence[str], limit: int
                  ) -> list[list[str]]:
    """``names`` cut, in order, into groups of at most ``limit`` parameters (a larger tensor alone);
    ``expert`` (or the first of several that holds each tensor) gives the sizes."""
    experts = [expert] if isinstance(expert, CompressedExpert) else list(expert)
    return cut_groups([(n, holder(experts, n).entry(n).numel) for n in names], limit)


def cut_groups(sized: Sequence[tuple[str, int]], limit: int) -> list[list[str]]:
    """(name, parameters) pairs cut, in order, into groups of at most ``limit`` parameters (a
    larger tensor alone); always at least one group."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, numel in sized:
        if groups[-1] and size + numel > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += numel
    return groups


def merge(experts: Sequence[CompressedExpert | str | os.PathLike[str]], *, method: str = "task_arithmetic",
          weights: Sequence[float] | None = None, scale: float = 1.0, normalize: bool = True, drop_rate: float = 0.0,
          seed: int = 0, into: MutableMapping[str, torch.Tensor] | None = None, names: Sequence[str] | None = None,
          check_base: bool = True, device: str | torch.device | None = None, progress: bool = False,
          lam: float | None = None, union: bool = False, scratch: Scratch | None = None) -> MergeResult:
    """Merge compressed experts from their streams.

    Parameters
    ----------
    experts
        Opened experts or paths, all with the same tensor names and shapes (and base fingerprint,
        unless ``check_base=False``); with ``union=True`` they may hold different tensors (the
        result holds them all; an expert lacking a tensor counts as 0 there, as a fine-tune that
        left that weight unchanged).
    method
        A key of :data:`METHODS`: ``linear``, ``task_arithmetic``, ``ties`` (PEFT's rule),
        ``dare_linear``, ``dare_ties``. mergekit's methods and rules (its TIES among them) come
        through configs: :func:`compeft.merge_run.merge_from_config`.
    weights
        One weight per expert (default 1 each).
    scale
        λ, the factor applied to the merged task vector (``lam`` is an older spelling of it).
    normalize
        ``linear`` only: divide the weights by their sum.
    drop_rate, seed
        DARE's drop probability p in [0, 1) and the seed of its drops.
    into
        A state dict to add the merged τ into, in place (``w = dtype(float32(w) + merged)``); the
        result is then empty apart from its metadata.
    names
        Merge only these tensors (e.g. one shard's); default all.
    device
        A CUDA device: each expert's compressed bytes are copied there (once per tensor group) and
        merged there; the result lives there. Bit-identical to the CPU merge (the same float32
        operations in the same order per parameter).
    scratch
        A :class:`Scratch` for the CPU passes' intermediate sums, to reuse its memory across
        several calls (e.g. one per part of a model); default a new one for this call.

    Returns
    -------
    MergeResult
        name -> merged τ as float32 tensors, and ``metadata``.

    Examples
    --------
    >>> import torch, compeft
    >>> a = compeft.compress({"w": torch.randn(100)}, density=0.5)
    >>> b = compeft.compress({"w": torch.randn(100)}, density=0.5)
    >>> compeft.merge([a, b], method="ties")["w"].shape
    torch.Size([100])
    """
    if lam is not None:
        if scale != 1.0 and scale != lam:
            raise InvalidArgumentError("pass scale or its older spelling lam, not both")
        scale = lam
    if method not in METHODS:
        raise InvalidArgumentError(f"unknown merge method {method!r}; known: {sorted(METHODS)}")
    rule = METHODS[method]
    opened = [as_expert(e) for e in experts]
    if not opened:
        raise InvalidArgumentError("merge needs at least one expert")
    try:
        coefficients = [1.0] * len(opened) if weights is None else [float(w) for w in weights]
    except (TypeError, ValueError):
        coefficients = []
    if len(coefficients) != len(opened) or not all(math.isfinite(w) for w in coefficients):
        raise InvalidArgumentError(f"weights must be {len(opened)} finite numbers, got {weights!r}")
    if type(seed) is not int or seed < 0:
        raise InvalidArgumentError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InvalidArgumentError(f"scale must be a finite number, got {scale!r}")
    if not 0 <= drop_rate < 1 or (drop_rate and not rule.dare):
        raise InvalidArgumentError(f"drop_rate must be in [0, 1) and only with a dare_* method, got {drop_rate!r}")
    if rule.normalize and normalize:
        total = sum(coefficients)
        if total == 0:
            raise InvalidArgumentError("linear merge weights sum to zero; pass normalize=False")
        coefficients = [w / total for w in coefficients]
    check_compatible(opened, check_base, names, union, values=into is not None)
    selected = merged_names(opened, union) if names is None else list(names)
    if len(set(selected)) != len(selected):
        raise InvalidArgumentError("names holds a tensor twice")
    for name in selected:
        holder(opened, name).entry(name)  # an unknown name raises here
    if into is not None:
        for e in opened if union else opened[:1]:
            check_state(e, into, check_base, [n for n in selected if n in e])
    values = agreed_values(opened, [n for n in selected if holder(opened, n).entry(n).role == "value"])
    selected = [n for n in selected if n not in values]
    result = MergeResult()
    result.metadata = {"method": method, "weights": coefficients, "lambda": float(scale), "drop_rate": drop_rate,
                       "seed": seed, "experts": [e.path for e in opened], **({"union": True} if union else {})}
    run_on = None  # the device the kernels run on: None for the CPU kernels
    if device is not None and (torch.device(device).type != "cpu" or gpu.interpreted()):
        run_on = gpu.kernel_device(device)  # (interpreted: the GPU kernels' CPU test mode)
    groups = tensor_groups(opened, selected, GROUP_PARAMETERS if run_on is None else GPU_GROUP_PARAMETERS)
    scratch = scratch or Scratch()
    largest = max([0, *(sum(holder(opened, n).entry(n).numel for n in g) for g in groups)])
    if into is not None and len(groups) > 1:  # a corrupt later group must not find earlier ones written
        for e in opened:
            e.payloads([n for n in selected if n in e])
    for e in opened if groups else ():  # experts read from URLs: all start fetching the first group at once
        e.prefetch([n for n in groups[0] if n in e])
    for k, group in enumerate(progress_bar(groups, "merging", progress)):
        if k + 1 < len(groups):  # the next group downloads while this one decodes
            for e in opened:
                e.prefetch([n for n in groups[k + 1] if n in e])
        # CRCs verified on first use; a structurally bad chunk fails the first pass, before any write
        # to `into`.
        executors = LazyExecutors(opened, group, run_on)
        if run_on is None:
            scratch.reset(largest, opened[0].path)
        merged = rule.combine(Accumulator(opened, executors, group, coefficients, float(scale), drop_rate, seed,
                                          run_on or torch.device("cpu"), scratch if run_on is None else None))
        for name in group:
            if into is None:
                result[name] = merged[name]
            else:
                weight = into[name]
                with torch.no_grad():
                    weight.copy_(added(weight, merged[name].to(weight.device)))
    if into is not None:  # (last: a corrupt payload above leaves them unwritten too)
        with torch.no_grad():
            for name, value in values.items():
                into[name].copy_(value.to(into[name].device))
    return result


class LazyExecutors:
    """``executors[i]``: expert i's executor for ``group`` on ``device``, made on first use, so later
    experts' bytes are still arriving (from a URL) while the first ones decode."""

    def __init__(self, experts: Sequence[CompressedExpert], group: list[str], device: torch.device | None) -> None:
        self._experts, self._group, self._device = experts, group, device
        self._made: dict[int, Executor] = {}

    def __getitem__(self, i: int) -> Executor:
        if i not in self._made:
            expert = self._experts[i]
            self._made[i] = expert.executor(self._device, [n for n in self._group if n in expert], check=False)
        return self._made[i]
