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
    keep = ev[ev > 1e-12 * ev[-1]]
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
