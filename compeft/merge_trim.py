"""Re-trimming an expert inside a config merge (TIES density, breadcrumbs, DARE, DELLA), with one
deterministic tie rule.

All kept entries of one compressed tensor decode to the same magnitude, so a magnitude ranking of
them is one long tie. compeft breaks every tie with a seeded hash of the entry: kept entry ``e``
(its index among the tensor's kept entries, in position order) of tensor ``t`` of expert ``i`` has
``h(e) = splitmix64(key + e) >> 1`` with ``key = compeft.plan.drop_key(seed, i, t)`` — the same
hash DARE's drops use. **When a trim keeps c of a group of entries tied at one magnitude, it keeps
the c with the largest h.** For a compressed tensor (one group) that is a single threshold on h,
which the decode kernels apply as they stream (``TensorPlan.drop_cut``); a tensor stored dense
(values of many magnitudes) is trimmed here in numpy with the same rule, and DELLA's
rank-dependent probabilities (which need ranks within rows) always are (docs/merging.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TWO63 = 2 ** 63
EPS = 1e-7  # mergekit's rescaled_masked_tensor: no rescale when a norm is below this
BLOCK = 1 << 22  # hashes computed this many at a time (32 MiB)
_GOLDEN, _M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 output function on a uint64 array (as ``compeft.codec.kernels.splitmix64``)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def entry_hashes(key: int, start: int, stop: int) -> np.ndarray:
    """h(e) = splitmix64(key + e) >> 1 for e in [start, stop), uint64: the kernels' drop rule keeps
    entry e when h(e) >= the plan's cut."""
    with np.errstate(over="ignore"):
        e = np.arange(start, stop, dtype=np.uint64) + np.uint64(key)
    return splitmix64(e) >> np.uint64(1)


