"""Whole-matrix metrics: norms and the exact largest squared singular value of a weight matrix.

These describe the weight matrix itself, whatever ESD the power law was fitted on (FARMS windows or
the full ESD), with WeightWatcher's names:

- ``norm = ‖W‖_F² = Σ σ²`` and ``log_norm = log10 norm``;
- ``lambda_max = σ²max`` (the squared spectral norm) and ``log_spectral_norm = log10 lambda_max``;
- ``stable_rank = norm / lambda_max``, so ``1 <= stable_rank <= rank(W) <= min(rows, cols)``.

A convolution's matrix is its unscaled ``(out, in/groups · kh · kw)`` reshape, one per group for a
grouped convolution; a layer holding several matrices reports the mean of each metric over them.

``lambda_max`` is exact (to 1e-7 relative at worst, measured ~1e-15 against a float64 SVD) at a
fraction of the cost of a full eigen-decomposition: Lanczos on ``W Wᵀ`` (or ``Wᵀ W``, the smaller
side) in float64 with full re-orthogonalisation. It stops only when the *explicitly computed*
residual ``‖A y − θ y‖`` of the top Ritz pair ``(θ, y)`` is at most ``1e-7 · θ``, which guarantees
an eigenvalue of ``A`` within ``1e-7 · θ`` of ``θ``; ``θ`` is a Rayleigh quotient, so never above
``lambda_max``, and Lanczos finds the extreme eigenvalue first from a start vector with a component
along it (a fixed pseudo-random start: that component is zero with probability zero). Lanczos on
``W`` streams the whole matrix twice per step (memory-bound), which pays off when the top singular
value is well separated, as in trained weights (~15-25 steps); when it is not (Gaussian-like
matrices, ~60 steps) the iteration switches, after ``max(16, dim // 32)`` steps, to the float64 Gram matrix
(one compute-bound product, then cheap steps): the same operator, so the recurrence just goes on.
Small matrices (smaller side <= 64) go straight to ``eigvalsh`` of the Gram matrix.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

#: Metric names in report order.
MATRIX_METRIC_NAMES = ("lambda_max", "log_spectral_norm", "norm", "log_norm", "stable_rank")
#: Certified relative accuracy of ``lambda_max`` (the residual bound at which Lanczos stops).
RESIDUAL_RTOL = 1e-7
#: Smaller sides up to this size use ``eigvalsh`` of the Gram matrix directly.
DIRECT_MAX_DIM = 64
#: Seed of the Lanczos start vector (its own generator: the global RNG is never touched).
START_SEED = 0x5EED


def conv_matrices(weight: torch.Tensor, groups: int = 1) -> list[torch.Tensor]:
    """The unscaled ``(out/groups, in/groups · kh · kw)`` matrix of each group of a conv weight.

    ``weight`` is stored ``(out, in/groups, *kernel)``; group ``g`` owns output channels
    ``[g · out/groups, (g + 1) · out/groups)``.
    """
    flat = weight.reshape(weight.shape[0], -1)
    if groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"{weight.shape[0]} output channels cannot be split into {groups} groups")
    return list(flat.chunk(groups)) if groups > 1 else [flat]


def lambda_max(w: torch.Tensor) -> float:
    """The largest squared singular value of a 2-D tensor (any float dtype, any device), in float64.

    Certified to ``RESIDUAL_RTOL`` relative (see the module docstring). ``w`` is only read.

    Example::

        >>> lambda_max(torch.diag(torch.tensor([3.0, 1.0])))
        9.0
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(w.shape)}")
    x = w.detach().to(torch.float64)
    if x.numel() == 0:
        return 0.0
    if min(x.shape) <= DIRECT_MAX_DIM:
        return float(torch.linalg.eigvalsh(_gram(x))[-1].clamp_min(0))
    return _lanczos_lambda_max(x)


def _gram(x: torch.Tensor) -> torch.Tensor:
    return x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x


