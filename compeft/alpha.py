"""α rules: from per-tensor statistics gathered while encoding to the scale stored per tensor, and
the data-free fidelity figures of the result (spec/FORMAT.md 7.3 and 7.6).

Every rule only sets the one magnitude of each scope, so it is a header matter: the masks and the
entropy-coded payloads are the same for every rule. The statistics are exact float64 sums over the
tensor (see :func:`tensor_stats`) and, for a LoRA factor, three r×r Gram matrices from which the
norms and inner products of the adapter's products ΔW = B·A follow in O(r²) per module.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

ALPHA_L2 = "l2"  # the scope's kept entries become their mean |τ|: the least squares magnitude
ALPHA_NORM = "norm"  # the scope's magnitude keeps its L2 norm: ‖τ̃‖ = ‖τ‖
ALPHA_UNBIASED = "unbiased"  # τ̃'s component along τ is τ itself: ⟨τ̃, τ⟩ = ‖τ‖²
PRODUCT_L2 = "product-l2"  # per LoRA module, the least squares fit of B·A by B̃·Ã
PRODUCT_NORM = "product-norm"  # per LoRA module, ‖B̃·Ã‖ = ‖B·A‖
PRODUCT_UNBIASED = "product-unbiased"  # per LoRA module, ⟨B̃·Ã, B·A⟩ = ‖B·A‖²
RULES = (ALPHA_L2, ALPHA_NORM, ALPHA_UNBIASED, PRODUCT_L2, PRODUCT_NORM, PRODUCT_UNBIASED)
# rule -> its rule for unpaired tensors
PRODUCT_RULES = {PRODUCT_L2: ALPHA_L2, PRODUCT_NORM: ALPHA_NORM, PRODUCT_UNBIASED: ALPHA_UNBIASED}
LORA_SOURCES = ("peft", "tensors")  # sources whose tensors may form LoRA pairs (a full fine-tune's cannot)
DEFAULT_ALPHA = PRODUCT_UNBIASED  # chosen on the fidelity benchmark (benchmarks/README.md "Fidelity")
DEFAULT_SCOPE = "tensor"

# A LoRA factor's name: the module's name, the factor's key, the rest (PEFT's saved names).
_LORA_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<embedding>embedding_)?(?P<factor>[AB])(?P<rest>(\.[^.]+)*)$")


@dataclass(frozen=True)
class Gram:
    """A LoRA factor's r×r statistics (float64), with S its ternary mask sign(τ)·kept:
    factor A (r × n): A·Aᵀ, S·Aᵀ, S·Sᵀ; factor B (m × r): Bᵀ·B, Sᵀ·B, Sᵀ·S."""

    values: np.ndarray
    cross: np.ndarray
    signs: np.ndarray


@dataclass(frozen=True)
class TensorStats:
    """Exact sums over one compressed tensor: Σ τ² (``squares``), the number of kept entries and
    Σ |τ| over them; ``gram`` for a LoRA factor."""

    squares: float
    kept: int
    kept_abs: float
    gram: Gram | None = None


def check_rule(alpha: object) -> bool:
    """Whether ``alpha`` names a rule (rather than being a number)."""
    return isinstance(alpha, str) and alpha in RULES


def lora_factor(name: str) -> tuple[str, str] | None:
    """(pair key, "A" or "B") for a LoRA factor's tensor name, else None. The pair key is the name
    with the factor letter blanked, so A and B of one module share it."""
    match = _LORA_FACTOR.match(name)
    if match is None:
        return None
    key = f"{match['module']}.lora_{match['embedding'] or ''}?{match['rest']}"
    return key, match["factor"]


def module_name(a_name: str) -> str:
    """How a LoRA pair is shown: its A factor's name with the factor written ``{A,B}``."""
    return a_name.replace(".lora_A", ".lora_{A,B}").replace(".lora_embedding_A", ".lora_embedding_{A,B}")


def lora_pairs(names: Sequence[str], shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, str]]:
    """(A name, B name) of every module whose two factors are both in ``names`` with matching
    ranks (A: r × …, B: … × r, ranks > 0), in the order of the A names."""
    halves: dict[str, dict[str, str]] = {}
    for name in names:
        found = lora_factor(name)
        if found is not None:
            halves.setdefault(found[0], {})[found[1]] = name
    pairs = []
    for half in halves.values():
        a, b = half.get("A"), half.get("B")
        if a is None or b is None:
            continue
        sa, sb = shapes[a], shapes[b]
        if len(sa) >= 2 and len(sb) >= 2 and sa[0] == sb[1] and sa[0] > 0:
            pairs.append((a, b))
    return sorted(pairs)


