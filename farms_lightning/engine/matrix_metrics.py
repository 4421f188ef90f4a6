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

Warm starts. :func:`lambda_max_with_vector` also returns the top Ritz vector ``y`` (on the smaller
Gram side), and takes the vector the previous analysis of the same matrix found as ``start``. Lanczos
then starts from ``unit(r) + unit(y_prev)`` (normalised), ``r`` the fixed pseudo-random start: the
previous vector is *added* to ``r``, never put in its place. Why that keeps the guarantee: the
residual test certifies *an* eigenvalue, and Lanczos meets the top one first only if the start has a
component along its eigenvector ``u1``. The combined start's component is
``(r·u1 ± y_prev·u1) / ‖unit(r) ± unit(y_prev)‖`` (the sign that puts ``y_prev`` at an acute angle
to ``r``, so the norm is between √2 and 2). When the weights moved a little, ``y_prev`` is close to
``u1`` and the component is large: fewer steps (10-25% fewer on Gaussian and Student-t matrices
moved by 1e-2 relative; the random part still has to be resolved). When ``y_prev`` is useless, even
orthogonal to ``u1`` (it sits on the second singular vector), the component is still ``r·u1``
divided by at most 2: the random start's own, whose vanishing has probability zero. Alone, a start
at the second singular vector has no such component, and Lanczos would certify ``λ2`` (a few percent
low on a random matrix). The argument takes ``y_prev`` from an earlier analysis: a vector built, with
the weights and ``START_SEED`` in hand, to cancel ``r·u1`` exactly (a forged checkpoint) could defeat
it, as it could any fixed start. An invalid ``start`` (wrong length, not a finite float vector, zero)
is ignored: the fixed start alone, the same bits as no ``start``. Same weights and same start give
the same bits.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, MutableSequence, Optional, Sequence

import torch

#: Metric names in report order.
MATRIX_METRIC_NAMES = ("lambda_max", "log_spectral_norm", "norm", "log_norm", "stable_rank")
#: Per-layer statistics that need the whole-matrix metrics (``alpha_weighted = alpha · log_spectral_norm``).
WHOLE_MATRIX_METRICS = (*MATRIX_METRIC_NAMES, "alpha_weighted")
#: Certified relative accuracy of ``lambda_max`` (the residual bound at which Lanczos stops).
RESIDUAL_RTOL = 1e-7
#: Smaller sides up to this size use ``eigvalsh`` of the Gram matrix directly.
DIRECT_MAX_DIM = 64
#: Seed of the Lanczos start vector (its own generator: the global RNG is never touched).
START_SEED = 0x5EED


def wants_matrix_metrics(matrix_metrics: Optional[bool], log_metrics: Iterable[str]) -> bool:
    """Whether a consumer computes the whole-matrix metrics: ``matrix_metrics`` when it is a bool,
    else (``None``) whether ``log_metrics`` names one of :data:`WHOLE_MATRIX_METRICS`.

    Raises:
        ValueError: ``matrix_metrics`` is not ``None``, ``True`` or ``False``.
    """
    if matrix_metrics is not None and not isinstance(matrix_metrics, bool):
        raise ValueError(f"`matrix_metrics` must be None, True or False, got {matrix_metrics!r}")
    if matrix_metrics is None:
        return any(metric in WHOLE_MATRIX_METRICS for metric in log_metrics)
    return matrix_metrics


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
    return lambda_max_with_vector(w)[0]


