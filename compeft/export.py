"""Writing experts out: dense task vectors, PEFT adapter directories, and base + τ̃ model files
with the base's sharding (``decompress``, ``merge_to``), one shard in memory at a time."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .alpha import DEFAULT_SCOPE
from .applying import add_expert
from .codec import golomb
from .encode import check_arguments, compress, default_alpha
from .errors import BaseMismatchError, HeaderError, InvalidArgumentError, SourceError
from .expert import CompressedExpert, PathLike, as_expert
from .format import atomic_write
from .merging import merge
from .progress import progress_bar
from .sources import (ADAPTER_CONFIG, SAFETENSORS_INDEX, base_dtype_shape, fingerprint, open_safetensors,
                      safetensors_files, safetensors_tensors)
from .weights import write_safetensors


def resolve_check_base(check_base: bool, force: bool | None) -> bool:
    """``check_base``, or ``not force`` when the older keyword ``force`` is given."""
    if force is None:
        return bool(check_base)
    if not check_base and not force:
        raise InvalidArgumentError("pass check_base or its older spelling force, not both")
    return not force


def restored(expert: CompressedExpert, name: str) -> torch.Tensor:
    """A PEFT adapter tensor: init + τ̃ (τ̃ alone when init is 0 or absent)."""
    e = expert.entry(name)
    value = expert.to_dense(name)
    if e.role == "delta" and e.init:
        value = (value.float() + e.init).to(value.dtype)
    return value


def decompress(expert: CompressedExpert | PathLike, output: PathLike, *, base: PathLike | None = None,
               check_base: bool = True, progress: bool = False, force: bool | None = None) -> Path:
    """Write an expert back out.

    - ``output`` ending in ``.safetensors`` without ``base``: the dense task vector (τ̃ per delta
      tensor, the value per value tensor);
    - an expert made from a PEFT adapter, to a directory: the adapter directory
      (``adapter_config.json`` + ``adapter_model.safetensors``) that PEFT loads;
    - with ``base`` (a model directory or ``.safetensors`` file): base + τ̃ with the base's sharding
      and every other file of the base directory copied.

    ``check_base=False`` skips the base fingerprint check (``force=True`` is its older spelling).
    Returns the path written.
    """
    check_base = resolve_check_base(check_base, force)
    expert = as_expert(expert)
    out = Path(output)
    if base is not None:
        return decompress_onto_base(expert, Path(base), out, check_base, progress)
    expert.prefetch()  # from a URL: every payload requested at once, not tensor by tensor
    if out.suffix == ".safetensors":
        tensors = {n: expert.to_dense(n).contiguous() for n in progress_bar(expert.names, "decoding", progress)}
        write_safetensors(tensors, out)
        return out
    if expert.metadata.get("source") != "peft":
        raise InvalidArgumentError("this expert is not a PEFT adapter: write a .safetensors task vector or pass a base",
                                   expert.path)
    tensors = {n: restored(expert, n).contiguous() for n in progress_bar(expert.names, "decoding", progress)}
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, out / "adapter_model.safetensors", {"format": "pt"})
    config = expert.metadata.get("adapter_config") or {}
    atomic_write(out / ADAPTER_CONFIG, [json.dumps(config, indent=2, sort_keys=True).encode()])
    return out


def merge_to(experts: Sequence[CompressedExpert | PathLike], output: PathLike, *, method: str = "task_arithmetic",
             weights: Sequence[float] | None = None, scale: float = 1.0, normalize: bool = True,
             drop_rate: float = 0.0, seed: int = 0, base: PathLike | None = None, density: float | None = None,
             alpha: float | str | None = None, check_base: bool = True, progress: bool = False,
             lam: float | None = None, force: bool | None = None) -> Path:
    """:func:`compeft.merge` written out: base + merged τ with the base's sharding (``base``), a
    ``.safetensors`` merged task vector (float32), or a re-compressed ``.cpeft`` (``density``,
    default the first expert's; ``alpha`` default :func:`compress`'s). The merge's method, weights,
    λ, drop rate and seed are recorded in the output's metadata."""
    check_base = resolve_check_base(check_base, force)
    opened = [as_expert(e) for e in experts]
    options = dict(method=method, weights=weights, scale=scale, lam=lam, normalize=normalize, drop_rate=drop_rate,
                   seed=seed, check_base=check_base)
    out = Path(output)
    if base is None and out.suffix not in (".safetensors", ".cpeft"):
        raise InvalidArgumentError("merge output must end in .safetensors or .cpeft, or come with a base", out)
    if out.suffix == ".cpeft" and base is None:
        check_arguments(0.1 if density is None else density, default_alpha(DEFAULT_SCOPE) if alpha is None else alpha,
                         DEFAULT_SCOPE, golomb.DEFAULT_CHUNK_SIZE)
    if base is not None:
        return onto_base(opened, Path(base), out, check_base, progress,
                         lambda shard, names: merge(opened, into=shard, names=names, **options))
    result = merge(opened, progress=progress, **options)
    record = {"merge": json.dumps(result.metadata, sort_keys=True)}
    if out.suffix == ".safetensors":
        write_safetensors({n: t.contiguous() for n, t in result.items()}, out, record)
    else:
        chosen = opened[0].metadata.get("density", 0.1) if density is None else density
        compress(dict(result), density=chosen, alpha=alpha, metadata=record, progress=progress).save(out)
    return out


