"""The public verbs: ``compress``, ``open``, ``apply`` and ``decompress``."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, MutableMapping, Sequence

import numpy as np
import torch

from . import __version__
from .codec import golomb, kernels
from .alpha import (ALPHA_UNBIASED, DEFAULT_ALPHA, LORA_SOURCES, DEFAULT_SCOPE, PRODUCT_RULES, RULES, TensorStats,
                    check_rule, fidelity, lora_factor, lora_pairs, scales, tensor_stats)
from .encode import Selection, select
from .errors import BaseMismatchError, FidelityWarning, HeaderError, InvalidArgumentError, SourceError
from .expert import _ADD_MODE, CompressedExpert, flat_bits, kept_value
from .format import (ENCODING_DENSE, ENCODING_GOLOMB, BytesReader, TensorEntry, atomic_write,
                     encode_header)
from .format.header import MAX_CHUNK_SIZE, PAYLOAD_ALIGNMENT, SCOPES, round_up
from .progress import progress_bar
from .weights import DTYPE_TO_TORCH, write_safetensors
from .report import describe
from .sources import (ADAPTER_CONFIG, SAFETENSORS_INDEX, Source, SourceTensor, base_dtype_shape, dtype_code, fingerprint, from_finetuned, from_mapping, open_safetensors,
                      from_peft_dir, safetensors_files, safetensors_tensors)

PathLike = str | os.PathLike[str]
TensorSource = Mapping[str, torch.Tensor] | PathLike


STAT_BLOCKS = 8  # a fixed split of the α rules' sums: the same float64 results for every thread count
PAPER_ALPHAS = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)  # the grid of Yadav et al. (2023)


def default_alpha(scope: str) -> str:
    """The α rule used when none is given: ``product-unbiased`` in tensor scope (for anything but
    LoRA pairs it is ``unbiased``), ``unbiased`` in global scope (one scale for all tensors: no pairs).
    Chosen on the fidelity benchmark (benchmarks/README.md "Fidelity")."""
    return DEFAULT_ALPHA if scope == "tensor" else ALPHA_UNBIASED


def _check_alpha(alpha: float | str) -> None:
    if check_rule(alpha):
        return
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise InvalidArgumentError(f"alpha must be a finite number > 0 or one of {list(RULES)}, got {alpha!r}")


def check_arguments(density: float, alpha: float | str, scope: str, chunk_size: int) -> None:
    """Raise :class:`InvalidArgumentError` unless the encoding settings are valid together (shared by
    :func:`compress`, :func:`tune_alpha`, merges re-compressed to ``.cpeft`` and library builds)."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise InvalidArgumentError(f"density must be in (0, 1], got {density!r}")
    _check_alpha(alpha)
    if scope not in SCOPES:
        raise InvalidArgumentError(f"scope must be one of {SCOPES}, got {scope!r}")
    if alpha in PRODUCT_RULES and scope != "tensor":
        raise InvalidArgumentError(f"alpha {alpha!r} fits each LoRA module's B·A on its own: it needs scope 'tensor'")
    if not isinstance(chunk_size, int) or not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise InvalidArgumentError(f"chunk_size must be an integer in [1, {MAX_CHUNK_SIZE}], got {chunk_size!r}")


def _resolve_source(source: TensorSource, base: PathLike | None) -> Source:
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


def _flat_f32(t: SourceTensor) -> np.ndarray:
    tensor = t.load().detach()
    if tuple(tensor.shape) != t.shape:
        raise SourceError(f"tensor {t.name!r} changed shape while being read")
    return tensor.to("cpu", torch.float32).contiguous().reshape(-1).numpy()