def lambda_max_with_vector(w: torch.Tensor, start: Any = None) -> tuple[float, torch.Tensor]:
    """``lambda_max`` of ``w`` and its top singular vector on the smaller side, for the next warm start.

    Args:
        w: a 2-D tensor (any float dtype, any device); only read.
        start: the vector this returned for the same matrix before (length ``min(w.shape)``), added
            to the fixed pseudo-random Lanczos start (module docstring). Anything else is ignored.

    Returns:
        ``(lambda_max, vector)``: ``lambda_max`` exactly as :func:`lambda_max` certifies it (float64),
        and a unit float64 CPU vector of length ``min(w.shape)``.

    Raises:
        ValueError: ``w`` is not 2-D.

    Example::

        >>> w = torch.randn(300, 200, dtype=torch.float64)
        >>> top, vector = lambda_max_with_vector(w)
        >>> again, _ = lambda_max_with_vector(w + 1e-2 * torch.randn(300, 200), start=vector)
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(w.shape)}")
    x = w.detach().to(torch.float64)
    dim = min(x.shape)
    if x.numel() == 0:
        return 0.0, torch.zeros(dim, dtype=torch.float64)
    if dim <= DIRECT_MAX_DIM:
        gram = _gram(x)
        vector = torch.linalg.eigh(gram)[1][:, -1]
        return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0)), vector.cpu()
    theta, vector, _ = _lanczos(x, start)
    return theta, vector


def usable_start(start: Any, dim: int) -> torch.Tensor | None:
    """``start`` as a unit float64 CPU vector of length ``dim``, or ``None`` if it cannot be one."""
    if not isinstance(start, torch.Tensor) or start.dim() != 1 or len(start) != dim or dim == 0:
        return None
    if not start.is_floating_point() or start.layout != torch.strided or start.is_meta:
        return None
    s = start.detach().to("cpu", torch.float64)
    peak = float(s.abs().max())
    if not (math.isfinite(peak) and peak > 0):  # NaN, inf or zero
        return None
    s = s / peak  # scaled first: the norm of a huge finite vector would overflow
    return s / s.norm()


def _gram(x: torch.Tensor) -> torch.Tensor:
    return x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x


def _lanczos(x: torch.Tensor, start: Any = None, check_every: int = 4) -> tuple[float, torch.Tensor, int]:
    """Top eigenpair of the smaller Gram matrix of ``x`` (float64) by Lanczos, certified by residual.

    Returns ``(theta, unit vector on the CPU, Lanczos steps taken)``.
    """
    wide = x.shape[0] <= x.shape[1]
    dim = min(x.shape)

    def on_w(v: torch.Tensor) -> torch.Tensor:
        return x @ (x.T @ v) if wide else x.T @ (x @ v)

    apply: Callable[[torch.Tensor], torch.Tensor] = on_w
    switch_at = max(16, dim // 32)
    generator = torch.Generator().manual_seed(START_SEED)
    v = torch.randn(dim, generator=generator, dtype=torch.float64)
    v /= v.norm()
    previous = usable_start(start, dim)
    if previous is not None:
        # Added to the random start at full weight, never in its place (module docstring).
        # An eigenvector's sign is arbitrary: the one at an acute angle to the random part keeps
        # ‖sum‖ >= √2, so neither part cancels the other.
        combined = v + previous if float(v @ previous) >= 0 else v - previous
        v = combined / combined.norm()
    v = v.to(x.device)
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
                    return max(theta, 0.0), _unit_cpu(vector), steps
        if breakdown:
            break
        v = u / b
    # Unreachable in exact arithmetic (the basis spans the space after `dim` steps); be exact anyway.
    values, vectors = torch.linalg.eigh(_gram(x))
    return float(values[-1].clamp_min(0)), vectors[:, -1].cpu(), dim


def _unit_cpu(vector: torch.Tensor) -> torch.Tensor:
    norm = vector.norm()
    return (vector / norm if norm > 0 else vector).cpu()


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
    matrices: Sequence[torch.Tensor], known_lambda_max: Optional[float] = None,
    starts: Optional[MutableSequence[Any]] = None,
) -> dict[str, float | None]:
    """The metrics of a layer's matrices (one, or one per conv group): each metric's mean over them.

    Args:
        matrices: the layer's 2-D matrices.
        known_lambda_max: the exact ``lambda_max`` of a single matrix, when at hand (no solve).
        starts: warm starts, one entry per matrix (``None``, or the vector an earlier call left
            there; an unusable entry is ignored). Each entry is replaced in place by its matrix's
            new top vector, for the next call. Untouched with ``known_lambda_max``.

    Raises:
        ValueError: no matrix, ``known_lambda_max`` given for several matrices, or ``starts`` not one
            entry per matrix.

    Example::

        >>> m = whole_matrix_metrics([torch.eye(4)])
        >>> m["stable_rank"], m["lambda_max"]
        (4.0, 1.0)
        >>> starts = [None]
        >>> _ = whole_matrix_metrics([torch.randn(300, 200)], starts=starts)  # starts[0]: a vector now
    """
    if not matrices:
        raise ValueError("expected at least one matrix")
    if known_lambda_max is not None and len(matrices) != 1:
        raise ValueError("`known_lambda_max` describes one matrix")
    if starts is not None and len(starts) != len(matrices):
        raise ValueError(f"`starts` needs one entry per matrix ({len(matrices)}), got {len(starts)}")
    per_matrix = []
    for at, m in enumerate(matrices):
        top = known_lambda_max
        if starts is not None and top is None:
            top, starts[at] = lambda_max_with_vector(m, starts[at])
        per_matrix.append(matrix_metrics(m, top))
    out: dict[str, float | None] = {}
    for name in MATRIX_METRIC_NAMES:
        values = [m[name] for m in per_matrix]
        out[name] = None if any(v is None for v in values) else math.fsum(values) / len(values)  # type: ignore[arg-type]
    return out
