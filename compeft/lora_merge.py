"""Merging LoRA experts as products: ΔWᵢ = scalingᵢ · Bᵢ·Aᵢ per module, merged dense, written as a LoRA.

PEFT's own non-SVD combinations merge the A and B factors apart (and need equal ranks); the
product is what each adapter adds to the model, so that is what is merged here
(``compeft merge a.cpeft b.cpeft --method ties --lora-rank 16 -o ./merged-lora``). One module
at a time: each expert's two factors of that module are decoded (small), and the merge runs over
the dense products with the formulas of :mod:`compeft.merging` (PEFT's ``merge_utils`` rules):

* ``linear``: Σ (wᵢ / Σ w) ΔWᵢ; ``task_arithmetic``: Σ wᵢ ΔWᵢ; both times λ;
* ``ties``: per entry the sign of Σ ΔWᵢ is elected (0 elects +); λ · (Σ wᵢ ΔWᵢ over the experts
  whose entry has that sign) / (how many do), 0 where none does — ``peft.utils.merge_utils.ties``
  with ``majority_sign_method="total"`` and density 1;
* ``dare_linear`` / ``dare_ties``: each entry of ΔWᵢ is dropped with probability p, survivors scaled
  by 1 / (1 − p), drawn from a torch generator seeded with the DARE key of (seed, i, module) (as a
  delta kept dense is dropped by :func:`compeft.plan.run_dense`), then task arithmetic or TIES.

Memory: a few float32 matrices of one module's ΔW shape (TIES streams the experts twice, so it
does not grow with their number), plus the output's rank-r factors. The merged ΔW is written by
:func:`compeft.lora.factorize` as a LoRA of rank r (``lora_alpha = r``: scaling 1) into a directory
that appears all at once, or dense as a ``.safetensors`` (``<module>.weight``, float32).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import BaseMismatchError, InvalidArgumentError
from .expert import CompressedExpert, PathLike, as_expert, check_outputs
from .export import staged_directory
from .format import atomic_write
from .lora import PEFT_PREFIX, LoraExport, deltas, factorize, lora_config, short
from .merging import check_same_base
from .plan import drop_key
from .progress import progress_bar
from .weights import write_safetensors

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")


def delta_shape(expert: CompressedExpert, module: str) -> tuple[int, int]:
    """The shape of a module's ΔW from the header: (B rows, A columns) of a LoRA, else its weight's."""
    b, a = f"{module}.lora_B.weight", f"{module}.lora_A.weight"
    if b in expert and a in expert:
        return expert.entry(b).shape[0], expert.entry(a).shape[-1]
    shape = expert.entry(f"{module}.weight").shape
    return shape[0], shape[1]


def modules_of(experts: Sequence[CompressedExpert], check_base: bool
               ) -> tuple[list[str], list[dict[str, tuple[Callable[[], torch.Tensor], torch.dtype, tuple[int, int]]]]]:
    """The modules every expert holds (short names, the first expert's order) and per expert
    module -> (a function giving its float32 ΔW, the dtype of its factors, the ΔW shape); raises unless all
    experts hold the same modules with the same ΔW shapes and base."""
    found = []
    for e in experts:
        modules, _ = deltas(e)
        if not modules:
            raise InvalidArgumentError("this expert holds no 2-D delta to merge as a LoRA", e.path)
        found.append({short(m): (load, dtype, delta_shape(e, m)) for m, load, dtype in modules})
    first = experts[0]
    names = list(found[0])
    for e, held in zip(experts[1:], found[1:]):
        if set(held) != set(names):
            differ = sorted(set(held) ^ set(names))[:3]
            raise BaseMismatchError(f"the experts target different modules (e.g. {differ} differ from "
                                    f"{first.path})", e.path)
        for m in names:
            if held[m][2] != found[0][m][2]:
                raise BaseMismatchError(f"module {m!r}: ΔW shape {list(held[m][2])} here, {list(found[0][m][2])} in "
                                        f"{first.path}", e.path)
        if check_base:
            check_same_base(first, e)
    return names, found


def dropped(delta: torch.Tensor, drop_rate: float, seed: int, index: int, module: str) -> torch.Tensor:
    """DARE: entries of ``delta`` dropped with probability ``drop_rate``, survivors × 1 / (1 − p), in place."""
    if not drop_rate:
        return delta
    cut = int(drop_rate * 2.0 ** 63)
    generator = torch.Generator().manual_seed(drop_key(seed, index, module))
    keep = torch.rand(delta.shape, generator=generator) >= cut / 2.0 ** 63
    return delta.mul_(keep).mul_(1.0 / (1.0 - drop_rate))


def merge_module(loads: Sequence[Callable[[], torch.Tensor]], module: str, method: str, weights: Sequence[float],
                 scale: float, drop_rate: float, seed: int) -> torch.Tensor:
    """The merged float32 ΔW of one module from its experts' ΔW functions."""
    def delta(i: int) -> torch.Tensor:
        return dropped(loads[i](), drop_rate, seed, i, module)

    if method not in ("ties", "dare_ties"):
        total = delta(0).mul_(weights[0])
        for i in range(1, len(loads)):
            total.add_(delta(i), alpha=weights[i])
        return total.mul_(scale)
    elected = delta(0)
    for i in range(1, len(loads)):
        elected.add_(delta(i))
    positive = elected >= 0
    del elected
    sums = torch.zeros(positive.shape)
    counts = torch.zeros(positive.shape)
    for i in range(len(loads)):
        d = delta(i)
        agree = torch.where(positive, d > 0, d < 0)
        sums.add_(torch.where(agree, d * weights[i], 0.0))
        counts.add_(agree)
    return sums.div_(counts.clamp_(min=1.0)).mul_(scale)


def merge_lora(experts: Sequence[CompressedExpert | PathLike], output: PathLike, *, rank: int,
               method: str = "task_arithmetic", weights: Sequence[float] | None = None, scale: float = 1.0,
               normalize: bool = True, drop_rate: float = 0.0, seed: int = 0, check_base: bool = True,
               progress: bool = False) -> LoraExport | Path:
    """Merge LoRA experts (or any experts' 2-D deltas) as their products ΔWᵢ and write the result.

    Parameters
    ----------
    experts
        Experts made from LoRA adapters (each ΔW = its ``lora_alpha / r`` · B·A; ranks may
        differ) or full fine-tunes, all targeting the same modules with the same shapes.
    output
        A directory: a PEFT LoRA adapter of rank ``rank`` (truncated SVD of each merged ΔW);
        ``.safetensors``: the merged ΔW dense (``<module>.weight``, float32).
    method, weights, scale, normalize, drop_rate, seed
        As :func:`compeft.merge` (module docstring: the formulas).

    Returns
    -------
    The :class:`~compeft.lora.LoraExport` (per module the share of ‖ΔW‖² the rank keeps), or the
    ``.safetensors`` path.

    Examples
    --------
    >>> import compeft, torch, tempfile
    >>> from compeft.lora_merge import merge_lora
    >>> a = compeft.compress({"l.weight": torch.randn(32, 2) @ torch.randn(2, 16)}, keep_dense=["*"])
    >>> b = compeft.compress({"l.weight": torch.randn(32, 2) @ torch.randn(2, 16)}, keep_dense=["*"])
    >>> out = merge_lora([a, b], tempfile.mkdtemp(), rank=4)
    >>> round(out.kept["l"], 6)  # a sum of two rank-2 changes has rank 4
    1.0
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= 1 << 16:
        raise InvalidArgumentError(f"rank must be an integer in [1, 65536], got {rank!r}")
    if method not in METHODS:
        raise InvalidArgumentError(f"unknown merge method {method!r}; known: {list(METHODS)}")
    opened = [as_expert(e) for e in experts]
    if not opened:
        raise InvalidArgumentError("merge needs at least one expert")
    coefficients = [1.0] * len(opened) if weights is None else [float(w) for w in weights]
    if len(coefficients) != len(opened) or not all(math.isfinite(w) for w in coefficients):
        raise InvalidArgumentError(f"weights must be {len(opened)} finite numbers, got {weights!r}")
    if method == "linear" and normalize:
        if sum(coefficients) == 0:
            raise InvalidArgumentError("linear merge weights sum to zero; pass normalize=False")
        coefficients = [w / sum(coefficients) for w in coefficients]
    if not 0 <= drop_rate < 1 or (drop_rate and not method.startswith("dare_")):
        raise InvalidArgumentError(f"drop_rate must be in [0, 1) and only with a dare_* method, got {drop_rate!r}")
    if type(seed) is not int or seed < 0:
        raise InvalidArgumentError(f"seed must be a non-negative integer, got {seed!r}")
    if not math.isfinite(scale):
        raise InvalidArgumentError(f"scale must be a finite number, got {scale!r}")
    out = Path(output)
    if out.suffix == ".cpeft":
        raise InvalidArgumentError("a merge of LoRA products is written as a LoRA directory or a .safetensors "
                                   "ΔW (re-compress that with compeft compress)", out)
    dense = out.suffix == ".safetensors"
    if not dense and out.exists() and not out.is_dir():
        raise InvalidArgumentError("the output exists and is not a directory", out)
    names, found = modules_of(opened, check_base)
    for e in opened:
        e.prefetch()  # from URLs: every factor requested at once
    if dense:  # every merged ΔW is held (float32) until the file is written
        check_outputs([(m, 4 * math.prod(found[0][m][2])) for m in names], opened[0].path)
    record = {"method": method, "weights": coefficients, "lambda": float(scale), "drop_rate": drop_rate,
              "seed": seed, "experts": [e.path for e in opened], "product": True}
    result = LoraExport(out, rank)
    tensors: dict[str, torch.Tensor] = {}
    dtype = next(iter(found[0].values()))[1]
    for module in progress_bar(names, "merging", progress):
        merged = merge_module([held[module][0] for held in found], module, method, coefficients, float(scale),
                              drop_rate, seed)
        if dense:
            tensors[f"{module}.weight"] = merged.contiguous()
            continue
        b, a, share = factorize(merged, rank)
        del merged
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.to(dtype).contiguous()
        result.kept[module] = share
    meta = {"merge": json.dumps(record, sort_keys=True)}
    if dense:
        write_safetensors(tensors, out, meta)
        return out
    source = opened[0].metadata.get("adapter_config") or {}
    config = lora_config(rank, sorted(result.kept), source)
    with staged_directory(out) as stage:  # both files appear together, or neither
        write_safetensors(tensors, stage / "adapter_model.safetensors", {"format": "pt", **meta})
        atomic_write(stage / "adapter_config.json", [json.dumps(config, indent=2, sort_keys=True).encode()])
    return result