def compress(source: TensorSource, *, base: PathLike | None = None, density: float = 0.1,
             alpha: float | str | None = None, scope: str = DEFAULT_SCOPE, keep_dense: Sequence[str] = (), auto_dense: bool = True,
             chunk_size: int = golomb.DEFAULT_CHUNK_SIZE, metadata: Mapping[str, str] | None = None,
             progress: bool = False) -> CompressedExpert:
    """Compress a task vector with ComPEFT (top-``density`` of |τ| kept as ±``alpha``·σ(τ)).

    Parameters
    ----------
    source
        A mapping name -> torch tensor holding τ itself; a PEFT adapter directory; or a
        fine-tuned model directory / ``.safetensors`` file (then ``base`` is required).
    base
        The base model (directory or file) a full fine-tune is measured from: τ = fine-tuned − base.
    density
        k in (0, 1]: the fraction of entries kept, per scope.
    alpha
        The magnitude of the kept entries. A number: α·σ(τ) (σ the unbiased std over the scope's
        entries; ``1.0`` with ``scope="global"`` is the paper's reference mode). Or a data-free
        rule (README "Choosing α"): ``"unbiased"``, τ̃'s component along τ is τ (⟨τ̃, τ⟩ = ‖τ‖²);
        ``"norm"``, ‖τ̃‖ = ‖τ‖; ``"l2"``, the mean kept |τ| (least ‖τ − τ̃‖); each per scope; and
        ``"product-unbiased"`` / ``"product-norm"`` / ``"product-l2"`` (tensor scope), the same
        judged on each LoRA module's product B·A. Default (None): ``"product-unbiased"`` in tensor
        scope, ``"unbiased"`` in global scope — chosen on the fidelity benchmark.
    scope
        ``"tensor"`` (default): each tensor its own threshold and magnitude; ``"global"``: one
        threshold and σ over all compressed tensors (reference ComPEFT).
    keep_dense
        Glob patterns (``fnmatch``) of tensor names stored verbatim, uncompressed.
    auto_dense
        PEFT adapters: store verbatim the tensors that are weights rather than residuals (DoRA
        magnitudes, ``modules_to_save`` copies, base-layer biases, prompt embeddings, ...; README
        "PEFT and Transformers"). ``False`` compresses every floating tensor (the reference rule).
    chunk_size
        Kept entries per chunk of the code: the unit of parallel decoding.
    metadata
        User metadata (str -> str) stored in the header.
    progress
        Show progress bars.

    Returns
    -------
    CompressedExpert
        The container, in memory; ``.save(path)`` writes it.

    Examples
    --------
    >>> import torch, compeft
    >>> tv = {"layer.weight": torch.randn(256, 256)}
    >>> expert = compeft.compress(tv, density=0.1, alpha=1.0)
    >>> int((expert.to_dense("layer.weight") != 0).sum())  # floor(d·k) + 1: ranks d−floor(d·k) … d
    6554
    >>> round(compeft.compress(tv, density=0.1, alpha="l2", scope="global").metadata["alpha"], 1)  # mean kept |τ| / σ
    2.1
    >>> relative_error, cosine = compeft.compress(tv).metadata["fidelity"]["overall"]  # from the header, no data
    >>> 0.6 < cosine < 0.7  # a Gaussian τ at k = 0.1
    True
    """
    alpha = default_alpha(scope) if alpha is None else alpha
    check_arguments(density, alpha, scope, chunk_size)
    encoded = _encode(_resolve_source(source, base), density=density, scope=scope, keep_dense=keep_dense,
                      auto_dense=auto_dense, chunk_size=chunk_size, metadata=metadata, progress=progress)
    expert = encoded.build(alpha)
    for message in describe(expert.header)["warnings"]:
        warnings.warn(message, FidelityWarning, stacklevel=2)
    return expert


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """What :func:`tune_alpha` chose: the expert (its metadata records the sweep), its α and
    density, its score, and every point scored as ``(density, alpha, score)`` in sweep order."""

    expert: CompressedExpert
    density: float
    alpha: float | str
    score: float
    scores: tuple[tuple[float, float | str, float], ...]


