"""Where task vectors come from: a tensor mapping, a PEFT adapter directory, or a fine-tuned model
beside its base. Each source lists its tensors and produces one residual at a time, so two full
models are never held in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from .codec import floats
from .errors import BaseMismatchError, InvalidArgumentError, SourceError
from .dtypes import TORCH_TO_DTYPE
from .weights import SafetensorsFile

COMPRESSIBLE = (torch.float32, torch.float16, torch.bfloat16)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
SAFETENSORS_INDEX = "model.safetensors.index.json"


def dtype_code(dtype: torch.dtype, where: str) -> str:
    try:
        return TORCH_TO_DTYPE[dtype]
    except KeyError:
        raise SourceError(f"{where}: dtype {dtype} is not supported") from None


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a source. ``load()`` returns the residual τ (role 'delta') or the value."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    init: float | None  # the constant τ is measured from (PEFT), or None: a base model's tensor
    load: Callable[[], torch.Tensor]
    load_value: Callable[[], torch.Tensor]  # the tensor itself, stored verbatim when kept dense
    dense_reason: str | None = None  # why this tensor is a weight, not a residual (kept dense by default)

    @property
    def floating(self) -> bool:
        return self.dtype in COMPRESSIBLE


@dataclass(frozen=True)
class Source:
    kind: str  # "tensors" | "peft" | "full"
    tensors: tuple[SourceTensor, ...]  # sorted by name
    adapter_config: dict[str, Any] | None = None
    # () -> the base's fingerprint, called once every tensor is encoded (it reuses the base bytes the
    # residuals read; tensors they did not read are read then)
    base_fingerprint: Callable[[], str] | None = None
    model_files: dict[str, str] | None = None  # the fine-tune's small JSON files (config.json, ...), verbatim


def _check_tensor(name: str, value: Any, where: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise SourceError(f"tensor {name!r} is a {type(value).__name__}, not a torch.Tensor", where)
    if value.is_sparse or value.is_complex():
        raise SourceError(f"tensor {name!r}: sparse and complex tensors are not supported", where)
    dtype_code(value.dtype, f"tensor {name!r}")
    return value


def from_mapping(tensors: Mapping[str, torch.Tensor]) -> Source:
    """A task vector given as tensors: each tensor is τ itself (relative to some base model)."""
    bad = [name for name in tensors if not isinstance(name, str) or not name]
    if bad:
        raise SourceError(f"tensor names must be non-empty strings, got {bad[0]!r}")
    items = []
    for name in sorted(tensors):
        value = _check_tensor(name, tensors[name], None).detach()
        items.append(SourceTensor(name, value.dtype, tuple(value.shape), None,
                                  (lambda v=value: v), (lambda v=value: v)))
    return Source("tensors", tuple(items))


# ---------------------------------------------------------------------------------------------
# safetensors files


def open_safetensors(path: Path) -> SafetensorsFile:
    return SafetensorsFile(path)


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a model directory: the index's shards, or every *.safetensors file."""
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError) as exc:
            raise SourceError(f"bad safetensors index ({exc})", index) from None
        files = [directory / n for n in names]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise SourceError("no *.safetensors weights found", directory)
    for f in files:
        if not f.is_file() or f.resolve().parent != directory.resolve():
            raise SourceError(f"weight file {f.name!r} is missing or outside the model directory", directory)
    return files


def safetensors_tensors(paths: list[Path]) -> dict[str, tuple[Path, SafetensorsFile]]:
    """name -> (file, open handle) over one or several safetensors files (names must not repeat)."""
    located: dict[str, tuple[Path, Any]] = {}
    for path in paths:
        handle = open_safetensors(path)
        for name in handle.keys():
            if name in located:
                raise SourceError(f"tensor {name!r} appears in two weight files", path)
            located[name] = (path, handle)
    return located


