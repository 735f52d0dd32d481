"""Writing experts out: dense task vectors, PEFT adapter directories, and base + τ̃ model files
with the base's sharding (``decompress``, ``merge_to``), one shard in memory at a time."""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .alpha import DEFAULT_SCOPE
from .applying import add_expert
from .codec import golomb
from .encode import check_arguments, compress, default_alpha
from .errors import BaseMismatchError, HeaderError, InvalidArgumentError, SourceError
from .expert import CompressedExpert, PathLike, as_expert, check_outputs, output_bytes
from .format import atomic_write
from .merging import Scratch, cut_groups, merge
from .progress import progress_bar
from .sources import (ADAPTER_CONFIG, SAFETENSORS_INDEX, base_dtype_shape, fingerprint_of, fingerprint_record,
                      open_safetensors, safetensors_files, safetensors_tensors)
from .weights import safetensors_header, safetensors_order, tensor_bytes, write_safetensors


def resolve_check_base(check_base: bool, force: bool | None) -> bool:
    """``check_base``, or ``not force`` when the older keyword ``force`` is given."""
    if force is None:
        return bool(check_base)
    if not check_base and not force:
        raise InvalidArgumentError("pass check_base or its older spelling force, not both")
    return not force


DECODE_GROUP = 1 << 26  # parameters per parallel decode pass when an expert is written out whole