def tune_alpha(source: TensorSource, evaluate: Callable[[CompressedExpert], float], *,
               base: PathLike | None = None, densities: Sequence[float] = (0.1,),
               alphas: Sequence[float | str] | None = None, scope: str = DEFAULT_SCOPE, keep_dense: Sequence[str] = (),
               auto_dense: bool = True, chunk_size: int = golomb.DEFAULT_CHUNK_SIZE,
               metadata: Mapping[str, str] | None = None, progress: bool = False) -> TuneResult:
    """Sweep α (and density) and keep the expert that ``evaluate`` scores highest.

    Each density is selected and entropy-coded once; every α of the grid only rewrites the
    header's scales, so a sweep costs about one :func:`compress` per density plus the evaluations.

    Parameters
    ----------
    source, base, scope, keep_dense, auto_dense, chunk_size, metadata, progress
        As for :func:`compress`.
    evaluate
        Called with each candidate expert (in memory); returns a score, higher is better (e.g. a
        validation accuracy). Its exceptions propagate.
    densities
        The densities k to try.
    alphas
        The α grid (default the paper's 0.5, 1, 2, 3, 4, 5, 6, 8, 10, then the default rule of the
        scope); rules (``"unbiased"``, ``"norm"``, ``"l2"``, ``"product-unbiased"``, ...) may be included.

    Returns
    -------
    TuneResult
        The best point (the first in sweep order among equal scores: densities in the order given,
        then α). Its expert's metadata holds ``tuning``: the grid, every score and the choice.

    Examples
    --------
    >>> import torch, compeft
    >>> tau = {"w": torch.randn(64, 64)}
    >>> def score(expert):  # minus the reconstruction error
    ...     return -float((expert.to_dense("w") - tau["w"]).norm())
    >>> result = compeft.tune_alpha(tau, score, densities=[0.1, 0.5])
    >>> result.density, result.alpha
    (0.5, 1.0)
    """
    if not callable(evaluate):
        raise InvalidArgumentError("evaluate must be a callable taking an expert and returning a score")
    densities = list(densities)
    # the default grid also holds the default rule, so tuning never picks worse than no tuning
    alphas = [*PAPER_ALPHAS, default_alpha(scope)] if alphas is None else list(alphas)
    if not densities or not alphas:
        raise InvalidArgumentError("tune_alpha needs at least one density and one alpha")
    for density in densities:
        check_arguments(density, alphas[0], scope, chunk_size)
    for alpha in alphas:
        check_arguments(densities[0], alpha, scope, chunk_size)
    src = _resolve_source(source, base)
    scored: list[tuple[float, float | str, float]] = []
    best: tuple[float, float, float | str, _Encoded] | None = None
    for density in densities:
        encoded = _encode(src, density=density, scope=scope, keep_dense=keep_dense, auto_dense=auto_dense,
                          chunk_size=chunk_size, metadata=metadata, progress=progress)
        for alpha in alphas:
            score = evaluate(encoded.build(alpha))
            if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                raise InvalidArgumentError(f"evaluate returned {score!r} for density {density}, alpha {alpha}; "
                                           "it must return a finite number")
            scored.append((float(density), alpha if isinstance(alpha, str) else float(alpha), float(score)))
            if best is None or score > best[0]:
                best = (float(score), float(density), alpha, encoded)
    assert best is not None
    score, density, alpha, encoded = best
    record = {"densities": [float(d) for d in densities], "alphas": [a if isinstance(a, str) else float(a) for a in alphas],
              "scores": [list(point) for point in scored], "chosen": {"density": density, "alpha": alpha,
                                                                       "score": score}}
    expert = encoded.build(alpha, {"tuning": record})
    return TuneResult(expert, density, alpha if isinstance(alpha, str) else float(alpha), score, tuple(scored))