def base_dtype_shape(handle: SafetensorsFile, name: str, path: Path) -> tuple[torch.dtype, tuple[int, ...]]:
    """The dtype and shape of tensor ``name`` of an open weight file."""
    return handle.dtype_shape(name)


# ---------------------------------------------------------------------------------------------
# PEFT adapters


def _load_failure(exc: Exception) -> str:
    """The reason in torch's refusal, on one line (its long message also suggests ``weights_only=False``,
    which would execute the file's code: advice compeft must not pass on)."""
    text = " ".join(str(exc).split())
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation", 1)[0].strip()
    return (text or type(exc).__name__)[:200]


def from_peft_dir(directory: str | os.PathLike[str]) -> Source:
    """A PEFT adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors`` (or a
    ``.bin`` read with ``torch.load(weights_only=True)``). LoRA-style weights are residuals from 0;
    (IA)³ scaling vectors from 1."""
    root = Path(directory)
    config_path = root / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise SourceError(f"not a PEFT adapter directory (no {ADAPTER_CONFIG})", root) from None
    except ValueError as exc:
        raise SourceError(f"invalid JSON ({exc})", config_path) from None
    if not isinstance(config, dict):
        raise SourceError("adapter config is not a JSON object", config_path)
    peft_type = str(config.get("peft_type", "")).upper()
    weights = next((root / n for n in ADAPTER_WEIGHTS if (root / n).is_file()), None)
    if weights is None:
        raise SourceError(f"no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})", root)
    if weights.suffix == ".safetensors":
        located = safetensors_tensors([weights])
        entries = {n: base_dtype_shape(h, n, p) for n, (p, h) in located.items()}
        loader = {n: (lambda n=n, h=h: h.get_tensor(n)) for n, (p, h) in located.items()}
    else:
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols before it refuses
                warnings.simplefilter("ignore")
                state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds here; none may escape unexplained
            raise SourceError(f"cannot read adapter weights safely ({_load_failure(exc)}); compeft never unpickles "
                              "anything but tensors: convert it to adapter_model.safetensors", weights) from None
        if not isinstance(state, dict):
            raise SourceError("adapter weights are not a tensor dictionary", weights)
        entries, loader = {}, {}
        for n, v in state.items():
            v = _check_tensor(n, v, weights)
            entries[n] = (v.dtype, tuple(v.shape))
            loader[n] = (lambda v=v: v)
    modules_to_save = config.get("modules_to_save") or []
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    items = []
    for name in sorted(entries):
        dtype, shape = entries[name]
        init = 1.0 if peft_type == "IA3" and "ia3_l" in name else 0.0
        reason = dense_reason(name, peft_type, modules_to_save)
        value = loader[name]

        def residual(value: Callable[[], torch.Tensor] = value, init: float = init) -> torch.Tensor:
            v = value()
            return v if init == 0.0 else v.float() - init

        items.append(SourceTensor(name, dtype, shape, init, residual, value, reason))
    return Source("peft", tuple(items), adapter_config=config)


# PEFT types whose whole state is values rather than residuals from a known init: prompt-learning
# methods store (virtual token) embeddings, LN tuning stores whole LayerNorm weights.
VALUE_PEFT_TYPES = frozenset({"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "CPT",
                              "ADAPTION_PROMPT", "LN_TUNING"})
# Name parts of the residual tensors of the adapters that also save base-layer tensors (bias="all").
ADAPTER_PARTS = ("lora_", "ia3_l")
TYPES_WITH_BASE_TENSORS = frozenset({"LORA", "ADALORA", "IA3"})


