"""Merging many compressed experts straight from their streams (task arithmetic, soups, TIES, DARE).

Every method is one small function over an :class:`Accumulator` (registered in :data:`METHODS`);
it works tensor group by tensor group on float32 accumulators (one to three per parameter of the
group, whatever the number of experts); each expert's kept entries are added by the decode kernel,
one expert after another, so no dense copy of any expert is made and the result does not depend on
the thread count (each position is written by one thread per pass).

Semantics (README "Merging"):

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

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, MutableMapping, Sequence

import numpy as np
import torch

from .codec import golomb, kernels
from .errors import BaseMismatchError, InvalidArgumentError
from .expert import CompressedExpert, allocate, flat_bits, kept_value
from .progress import progress_bar
from .weights import DTYPE_TO_TORCH

GROUP_PARAMETERS = 1 << 24  # accumulators for at most this many parameters at a time (64 MiB each)
GPU_GROUP_PARAMETERS = 1 << 28  # on a GPU: fewer, larger launches (1 GiB per accumulator)


class Accumulator:
    """The primitives a merge method combines, over one group of tensors: each runs one pass per
    expert over its kept entries (DARE drops and the 1 / (1 − p) rescale already applied) and
    returns name -> float32 tensor."""

    def __init__(self, experts: Sequence[CompressedExpert], payloads: Any, group: list[str],
                 weights: list[float], lam: float, drop_rate: float, seed: int,
                 on_device: Sequence[Any] | None = None) -> None:
        self.experts, self.payloads, self.group = experts, payloads, group
        self.on_device = on_device  # None: the CPU kernels; else each expert's DeviceExpert
        self.device = None if on_device is None else on_device[0].device
        self.weights, self.lam, self.seed = weights, lam, seed
        self.keep = 1.0 - drop_rate
        self.cut = int(drop_rate * 2.0 ** 63)

    def _run(self, mode: int, scales: Sequence[float], elected: dict[str, torch.Tensor] | None = None
             ) -> dict[str, torch.Tensor]:
        rows = 2 if mode == kernels.MODE_TIES else 1  # MODE_TIES also counts, in a second row
        first = self.experts[0]
        out = {n: allocate(first.entry(n), (rows, first.entry(n).numel), torch.float32, first.path, zero=True,
                           device=self.device) for n in self.group}
        launches = []
        for i, expert in enumerate(self.experts):
            scale = scales[i] / self.keep
            batch = []
            steps: dict[str, float] = {}
            for name in self.group:
                payload, e = self.payloads[i][name], expert.entry(name)
                aux = None if elected is None else elected[name]
                if isinstance(payload, torch.Tensor):  # a delta kept dense
                    _dense_step(mode, out[name], payload.reshape(-1), scale, None if aux is None else aux.reshape(-1),
                                self.cut, self.seed, i, name)
                    continue
                value = kept_value(e.scale, DTYPE_TO_TORCH[e.dtype])
                steps[name] = float(np.float32(scale) * np.float32(value))
                if self.device is None:
                    batch.append(golomb.DecodeJob(
                        payload, e.numel, flat_bits(out[name]), f"tensor {name!r}", delta=steps[name],
                        aux=None if aux is None else aux.reshape(-1).numpy(),
                        drop_key=_drop_key(self.seed, i, name) if self.cut else 0, drop_cut=self.cut))
            if self.device is None:
                golomb.decode_many(batch, mode, expert.path)
            else:
                launches.append(self.on_device[i].accumulate(
                    mode, {n: out[n].view(-1) for n in steps}, steps,
                    None if elected is None else {n: elected[n].reshape(-1) for n in steps},
                    {n: (_drop_key(self.seed, i, n), self.cut) for n in steps} if self.cut else None))
        if launches:
            from .gpu import raise_bad

            raise_bad(launches)
        shapes = {n: self.experts[0].entry(n).shape for n in self.group}
        return {n: out[n].reshape((rows, *shapes[n])) if rows > 1 else out[n].reshape(shapes[n]) for n in self.group}

    def weighted_sum(self, scales: Sequence[float]) -> dict[str, torch.Tensor]:
        """Σᵢ scalesᵢ · τ̃ᵢ."""
        return self._run(kernels.MODE_ADD_F32, scales)

    def agreeing(self, elected: dict[str, torch.Tensor], scales: Sequence[float]) -> dict[str, torch.Tensor]:
        """Per tensor a [2, *shape] tensor: Σᵢ scalesᵢ · τ̃ᵢ over the entries whose sign is that of
        ``elected`` (>= 0 counts as +), and how many experts have such an entry."""
        return self._run(kernels.MODE_TIES, scales, elected)


def weighted_sum(acc: Accumulator) -> dict[str, torch.Tensor]:
    """Task arithmetic (and, with normalised weights, a soup): λ · Σ wᵢ τ̃ᵢ."""
    return acc.weighted_sum([acc.lam * w for w in acc.weights])


def ties(acc: Accumulator) -> dict[str, torch.Tensor]:
    """TIES: elect the sign of Σ τ̃ᵢ, then λ · the mean of the weighted entries that agree."""
    elected = acc.weighted_sum([1.0] * len(acc.weights))
    agreeing = acc.agreeing(elected, acc.weights)
    # A new tensor per result, so that the [2, …] sum-and-count buffer is freed with the group.
    return {n: torch.div(agreeing[n][0], agreeing[n][1].clamp_(min=1.0)).mul_(acc.lam) for n in acc.group}


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


def _drop_key(seed: int, expert: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{expert}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _check_compatible(experts: Sequence[CompressedExpert], check_base: bool,
                      names: Sequence[str] | None = None) -> None:
    first = experts[0]
    for other in experts[1:]:
        if other.names != first.names:
            missing = sorted(set(first.names) ^ set(other.names))
            raise BaseMismatchError(f"experts hold different tensors (e.g. {missing[:3]} differ from "
                                    f"{first.path})", other.path)
        for name in first.names:
            a, b = first.entry(name), other.entry(name)
            if a.shape != b.shape:
                raise BaseMismatchError(f"tensor {name!r}: shape {list(b.shape)} here, {list(a.shape)} in "
                                        f"{first.path}", other.path)
        prints = (first.metadata.get("base_fingerprint"), other.metadata.get("base_fingerprint"))
        if check_base and prints[0] != prints[1]:
            raise BaseMismatchError(f"built on a different base than {first.path} (fingerprints differ); "
                                    "pass check_base=False to merge anyway", other.path)
    for e in experts:
        for name in e.names if names is None else names:  # values outside ``names`` (a head) are not merged
            if name in e and e.entry(name).role != "delta":
                raise InvalidArgumentError(f"tensor {name!r} is stored as a value, not a delta: only task "
                                           "vectors can be merged", e.path)


def _groups(expert: CompressedExpert, names: Sequence[str], limit: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        numel = expert.entry(name).numel
        if groups[-1] and size + numel > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += numel
    return groups


def merge(experts: Sequence[CompressedExpert | str | os.PathLike[str]], *, method: str = "task_arithmetic",
          weights: Sequence[float] | None = None, lam: float = 1.0, normalize: bool = True, drop_rate: float = 0.0,
          seed: int = 0, into: MutableMapping[str, torch.Tensor] | None = None, names: Sequence[str] | None = None,
          check_base: bool = True, device: str | torch.device | None = None, progress: bool = False) -> MergeResult:
    """Merge compressed experts from their streams.

    Parameters
    ----------
    experts
        Opened experts or paths, all with the same tensor names and shapes (and base fingerprint,
        unless ``check_base=False``).
    method
        A key of :data:`METHODS`: ``linear``, ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``.
    weights
        One weight per expert (default 1 each).
    lam
        λ, the factor applied to the merged task vector.
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
    from .api import _added, _as_expert, _check_base

    if method not in METHODS:
        raise InvalidArgumentError(f"unknown merge method {method!r}; known: {sorted(METHODS)}")
    rule = METHODS[method]
    opened = [_as_expert(e) for e in experts]
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
    if not math.isfinite(lam):
        raise InvalidArgumentError(f"lam must be finite, got {lam!r}")
    if not 0 <= drop_rate < 1 or (drop_rate and not rule.dare):
        raise InvalidArgumentError(f"drop_rate must be in [0, 1) and only with a dare_* method, got {drop_rate!r}")
    if rule.normalize and normalize:
        total = sum(coefficients)
        if total == 0:
            raise InvalidArgumentError("linear merge weights sum to zero; pass normalize=False")
        coefficients = [w / total for w in coefficients]
    _check_compatible(opened, check_base, names)
    selected = list(opened[0].names if names is None else names)
    if len(set(selected)) != len(selected):
        raise InvalidArgumentError("names holds a tensor twice")
    for name in selected:
        opened[0].entry(name)  # an unknown name raises here
    if into is not None:
        _check_base(opened[0], into, check_base, selected)
    result = MergeResult()
    result.metadata = {"method": method, "weights": coefficients, "lambda": float(lam), "drop_rate": drop_rate,
                       "seed": seed, "experts": [e.path for e in opened]}
    run_on = None  # the device the kernels run on: None for the CPU kernels
    if device is not None:
        from .gpu import interpreted, kernel_device

        if torch.device(device).type != "cpu" or interpreted():  # interpreted: the kernels' CPU test mode
            run_on = kernel_device(device)
    groups = _groups(opened[0], selected, GROUP_PARAMETERS if run_on is None else GPU_GROUP_PARAMETERS)
    if into is not None and len(groups) > 1:  # a corrupt later group must not find earlier ones written
        for e in opened:
            e.payloads(selected)
    for e in opened:  # experts read from URLs: all start fetching the first group at once
        e.prefetch(groups[0])
    for k, group in enumerate(progress_bar(groups, "merging", progress)):
        if k + 1 < len(groups):  # the next group downloads while this one decodes
            for e in opened:
                e.prefetch(groups[k + 1])
        # CRCs verified on first use; a structurally bad chunk fails the first pass, before any write
        # to `into`. Each expert's payloads are taken when its turn comes, so later experts' bytes
        # are still arriving while the first ones decode.
        if run_on is None:
            payloads, placed = _LazyPayloads(opened, group), None
        else:
            from .gpu import on_device

            placed = [on_device(e, run_on, group) for e in opened]
            payloads = [{n: d.dense.get(n, d) for n in group} for d in placed]
        merged = rule.combine(Accumulator(opened, payloads, group, coefficients, float(lam), drop_rate, seed, placed))
        for name in group:
            if into is None:
                result[name] = merged[name]
            else:
                weight = into[name]
                with torch.no_grad():
                    weight.copy_(_added(weight, merged[name].to(weight.device)))
    return result