class _Encoded:
    """A source selected and entropy-coded once. α only sets the scale of each compressed tensor
    (spec 7.3), so experts for many α are built from the same payloads by rewriting the header."""

    def __init__(self, meta: dict[str, Any], entries: list[TensorEntry], parts: list[bytes | memoryview],
                 data_length: int, scopes: list[list[str]], sigmas: dict[str, float],
                 stats: dict[str, TensorStats]) -> None:
        self.meta, self.entries, self.parts, self.data_length = meta, entries, parts, data_length
        self.scopes, self.sigmas, self.stats = scopes, sigmas, stats
        self.by_name = {e.name: e for e in entries}
        shapes = {e.name: e.shape for e in entries}
        self.pairs = lora_pairs([n for n in stats if stats[n].gram is not None], shapes)

    def build(self, alpha: float | str, extra: Mapping[str, Any] | None = None) -> CompressedExpert:
        chosen, alphas = scales(alpha, self.scopes, self.sigmas, self.stats, self.pairs)
        meta = dict(self.meta)
        if isinstance(alpha, str):
            # one α per scope: a number in global scope; per tensor it lives in each scale only
            meta.update(alpha=alphas[0] if self.meta["scope"] == "global" and alphas else None, alpha_rule=alpha)
        else:  # "alpha_rule" absent means the given α (so containers written before it are unchanged)
            meta["alpha"] = float(alpha)
        names = [n for scope in self.scopes for n in scope]
        magnitudes = {n: kept_value(chosen[n], DTYPE_TO_TORCH[self.by_name[n].dtype]) for n in names}
        meta["fidelity"] = fidelity(sorted(names), self.stats, magnitudes, self.pairs)
        meta.update(extra or {})
        entries = [dataclasses.replace(e, scale=chosen[e.name]) if e.name in chosen else e for e in self.entries]
        blob = b"".join([encode_header(meta, entries, self.data_length), *self.parts])
        return CompressedExpert(BytesReader(blob, name="<in-memory expert>"))


def _encode(src: Source, *, density: float, scope: str, keep_dense: Sequence[str] | str, auto_dense: bool,
            chunk_size: int, metadata: Mapping[str, str] | None, progress: bool) -> _Encoded:
    """Selection and coding of every tensor (everything of ``compress`` but the scales)."""
    if isinstance(keep_dense, str):
        keep_dense = (keep_dense,)
    user = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in user.items()):
        raise InvalidArgumentError("metadata must map strings to strings")
    compressed = [t for t in src.tensors
                  if t.floating and not (auto_dense and t.dense_reason)
                  and not any(fnmatch.fnmatchcase(t.name, p) for p in keep_dense)]
    selections: dict[str, Selection] = {}
    meta: dict[str, Any] = {"created_by": f"compeft {__version__}", "source": src.kind, "density": float(density),
                            "alpha": None, "scope": scope}
    if scope == "global":
        bar = progress_bar(2 * len(compressed), "selecting", progress)

        def arrays() -> Iterable[tuple[str, np.ndarray]]:
            for t in compressed:
                yield t.name, _flat_f32(t)
                bar.update()

        chosen = select(arrays, density)
        bar.close()
        selections = {t.name: chosen for t in compressed}
        meta.update(sigma=chosen.sigma, threshold=chosen.threshold)
    meta.update(base_fingerprint=src.base_fingerprint, adapter_config=src.adapter_config, user=user)
    if src.model_files:
        meta["model_files"] = dict(src.model_files)

    entries: list[TensorEntry] = []
    parts: list[bytes | memoryview] = []
    sigmas: dict[str, float] = {}
    stats: dict[str, TensorStats] = {}
    offset = 0
    compressed_names = {t.name for t in compressed}
    for t in progress_bar(src.tensors, "encoding", progress):
        if t.name in compressed_names:
            fields, pieces, sigmas[t.name], stats[t.name] = _encode_compressed(
                t, selections.get(t.name), density, chunk_size, lora=src.kind in LORA_SOURCES)
        else:
            fields, pieces = _encode_dense(t, src.kind)
        length = sum(len(p) for p in pieces)
        crc = 0
        for p in pieces:
            crc = zlib.crc32(p, crc)
        entries.append(TensorEntry(name=t.name, dtype=dtype_code(t.dtype, t.name), shape=t.shape, offset=offset,
                                   length=length, crc32=crc, **fields))
        parts.extend(pieces)
        padded = round_up(offset + length, PAYLOAD_ALIGNMENT)
        parts.append(bytes(padded - offset - length))
        offset = padded
    names = [t.name for t in compressed]
    scopes = [names] if scope == "global" else [[n] for n in names]
    return _Encoded(meta, entries, parts, offset, scopes, sigmas, stats)