def decoded(expert: CompressedExpert, *, init: bool = False, progress: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of ``expert``, decoded (contiguous) group by group of about ``DECODE_GROUP``
    parameters: one read and one parallel pass per group, where a pass per tensor cost 2.5x as
    much on the 448 tensors of a 7B LoRA set (benchmarks/README, case 2's info row). With ``init``, a PEFT
    adapter's tensors as PEFT saves them: ``init`` + τ̃ (e.g. 1 + τ̃ for (IA)³ vectors)."""
    out: dict[str, torch.Tensor] = {}
    bar = progress_bar(len(expert.names), "decoding", progress)
    for group in cut_groups([(n, expert.entry(n).numel) for n in expert.names], DECODE_GROUP):
        for name, value in expert.state_dict(group).items():
            e = expert.entry(name)
            if init and e.role == "delta" and e.init:
                value = (value.float() + e.init).to(value.dtype)
            out[name] = value.contiguous()
        bar.update(len(group))
    bar.close()
    return out


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
    if out.suffix != ".safetensors" and expert.metadata.get("source") != "peft":
        raise InvalidArgumentError("this expert is not a PEFT adapter: write a .safetensors task vector or pass a base",
                                   expert.path)
    # every tensor is held until the file is written: one memory budget for all of them
    check_outputs([(e.name, output_bytes(e)) for e in expert.header.tensors], expert.path)
    expert.prefetch()  # from a URL: every payload requested at once, not tensor by tensor
    if out.suffix == ".safetensors":
        write_safetensors(decoded(expert, progress=progress), out)
        return out
    tensors = decoded(expert, init=True, progress=progress)
    config = json.dumps(expert.metadata.get("adapter_config") or {}, indent=2, sort_keys=True).encode()
    with staged_directory(out) as stage:  # both files appear together, or neither
        write_safetensors(tensors, stage / "adapter_model.safetensors", {"format": "pt"})
        atomic_write(stage / ADAPTER_CONFIG, [config])
    return out


def merge_to(experts: Sequence[CompressedExpert | PathLike], output: PathLike, *, method: str = "task_arithmetic",
             weights: Sequence[float] | None = None, scale: float = 1.0, normalize: bool = True,
             drop_rate: float = 0.0, seed: int = 0, base: PathLike | None = None, density: float | None = None,
             alpha: float | str | None = None, check_base: bool = True, progress: bool = False,
             lam: float | None = None, force: bool | None = None, union: bool = False) -> Path:
    """:func:`compeft.merge` written out: base + merged τ with the base's sharding (``base``), a
    ``.safetensors`` merged task vector (float32), or a re-compressed ``.cpeft`` (``density``,
    default the first expert's; ``alpha`` default :func:`compress`'s). The merge's method, weights,
    λ, drop rate and seed are recorded in the output's metadata. ``union``: experts may hold
    different tensors (:func:`compeft.merge`)."""
    check_base = resolve_check_base(check_base, force)
    opened = [as_expert(e) for e in experts]
    options = dict(method=method, weights=weights, scale=scale, lam=lam, normalize=normalize, drop_rate=drop_rate,
                   seed=seed, check_base=check_base, union=union)
    out = Path(output)
    if base is None and out.suffix not in (".safetensors", ".cpeft"):
        raise InvalidArgumentError("merge output must end in .safetensors or .cpeft, or come with a base", out)
    if out.suffix == ".cpeft" and base is None:
        check_arguments(0.1 if density is None else density, default_alpha(DEFAULT_SCOPE) if alpha is None else alpha,
                         DEFAULT_SCOPE, golomb.DEFAULT_CHUNK_SIZE)
    if base is not None:
        every = list(dict.fromkeys(n for e in opened for n in (e.names if union else opened[0].names)))
        if union and Path(base).exists():  # onto_base checks the first expert's tensors; the others' here
            located = safetensors_tensors([Path(base)] if Path(base).is_file() else safetensors_files(Path(base)))
            missing = [n for n in every if n not in located]
            if missing:
                raise BaseMismatchError(f"{len(missing)} tensors of the experts are not in the base (e.g. "
                                        f"{missing[:3]})", base)
        scratch = Scratch()  # one block of accumulator memory for every part of every shard
        return onto_base(opened, Path(base), out, check_base, progress,
                         lambda part, names: merge(opened, into=part, names=[n for n in every if n in part],
                                                   scratch=scratch, **options))
    # the result holds a float32 tensor per merged tensor until it is written
    check_outputs({n: 4 * e.entry(n).numel for e in opened for n in e.names}.items(), opened[0].path)
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


MAX_MODEL_FILES = 256  # files in a full fine-tune's model_files ...
MAX_MODEL_FILES_BYTES = 16 << 20  # ... and their text in all (a config, a tokenizer's JSON files)
MAX_FILE_NAME_BYTES = 255  # NAME_MAX of the common file systems


def model_files(expert: CompressedExpert) -> dict[str, str]:
    """The header's ``model_files`` (a full fine-tune's small JSON files), checked completely before
    anything is written: the header is untrusted input, so each name must be a plain, printable
    ``*.json`` file name (no path, no NUL, not hidden, at most 255 UTF-8 bytes, never the weights'
    index), each text valid UTF-8 (no lone surrogate), and they are at most
    :data:`MAX_MODEL_FILES` files of :data:`MAX_MODEL_FILES_BYTES` in all."""
    files = expert.metadata.get("model_files") or {}
    if not isinstance(files, dict):
        raise HeaderError("metadata model_files must be a JSON object", expert.path)
    if len(files) > MAX_MODEL_FILES:
        raise HeaderError(f"metadata model_files lists {len(files)} files, more than {MAX_MODEL_FILES}", expert.path)
    total = 0
    for name, text in files.items():
        if not (isinstance(text, str) and _plain_json_name(name)):
            raise HeaderError(f"metadata model_files: {ascii(name)[:300]} is not a plain .json file name with text",
                              expert.path)
        try:
            total += len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise HeaderError(f"metadata model_files: the text of {name!r} is not valid UTF-8 (a lone surrogate)",
                              expert.path) from None
        if total > MAX_MODEL_FILES_BYTES:
            raise HeaderError(f"metadata model_files: more than {MAX_MODEL_FILES_BYTES:,} bytes of text in all",
                              expert.path)
    return files


def _plain_json_name(name: str) -> bool:
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return False
    return (name.endswith(".json") and name.isprintable() and 5 < size <= MAX_FILE_NAME_BYTES
            and not name.startswith(".") and "/" not in name and "\\" not in name and name != SAFETENSORS_INDEX)


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """A hidden directory beside ``out`` to write an output directory into. When the block ends
    normally its files appear at ``out`` at once: renamed into place, or, over an earlier output
    (an ``out`` holding no name the stage lacks), swapped with it in one atomic exchange and the old
    one removed; into a directory holding other files too they are moved one by one (each file
    atomic, the set not). When the block raises, the stage is removed and ``out`` is untouched. A
    writer killed meanwhile (SIGKILL) leaves only hidden stages, which hold a lock while their
    writer lives: the next write to ``out`` removes stages whose lock is free."""
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    for old in parent.glob(f".{glob.escape(out.name)}.*.partial"):
        _remove_abandoned(old)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=parent))
    os.chmod(stage, _directory_mode())  # mkdtemp's 0o700 would become the output's mode
    lock = _lock(stage)
    try:
        yield stage
        if out.exists() and not out.is_dir():
            raise InvalidArgumentError("the output exists and is not a directory", out)
        try:
            os.rename(stage, out)  # a new name, or over an empty directory: all at once
        except OSError:
            if replaceable(out, stage) and exchange(stage, out):  # the old output now sits at the stage's name
                shutil.rmtree(stage, ignore_errors=True)
            else:
                for item in sorted(stage.iterdir()):
                    os.replace(item, out / item.name)
                stage.rmdir()
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        if lock >= 0:
            os.close(lock)