def _lanczos_lambda_max(x: torch.Tensor, check_every: int = 4) -> float:
    """Top eigenvalue of the smaller Gram matrix of ``x`` (float64) by Lanczos, certified by residual."""
    wide = x.shape[0] <= x.shape[1]
    dim = min(x.shape)

    def on_w(v: torch.Tensor) -> torch.Tensor:
        return x @ (x.T @ v) if wide else x.T @ (x @ v)

    apply: Callable[[torch.Tensor], torch.Tensor] = on_w
    switch_at = max(16, dim // 32)
    generator = torch.Generator().manual_seed(START_SEED)
    v = torch.randn(dim, generator=generator, dtype=torch.float64).to(x.device)
    v /= v.norm()
    basis = torch.empty(min(dim, 64), dim, dtype=torch.float64, device=x.device)  # grown on demand
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0  # largest |alpha| seen: a lower bound on lambda_max, for the breakdown test
    for j in range(dim):
        if j == switch_at:
            gram = _gram(x)
            apply = gram.__matmul__
        if j == len(basis):
            basis = torch.cat([basis, torch.empty_like(basis)])[:dim]
        basis[j] = v
        u = apply(v)
        a = float(v @ u)
        u -= a * v
        if j:
            u -= betas[-1] * basis[j - 1]
        done = basis[:j + 1]
        for _ in range(2):  # full re-orthogonalisation, twice ("twice is enough")
            u -= done.T @ (done @ u)
        b = float(u.norm())
        alphas.append(a)
        betas.append(b)
        scale = max(scale, abs(a))
        steps = j + 1
        breakdown = b <= 1e-14 * scale  # the Krylov space is invariant: its Ritz values are exact
        if breakdown or steps == dim or steps % check_every == 0:
            theta, y = _top_ritz(alphas, betas)
            if breakdown or steps == dim or b * abs(float(y[-1])) <= RESIDUAL_RTOL * theta:
                vector = basis[:steps].T @ y.to(x.device)
                residual = float((apply(vector) - theta * vector).norm())
                if breakdown or steps == dim or residual <= RESIDUAL_RTOL * theta:
                    return max(theta, 0.0)
        if breakdown:
            break
        v = u / b
    # Unreachable in exact arithmetic (the basis spans the space after `dim` steps); be exact anyway.
    return float(torch.linalg.eigvalsh(_gram(x))[-1].clamp_min(0))


def _top_ritz(alphas: list[float], betas: list[float]) -> tuple[float, torch.Tensor]:
    """Largest eigenvalue of the Lanczos tridiagonal matrix and its eigenvector (CPU, float64)."""
    k = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[:k - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(t)
    return float(values[-1]), vectors[:, -1]


def matrix_metrics(w: torch.Tensor, known_lambda_max: Optional[float] = None) -> dict[str, float | None]:
    """``norm``, ``log_norm``, ``lambda_max``, ``log_spectral_norm`` and ``stable_rank`` of one 2-D matrix.

    ``known_lambda_max`` skips the solve when an exact value is at hand (a float64 full ESD).
    The logs and the stable rank are ``None`` for an all-zero matrix.
    """
    x = w.detach().to(torch.float64)
    norm = float((x * x).sum())
    top = lambda_max(x) if known_lambda_max is None else float(known_lambda_max)
    if not (norm > 0 and top > 0):
        return {"lambda_max": top, "log_spectral_norm": None, "norm": norm, "log_norm": None, "stable_rank": None}
    # Mathematically 1 <= norm/top <= rank: clamping only absorbs rounding (top is certified to 1e-7).
    stable_rank = min(max(norm / top, 1.0), float(min(x.shape)))
    return {"lambda_max": top, "log_spectral_norm": math.log10(top), "norm": norm, "log_norm": math.log10(norm),
            "stable_rank": stable_rank}


def whole_matrix_metrics(
    matrices: Sequence[torch.Tensor], known_lambda_max: Optional[float] = None
) -> dict[str, float | None]:
    """The metrics of a layer's matrices (one, or one per conv group): each metric's mean over them.

    Raises:
        ValueError: no matrix, or ``known_lambda_max`` given for several matrices.

    Example::

        >>> m = whole_matrix_metrics([torch.eye(4)])
        >>> m["stable_rank"], m["lambda_max"]
        (4.0, 1.0)
    """
    if not matrices:
        raise ValueError("expected at least one matrix")
    if known_lambda_max is not None and len(matrices) != 1:
        raise ValueError("`known_lambda_max` describes one matrix")
    per_matrix = [matrix_metrics(m, known_lambda_max) for m in matrices]
    out: dict[str, float | None] = {}
    for name in MATRIX_METRIC_NAMES:
        values = [m[name] for m in per_matrix]
        out[name] = None if any(v is None for v in values) else math.fsum(values) / len(values)  # type: ignore[arg-type]
    return out