def _encode_compressed(t: SourceTensor, chosen: Selection | None, density: float, chunk_size: int,
                       lora: bool) -> tuple[dict[str, Any], list[memoryview], float, TensorStats]:
    """Header fields (scale still 0), payload pieces, σ of the scope and the tensor's statistics for
    the α rules (with ``lora``, a LoRA factor's Gram matrices too). ``chosen``: the global
    selection, or None to select within the tensor."""
    values = _flat_f32(t)
    if chosen is None:
        chosen = select(lambda: [(t.name, values)], density)
    streams = golomb.encode(values, chosen.threshold, chunk_size)
    factor = lora_factor(t.name) if lora else None
    sums = kernels.kept_stats(values, np.float32(chosen.threshold), STAT_BLOCKS)
    stats = tensor_stats(values, chosen.threshold, t.shape, None if factor is None else factor[1], sums)
    fields = dict(encoding=ENCODING_GOLOMB, role="delta", init=t.init, nnz=streams.nnz, scale=0.0,
                  golomb_m=streams.golomb_m, chunk_size=chunk_size, unary_bits=streams.unary_bits,
                  high_bits=streams.high_bits)
    return fields, streams.payload_parts(), chosen.sigma, stats


def _encode_dense(t: SourceTensor, kind: str) -> tuple[dict[str, Any], list[memoryview]]:
    """A tensor stored verbatim: a delta when a task-vector mapping gave it, otherwise the value."""
    is_delta = kind == "tensors" and t.dtype.is_floating_point
    value = (t.load() if is_delta else t.load_value()).detach().cpu().contiguous()
    pieces = [memoryview(value.reshape(-1).view(torch.uint8).numpy())] if value.numel() else []
    return dict(encoding=ENCODING_DENSE, role="delta" if is_delta else "value", init=None), pieces


def open(path: PathLike, *, storage_options: Mapping[str, Any] | None = None,  # noqa: A001 - as safetensors
         cache: PathLike | None = None, progress: bool = False) -> CompressedExpert:
    """Open a ``.cpeft`` file or URL lazily: reads and validates the preamble and header only.

    Parameters
    ----------
    path
        A local path, or any fsspec URL (``https://…``, ``s3://bucket/key``, ``hf://…``,
        ``file://…``, chained ``simplecache::s3://…``). Reading one tensor of a remote expert is
        one range request; many tensors are fetched concurrently (README "Remote").
    storage_options
        Options for the URL's file system (credentials, ``client_kwargs``…), passed to fsspec.
    cache
        A directory for a persistent cache of fetched bytes, keyed by the URL and the object's
        ETag / version / size, so a changed object is never served stale; several processes may
        share it. Not used for local files.
    progress
        Show a progress bar of bytes fetched on long transfers.

    Examples
    --------
    >>> import compeft, torch, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "e.cpeft")
    >>> compeft.compress({"w": torch.randn(8, 8)}).save(path)
    >>> compeft.open(path).names
    ['w']
    >>> compeft.open("file://" + path).names
    ['w']
    """
    from .remote import open_reader
    return CompressedExpert(open_reader(path, storage_options, cache, progress=progress))


def _as_expert(expert: CompressedExpert | PathLike) -> CompressedExpert:
    return expert if isinstance(expert, CompressedExpert) else open(expert)


