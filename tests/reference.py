"""An independent float64 NumPy implementation of the method (``docs/method.md``).

Written from the method's text, deliberately the slow obvious way (per-window SVD, per-candidate loop,
``np.histogram``), and never calling farms_lightning: tests compare the package against it.
"""

from __future__ import annotations

import math

import numpy as np


def grid_starts(size: int, win: int, k: int) -> list[int]:
    step = max(1, (size - win) // (k - 1)) if k > 1 else 1
    count = min(k, max(1, (size - win) // step + 1))
    return [min(i * step, size - win) for i in range(count)]


def farms_eigs(w: np.ndarray, m: int = 100, q: float = 1.0, k: int = 9) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    rows, cols = w.shape
    m = min(m, rows, math.floor(cols / q))
    n = int(m * q)
    if min(m, n) < 2:
        return np.empty(0)
    evs = []
    for r in grid_starts(rows, m, k):
        for c in grid_starts(cols, n, k):
            evs.append(np.linalg.svd(w[r:r + m, c:c + n], compute_uv=False) ** 2)
    return np.sort(np.concatenate(evs))


def full_eigs(w: np.ndarray) -> np.ndarray:
    return np.sort(np.linalg.svd(np.asarray(w, dtype=np.float64), compute_uv=False) ** 2)


def conv_kernel_matrices(w: np.ndarray) -> list[np.ndarray]:
    """Kernel-position matrices W[:, :, p] (out, in), transposed so that rows >= cols."""
    w = np.asarray(w, dtype=np.float64)
    out, inp = w.shape[:2]
    flat = w.reshape(out, inp, -1)
    mats = [flat[:, :, p] for p in range(flat.shape[2])]
    return [m.T if m.shape[0] < m.shape[1] else m for m in mats]


def conv_block_eigs(w: np.ndarray, q: float = 1.0) -> list[np.ndarray]:
    """Per block b, the pooled λ of all kernel positions, each block scaled by sqrt(0.5)."""
    mats = conv_kernel_matrices(w)
    rows, cols = mats[0].shape
    if q <= 1:
        r, c = cols, int(cols // (1 / q))
    else:
        r, c = int(cols // q), cols
    r, c = max(1, r), max(1, c)
    division = rows // cols
    blocks = []
    for b in range(division):
        ev = [np.linalg.svd(math.sqrt(0.5) * m[b * r:(b + 1) * r, :c], compute_uv=False) ** 2 for m in mats]
        blocks.append(np.sort(np.concatenate(ev)))
    return blocks


def conv_full_eigs(w: np.ndarray) -> np.ndarray:
    return np.sort(np.concatenate([full_eigs(math.sqrt(0.5) * m) for m in conv_kernel_matrices(w)]))


def _drop_zeros(ev: np.ndarray) -> tuple[np.ndarray, int]:
    ev = np.sort(np.asarray(ev, dtype=np.float64))
    if len(ev) == 0:
        return ev, 0
    keep = ev[ev > 1e-24 * ev[-1]]  # numerical zeros only: singular values below 1e-12·σmax
    return keep, len(ev) - len(keep)


def _hill(ev: np.ndarray, i: int) -> float:
    n = len(ev) - i
    s = np.sum(np.log(ev[i:]) - np.log(ev[i]))
    return 1 + n / s if s > 0 else math.inf


def _distance(ev: np.ndarray, i: int, alpha: float) -> float:
    n = len(ev) - i
    return float(np.max(np.abs(1 - (ev[i:] / ev[i]) ** (1 - alpha) - np.arange(n) / n)))


def _flat(ev: np.ndarray, i: int) -> bool:
    return ev[-1] <= ev[i] * (1 + 1e-9)


def fit(ev, method: str = "median", min_evals: int = 10, peak_bound: str = "reference") -> dict:
    """Returns dict(alpha, xmin, D, num_evals, num_dropped, ok)."""
    ev, dropped = _drop_zeros(ev)
    n_total = len(ev)
    result = {"alpha": None, "xmin": None, "D": None, "num_evals": n_total, "num_dropped": dropped, "ok": False}
    if n_total < min_evals:
        return result
    if method == "median":
        candidates = [n_total // 2]
    elif method == "ks":
        candidates = range(n_total - 1)
    else:
        counts, edges = np.histogram(np.log10(ev), bins=100)
        peak = 10 ** edges[np.argmax(counts)]
        lo = np.log10(0.95 * peak) if peak_bound == "reference" else 0.95 * peak
        candidates = [i for i in range(n_total - 1) if lo <= ev[i] <= 1.5 * peak]
    best = None
    for i in candidates:
        if _flat(ev, i):
            continue
        alpha = _hill(ev, i)
        if not (alpha > 1 and math.isfinite(alpha)):
            continue
        d = _distance(ev, i, alpha)
        if best is None or d < best[2]:
            best = (alpha, ev[i], d)
    if best is not None:
        result.update(alpha=best[0], xmin=best[1], D=best[2], ok=True)
    return result


def grouped_conv_block_eigs(w: np.ndarray, groups: int, q: float = 1.0) -> list[np.ndarray]:
    """A grouped conv as ``groups`` separate convs: every group's blocks, group after group."""
    w = np.asarray(w, dtype=np.float64)
    size = w.shape[0] // groups
    return [ev for g in range(groups) for ev in conv_block_eigs(w[g * size:(g + 1) * size], q)]


def block_diagonal_conv_full_eigs(w: np.ndarray, groups: int) -> np.ndarray:
    """Full ESD of a grouped conv: per kernel position the dense block-diagonal (out, in) matrix."""
    w = np.asarray(w, dtype=np.float64)
    out, per_group = w.shape[:2]
    size = out // groups
    flat = w.reshape(out, per_group, -1)
    evs = []
    for p in range(flat.shape[2]):
        dense = np.zeros((out, per_group * groups))
        for g in range(groups):
            dense[g * size:(g + 1) * size, g * per_group:(g + 1) * per_group] = flat[g * size:(g + 1) * size, :, p]
        evs.append(full_eigs(math.sqrt(0.5) * dense)[-min(out, per_group * groups):])
    return np.sort(np.concatenate(evs))


# ------------------------------------------------------------------ the published method, in float64


def farms_eigs_exact_zeros(w: np.ndarray, m: int, q: float, k: int) -> tuple[np.ndarray, int]:
    """Pooled window λ with each window's structural zeros exact: the SVD of the window with its
    zero rows and columns removed, padded with zeros to ``min(m, n)`` values. Returns (λ, zeros)."""
    w = np.asarray(w, dtype=np.float64)
    rows, cols = w.shape
    m = min(m, rows, math.floor(cols / q))
    n = int(m * q)
    evs, zeros = [], 0
    for r in grid_starts(rows, m, k):
        for c in grid_starts(cols, n, k):
            x = w[r:r + m, c:c + n]
            x = x[np.any(x != 0, axis=1)][:, np.any(x != 0, axis=0)]
            s = np.linalg.svd(x, compute_uv=False) ** 2 if x.size else np.empty(0)
            zeros += min(m, n) - len(s)
            evs.append(np.concatenate([np.zeros(min(m, n) - len(s)), s]))
    return np.sort(np.concatenate(evs)), zeros


def published_peak_alpha(ev: np.ndarray) -> float:
    """The published FARMS-LLM / AlphaPruning ``xmin_peak`` fit, transcribed to NumPy float64.

    Only exact zeros are removed (the published code keeps everything; it would take ln 0). As
    published: candidates ``log10(0.95·peak) <= λ_i <= 1.5·peak`` (i <= N-2) around the fullest of
    100 log10 bins; ``alpha_i = 1 + n / (Σ_{j≥i} ln λ_j − n ln λ_i)``; alphas default to 0 and
    distances to 1, a candidate with alpha <= 1 keeps D = 1, the first minimum of D wins (so with no
    usable candidate this returns 0, as the published code does).

    Speed-up, exact: ``D_i`` is a maximum over the tail, so its maximum over every 64th tail point is
    a lower bound. Candidates are evaluated in order of that bound and the loop stops once the bound
    exceeds the best exact ``D`` found: no skipped candidate can have a smaller (or equal) ``D``.
    """
    nz = np.sort(np.asarray(ev, dtype=np.float64))
    nz = nz[nz > 0]
    n_all = len(nz)
    counts, edges = np.histogram(np.log10(nz), bins=100)
    peak = 10 ** edges[np.argmax(counts)]
    lo, hi = np.log10(0.95 * peak), 1.5 * peak
    logs = np.log(nz)
    suffix = np.cumsum(logs[::-1])[::-1]  # Σ_{j≥i} ln λ_j
    alphas, ds = np.zeros(n_all - 1), np.ones(n_all - 1)
    candidates = [i for i in range(n_all - 1) if lo <= nz[i] <= hi]
    for i in candidates:
        n = n_all - i
        alphas[i] = 1 + n / (suffix[i] - n * logs[i])

    def deviation(i: int, t: np.ndarray) -> np.ndarray:
        n = n_all - i
        return np.abs(1 - np.exp((1 - alphas[i]) * (logs[i + t] - logs[i])) - t / n)

    usable = [i for i in candidates if alphas[i] > 1]
    bounds = {i: float(np.max(deviation(i, np.arange(0, n_all - i, 64)))) for i in usable}
    best = math.inf
    for i in sorted(usable, key=lambda j: (bounds[j], j)):
        if bounds[i] > best:
            break
        ds[i] = float(np.max(deviation(i, np.arange(n_all - i))))
        best = min(best, ds[i])
    return float(alphas[np.argmin(ds)])
