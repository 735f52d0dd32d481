"""Config merges: a mergekit merge config (``compeft merge --config merge.yml``) run on compressed
experts, straight from their streams.

:func:`plan_config` does everything that needs headers only (the config, the experts' names,
shapes and base fingerprints, the base's tensor list, every parameter of every tensor); it is
``--dry-run``. :func:`merge_from_config` then merges one tensor group at a time
(:mod:`compeft.merge_methods`) and writes a model directory (base with the merge, the base's
sharding), a ``.safetensors`` task vector or a re-compressed ``.cpeft``. docs/merging.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .encode import compress
from .errors import BaseMismatchError, InvalidArgumentError, SourceError
from .expert import CompressedExpert, open as open_expert
from .export import merge_to, onto_base
from .merge_config import MergeConfig, TensorParams, layer_positions, load_config, resolve, uses_gradient
from .merge_methods import Operands, base_coefficient, check_tensor, combine
from .merging import MergeResult, Scratch, agreed_values, check_compatible, holder, merged_names, tensor_groups
from .progress import progress_bar
from .sources import base_dtype_shape, safetensors_files, safetensors_tensors
from .weights import write_safetensors

# Smaller groups than compeft.merge's: a config merge keeps up to POOL_ROWS float32 accumulators
# per parameter of a group (64 MiB at 2^22 parameters), next to one base shard.
CONFIG_GROUP_PARAMETERS = 1 << 22
POOL_ROWS = 5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class ConfigPlan:
    """A config merge checked from headers alone: the experts (in the config's order), the
    operands (``None``: the base as an input of a method that ignores the base), the tensors and
    every tensor's parameters."""

    config: MergeConfig
    experts: list[CompressedExpert]
    operands: list[CompressedExpert | None]
    indices: list[int | None]
    names: list[str]
    params: dict[str, TensorParams]
    base: Path | None
    base_names: list[str] = field(default_factory=list)
    seed: int = 0
    union: bool = False
    check_base: bool = True
    values: list[str] = field(default_factory=list)  # tensors stored as values: copied (the experts agree)
    scratch: Scratch = field(default_factory=lambda: Scratch(POOL_ROWS))  # kept across calls (parts)

    def coefficient(self, name: str) -> float:
        """c in c·base + τ for a tensor (1 unless linear without normalising, or passthrough)."""
        if self.config.method.family not in ("linear", "passthrough"):
            return 1.0
        if name not in self.params:
            positions, _ = layer_positions([*self.names, *self.base_names])
            self.params[name] = resolve(self.config, name, positions[name])
        return base_coefficient(self.config.method, self.params[name])

    def summary(self) -> dict[str, Any]:
        """What a dry run prints: the method, each expert, the tensors and the checks made."""
        numel = sum(holder(self.experts, n).entry(n).numel for n in self.names)
        return {"merge_method": self.config.method.name, "base_model": self.config.base_model,
                "base": None if self.base is None else str(self.base), "union": self.union, "seed": self.seed,
                "experts": [{"model": i.model, "path": e.path, "tensors": len(e),
                             "density": e.metadata.get("density"), "base_fingerprint": e.metadata.get("base_fingerprint")}
                            for i, e in zip(self.config.experts, self.experts)],
                "tensors": len(self.names), "parameters": numel,
                "checked": ["config keys, types and ranges", "every parameter of every tensor",
                            "tensor names and shapes across the experts", "base fingerprints across the experts"]
                + (["the base holds every tensor with its shape"] if self.base_names else [])}


def plan_config(config: str | os.PathLike[str] | Mapping[str, Any] | MergeConfig, *, base: str | os.PathLike[str] | None = None,
                library: str | None = None, union: bool = False, seed: int = 0, check_base: bool = True,
                output: str | os.PathLike[str] | None = None, storage_options: Mapping[str, Any] | None = None,
                cache: str | os.PathLike[str] | None = None) -> ConfigPlan:
    """Validate a config merge from headers only (``compeft merge --config … --dry-run``): the
    config, the experts' tensor names, shapes and base fingerprints (``check_base``), and, when
    ``output`` is a model directory, that the base holds every tensor with its shape. No payload
    is read. Raises :class:`~compeft.errors.InvalidArgumentError` or
    :class:`~compeft.errors.BaseMismatchError` naming what is wrong."""
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    if type(seed) is not int or seed < 0:
        raise InvalidArgumentError(f"seed must be a non-negative integer, got {seed!r}")
    if base is not None and cfg.base_model is not None and str(base) != cfg.base_model:
        raise InvalidArgumentError(f"the config sets base_model {cfg.base_model!r}; do not pass another base ({base})")
    base_path = Path(base if base is not None else cfg.base_model) if (base or cfg.base_model) else None
    if library is not None and cfg.library is not None and library != cfg.library:
        raise InvalidArgumentError(f"the config sets library {cfg.library!r}; do not pass another ({library})")
    where = library or cfg.library
    catalog = None
    if where is not None:
        from .library import open_library

        catalog = open_library(where, storage_options=storage_options, cache=cache)
    experts = [catalog[i.model] if catalog is not None and i.model in catalog
               else open_expert(i.model, storage_options=storage_options, cache=cache) for i in cfg.experts]
    model_output = output is not None and Path(output).suffix not in (".safetensors", ".cpeft")
    check_compatible(experts, check_base, None, union, values=model_output)  # a model copies agreed values
    names = merged_names(experts, union)
    values = [n for n in names if holder(experts, n).entry(n).role == "value"]
    names = [n for n in names if n not in values]
    base_names: list[str] = []
    if model_output:
        if base_path is None:
            raise InvalidArgumentError("a model directory output needs the base: set base_model or pass --base / "
                                       "base= (or write a .safetensors task vector or a .cpeft)", output)
        located = check_base_holds(base_path, experts, names)
        base_names = list(located)
        changes = bool(cfg.out_dtype or cfg.dtype) or cfg.method.family in ("linear", "passthrough")
        held: dict[Path, set[str]] = {}
        for n, (path, _) in located.items():
            held.setdefault(path, set()).add(n)
        for path, inside in held.items():  # onto_base rewrites the shards holding a tensor of the first expert
            if not inside & set(experts[0].names) and (changes or inside & set(names)):
                raise InvalidArgumentError(f"base shard {path.name} holds no tensor of the first expert "
                                           f"({cfg.experts[0].model}): list an expert holding every tensor first")
    positions, stacks = layer_positions([*names, *(n for n in base_names if n not in set(names))])
    if len(stacks) > 1 and uses_gradient(cfg):
        raise InvalidArgumentError(f"a gradient needs one stack of layers; these tensors have {len(stacks)} "
                                   f"({', '.join(stacks[:3])})")
    by_model = {i.model: e for i, e in zip(cfg.experts, experts)}
    operands = [None if i.is_base else by_model[i.model] for i in cfg.operands]
    indices = [None if i.is_base else cfg.experts.index(i) for i in cfg.operands]
    params = {}
    for n in names:
        params[n] = resolve(cfg, n, positions[n])
        check_tensor(cfg.method, n, holder(experts, n).entry(n).shape, params[n], [i.model for i in cfg.operands])
    return ConfigPlan(cfg, experts, operands, indices, names, params, base_path, base_names, seed, union, check_base,
                      values)


def check_base_holds(base: Path, experts: list[CompressedExpert], names: list[str]) -> dict[str, Any]:
    """The base's tensors (name -> (file, handle)), from its safetensors headers, after checking
    it holds every merged tensor with the experts' shape in a floating dtype."""
    if not base.exists():
        raise SourceError("no such file or directory", base)
    located = safetensors_tensors([base] if base.is_file() else safetensors_files(base))
    for name in names:
        if name not in located:
            raise BaseMismatchError(f"tensor {name!r} of the experts is not in the base", base)
        dtype, shape = base_dtype_shape(located[name][1], name, located[name][0])
        if shape != holder(experts, name).entry(name).shape:
            raise BaseMismatchError(f"tensor {name!r}: expert shape {list(holder(experts, name).entry(name).shape)}, "
                                    f"base shape {list(shape)}", base)
        if not dtype.is_floating_point:
            raise BaseMismatchError(f"tensor {name!r}: cannot add a delta into a {dtype} weight", base)
    return located


def merged_groups(plan: ConfigPlan, names: list[str], progress: bool = False):  # type: ignore[no-untyped-def]
    """(group, name -> merged τ) for ``names``, one group of at most CONFIG_GROUP_PARAMETERS at a
    time; a merged τ may be a view of scratch memory reused by the next group: use it first."""
    groups = [g for g in tensor_groups(plan.experts, names, CONFIG_GROUP_PARAMETERS) if g]
    largest = max([0, *(sum(holder(plan.experts, n).entry(n).numel for n in g) for g in groups)])
    for k, group in enumerate(progress_bar(groups, "merging", progress)):
        for e in plan.experts:  # experts read from URLs: this group and the next one start downloading
            e.prefetch([n for g in groups[k:k + 2] for n in g if n in e])
        plan.scratch.reset(largest, plan.experts[0].path)  # TIES: election, sums and counts, steps
        ops = Operands(plan.operands, plan.indices, group, plan.seed, plan.scratch)
        yield group, combine(plan.config.method, ops, {n: plan.params[n] for n in group})


def merge_from_config(config: str | os.PathLike[str] | Mapping[str, Any] | MergeConfig,
                      output: str | os.PathLike[str] | None = None, *, base: str | os.PathLike[str] | None = None,
                      library: str | None = None, union: bool = False, seed: int = 0, density: float | None = None,
                      alpha: float | str | None = None, check_base: bool = True, dry_run: bool = False,
                      storage_options: Mapping[str, Any] | None = None, cache: str | os.PathLike[str] | None = None,
                      progress: bool = False) -> Any:
    """Run a mergekit merge config on compressed experts.

    Parameters
    ----------
    config
        A YAML file (mergekit's schema, read with ``yaml.safe_load``) or its parsed mapping. Each
        ``model`` names a ``.cpeft`` path, fsspec URL or a name in ``library``; ``base_model`` the
        base model directory (or ``.safetensors``) the experts were made from.
    output
        A model directory (base + merge with the base's sharding; needs the base), a
        ``.safetensors`` merged task vector, a ``.cpeft`` re-compressed at ``density`` (default the
        first expert's) and ``alpha``; ``None``: return the merged task vectors.
    base
        The base when the config has no ``base_model`` (``linear``, ``passthrough``: with
        ``base_model`` mergekit merges the base as one more model).
    library
        A library (directory or URL) whose names ``model`` may use (else the config's ``library``).
    union
        Experts may hold different tensors: one lacking a tensor counts as 0 there.
    seed
        Seeds DARE's and DELLA's drops and every re-trim's tie rule (recorded in the output).
    check_base
        Check base fingerprints (experts against each other, and the base when writing onto it).
    dry_run
        Check everything from headers and return the :class:`ConfigPlan` without merging.

    Returns
    -------
    The :class:`ConfigPlan` (``dry_run``), the :class:`~compeft.merging.MergeResult` (no output) or
    the path written.

    Examples
    --------
    >>> import compeft, torch
    >>> from compeft.merge_run import merge_from_config
    >>> a = compeft.compress({"w": torch.randn(100)}, density=0.5)
    >>> b = compeft.compress({"w": torch.randn(100)}, density=0.5)
    >>> import tempfile, os; d = tempfile.mkdtemp(); a.save(f"{d}/a.cpeft"); b.save(f"{d}/b.cpeft")
    >>> config = {"merge_method": "linear", "models": [{"model": f"{d}/a.cpeft", "parameters": {"weight": 1}},
    ...                                                {"model": f"{d}/b.cpeft", "parameters": {"weight": 3}}]}
    >>> merge_from_config(config)["w"].shape
    torch.Size([100])
    """
    plan = plan_config(config, base=base, library=library, union=union, seed=seed, check_base=check_base,
                       output=output, storage_options=storage_options, cache=cache)
    out = None if output is None else Path(output)
    vector = out is None or out.suffix in (".safetensors", ".cpeft")
    if vector:
        scaled = [n for n in plan.names if plan.coefficient(n) != 1.0]
        if scaled:
            raise InvalidArgumentError(f"{plan.config.method.name} here scales the base too (tensor {scaled[0]!r}: "
                                       f"{plan.coefficient(scaled[0]):g} × base): write a model directory", output)
    if out is not None and out.suffix == ".cpeft":
        from .encode import check_arguments, default_alpha
        from .alpha import DEFAULT_SCOPE
        from .codec import golomb

        check_arguments(0.1 if density is None else density, default_alpha(DEFAULT_SCOPE) if alpha is None else alpha,
                        DEFAULT_SCOPE, golomb.DEFAULT_CHUNK_SIZE)
    if dry_run:
        return plan
    record = {"method": plan.config.method.name, "config": plan.config.text, "seed": seed, "union": union,
              "experts": [e.path for e in plan.experts]}
    if vector:
        dtype = DTYPES[plan.config.out_dtype or plan.config.dtype or "float32"]
        result = MergeResult()
        result.metadata = record
        for _, merged in merged_groups(plan, plan.names, progress):
            result.update({n: t.to(dtype, copy=True) for n, t in merged.items()})  # (the scratch is reused)
        if out is None:
            return result
        meta = {"merge": json.dumps(record, sort_keys=True, default=str)}
        if out.suffix == ".safetensors":
            write_safetensors({n: t.contiguous() for n, t in result.items()}, out, meta)
        else:
            chosen = plan.experts[0].metadata.get("density", 0.1) if density is None else density
            compress(dict(result), density=chosen, alpha=alpha, metadata=meta, progress=progress).save(out)
        return out
    assert out is not None and plan.base is not None
    chosen = plan.config.out_dtype or plan.config.dtype
    values = agreed_values(plan.experts, plan.values)  # (read and compared before anything is written)
    return onto_base(plan.experts, plan.base, out, check_base, progress,
                     lambda part, names: write_part(plan, part, values),
                     config_over(plan), lambda name, dtype: DTYPES[chosen] if chosen and dtype.is_floating_point else dtype)


def write_part(plan: ConfigPlan, shard: dict[str, torch.Tensor], values: Mapping[str, torch.Tensor]) -> None:
    """A part of a base shard, in place, one tensor group at a time: each merged tensor becomes
    dtype(c·base + τ) computed in float32 (float64 for a float64 output), a tensor the experts
    store as a value becomes that value (in the output's dtype when floating), every other
    floating tensor dtype(c·base); dtype is out_dtype, else dtype, else the base's."""
    chosen = plan.config.out_dtype or plan.config.dtype

    def update(name: str, change: torch.Tensor | None) -> None:
        weight = shard[name]
        dtype = DTYPES[chosen] if chosen else weight.dtype
        c = plan.coefficient(name)
        if change is None and c == 1.0 and dtype == weight.dtype:
            return
        wide = torch.float64 if torch.float64 in (dtype, weight.dtype) else torch.float32
        if change is not None and c == 1.0 and wide == torch.float32:
            shard[name] = change.add_(weight).to(dtype)  # float32(w) + τ, no float32 copy of the weight
            return
        value = weight.to(wide)
        if c != 1.0:
            value = value * (c if wide == torch.float64 else float(np.float32(c)))
        if change is not None:
            value = value + change.to(wide)
        shard[name] = value.to(dtype)

    wanted = [n for n in plan.names if n in shard]
    for group, merged in merged_groups(plan, wanted):
        for name in group:
            update(name, merged.pop(name))
    for name in set(shard) - set(wanted):
        if name in values:
            weight = shard[name]
            shard[name] = values[name].to(DTYPES[chosen] if chosen and weight.is_floating_point() else weight.dtype)
        elif shard[name].is_floating_point():
            update(name, None)


def config_over(plan: ConfigPlan) -> dict[str, str]:
    """The base's config.json with its dtype set to the output's, when the config chooses one."""
    chosen = plan.config.out_dtype or plan.config.dtype
    path = plan.base / "config.json" if plan.base is not None and plan.base.is_dir() else None
    if chosen is None or path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return {}
    for key in ("torch_dtype", "dtype"):
        if isinstance(data, dict) and key in data:
            data[key] = chosen
    return {"config.json": json.dumps(data, indent=2, sort_keys=True)}


def merge_command(args: Any, storage_options: Mapping[str, Any]) -> str:
    """``compeft merge`` (its parsed arguments): a config merge with ``--config``, else the flag
    merge of :func:`compeft.export.merge_to`; returns what the command prints. Flags a config
    replaces are refused with it, never ignored."""
    options = dict(base=args.base, density=args.density, alpha=args.alpha, check_base=not args.force,
                   union=args.union, seed=args.seed, progress=not args.quiet)
    if args.output is None and not args.dry_run:
        raise InvalidArgumentError("merge needs -o/--output (or --dry-run with --config)")
    if args.config:
        given = [f for f, v in (("expert arguments", args.experts), ("--method", args.method), ("--weights", args.weights),
                                ("--scale", args.scale != 1.0), ("--no-normalize", args.no_normalize),
                                ("--drop-rate", args.drop_rate), ("--lora-rank", args.lora_rank is not None)) if v]
        if given:
            raise InvalidArgumentError(f"{given[0]} cannot be combined with --config (the config says how to merge)")
        got = merge_from_config(args.config, args.output, library=args.library, dry_run=args.dry_run,
                                storage_options=storage_options, cache=args.cache, **options)
        return describe(got) if args.dry_run else f"wrote {got}"
    if not args.experts or args.dry_run:
        raise InvalidArgumentError("merge needs expert arguments, or --config merge.yml (--dry-run needs --config)")
    weights = None
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise InvalidArgumentError(f"--weights expects comma-separated numbers, got {args.weights!r}") from None
        if len(weights) != len(args.experts):
            raise InvalidArgumentError(f"--weights has {len(weights)} numbers for {len(args.experts)} experts")
    if args.library:
        from .library import open_library

        experts = open_library(args.library, storage_options=storage_options, cache=args.cache).select(args.experts)
    else:
        experts = [open_expert(e, storage_options=storage_options, cache=args.cache, progress=not args.quiet)
                   for e in args.experts]
    if args.lora_rank is not None:  # LoRA experts merged as products (compeft.lora_merge)
        from .lora_merge import merge_lora

        if args.base or args.union or args.density is not None or args.alpha is not None:
            raise InvalidArgumentError("--lora-rank writes a LoRA directory or a .safetensors ΔW: it takes no "
                                       "--base, --union, --density or --alpha")
        got = merge_lora(experts, args.output, rank=args.lora_rank, method=args.method or "task_arithmetic",
                         weights=weights, scale=args.scale, normalize=not args.no_normalize, drop_rate=args.drop_rate,
                         seed=args.seed, check_base=not args.force, progress=not args.quiet)
        return f"wrote {args.output}" + (f": {len(got.kept)} modules at rank {got.rank}, ‖ΔW‖² kept min "
                                         f"{100 * min(got.kept.values()):.1f} %" if hasattr(got, "kept") else "")
    out = merge_to(experts, args.output, method=args.method or "task_arithmetic", weights=weights, scale=args.scale,
                   normalize=not args.no_normalize, drop_rate=args.drop_rate, **options)
    return f"wrote {out}"


def describe(plan: ConfigPlan) -> str:
    """A dry run's report, a few lines of text."""
    s = plan.summary()
    lines = [f"config OK: {s['merge_method']} of {len(s['experts'])} experts, {s['tensors']} tensors, "
             f"{s['parameters']:,} parameters each" + (" (union)" if s["union"] else "")
             + (f", base {s['base']}" if s["base"] else "")]
    lines += [f"  {e['model']}: {e['tensors']} tensors, density {e['density']}" for e in s["experts"]]
    lines.append("checked from headers (no payload read): " + "; ".join(s["checked"]))
    return "\n".join(lines)