def _check_base(expert: CompressedExpert, state: Mapping[str, torch.Tensor], check_base: bool,
                names: Sequence[str] | None = None) -> None:
    """``state`` holds a floating weight of the right shape for each of ``names`` (default all the
    expert's tensors) and, when they are all of them, matches the expert's base fingerprint."""
    names = expert.names if names is None else list(names)
    missing = [n for n in names if n not in state]
    if missing:
        raise BaseMismatchError(f"{len(missing)} tensors of the expert are not in the base (e.g. {missing[:3]})",
                                expert.path)
    for name in names:
        e, w = expert.entry(name), state[name]
        if tuple(w.shape) != e.shape:
            raise BaseMismatchError(f"tensor {name!r}: expert shape {list(e.shape)}, base shape {list(w.shape)}",
                                    expert.path)
        if e.role == "delta" and not w.is_floating_point():
            raise BaseMismatchError(f"tensor {name!r}: cannot add a delta into a {w.dtype} weight", expert.path)
    wanted = expert.metadata.get("base_fingerprint")
    if check_base and wanted and len(names) == len(expert):
        got = fingerprint((n, state[n]) for n in expert.names)
        if got != wanted:
            raise BaseMismatchError("the base is not the one this expert was made from (fingerprint "
                                    f"{got[:22]}… ≠ {wanted[:22]}…); pass check_base=False / --force to apply anyway",
                                    expert.path)


class Restore:
    """What :func:`apply` with ``restorable=True`` returns: :meth:`restore` puts back, bit for bit,
    every weight value the apply changed. On a GPU it holds only the overwritten values (one 16- or
    32-bit slot per kept entry); on the CPU a copy of each weight the expert touches."""

    def __init__(self, expert: CompressedExpert, state_dict: MutableMapping[str, torch.Tensor]) -> None:
        self._expert, self._state = expert, state_dict
        self._saved: list[tuple[Any, dict[str, torch.Tensor]]] = []  # (device expert or None, saved)
        self._done = False

    def restore(self) -> None:
        """Undo the apply (once)."""
        if self._done:
            raise InvalidArgumentError("this apply was already restored", self._expert.path)
        for device_expert, saved in self._saved:
            if device_expert is None:
                for name, original in saved.items():
                    self._state[name].copy_(original)
            else:
                device_expert.restore_entries(self._state, saved)
        self._done = True
        self._saved.clear()


@torch.no_grad()
def apply(expert: CompressedExpert | PathLike, state_dict: MutableMapping[str, torch.Tensor], *,
          scale: float = 1.0, check_base: bool = True, restorable: bool = False, progress: bool = False
          ) -> Restore | None:
    """Add ``scale`` × τ̃ into the weights of ``state_dict`` in place (no dense copy of τ̃).

    Every kept entry does ``w = dtype(float32(w) + float32(scale) * float32(v))`` where ``v`` is the
    entry's decoded value; ``value`` tensors are copied over their weights. Everything is read and
    verified before the first weight changes, so a corrupt expert leaves the weights untouched.
    Weights on a CUDA device are updated there, from the compressed bytes copied to it once
    (bit-identical to the CPU path). ``restorable=True`` returns a :class:`Restore` whose
    ``restore()`` undoes the apply bit for bit (hot-swapping experts in a resident model).

    Examples
    --------
    >>> import torch, compeft
    >>> base = {"w": torch.zeros(4, 4, dtype=torch.bfloat16)}
    >>> undo = compeft.apply(compeft.compress({"w": torch.eye(4)}, density=0.25), base, scale=0.5, restorable=True)
    >>> int((base["w"] != 0).sum())
    4
    >>> undo.restore(); int((base["w"] != 0).sum())
    0
    """
    expert = _as_expert(expert)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InvalidArgumentError(f"scale must be a finite number, got {scale!r}")
    _check_base(expert, state_dict, check_base)
    return _apply(expert, state_dict, expert.names, scale, progress, restorable)


def _on_gpu(w: torch.Tensor) -> bool:
    return w.device.type == "cuda" and w.is_contiguous() and w.dtype in _ADD_MODE


