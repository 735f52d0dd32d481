"""Export any expert as a standard PEFT LoRA adapter: each 2-D delta ΔW ≈ B·A at a chosen rank.

LoRA servers (vLLM, LoRAX, TGI) and PEFT itself load only LoRA A/B matrices. ``export_lora`` turns
a compressed full fine-tune, a merge, or a LoRA expert (its ΔW = scaling · B·A, the product, not
the factors apart) into ``adapter_config.json`` + ``adapter_model.safetensors`` by truncated SVD,
one module in memory at a time (randomized SVD for large matrices). The best rank-r approximation
in Frobenius norm keeps the share Σᵢ≤ᵣ σᵢ² / ‖ΔW‖² of the module's energy: it is reported per module.

With ``lora_alpha = r`` the LoRA scaling is 1, so the adapter adds exactly B·A. Tensors that are not
a linear layer's 2-D weight (biases, norms, embedding tables — PEFT stores embedding LoRA in another
layout) cannot be a LoRA: they are left out and reported with their share of ‖τ̃‖², or refused
with ``strict=True``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .alpha import lora_pairs
from .errors import InvalidArgumentError
from .dtypes import DTYPE_TO_TORCH
from .expert import CompressedExpert, PathLike, as_expert
from .export import staged_directory
from .format import atomic_write
from .progress import progress_bar
from .weights import write_safetensors

PEFT_PREFIX = "base_model.model."
EXACT_SVD_BELOW = 1024  # smaller side up to this: exact SVD; above: randomized (torch.svd_lowrank)
OVERSAMPLE = 16  # extra columns of the randomized range finder
POWER_ITERATIONS = 4
_EMBEDDING = re.compile(r"(^|\.)(embed[^.]*|wte|wpe|word_embeddings|position_embeddings|shared)(\.|$)")


@dataclass
class LoraExport:
    """What :func:`export_lora` wrote: the directory, the rank, per module the share of ‖ΔW‖² the
    rank-r factors keep, and the tensors left out (name -> reason) with their share of ‖τ̃‖²."""

    path: Path
    rank: int
    kept: dict[str, float] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    left_out_energy: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "rank": self.rank, "modules": len(self.kept), "kept": self.kept,
                "left_out": self.left_out, "left_out_energy": self.left_out_energy}


def factorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B [out, rank], A [rank, in], share of ‖delta‖² kept) of the best rank-``rank`` approximation
    B·A of a float32 matrix (zero-padded where the matrix has a smaller rank)."""
    rows, cols = delta.shape
    r = min(rank, rows, cols)
    total = float(delta.double().square().sum())
    if min(rows, cols) <= EXACT_SVD_BELOW:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    else:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)  # the range finder's random test matrix: the same factors on every run
        u, s, v = torch.svd_lowrank(delta, q=min(r + OVERSAMPLE, rows, cols), niter=POWER_ITERATIONS)
        torch.random.set_rng_state(generator_state)
        vh = v.T
    root = s[:r].sqrt()
    b = torch.zeros(rows, rank)
    a = torch.zeros(rank, cols)
    b[:, :r] = u[:, :r] * root
    a[:r] = root[:, None] * vh[:r]
    share = float(s[:r].double().square().sum()) / total if total > 0 else 1.0
    return b, a, min(share, 1.0)


def lora_scaling(config: dict[str, Any], path: object) -> float:
    """The scaling of a LoRA expert's B·A from its adapter config; patterns and layouts that would
    give modules different scalings or orientations are refused."""
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise InvalidArgumentError(f"export-lora: adapter_config {key} is not supported (per-module ranks)", path)
    if config.get("fan_in_fan_out"):
        raise InvalidArgumentError("export-lora: adapter_config fan_in_fan_out is not supported", path)
    r, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if isinstance(r, bool) or not isinstance(r, int) or r < 1 or isinstance(alpha, bool) \
            or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InvalidArgumentError(f"export-lora: adapter_config needs an integer r >= 1 and a finite lora_alpha, "
                                   f"got r={r!r}, lora_alpha={alpha!r}", path)
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def deltas(expert: CompressedExpert) -> tuple[list[tuple[str, Any, torch.dtype]], dict[str, str]]:
    """(module name, a function giving its float32 ΔW, the dtype its factors are written in) for
    every module that can be a LoRA, and the other tensors with the reason each cannot."""
    config = expert.metadata.get("adapter_config") or {}
    left_out: dict[str, str] = {}
    modules: list[tuple[str, Any, torch.dtype]] = []
    shapes = {n: expert.entry(n).shape for n in expert.names}
    if expert.metadata.get("source") == "peft":
        if str(config.get("peft_type", "")).upper() != "LORA":
            raise InvalidArgumentError(f"export-lora: a {config.get('peft_type')!r} adapter is not a LoRA; "
                                       "export a full fine-tune or a merge instead", expert.path)
        scaling = lora_scaling(config, expert.path)
        pairs = lora_pairs(expert.names, shapes)
        paired = {n for pair in pairs for n in pair}
        for a, b in pairs:
            if ".lora_embedding_" in a:
                left_out[a] = left_out[b] = "an embedding LoRA (another layout)"
                continue
            module = a[:a.index(".lora_A")]

            def product(a: str = a, b: str = b) -> torch.Tensor:
                return (expert.to_dense(b).float() @ expert.to_dense(a).float()).mul_(scaling)

            modules.append((module, product, DTYPE_TO_TORCH[expert.entry(b).dtype]))
        for name in expert.names:
            if name not in paired:
                left_out[name] = "not a LoRA factor with its pair"
        return modules, left_out
    for name in expert.names:
        e = expert.entry(name)
        if e.role != "delta":
            left_out[name] = "stored as a value, not a delta"
        elif len(e.shape) != 2 or not name.endswith(".weight"):
            left_out[name] = "not a 2-D weight"
        elif _EMBEDDING.search(name[:-len(".weight")]):
            left_out[name] = "an embedding table (PEFT stores its LoRA in another layout)"
        else:
            modules.append((name[:-len(".weight")], lambda name=name: expert.to_dense(name).float(),
                            DTYPE_TO_TORCH[e.dtype]))
    return modules, left_out