def replaceable(out: Path, stage: Path) -> bool:
    """Whether ``out`` is a real directory whose every entry the stage replaces (an earlier output)."""
    if out.is_symlink() or not out.is_dir():
        return False
    return {p.name for p in out.iterdir()} <= {p.name for p in stage.iterdir()}


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    try:
        import ctypes

        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (ImportError, OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _directory_mode() -> int:
    """The mode ``mkdir`` would give a new directory: 0o777 less the umask (read from /proc, since
    setting the umask to read it races with other threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o777 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o755


def _lock(directory: Path) -> int:
    """An fd holding an exclusive lock on ``directory`` (released when the process dies), or -1."""
    try:
        import fcntl
        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return -1
    return fd


def _remove_abandoned(stage: Path) -> None:
    """Remove a stage left by a writer that died (its lock is free); leave a live writer's alone."""
    if stage.is_symlink() or not stage.is_dir():
        return
    fd = _lock(stage)
    if fd >= 0:
        try:
            shutil.rmtree(stage, ignore_errors=True)
        finally:
            os.close(fd)


def onto_base(experts: Sequence[CompressedExpert], base: Path, out: Path, check_base: bool, progress: bool,
              update: Callable[[dict[str, torch.Tensor], list[str]], Any], files_over: Mapping[str, str] = {},
              dtype_for: Callable[[str, torch.dtype], torch.dtype] | None = None) -> Path:
    """Write base + the experts' change with the base's sharding, one shard in memory at a time:
    ``update(part, names)`` changes the tensors ``names`` of a part of a shard in place (see
    :func:`write_shard`; ``dtype_for`` gives output dtypes); ``files_over`` (name -> text) are
    written over the base directory's other files.

    Everything that can be checked without reading the base's weights is checked before anything
    is written (the base holds every tensor with the expert's shape in a floating dtype, every
    payload's checksum and structure). The base's fingerprint (``check_base``) is computed from the
    bytes the write pass reads, so the base is read once, and checked before the output is renamed
    into place: the output is written under a temporary name beside ``out``, so a failure, this one
    included, leaves nothing behind."""
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
    for each in experts:
        each.verify()  # every payload checked before the first file is written
    handles = {path: handle for path, handle in located.values()}
    wanted = expert.metadata.get("base_fingerprint") if check_base else None
    records: dict[str, bytes] = {}

    def recorded(part: dict[str, torch.Tensor], names: list[str]) -> Any:
        for name in names if wanted else ():  # the base's bytes, before the update changes them
            records[name] = fingerprint_record(name, part[name])
        return update(part, names)

    def check_fingerprint() -> None:
        """The base's fingerprint, from the bytes the write pass read (one read of the base, not two);
        raised before the output is renamed into place."""
        if wanted and fingerprint_of(records[n] for n in expert.names) != wanted:
            raise BaseMismatchError("the base is not the one this expert was made from; pass --force to apply anyway",
                                    base)

    if base.is_file() and out.suffix == ".safetensors":
        write_shard(base, out, handles, expert.names, recorded, dtype_for, check_fingerprint)
        return out
    with staged_directory(out) as stage:  # nothing appears at `out` until every file is written
        for source_file in progress_bar(files, "writing shards", progress):
            write_shard(source_file, stage / source_file.name, handles, expert.names, recorded, dtype_for)
        check_fingerprint()
        if base.is_dir():
            weight_names = {f.name for f in files}
            for item in base.iterdir():
                if item.is_file() and item.name not in weight_names:
                    shutil.copy2(item, stage / item.name)
        for name, text in files_over.items():  # (checked by model_files before the first shard)
            atomic_write(stage / name, [text.encode("utf-8")])
    return out


SHARD_PART_PARAMETERS = 1 << 22  # tensors of a shard read, changed and written together


def write_shard(source_file: Path, dest: Path, handles: Mapping[Path, Any], names: Sequence[str],
                update: Callable[[dict[str, torch.Tensor], list[str]], Any],
                dtype_for: Callable[[str, torch.dtype], torch.dtype] | None = None,
                finish: Callable[[], None] | None = None) -> None:
    """One shard of the base with ``update`` applied to the expert's tensors in it, written
    atomically and streamed: the output's header comes from the base's (``dtype_for(name, dtype)``
    gives each tensor's output dtype; default unchanged), then the tensors in file order, a part of
    at most SHARD_PART_PARAMETERS parameters at a time (a larger tensor alone), each part read,
    passed to ``update(part, changed)`` and written before the next is read. Memory holds one part,
    not the shard. ``update`` sees every part of a shard that holds a tensor of ``names`` (as it saw
    the whole shard before), also parts without one: it may convert them, or merge tensors that
    only other experts hold. ``finish`` runs after the last byte and before the file is named: what
    it raises leaves no file."""
    handle = handles.get(source_file) or open_safetensors(source_file)  # a shard the expert leaves alone
    shard_meta = handle.metadata() or None
    specs = {}
    for name in handle.keys():
        dtype, shape = base_dtype_shape(handle, name, source_file)
        specs[name] = (dtype if dtype_for is None else dtype_for(name, dtype), tuple(shape))
    wanted = set(names)
    touched = any(n in wanted for n in specs)
    parts = cut_groups([(n, math.prod(specs[n][1])) for n in safetensors_order(specs)], SHARD_PART_PARAMETERS)

    def chunks() -> Iterator[bytes | memoryview]:
        yield safetensors_header(specs, shard_meta)
        for group in parts:
            part = {n: handle.get_tensor(n) for n in group}
            changed = [n for n in group if n in wanted]
            if touched:
                update(part, changed)
            for name in group:
                t = part.pop(name)
                if t.dtype != specs[name][0] or tuple(t.shape) != specs[name][1]:
                    raise InvalidArgumentError(f"tensor {name!r}: the update gave {t.dtype} {list(t.shape)}, the "
                                               f"header says {specs[name][0]} {list(specs[name][1])}", dest)
                if t.numel():
                    yield tensor_bytes(t)
        if finish is not None:
            finish()

    atomic_write(dest, chunks())


