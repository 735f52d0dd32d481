"""Size and structure summaries of a container, computed from its header alone (no torch, no numba),
and the one way compeft makes untrusted text safe to print (:func:`shown`, :func:`number`)."""

from __future__ import annotations

import math
from typing import Any

from .alpha import LORA_SOURCES, fidelity_warnings, lora_pairs, module_name
from .format.header import DTYPE_SIZES, Header


# Integers longer than this many bits are described, not printed (Python refuses to turn one of
# more than 4300 digits into text, and nobody reads 60 digits).
_LONGEST_INTEGER = 200


def shown(value: object, limit: int | None = None) -> str:
    r"""``value`` as text safe to print on a terminal, whatever a hostile file put in it: characters
    that are not printable (escape sequences, bidirectional overrides, lone surrogates that cannot
    be encoded) are shown escaped (``\x1b``), an integer too long to print is described, and the
    text is cut to ``limit`` characters. Every name, metadata value and catalog field that the CLI
    prints goes through here.

    >>> shown("w\x1b[2J"), shown(10 ** 400)
    ('w\\x1b[2J', '<an integer of 1329 bits>')
    """
    if type(value) is int and value.bit_length() > _LONGEST_INTEGER:
        text = f"<an integer of {value.bit_length()} bits>"
    else:
        try:
            text = str(value)
        except (ValueError, TypeError):  # (a __str__ that fails)
            text = f"<{type(value).__name__}>"
    if not text.isprintable():
        text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    if limit is not None and len(text) > limit:
        text = text[:max(limit - 1, 0)] + "…"
    return text


