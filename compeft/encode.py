"""Encoding: a source's task vector selected, ternarised and entropy-coded into a container.

``compress`` is :func:`encode_source` (selection and coding of every tensor: everything but the
magnitudes) followed by :meth:`Encoded.build` (α sets each compressed tensor's magnitude, the
header field ``scale``), so experts for many α are built from the same payloads
(:func:`compeft.tuning.tune_alpha`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from .alpha import (ALPHA_UNBIASED, DEFAULT_ALPHA, DEFAULT_SCOPE, LORA_SOURCES, PRODUCT_RULES, RULES, TensorStats,
                    check_rule, fidelity, lora_factor, lora_pairs, scales, tensor_stats)
from .codec import golomb, select_kernels
from .dtypes import DTYPE_TO_TORCH, magnitude
from .errors import FidelityWarning, InvalidArgumentError, SourceError
from .expert import CompressedExpert
from .format import (ENCODING_DENSE, ENCODING_GOLOMB, ENCODING_PACKED, FORMAT_VERSION, FORMAT_VERSIONS, BytesReader,
                     TensorEntry, encode_header, payload_alignment)
from .format.header import MAX_CHUNK_SIZE, SCOPES
from .format.layout import lay_out
from .progress import progress_bar
from .report import describe
from .select import Selection, select
from .sources import Source, SourceTensor, dtype_code, resolve_source
from .version import __version__

PathLike = str | os.PathLike[str]
TensorSource = Mapping[str, torch.Tensor] | PathLike

STAT_BLOCKS = 8  # a fixed split of the α rules' sums: the same float64 results for every thread count


def default_alpha(scope: str) -> str:
    """The α rule used when none is given: ``product-unbiased`` in tensor scope (for anything but
    LoRA pairs it is ``unbiased``), ``unbiased`` in global scope (one magnitude for all tensors: no
    pairs). Chosen on the fidelity benchmark (benchmarks/README.md "Fidelity")."""
    return DEFAULT_ALPHA if scope == "tensor" else ALPHA_UNBIASED


def check_alpha(alpha: float | str) -> None:
    """Raise :class:`InvalidArgumentError` unless ``alpha`` is a finite number > 0 or a rule name."""
    if check_rule(alpha):
        return
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise InvalidArgumentError(f"alpha must be a finite number > 0 or one of {list(RULES)}, got {alpha!r}")


def check_arguments(density: float, alpha: float | str, scope: str, chunk_size: int) -> None:
    """Raise :class:`InvalidArgumentError` unless the encoding settings are valid together (shared by
    :func:`compress`, :func:`compeft.tune_alpha`, merges re-compressed to ``.cpeft`` and library builds)."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise InvalidArgumentError(f"density must be in (0, 1], got {density!r}")
    check_alpha(alpha)
    if scope not in SCOPES:
        raise InvalidArgumentError(f"scope must be one of {SCOPES}, got {scope!r}")
    if alpha in PRODUCT_RULES and scope != "tensor":
        raise InvalidArgumentError(f"alpha {alpha!r} fits each LoRA module's B·A on its own: it needs scope 'tensor'")
    if not isinstance(chunk_size, int) or not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise InvalidArgumentError(f"chunk_size must be an integer in [1, {MAX_CHUNK_SIZE}], got {chunk_size!r}")


def is_text(value: str) -> bool:
    """Whether ``value`` can be written as UTF-8 (a lone surrogate cannot)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def flat_f32(t: SourceTensor) -> np.ndarray:
    """A source tensor's residual as flat float32 (what selection and coding read)."""
    tensor = t.load().detach()
    if tuple(tensor.shape) != t.shape:
        raise SourceError(f"tensor {t.name!r} changed shape while being read")
    return tensor.to("cpu", torch.float32).contiguous().reshape(-1).numpy()