def _apply(expert: CompressedExpert, state_dict: MutableMapping[str, torch.Tensor], names: Sequence[str],
           scale: float, progress: bool, restorable: bool = False) -> Restore | None:
    on_gpu: dict[torch.device, list[str]] = {}
    for name in names:
        if _on_gpu(state_dict[name]):
            on_gpu.setdefault(state_dict[name].device, []).append(name)
    on_host = [n for n in names if not _on_gpu(state_dict[n])]
    # phase 1: read and verify everything before any write
    payloads = expert.payloads(on_host)
    device_experts = []
    if on_gpu:
        from .gpu import DeviceExpert
    for device, group in on_gpu.items():
        whole = len(group) == len(expert)
        device_expert = expert.to_device(device) if whole else DeviceExpert(expert, device, group)
        device_expert.check()
        device_experts.append((device_expert, None if whole else group))
    undo = Restore(expert, state_dict) if restorable else None
    if undo is not None:
        undo._saved.append((None, {n: state_dict[n].detach().clone() for n in on_host}))
        for device_expert, group in device_experts:
            undo._saved.append((device_expert, device_expert.save_entries(state_dict, group)))
    # phase 2: write
    for device_expert, group in device_experts:
        device_expert.add_into(state_dict, scale, group)
    step = np.float32(scale)
    jobs = []
    copies_back = []
    for name in progress_bar(on_host, "applying", progress):
        e, w, payload = expert.entry(name), state_dict[name], payloads[name]
        if isinstance(payload, torch.Tensor):
            if e.role == "value":
                w.copy_(payload)
            else:
                w.copy_(_added(w, float(step) * payload.float()))
            continue
        delta = float(np.float32(step * np.float32(kept_value(e.scale, DTYPE_TO_TORCH[e.dtype]))))
        target = w.detach()
        if target.device.type == "cpu" and target.dtype in _ADD_MODE:
            work = target if target.is_contiguous() else target.contiguous()
            if work is not target:
                copies_back.append((target, work))
            jobs.append((_ADD_MODE[target.dtype],
                         golomb.DecodeJob(payload, e.numel, flat_bits(work), f"tensor {name!r}", delta=delta)))
        else:  # float64, a strided GPU weight or another device: the same rule on the kept positions only
            dense = expert.to_dense(name).to(target.device)
            target.copy_(torch.where(dense != 0, _added(target, float(step) * dense.float()), target))
    for mode in sorted({mode for mode, _ in jobs}):
        golomb.decode_many([job for m, job in jobs if m == mode], mode, expert.path)
    for target, work in copies_back:
        target.copy_(work)
    return undo


def _added(weight: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """weight + step (float32) rounded once to the weight's dtype; float64 weights add in float64."""
    if weight.dtype == torch.float64:
        return weight + step.double()
    return (weight.float() + step).to(weight.dtype)


def _restored(expert: CompressedExpert, name: str) -> torch.Tensor:
    """A PEFT adapter tensor: init + τ̃ (τ̃ alone when init is 0 or absent)."""
    e = expert.entry(name)
    value = expert.to_dense(name)
    if e.role == "delta" and e.init:
        value = (value.float() + e.init).to(value.dtype)
    return value


def decompress(expert: CompressedExpert | PathLike, output: PathLike, *, base: PathLike | None = None,
               force: bool = False, progress: bool = False) -> Path:
    """Write an expert back out.

    - ``output`` ending in ``.safetensors`` without ``base``: the dense task vector (τ̃ per delta
      tensor, the value per value tensor);
    - an expert made from a PEFT adapter, to a directory: the adapter directory
      (``adapter_config.json`` + ``adapter_model.safetensors``) that PEFT loads;
    - with ``base`` (a model directory or ``.safetensors`` file): base + τ̃ with the base's sharding
      and every other file of the base directory copied.

    Returns the path written.
    """
    expert = _as_expert(expert)
    out = Path(output)
    if base is not None:
        return _decompress_onto_base(expert, Path(base), out, force, progress)
    expert.prefetch()  # from a URL: every payload requested at once, not tensor by tensor
    if out.suffix == ".safetensors":
        tensors = {n: expert.to_dense(n).contiguous() for n in progress_bar(expert.names, "decoding", progress)}
        write_safetensors(tensors, out)
        return out
    if expert.metadata.get("source") != "peft":
        raise InvalidArgumentError("this expert is not a PEFT adapter: write a .safetensors task vector or pass a base",
                                   expert.path)
    tensors = {n: _restored(expert, n).contiguous() for n in progress_bar(expert.names, "decoding", progress)}
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, out / "adapter_model.safetensors", {"format": "pt"})
    config = expert.metadata.get("adapter_config") or {}
    atomic_write(out / ADAPTER_CONFIG, [json.dumps(config, indent=2, sort_keys=True).encode()])
    return out