def decompress_onto_base(expert: CompressedExpert, base: Path, out: Path, check_base: bool, progress: bool
                         ) -> Path:
    # the fine-tune's own config files replace the base's copies
    return onto_base([expert], base, out, check_base, progress,
                     lambda shard, names: add_expert(expert, shard, names, 1.0), model_files(expert))


def model_files(expert: CompressedExpert) -> dict[str, str]:
    """The header's ``model_files`` (a full fine-tune's small JSON files), checked: the header is
    untrusted input, so a name must be a plain ``*.json`` file name, never a path."""
    files = expert.metadata.get("model_files") or {}
    if not isinstance(files, dict):
        raise HeaderError("metadata model_files must be a JSON object", expert.path)
    for name, text in files.items():
        if (not isinstance(text, str) or not name.endswith(".json") or name != Path(name).name
                or name in (".json", "..") or "\\" in name or name == SAFETENSORS_INDEX):
            raise HeaderError(f"metadata model_files: {name!r} is not a plain .json file name with text", expert.path)
    return files


def onto_base(experts: Sequence[CompressedExpert], base: Path, out: Path, check_base: bool, progress: bool,
               update: Callable[[dict[str, torch.Tensor], list[str]], Any], files_over: Mapping[str, str] = {}) -> Path:
    """Write base + the experts' change with the base's sharding, one shard in memory at a time:
    ``update(shard, names)`` changes the shard's tensors ``names`` in place; ``files_over`` (name ->
    text) are written over the base directory's other files.

    Everything that can be checked is checked before anything is written (the base holds every
    tensor with the expert's shape in a floating dtype, its fingerprint with ``check_base``, every
    payload's checksum and structure); a directory output is written under a temporary name
    beside ``out`` and renamed into place, so a failure leaves nothing behind."""
    expert = experts[0]
    if not base.exists():
        raise SourceError("no such file or directory", base)
    files = [base] if base.is_file() else safetensors_files(base)
    if base.is_dir() and out.suffix == ".safetensors":
        raise InvalidArgumentError(f"the base {base} is a model directory: the output must be a directory, "
                                   "not a .safetensors file", out)
    if base.is_file() and out.suffix != ".safetensors" and out.exists() and not out.is_dir():
        raise InvalidArgumentError("the output exists and is not a directory", out)
    located = safetensors_tensors(files)
    missing = [n for n in expert.names if n not in located]
    if missing:
        raise BaseMismatchError(f"{len(missing)} tensors of the expert are not in the base (e.g. {missing[:3]})", base)
    for name in expert.names:
        path, handle = located[name]
        dtype, shape = base_dtype_shape(handle, name, path)
        e = expert.entry(name)
        if shape != e.shape:
            raise BaseMismatchError(f"tensor {name!r}: expert shape {list(e.shape)}, base shape {list(shape)} "
                                    f"(--force skips only the fingerprint check)", path)
        if e.role == "delta" and not dtype.is_floating_point:
            raise BaseMismatchError(f"tensor {name!r}: cannot add a delta into a {dtype} weight", path)
    wanted = expert.metadata.get("base_fingerprint")
    if wanted and check_base:
        got = fingerprint((n, located[n][1].get_tensor(n)) for n in expert.names)
        if got != wanted:
            raise BaseMismatchError("the base is not the one this expert was made from; pass --force to apply anyway",
                                    base)
    for each in experts:
        each.verify()  # every payload checked before the first file is written
    single = base.is_file() and out.suffix == ".safetensors"
    stage = out if single or out.exists() else out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        targets = [(base, stage)] if single else [(f, stage / f.name) for f in files]
        if not single:
            stage.mkdir(parents=True, exist_ok=True)
        handles = {path: handle for path, handle in located.values()}
        for source_file, dest in progress_bar(targets, "writing shards", progress):
            handle = handles.get(source_file) or open_safetensors(source_file)  # a shard the expert leaves alone
            shard_meta = handle.metadata() or None
            shard = {n: handle.get_tensor(n) for n in handle.keys()}  # one shard in memory, not mapped
            names = [n for n in expert.names if n in shard]
            if names:
                update(shard, names)
            write_safetensors(shard, dest, shard_meta)
            del shard
        if base.is_dir():
            weight_names = {f.name for f in files}
            for item in base.iterdir():
                if item.is_file() and item.name not in weight_names:
                    shutil.copy2(item, stage / item.name)
        if not single:
            for name, text in files_over.items():
                atomic_write(stage / name, [text.encode("utf-8")])
        if stage != out:
            os.rename(stage, out)
    except BaseException:
        if stage != out:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    return out