def compress(source: TensorSource, *, base: PathLike | None = None, density: float = 0.1,
             alpha: float | str | None = None, scope: str = DEFAULT_SCOPE, keep_dense: Sequence[str] = (), auto_dense: bool = True,
             chunk_size: int = golomb.DEFAULT_CHUNK_SIZE, metadata: Mapping[str, str] | None = None,
             progress: bool = False, format_version: int = FORMAT_VERSION) -> CompressedExpert:
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
        rule (docs/alpha.md): ``"unbiased"``, τ̃'s component along τ is τ (⟨τ̃, τ⟩ = ‖τ‖²);
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
        magnitudes, ``modules_to_save`` copies, base-layer biases, prompt embeddings, ...;
        docs/peft.md). ``False`` compresses every floating tensor (the reference rule).
    chunk_size
        Kept entries per chunk of the code: the unit of parallel decoding.
    metadata
        User metadata (str -> str) stored in the header.
    progress
        Show progress bars.
    format_version
        2 (default): small tensors packed (no chunk table), the header deflated with the preset
        dictionary, scales in their shortest digits (spec/FORMAT.md 13). 1: a file compeft releases
        before version 2 can read; its header and every large tensor are a few bytes larger.

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
    if format_version not in FORMAT_VERSIONS or type(format_version) is not int:
        raise InvalidArgumentError(f"format_version must be 1 or 2, got {format_version!r:.40}")
    encoded = encode_source(resolve_source(source, base), density=density, scope=scope, keep_dense=keep_dense,
                            auto_dense=auto_dense, chunk_size=chunk_size, metadata=metadata, progress=progress,
                            format_version=format_version)
    expert = encoded.build(alpha)
    for message in describe(expert.header)["warnings"]:
        warnings.warn(message, FidelityWarning, stacklevel=2)
    return expert


class Encoded:
    """A source selected and entropy-coded once. α only sets the scale of each compressed tensor
    (spec 7.3), so experts for many α are built from the same payloads by rewriting the header."""

    def __init__(self, meta: dict[str, Any], entries: list[TensorEntry], parts: list[bytes | memoryview],
                 data_length: int, scopes: list[list[str]], sigmas: dict[str, float],
                 stats: dict[str, TensorStats], format_version: int = FORMAT_VERSION) -> None:
        self.meta, self.entries, self.parts, self.data_length = meta, entries, parts, data_length
        self.format_version = format_version
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
        magnitudes = {n: magnitude(chosen[n], DTYPE_TO_TORCH[self.by_name[n].dtype]) for n in names}
        meta["fidelity"] = fidelity(sorted(names), self.stats, magnitudes, self.pairs)
        meta.update(extra or {})
        entries = [dataclasses.replace(e, scale=chosen[e.name]) if e.name in chosen else e for e in self.entries]
        blob = b"".join([encode_header(meta, entries, self.data_length, self.format_version), *self.parts])
        return CompressedExpert(BytesReader(blob, name="<in-memory expert>"))