class _LazyPayloads:
    """``payloads[i]``: expert i's verified payloads of ``group``, read on first use."""

    def __init__(self, experts: Sequence[CompressedExpert], group: list[str]) -> None:
        self._experts, self._group = experts, group
        self._read: dict[int, dict[str, Any]] = {}

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i not in self._read:
            self._read[i] = self._experts[i].payloads(self._group, check=False)
        return self._read[i]


def _dense_step(mode: int, out: torch.Tensor, dense: torch.Tensor, scale: float, aux: torch.Tensor | None, cut: int,
                seed: int, expert: int, name: str) -> None:
    """The kernels' rules for a delta stored dense (flat): its non-zero entries are its kept entries.
    ``out`` is [1, numel], or [2, numel] for MODE_TIES (sum, then count)."""
    values = dense.to(out.device).float()
    kept = values != 0
    if cut:  # drawn on the CPU whatever the device, so that drops do not depend on it
        generator = torch.Generator().manual_seed(_drop_key(seed, expert, name))
        kept &= (torch.rand(values.shape, generator=generator) >= cut / 2.0 ** 63).to(out.device)
    zeros = torch.zeros_like(values)
    if mode == kernels.MODE_ADD_F32:
        out[0].add_(torch.where(kept, values * np.float32(scale), zeros))
        return
    assert aux is not None
    agree = kept & ((values < 0) == (aux < 0))
    out[0].add_(torch.where(agree, values * np.float32(scale), zeros))
    out[1].add_(agree.float())