def dense_reason(name: str, peft_type: str, modules_to_save: list[str]) -> str | None:
    """Why a PEFT adapter tensor is a weight rather than a residual from 0 (or 1), or None.

    ComPEFT keeps the top-k of |τ| with one magnitude; a weight is not small around 0, and
    ternarizing it wrecks the layer it belongs to, so these are stored verbatim by default.
    """
    if peft_type in VALUE_PEFT_TYPES:
        return f"{peft_type} adapters store values, not residuals"
    if "lora_magnitude_vector" in name:
        return "DoRA magnitude vector (column norms of the whole weight)"
    if "trainable_tokens" in name:
        return "trainable token rows (embedding values)"
    parts = name.split(".")
    if any(part.startswith(ADAPTER_PARTS) for part in parts):
        return None
    for module in modules_to_save:
        want = str(module).split(".")
        if any(parts[i:i + len(want)] == want for i in range(len(parts) - len(want) + 1)):
            return f"modules_to_save copy of {module!r} (a whole weight)"
    if peft_type in TYPES_WITH_BASE_TENSORS:
        return "a base-layer tensor saved with the adapter (e.g. bias='all')"
    if any(part in ("vera_A", "vera_B") for part in parts):
        return "VeRA's shared random projection"
    return None


# ---------------------------------------------------------------------------------------------
# full fine-tunes


def fingerprint_record(name: str, tensor: torch.Tensor) -> bytes:
    """One base tensor's record in a base fingerprint: name, dtype, shape and a CRC-32 of its bytes."""
    data = tensor.detach().contiguous().cpu().view(torch.uint8).numpy() if tensor.numel() else b""
    record = [name, dtype_code(tensor.dtype, name), list(tensor.shape), zlib.crc32(data)]
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def fingerprint_of(records: Iterable[bytes]) -> str:
    """``cpeft-fp1:`` + SHA-256 over the records of :func:`fingerprint_record`, in name order."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(record)
    return "cpeft-fp1:" + digest.hexdigest()


def fingerprint(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The base fingerprint of ``(name, tensor)`` pairs given in name order."""
    return fingerprint_of(fingerprint_record(name, tensor) for name, tensor in tensors)


class Residuals:
    """τ = fine-tuned − base of one tensor at a time, in float32 (:func:`from_finetuned`).

    Both tensors are read into two buffers that are reused tensor after tensor (per thread), so
    their pages are faulted in once, not per tensor; two 16-bit tensors are widened and subtracted
    in one kernel pass (``codec.floats.difference_f32``: the bits of ``a.float() - b.float()``).
    The base's fingerprint record of each tensor (``records``) is taken from the bytes read, so
    that the fingerprint needs no second read of the base."""

    def __init__(self) -> None:
        self.records: dict[str, bytes] = {}
        self.rooms = threading.local()

    def room(self, which: int, handle: Any, name: str) -> torch.Tensor:
        dtype, shape = handle.dtype_shape(name)
        wanted = math.prod(shape) * dtype.itemsize
        buffers = self.rooms.__dict__.setdefault("buffers", [torch.empty(0, dtype=torch.uint8)] * 2)  # this thread's
        if buffers[which].numel() < wanted:
            buffers[which] = torch.empty(0, dtype=torch.uint8)  # the smaller one freed before the larger is taken
            buffers[which] = torch.empty(wanted, dtype=torch.uint8)
        return buffers[which]

    def __call__(self, tuned: Any, base: Any, name: str) -> torch.Tensor:
        a = tuned.get_tensor(name, into=self.room(0, tuned, name))
        b = base.get_tensor(name, into=self.room(1, base, name))
        if name not in self.records:
            self.records[name] = fingerprint_record(name, b)
        halves = (torch.bfloat16, torch.float16)
        if a.dtype not in halves or b.dtype not in halves or not a.numel():
            return a.float() - b.float()  # a fresh tensor either way: nothing refers to the buffers
        out = torch.empty(a.shape, dtype=torch.float32)
        floats.difference_f32(a.reshape(-1).view(torch.int16).numpy().view(np.uint16), a.dtype == torch.bfloat16,
                              b.reshape(-1).view(torch.int16).numpy().view(np.uint16), b.dtype == torch.bfloat16,
                              floats.F16_TO_F32, out.view(-1).numpy())
        return out