def short(module: str) -> str:
    return module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module


def export_lora(expert: CompressedExpert | PathLike, output: PathLike, *, rank: int,
                target_modules: Sequence[str] | None = None, strict: bool = False,
                progress: bool = False) -> LoraExport:
    """Write ``expert`` as a PEFT LoRA adapter directory of rank ``rank``.

    Parameters
    ----------
    expert
        Any expert: a full fine-tune, a merge re-compressed to ``.cpeft``, or a LoRA adapter.
    output
        The adapter directory (created; its two files are written atomically).
    rank
        r of every module (a module whose ΔW has a smaller rank is padded with zeros: exact).
    target_modules
        Export only modules whose name ends with one of these (``q_proj``, ``layers.0.mlp.up_proj``).
    strict
        Refuse, instead of leaving out and reporting, tensors that cannot be a LoRA.

    Returns
    -------
    LoraExport
        Per module the share of ‖ΔW‖² kept, and what was left out.

    Examples
    --------
    >>> import compeft, torch, tempfile
    >>> tau = {"layer.weight": torch.randn(64, 4) @ torch.randn(4, 32)}  # a rank-4 change
    >>> expert = compeft.compress(tau, keep_dense=["*"])  # stored exactly, to show the rank rule
    >>> out = compeft.export_lora(expert, tempfile.mkdtemp(), rank=8)
    >>> round(out.kept["layer"], 6)
    1.0
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= 1 << 16:
        raise InvalidArgumentError(f"rank must be an integer in [1, 65536], got {rank!r}")
    expert = as_expert(expert)
    wanted = None if target_modules is None else [str(t).strip(".") for t in target_modules if str(t).strip(".")]
    if wanted is not None and not wanted:
        raise InvalidArgumentError("target_modules names no module")
    modules, left_out = deltas(expert)
    if wanted is not None:
        for module, _, _ in modules:
            if not any(module == t or module.endswith("." + t) for t in wanted):
                left_out[f"{module}.weight"] = "not in target_modules"
        modules = [m for m in modules if any(m[0] == t or m[0].endswith("." + t) for t in wanted)]
        if not modules:
            raise InvalidArgumentError(f"no module of the expert matches target_modules {wanted}", expert.path)
    if strict and left_out:
        first = sorted(left_out.items())[:3]
        raise InvalidArgumentError(f"{len(left_out)} tensors cannot be a LoRA (e.g. "
                                   + "; ".join(f"{n}: {why}" for n, why in first) + ")", expert.path)
    if not modules:
        raise InvalidArgumentError("the expert has no 2-D delta that a LoRA can hold", expert.path)
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError("the output exists and is not a directory", out)
    result = LoraExport(out, rank)
    tensors: dict[str, torch.Tensor] = {}
    energy_kept = energy_left = 0.0
    for module, load, dtype in progress_bar(modules, "factorizing", progress):
        delta = load()
        b, a, share = factorize(delta, rank)
        energy = float(delta.double().square().sum())
        energy_kept += energy
        prefix = module if module.startswith(PEFT_PREFIX) else PEFT_PREFIX + module
        tensors[f"{prefix}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.to(dtype).contiguous()
        result.kept[short(module)] = share
        del delta
    for name in left_out:
        if name in expert and expert.entry(name).role == "delta" and expert.entry(name).numel:
            energy_left += float(expert.to_dense(name).double().square().sum())
    total = energy_kept + energy_left
    result.left_out = dict(sorted(left_out.items()))
    result.left_out_energy = energy_left / total if total > 0 else 0.0
    config = lora_config(rank, sorted(result.kept), expert.metadata.get("adapter_config") or {})
    with staged_directory(out) as stage:  # both files appear together, or neither
        write_safetensors(tensors, stage / "adapter_model.safetensors", {"format": "pt"})
        atomic_write(stage / "adapter_config.json", [json.dumps(config, indent=2, sort_keys=True).encode()])
    return result


def lora_config(rank: int, modules: Sequence[str], source: dict[str, Any]) -> dict[str, Any]:
    """A plain LoRA ``adapter_config.json`` of rank ``rank`` and scaling 1 (``lora_alpha = r``)
    over ``modules``; the task type and base model name come from ``source`` (an adapter config)."""
    return {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(modules),
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
            "task_type": source.get("task_type"), "base_model_name_or_path": source.get("base_model_name_or_path")}