def uniforms(h: np.ndarray) -> np.ndarray:
    """A second, independent uniform draw in [0, 1) per entry, from its hash (DELLA's Bernoulli)."""
    return (splitmix64(h) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def count_kept(key: int, cut: int, nnz: int) -> int:
    """How many of ``nnz`` entries the drop rule keeps (h(e) >= cut)."""
    total = 0
    for start in range(0, nnz, BLOCK):
        total += int(np.count_nonzero(entry_hashes(key, start, min(nnz, start + BLOCK)) >= np.uint64(cut)))
    return total


def top_cut(key: int, nnz: int, c: int) -> int:
    """The cut that keeps exactly the ``c`` (0 < c < nnz) entries of largest hash: the c-th largest
    h. Exact, in bounded memory: a histogram of the top 16 bits first, then the one bucket sorted."""
    if nnz <= BLOCK:
        return int(np.partition(entry_hashes(key, 0, nnz), nnz - c)[nnz - c])
    shift = np.uint64(47)  # h < 2^63: its top 16 bits
    counts = np.zeros(1 << 16, dtype=np.int64)
    for start in range(0, nnz, BLOCK):
        counts += np.bincount((entry_hashes(key, start, min(nnz, start + BLOCK)) >> shift).astype(np.int64),
                              minlength=1 << 16)
    above = np.cumsum(counts[::-1])  # above[k]: entries in the top k + 1 buckets
    k = int(np.searchsorted(above, c))
    bucket = (1 << 16) - 1 - k
    need = c - (int(above[k - 1]) if k else 0)
    inside = [h[(h >> shift) == np.uint64(bucket)] for start in range(0, nnz, BLOCK)
              for h in [entry_hashes(key, start, min(nnz, start + BLOCK))]]
    values = np.sort(np.concatenate(inside))[::-1]
    return int(values[need - 1])


@dataclass(frozen=True)
class Trim:
    """How one expert's tensor is re-trimmed: mergekit's sparsification method and its
    parameters (density: fraction kept; gamma: breadcrumbs' top fraction removed; epsilon: DELLA's
    spread of keep probabilities; rescale: restore the L1 norm, as mergekit's ``rescale``)."""

    method: str | None  # None, magnitude, random, magnitude_outliers, della
    density: float = 1.0
    gamma: float = 0.0
    epsilon: float = 0.0
    rescale: bool = False

    @property
    def identity(self) -> bool:
        return self.method is None or self.density >= 1.0


def window(trim: Trim, numel: int, nnz: int) -> tuple[int, int]:
    """The ranks [lo, hi) that a magnitude trim keeps among a tensor's ``nnz`` non-zero entries,
    sorted by increasing magnitude (its zeros come first and are not counted): mergekit's
    ``magnitude`` (top k = max(1, ⌊density·numel⌋)) and ``magnitude_outliers`` (the ⌊gamma·numel⌋
    largest removed, then the smallest, until ⌊density·numel⌋ remain)."""
    zeros = numel - nnz
    if trim.method == "magnitude":
        k = 0 if trim.density <= 0 else max(1, int(trim.density * numel))
        return max(0, nnz - k), nnz
    target = int(trim.density * numel)
    top = int(trim.gamma * numel)
    bottom = max(0, numel - target - top)
    return min(nnz, max(0, bottom - zeros)), max(0, min(nnz, bottom + target - zeros))


def rescale_factor(trim: Trim, before: float, after: float) -> float:
    """mergekit's L1 rescale: ‖τ‖₁ / ‖kept‖₁, 1 when either is below 1e-7 or rescale is off."""
    if not trim.rescale or before < EPS or after < EPS:
        return 1.0
    return before / after


@dataclass(frozen=True)
class Cut:
    """A trim as the decode kernels apply it: drop entry e when h(e) < ``cut`` (0: keep all), scale
    the survivors by ``factor``; ``kept`` is how many survive (0: the tensor contributes nothing)."""

    cut: int
    kept: int
    factor: float


def stream_cut(trim: Trim, key: int, numel: int, nnz: int, magnitude: float) -> Cut:
    """The cut of a compressed tensor (every kept entry has |value| = ``magnitude``)."""
    if trim.identity or nnz == 0:
        return Cut(0, nnz, 1.0)
    if trim.method == "random":
        if trim.density <= 0:
            return Cut(0, 0, 1.0)
        cut = int((1.0 - trim.density) * TWO63)
        kept = count_kept(key, cut, nnz) if cut else nnz
        return Cut(cut, kept, rescale_factor(trim, nnz * magnitude, kept * magnitude))
    lo, hi = window(trim, numel, nnz)
    kept = hi - lo  # one tie group: the kept ones are those of largest hash
    if kept <= 0:
        return Cut(0, 0, 1.0)
    cut = 0 if kept >= nnz else top_cut(key, nnz, kept)
    return Cut(cut, kept, rescale_factor(trim, nnz * magnitude, kept * magnitude))


def dense_keep(trim: Trim, key: int, x: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """The kept entries of a decoded tensor ``x`` (float32, any magnitudes) as a bool mask of its
    shape (None: all), and the rescale factor. Equal to :func:`stream_cut` on a compressed tensor."""
    if trim.identity:
        return None, 1.0
    flat = x.reshape(-1)
    where = torch.nonzero(flat).reshape(-1)
    nnz = int(where.numel())
    mags = flat[where].abs().numpy()
    h = entry_hashes(key, 0, nnz)
    if trim.method == "random":
        keep = h >= np.uint64(int((1.0 - trim.density) * TWO63)) if trim.density > 0 else np.zeros(nnz, bool)
    elif trim.method == "della":
        keep = della_keep(trim, x, where.numpy(), mags, h)
    else:
        keep = window_keep(mags, h, *window(trim, flat.numel(), nnz))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[where[torch.from_numpy(keep)]] = True
    before = float(np.sum(mags, dtype=np.float64))
    after = float(np.sum(mags[keep], dtype=np.float64))
    return mask.reshape(x.shape), rescale_factor(trim, before, after)


def window_keep(mags: np.ndarray, h: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Entries of sorted ranks [lo, hi) (by magnitude): where a tie group straddles an edge, its
    members of largest hash are the ones kept."""
    keep = np.zeros(mags.size, dtype=bool)
    if hi <= lo:
        return keep
    order = np.lexsort((h, mags))  # increasing magnitude, then increasing hash
    ranked = mags[order]
    inside = np.zeros(mags.size, dtype=bool)
    inside[lo:hi] = True
    for value in {ranked[lo], ranked[hi - 1]}:
        g0, g1 = int(np.searchsorted(ranked, value, "left")), int(np.searchsorted(ranked, value, "right"))
        count = max(0, min(hi, g1) - max(lo, g0))
        inside[g0:g1] = False
        inside[g1 - count:g1] = True  # the group's largest hashes
    keep[order] = inside
    return keep


def della_keep(trim: Trim, x: torch.Tensor, where: np.ndarray, mags: np.ndarray, h: np.ndarray) -> np.ndarray:
    """DELLA's MagPrune (Deep et al. 2024, as mergekit's ``della_magprune``): within each row (along
    dimension 1, as mergekit's ``argsort(dim=1)``; a 1-D tensor is one row) entries are ranked by
    magnitude, ties by increasing hash, zeros first; rank r of n keeps with probability
    density − ε + 2ε·(r − 1)/(n − 1), drawn from the entry's own uniform (:func:`uniforms`)."""
    n = x.shape[1] if x.dim() >= 2 else x.numel()
    inner = x[0, 0].numel() if x.dim() >= 2 else 1  # entries after dimension 1
    rows = (where // (n * inner)) * inner + where % inner
    order = np.lexsort((h, mags, rows))  # by row, then magnitude, then hash
    starts = np.searchsorted(rows[order], rows[order], "left")
    in_row = np.arange(order.size) - starts  # rank among the row's non-zero entries
    row_nnz = np.bincount(rows)[rows[order]]
    rank = (n - row_nnz) + in_row  # 0-based rank among all n entries of the row
    prob = (trim.density - trim.epsilon) + rank / (n - 1) * 2 * trim.epsilon
    keep = np.zeros(order.size, dtype=bool)
    keep[order] = uniforms(h[order]) < prob
    return keep