def from_finetuned(finetuned: str | os.PathLike[str], base: str | os.PathLike[str]) -> Source:
    """A fine-tuned model directory (or .safetensors file) and its base: τ = fine-tuned − base,
    computed in float32 one tensor at a time."""
    ft_root, base_root = Path(finetuned), Path(base)
    ft_files = [ft_root] if ft_root.is_file() else safetensors_files(ft_root)
    base_files = [base_root] if base_root.is_file() else safetensors_files(base_root)
    ft = safetensors_tensors(ft_files)
    bs = safetensors_tensors(base_files)
    missing, extra = sorted(set(ft) - set(bs)), sorted(set(bs) - set(ft))
    if missing or extra:
        detail = (f"{len(missing)} only in the fine-tune (e.g. {missing[:3]})" if missing else "") + \
                 (f"; {len(extra)} only in the base (e.g. {extra[:3]})" if extra else "")
        raise BaseMismatchError(f"fine-tune and base hold different tensors: {detail.strip('; ')}", base_root)
    residuals = Residuals()
    items = []
    for name in sorted(ft):
        path, handle = ft[name]
        bpath, bhandle = bs[name]
        dtype, shape = base_dtype_shape(handle, name, path)
        bdtype, bshape = base_dtype_shape(bhandle, name, bpath)
        if shape != bshape:
            raise BaseMismatchError(f"tensor {name!r}: fine-tune shape {list(shape)}, base shape {list(bshape)}",
                                    bpath)

        def residual(h: Any = handle, bh: Any = bhandle, n: str = name) -> torch.Tensor:
            return residuals(h, bh, n)

        items.append(SourceTensor(name, dtype, shape, None, residual,
                                  (lambda h=handle, n=name: h.get_tensor(n))))

    def print_fp() -> str:
        seen = residuals.records
        return fingerprint_of(seen[n] if n in seen else fingerprint_record(n, bs[n][1].get_tensor(n))
                              for n in sorted(bs))

    return Source("full", tuple(items), base_fingerprint=print_fp,
                  model_files=model_files(ft_root) if ft_root.is_dir() else None)


MODEL_FILE_LIMIT = 1 << 20  # larger JSON files (a big tokenizer.json) come from the base instead
MODEL_FILES_LIMIT = 4 << 20


def model_files(directory: Path) -> dict[str, str]:
    """The small JSON files of a fine-tuned model directory (config.json, generation_config.json,
    tokenizer configs, ...), whose text a restore writes over the base's copies: a fine-tune may
    change them (labels, architectures). The safetensors index is not one: restores keep the base's
    sharding."""
    out: dict[str, str] = {}
    total = 0
    for path in sorted(directory.glob("*.json")):
        if path.name == SAFETENSORS_INDEX or not path.is_file() or path.stat().st_size > MODEL_FILE_LIMIT:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SourceError(f"cannot read model file ({exc})", path) from None
        total += len(text)
        if total > MODEL_FILES_LIMIT:
            break
        out[path.name] = text
    return out


def resolve_source(source: Mapping[str, torch.Tensor] | str | os.PathLike[str],
                   base: str | os.PathLike[str] | None) -> Source:
    """The source a user names: a tensor mapping (τ itself), a PEFT adapter directory, or a
    fine-tuned model (directory or ``.safetensors`` file) with its ``base``."""
    from .errors import InvalidArgumentError

    if isinstance(source, Mapping):
        if base is not None:
            raise InvalidArgumentError("base is only used with a fine-tuned model path, not a tensor mapping")
        return from_mapping(source)
    path = Path(source)
    if not path.exists():
        raise SourceError("no such file or directory", path)
    if base is not None:
        return from_finetuned(path, base)
    if (path / ADAPTER_CONFIG).is_file():
        return from_peft_dir(path)
    raise SourceError(f"not a PEFT adapter directory (no {ADAPTER_CONFIG}); a fine-tuned model also needs a base",
                      path)