def number(value: object, spec: str = "") -> str:
    """``format(value, spec)`` for a number read from an untrusted file, or :func:`shown` when it
    is not a number or out of the format's range (a 400-digit integer has no float)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            if not (type(value) is int and value.bit_length() > _LONGEST_INTEGER):
                return format(value, spec)
        except (OverflowError, ValueError):
            pass
    return shown(value)


def human_size(n: object) -> str:
    """A byte count as ``123 B``, ``1.50 KiB`` … ``2.00 GiB`` (any value: see :func:`number`)."""
    if not isinstance(n, (int, float)) or isinstance(n, bool) or not abs(n) < 2 ** 80:
        return f"{shown(n)} B"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value} B"


def _figure(value: Any) -> list[Any] | None:
    """A ``[relative error, cosine]`` pair of the fidelity metadata, or None if malformed (the
    header is untrusted and this key is informative: a bad one is shown as missing)."""
    ok = (isinstance(value, list) and len(value) == 2
          and all(v is None or (type(v) in (int, float) and math.isfinite(v)) for v in value))
    return value if ok else None


def fidelity_of(header: Header) -> dict[str, Any]:
    """The header's data-free fidelity figures (FORMAT.md 7.6) by tensor name and LoRA module,
    with the overall figures and the warnings they call for; empty for files written without."""
    meta = header.metadata.get("fidelity")
    if not isinstance(meta, dict):
        return {}
    compressed = [t.name for t in header.tensors if t.compressed]
    rows = meta.get("tensors") if isinstance(meta.get("tensors"), list) else []
    tensors = {n: _figure(r) for n, r in zip(compressed, rows)}
    shapes = {t.name: t.shape for t in header.tensors}
    pairs = lora_pairs(compressed, shapes) if header.metadata.get("source") in LORA_SOURCES else []
    lora_rows = meta.get("lora") if isinstance(meta.get("lora"), list) else []
    modules = {module_name(a): _figure(r) for (a, _), r in zip(pairs, lora_rows)}
    kept = {t.name: t.nnz for t in header.tensors if t.compressed}
    clean = {"tensors": [tensors.get(n) for n in compressed],
             "lora": [modules[m] for m in modules], "overall": _figure(meta.get("overall")),
             "lora_overall": _figure(meta.get("lora_overall"))}
    return {"overall": clean["overall"], "lora_overall": clean["lora_overall"], "tensors": tensors,
            "lora": modules, "warnings": fidelity_warnings(compressed, kept, clean, pairs, header.metadata.get("scope"))}


def describe(header: Header) -> dict[str, Any]:
    """A JSON-ready summary: global metadata, one row per tensor, totals, and the data-free fidelity
    figures with their warnings."""
    figures = fidelity_of(header)
    rows = []
    params = 0
    original = 0
    for t in header.tensors:
        numel = t.numel
        params += numel
        original += numel * DTYPE_SIZES[t.dtype]
        rows.append({
            "name": t.name, "dtype": t.dtype, "shape": list(t.shape), "encoding": t.encoding, "role": t.role,
            "nnz": t.nnz if t.compressed else numel,
            "bytes": t.length, "bits_per_param": (8 * t.length / numel) if numel else 0.0,
            "scale": t.scale if t.compressed else None,
            "golomb_m": t.golomb_m if t.compressed else None,
            "rel_error": (figures.get("tensors", {}).get(t.name) or [None, None])[0],
            "cosine": (figures.get("tensors", {}).get(t.name) or [None, None])[1],
        })
    size = header.file_length
    meta = {k: v for k, v in header.metadata.items() if k not in ("adapter_config", "fidelity")}
    return {
        "format_version": header.version,
        "metadata": meta,
        "has_adapter_config": header.metadata.get("adapter_config") is not None,
        "tensors": rows,
        "totals": {
            "tensors": len(rows), "parameters": params, "file_bytes": size,
            "bits_per_param": 8 * size / params if params else 0.0,
            "ratio_vs_16bit": (2 * params / size) if size else math.inf,
            "ratio_vs_original": (original / size) if size else math.inf,
        },
        "fidelity": {k: figures.get(k) for k in ("overall", "lora_overall", "lora")},
        "warnings": figures.get("warnings", []),
    }


def inspect_table(summary: dict[str, Any], file: object) -> str:
    """The text `compeft inspect` prints for :func:`describe`'s ``summary`` of ``file``: a line on
    the file, a row per tensor and the totals (every name and metadata value through :func:`shown`)."""
    m = summary["metadata"]
    alpha = m.get("alpha") if m.get("alpha_rule") is None else m.get("alpha_rule")
    lines = [f"{shown(file)}: compeft format v{summary['format_version']}, source={shown(m.get('source'))}, "
             f"scope={shown(m.get('scope'))}, density={m.get('density')}, alpha={shown(alpha)}"]
    rows = summary["tensors"]
    names = [shown(r["name"]) for r in rows]
    width = max([len("name"), *map(len, names)])
    lines.append(f"{'name':<{width}}  {'dtype':<5} {'shape':<18} {'encoding':<15} {'nnz':>12} {'bytes':>12} "
                 f"{'bits/param':>10} {'rel.err':>7} {'cosine':>6}")
    for name, r in zip(names, rows):
        shape = "x".join(map(str, r["shape"])) or "scalar"
        rel = "" if r["rel_error"] is None else f"{r['rel_error']:.3f}"
        cos = "" if r["cosine"] is None else f"{r['cosine']:.3f}"
        lines.append(f"{name:<{width}}  {r['dtype']:<5} {shape:<18} {r['encoding']:<15} {r['nnz']:>12,} "
                     f"{r['bytes']:>12,} {r['bits_per_param']:>10.3f} {rel:>7} {cos:>6}")
    t = summary["totals"]
    lines.append(f"total: {t['tensors']} tensors, {t['parameters']:,} parameters, {human_size(t['file_bytes'])}, "
                 f"{t['bits_per_param']:.3f} bits/param, {t['ratio_vs_16bit']:.1f}x vs 16-bit, "
                 f"{t['ratio_vs_original']:.1f}x vs original dtypes")
    return "\n".join(lines)