def merge_to(experts: Sequence[CompressedExpert | PathLike], output: PathLike, *, method: str = "task_arithmetic",
             weights: Sequence[float] | None = None, lam: float = 1.0, normalize: bool = True,
             drop_rate: float = 0.0, seed: int = 0, base: PathLike | None = None, density: float | None = None,
             alpha: float | str | None = None, force: bool = False, progress: bool = False) -> Path:
    """:func:`compeft.merge` written out: base + merged τ with the base's sharding (``base``), a
    ``.safetensors`` merged task vector (float32), or a re-compressed ``.cpeft`` (``density``,
    default the first expert's; ``alpha`` default :func:`compress`'s). The merge's method, weights,
    λ, drop rate and seed are recorded in the output's metadata."""
    from .merging import merge

    opened = [_as_expert(e) for e in experts]
    options = dict(method=method, weights=weights, lam=lam, normalize=normalize, drop_rate=drop_rate, seed=seed,
                   check_base=not force)
    out = Path(output)
    if base is None and out.suffix not in (".safetensors", ".cpeft"):
        raise InvalidArgumentError("merge output must end in .safetensors or .cpeft, or come with a base", out)
    if out.suffix == ".cpeft" and base is None:
        check_arguments(0.1 if density is None else density, default_alpha(DEFAULT_SCOPE) if alpha is None else alpha,
                         DEFAULT_SCOPE, golomb.DEFAULT_CHUNK_SIZE)
    if base is not None:
        return _onto_base(opened, Path(base), out, force, progress,
                          lambda shard, names: merge(opened, into=shard, names=names, **options))
    result = merge(opened, progress=progress, **options)
    record = {"merge": json.dumps(result.metadata, sort_keys=True)}
    if out.suffix == ".safetensors":
        write_safetensors({n: t.contiguous() for n, t in result.items()}, out, record)
    else:
        chosen = opened[0].metadata.get("density", 0.1) if density is None else density
        compress(dict(result), density=chosen, alpha=alpha, metadata=record, progress=progress).save(out)
    return out


def _decompress_onto_base(expert: CompressedExpert, base: Path, out: Path, force: bool, progress: bool) -> Path:
    # the fine-tune's own config files replace the base's copies
    return _onto_base([expert], base, out, force, progress,
                      lambda shard, names: _apply(expert, shard, names, 1.0, False), _model_files(expert))


def _model_files(expert: CompressedExpert) -> dict[str, str]:
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


def _onto_base(experts: Sequence[CompressedExpert], base: Path, out: Path, force: bool, progress: bool,
               update: Callable[[dict[str, torch.Tensor], list[str]], Any], files_over: Mapping[str, str] = {}) -> Path:
    """Write base + the experts' change with the base's sharding, one shard in memory at a time:
    ``update(shard, names)`` changes the shard's tensors ``names`` in place; ``files_over`` (name ->
    text) are written over the base directory's other files.

    Everything that can be checked is checked before anything is written (the base holds every
    tensor with the expert's shape in a floating dtype, its fingerprint unless ``force``, every
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
    if wanted and not force:
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