def encode_source(src: Source, *, density: float, scope: str, keep_dense: Sequence[str] | str, auto_dense: bool,
                  chunk_size: int, metadata: Mapping[str, str] | None, progress: bool,
                  format_version: int = FORMAT_VERSION) -> Encoded:
    """Selection and coding of every tensor: everything of :func:`compress` but the magnitudes."""
    if isinstance(keep_dense, str):
        keep_dense = (keep_dense,)
    user = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) and is_text(k) and is_text(v) for k, v in user.items()):
        raise InvalidArgumentError("metadata must map strings to strings (valid Unicode: no lone surrogates)")
    for t in src.tensors:
        if not is_text(t.name):
            raise SourceError(f"tensor name {t.name!r} is not valid Unicode text (a lone surrogate): the header "
                              "could not hold it")
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
                yield t.name, flat_f32(t)
                bar.update()

        chosen = select(arrays, density)
        bar.close()
        selections = {t.name: chosen for t in compressed}
        meta.update(sigma=chosen.sigma, threshold=chosen.threshold)
    meta.update(base_fingerprint=None, adapter_config=src.adapter_config, user=user)  # the fingerprint: below
    if src.model_files:
        meta["model_files"] = dict(src.model_files)

    fields: list[dict[str, Any]] = []
    payloads: list[list[memoryview]] = []
    sigmas: dict[str, float] = {}
    stats: dict[str, TensorStats] = {}
    compressed_names = {t.name for t in compressed}
    for t in progress_bar(src.tensors, "encoding", progress):
        if t.name in compressed_names:
            own, pieces, sigmas[t.name], stats[t.name] = encode_compressed(
                t, selections.get(t.name), density, chunk_size, lora=src.kind in LORA_SOURCES,
                pack=format_version >= 2)
        else:
            own, pieces = encode_dense(t, src.kind)
        fields.append(own)
        payloads.append(pieces)
    if src.base_fingerprint is not None:  # after the tensors: from the base bytes their residuals read
        meta["base_fingerprint"] = src.base_fingerprint()
    places, parts, data_length = lay_out(payloads, [payload_alignment(own["encoding"]) for own in fields])
    entries = [TensorEntry(name=t.name, dtype=dtype_code(t.dtype, t.name), shape=t.shape, offset=place.offset,
                           length=place.length, crc32=place.crc32, **own)
               for t, own, place in zip(src.tensors, fields, places)]
    names = [t.name for t in compressed]
    scopes = [names] if scope == "global" else [[n] for n in names]
    return Encoded(meta, entries, parts, data_length, scopes, sigmas, stats, format_version)


def encode_compressed(t: SourceTensor, chosen: Selection | None, density: float, chunk_size: int,
                      lora: bool, pack: bool = True) -> tuple[dict[str, Any], list[bytes | memoryview], float,
                                                              TensorStats]:
    """Header fields (scale still 0), payload pieces, σ of the scope and the tensor's statistics for
    the α rules (with ``lora``, a LoRA factor's Gram matrices too). ``chosen``: the global
    selection, or None to select within the tensor. With ``pack``, a small one-chunk tensor is
    written ``ternary-golomb-packed`` (:data:`golomb.PACK_BELOW`)."""
    values = flat_f32(t)
    if chosen is None:
        chosen = select(lambda: [(t.name, values)], density)
    streams = golomb.encode(values, chosen.threshold, chunk_size)
    factor = lora_factor(t.name) if lora else None
    sums = select_kernels.kept_stats(values, np.float32(chosen.threshold), STAT_BLOCKS)
    stats = tensor_stats(values, chosen.threshold, t.shape, None if factor is None else factor[1], sums)
    fields = dict(encoding=ENCODING_GOLOMB, role="delta", init=t.init, nnz=streams.nnz, scale=0.0,
                  golomb_m=streams.golomb_m, chunk_size=chunk_size, unary_bits=streams.unary_bits,
                  high_bits=streams.high_bits)
    if pack and streams.nnz <= chunk_size and streams.payload_length < golomb.PACK_BELOW:
        fields.update(encoding=ENCODING_PACKED, chunk_size=max(streams.nnz, 1))
        return fields, [streams.packed_payload()], chosen.sigma, stats
    return fields, streams.payload_parts(), chosen.sigma, stats


def encode_dense(t: SourceTensor, kind: str) -> tuple[dict[str, Any], list[memoryview]]:
    """A tensor stored verbatim: a delta when a task-vector mapping gave it, otherwise the value."""
    is_delta = kind == "tensors" and t.dtype.is_floating_point
    value = (t.load() if is_delta else t.load_value()).detach().cpu().contiguous()
    pieces = [memoryview(value.reshape(-1).view(torch.uint8).numpy())] if value.numel() else []
    return dict(encoding=ENCODING_DENSE, role="delta" if is_delta else "value", init=None), pieces