def tensor_stats(values: np.ndarray, threshold: float, shape: tuple[int, ...], factor: str | None,
                 sums: tuple[float, float, int]) -> TensorStats:
    """The statistics of one tensor (flat float32 ``values``) under its selection ``threshold``,
    from its exact ``sums`` (Σ τ², Σ_kept |τ|, n_kept: ``codec.kernels.kept_stats``); with
    ``factor`` ("A" or "B") also its :class:`Gram`."""
    squares, kept_abs, kept = sums
    gram = None
    if factor is not None and len(shape) >= 2 and values.size:
        from .codec.select_kernels import kept_signs  # (here, like torch below)

        rows = (shape[0], values.size // shape[0])
        x, s = np.empty(rows, dtype=np.float64), np.empty(rows, dtype=np.float64)
        kept_signs(np.ascontiguousarray(values, dtype=np.float32).reshape(-1), np.float32(threshold), x.reshape(-1),
                   s.reshape(-1))
        # torch's matmul (MKL on the OpenMP pool Numba shares), not numpy's: OpenBLAS's own threads
        # spin for a long while after each call, and on 2 cores they made every later parallel
        # kernel wait (compress of the 160M set 13 s instead of 5 s, a decode after it 2.5 s
        # instead of 0.14 s: benchmarks/README.md "Threads")
        import torch  # (here: `compeft inspect` reads this module and imports neither torch nor numba)
        tx, ts = torch.from_numpy(x), torch.from_numpy(s)
        if factor == "B":  # m × r: the transposes, so that both factors give r × r (views: BLAS reads them as they lie)
            tx, ts = tx.reshape(-1, shape[1]).T, ts.reshape(-1, shape[1]).T
        gram = Gram(values=(tx @ tx.T).numpy(), cross=(ts @ tx.T).numpy(), signs=(ts @ ts.T).numpy())
    return TensorStats(squares=float(squares), kept=int(kept), kept_abs=float(kept_abs), gram=gram)


def scope_magnitude(rule: str, stats: Sequence[TensorStats]) -> float:
    """The magnitude of a scope's kept entries under ``l2``, ``norm`` or ``unbiased`` (0 when none
    is kept)."""
    kept = sum(s.kept for s in stats)
    kept_abs = math.fsum(s.kept_abs for s in stats)
    if not kept or kept_abs <= 0:
        return 0.0
    if rule == ALPHA_L2:
        return kept_abs / kept
    squares = math.fsum(s.squares for s in stats)
    if rule == ALPHA_NORM:
        return math.sqrt(squares / kept)
    return squares / kept_abs


@dataclass(frozen=True)
class ProductStats:
    """One LoRA module's ΔW = B·A statistics: ‖BA‖², ⟨BA, S_B·S_A⟩ and ‖S_B·S_A‖²."""

    squares: float
    cross: float
    signs: float


def product_stats(a: Gram, b: Gram) -> ProductStats:
    # ‖BA‖² = tr(BᵀB·AAᵀ), ⟨BA, S_B S_A⟩ = tr(BᵀS_B·S_A Aᵀ), ‖S_B S_A‖² = tr(S_BᵀS_B·S_A S_Aᵀ), and
    # tr(X·Y) = Σ X ∘ Yᵀ; the Gram matrices are symmetric but for B's cross term, stored as (BᵀS_B)ᵀ
    return ProductStats(squares=float(np.sum(b.values * a.values)), cross=float(np.sum(b.cross * a.cross)),
                        signs=float(np.sum(b.signs * a.signs)))


def product_scales(rule: str, a: TensorStats, b: TensorStats) -> tuple[float, float] | None:
    """(s_A, s_B) whose product fits B·A under ``rule`` (least squares, the same norm, or the same
    component along B·A), split
    between the factors in the ratio of their own scales under the per-tensor rule; None when the
    product keeps nothing or has no positive fit (the per-tensor rule then applies)."""
    assert a.gram is not None and b.gram is not None
    p = product_stats(a.gram, b.gram)
    if p.signs <= 0 or p.squares <= 0:
        return None
    if rule == PRODUCT_L2:
        product = p.cross / p.signs
    elif rule == PRODUCT_NORM:
        product = math.sqrt(p.squares / p.signs)
    else:
        product = p.squares / p.cross if p.cross > 0 else 0.0
    own_a, own_b = (scope_magnitude(PRODUCT_RULES[rule], [s]) for s in (a, b))
    if not (product > 0 and math.isfinite(product) and own_a > 0 and own_b > 0):
        return None
    return math.sqrt(product * own_a / own_b), math.sqrt(product * own_b / own_a)


def scales(alpha: float | str, scopes: Sequence[Sequence[str]], sigmas: Mapping[str, float],
           stats: Mapping[str, TensorStats], pairs: Sequence[tuple[str, str]]) -> tuple[dict[str, float], list[float]]:
    """The float32 scale of every compressed tensor, and the α of each scope (scale / σ; 0 where
    σ is 0), for a number α or a rule."""
    out: dict[str, float] = {}
    alphas: list[float] = []
    for names in scopes:
        sigma = sigmas[names[0]] if names else 0.0
        if isinstance(alpha, str):
            magnitude = scope_magnitude(PRODUCT_RULES.get(alpha, alpha), [stats[n] for n in names])
        else:
            magnitude = float(alpha) * sigma
        out.update((n, float(np.float32(magnitude))) for n in names)
        alphas.append(magnitude / sigma if sigma > 0 else 0.0)
    if alpha in PRODUCT_RULES:
        for a, b in pairs:
            fitted = product_scales(str(alpha), stats[a], stats[b])
            if fitted is not None:
                out[a], out[b] = (float(np.float32(s)) for s in fitted)
    return out, alphas


def _figures(items: Sequence[tuple[float, float, float, float]]) -> tuple[list[list[float | None]], list[float | None]]:
    """[relative error, cosine] of each ``(Σ x², Σ x·s, Σ s², m)`` item, where x is the original and
    m·s its compressed form (s a sign mask, or a product of two), and of all items as one vector."""

    def figure(squares: float, cross: float, signs: float, m: float) -> list[float | None]:
        error = squares - 2 * m * cross + m * m * signs
        rel = math.sqrt(max(error, 0.0) / squares) if squares > 0 else 0.0
        cosine = cross / math.sqrt(squares * signs) if squares > 0 and signs > 0 and m > 0 else None
        return [float(f"{rel:.4g}"), None if cosine is None else float(f"{cosine:.4g}")]

    rows = [figure(*item) for item in items]
    # all items as one vector: scaling each item's s by its m makes the overall magnitude 1
    squares = math.fsum(i[0] for i in items)
    cross = math.fsum(i[3] * i[1] for i in items)
    signs = math.fsum(i[3] * i[3] * i[2] for i in items)
    return rows, figure(squares, cross, signs, 1.0)


def fidelity(names: Sequence[str], stats: Mapping[str, TensorStats], magnitudes: Mapping[str, float],
             pairs: Sequence[tuple[str, str]]) -> dict[str, object]:
    """The ``fidelity`` metadata (FORMAT.md 7.6): relative error ‖τ − τ̃‖/‖τ‖ and cosine of every
    compressed tensor (in ``names`` order) and overall; with LoRA pairs, the same on each B·A."""
    rows, overall = _figures([(stats[n].squares, stats[n].kept_abs, stats[n].kept, magnitudes[n]) for n in names])
    out: dict[str, object] = {"overall": overall, "tensors": rows}
    if pairs:
        products = []
        for a, b in pairs:
            ga, gb = stats[a].gram, stats[b].gram
            assert ga is not None and gb is not None
            p = product_stats(ga, gb)
            products.append((p.squares, p.cross, p.signs, magnitudes[a] * magnitudes[b]))
        out["lora"], out["lora_overall"] = _figures(products)
    return out


def fidelity_warnings(header_names: Sequence[str], kept: Mapping[str, int], fidelity_meta: Mapping[str, object],
                      pairs: Sequence[tuple[str, str]], scope: object = None) -> list[str]:
    """Plain-language warnings: a compressed tensor that keeps no entry although τ ≠ 0, a LoRA
    module whose B̃·Ã is zero, and an adapter whose update as a whole points elsewhere. The advice
    names tensor scope only to a file not written in it."""
    advice = "use a higher density" if scope == "tensor" else "use tensor scope or a higher density"
    out = []
    rows = fidelity_meta.get("tensors") or []
    empty = [n for n, row in zip(header_names, rows) if kept.get(n) == 0 and isinstance(row, list) and row[0]]
    if empty:
        out.append(f"{len(empty)} compressed tensors keep no entries although their τ is not zero "
                   f"(e.g. {empty[:3]}): their fine-tune is lost; {advice}")
    lora = fidelity_meta.get("lora") or []
    collapsed = [module_name(a) for (a, _), row in zip(pairs, lora)
                 if isinstance(row, list) and row[0] is not None and row[0] >= 1 and row[1] is None]
    if collapsed:
        out.append(f"{len(collapsed)} LoRA modules lose their whole update (B̃·Ã = 0, e.g. {collapsed[:3]}); "
                   + advice)
    overall = fidelity_meta.get("lora_overall") or fidelity_meta.get("overall")
    if isinstance(overall, list) and len(overall) == 2 and isinstance(overall[1], (int, float)) and overall[1] < 0.2:
        out.append(f"the compressed update keeps little of the original's direction (cosine {overall[1]:.3g}); "
                   + advice)
    return out
