"""Eigenvalues of single windows, in float64: Gram matrices, exact zeros, SVD refinement.

A Gram matrix (``X Xᵀ`` or ``Xᵀ X``, the smaller) resolves eigenvalues only to a small multiple of
``eps·λmax`` of its window, so a window whose spectrum reaches down towards that floor is re-solved
by a float64 SVD (:data:`REFINE_RATIO`), or, deferred, keeps its Gram values with an error bound
(:data:`GRAM_ERROR_FACTOR`) for :mod:`farms_lightning.engine.certificate` to judge. Exact zero rows
and columns give exact zero eigenvalues (:func:`structural_zeros`). There is no float32 mode.
"""

from __future__ import annotations

from typing import Callable, Union

import torch

DTypeLike = Union[torch.dtype, str, None]

#: Windows whose smallest (non-structural) Gram eigenvalue is at or below this fraction of their
#: largest are re-solved with a float64 SVD. A float64 Gram matrix (``XᵀX`` formed, then ``eigvalsh``)
#: has an absolute error of ``c·eps·λmax`` at its small eigenvalues; measured on the real MiniLM
#: windows (100², 192², 384²) ``c <= 1.2``, on Gaussian ones up to 1000² ``c <= 2.2``. Keeping every
#: eigenvalue to ``1e-9`` relative needs ``λmin/λmax >= c·eps·1e9 ≈ c·2.2e-7``; 1e-6 (``c = 4.5``)
#: leaves a margin of 2 to 4 (the largest ratio at which a MiniLM window missed the bound
#: unrefined: 1.5e-7).
REFINE_RATIO = 1e-6

#: The error bound of a deferred Gram eigenvalue: ``GRAM_ERROR_FACTOR·k·eps·λmax`` of its window,
#: ``k`` the Gram product's inner dimension (the window's longer side). Forming the Gram matrix rounds
#: every entry, a length-``k`` dot product, by at most ``k·eps`` of its magnitude, and the eigensolver
#: is backward stable; the proven form of that bound (``k·eps·‖X‖_F²`` plus LAPACK's unstated
#: constant) is not computable, so the bound is ``λmax`` in place of ``‖X‖_F²`` with a measured
#: margin: every eigenvalue of Gaussian, heavy-tailed, low-rank and real MiniLM windows from 60² to
#: 1000² is within ``0.07·k·eps·λmax`` of a float64 SVD's (at most ``2.2·eps·λmax`` below the median),
#: a margin of 14 or more (``tests/test_certificate.py`` re-measures it).
GRAM_ERROR_FACTOR = 1.0

#: Why ``dtype=torch.float32`` is refused (measured with ``benchmarks/bench_farms.py`` and
#: ``benchmarks/small_eigenvalues.py`` on the real MiniLM, peak fits at windows 192 and 100).
FLOAT32_REFUSED = (
    "dtype=torch.float32 is not supported: a float32 Gram matrix loses the small eigenvalues the peak fit "
    "depends on (alphas up to 38% off float64 on real weights), and a float32 SVD, as accurate as the "
    "published float32 pipeline, is slower than the exact float64 default on a CPU; use None or torch.float64"
)


def resolve_dtype(dtype: DTypeLike) -> torch.dtype:
    """The eigen-solver dtype: ``None``/``torch.float64``/``"float64"`` (the only one).

    Every eigenvalue equals a float64 SVD's. A float32 mode was removed: see ``FLOAT32_REFUSED``.

    Raises:
        ValueError: ``torch.float32``/``"float32"`` (with the reason), or any other value.
    """
    if dtype is None:
        return torch.float64
    if isinstance(dtype, str):
        dtype = {"float64": torch.float64, "double": torch.float64, "float32": torch.float32,
                 "float": torch.float32}.get(dtype.removeprefix("torch."), dtype)  # type: ignore[arg-type]
    if dtype == torch.float64:
        return torch.float64
    if dtype == torch.float32:
        raise ValueError(FLOAT32_REFUSED)
    raise ValueError(f"`dtype` must be None or torch.float64, got {dtype!r}")


def gram_eigenvalues(windows: torch.Tensor) -> torch.Tensor:
    """Float64 eigenvalues (ascending, >= 0) of the smaller Gram matrix of each ``(B, r, c)`` window."""
    x = windows.to(torch.float64)
    gram = x @ x.mT if x.shape[-2] <= x.shape[-1] else x.mT @ x
    return torch.linalg.eigvalsh(gram).clamp_min_(0)


def structural_zeros(windows: torch.Tensor) -> torch.Tensor:
    """Per window, how many of its ``min(r, c)`` singular values are exactly zero by structure.

    A window with only ``a`` non-zero rows and ``b`` non-zero columns has rank at most ``min(a, b)``.
    (Two ``amax`` passes: cheaper than a boolean copy of the windows, and exact.)
    """
    magnitude = windows.abs()
    rows = (magnitude.amax(dim=-1) != 0).sum(dim=-1)
    cols = (magnitude.amax(dim=-2) != 0).sum(dim=-1)
    return min(windows.shape[-2:]) - torch.minimum(rows, cols)


def svd_eigenvalues(windows: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Squared singular values (ascending, float64) of each ``(B, r, c)`` window, SVD in ``dtype``."""
    return torch.linalg.svdvals(windows.to(dtype)).flip(-1).to(torch.float64).square()


def _needs_refinement(ev: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Windows whose smallest non-structural Gram eigenvalue is ``<= REFINE_RATIO·λmax``."""
    size = ev.shape[-1]
    smallest = ev.gather(1, zeros.clamp(max=size - 1)[:, None]).squeeze(1)
    return (smallest <= REFINE_RATIO * ev[:, -1]) & (zeros < size)


def window_eigenvalues(windows: torch.Tensor, direct_svd: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending, float64) of each ``(B, r, c)`` window, and which were solved by SVD.

    Gram eigenvalues, with windows whose smallest non-structural eigenvalue is
    ``<= REFINE_RATIO·λmax`` re-solved by a batched float64 SVD (with ``direct_svd``: every window
    by the SVD), so every value equals a float64 SVD's to ``1e-9·λ + 8·eps·sqrt(λ·λmax)``. The
    :func:`structural_zeros` of each window are exactly 0.
    """
    ev, svd, _ = _solve_windows(windows, "svd" if direct_svd else "gram")
    return ev, svd


def _solve_windows(windows: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`window_eigenvalues` by ``mode`` (see ``_Part``), and each value's error bound.

    With ``mode="defer"`` nearly singular windows keep their Gram values, and each of their values at
    or below ``REFINE_RATIO·λmax`` gets the error bound :data:`GRAM_ERROR_FACTOR` ``·k·eps·λmax`` (0
    everywhere else), so that a caller refines only when a result depends on them
    (:mod:`farms_lightning.engine.certificate`).
    """
    zeros = structural_zeros(windows)
    if mode == "svd":
        size = min(windows.shape[-2:])
        ev = svd_eigenvalues(windows)
        ev[torch.arange(size, device=ev.device) < zeros[:, None]] = 0.0
        errors = torch.zeros(len(windows), size, dtype=torch.float64, device=windows.device)
        return ev, torch.ones(len(windows), dtype=torch.bool), errors
    return finish_gram_eigenvalues(gram_eigenvalues(windows), zeros, mode, max(windows.shape[-2:]),
                                   lambda chosen: windows[chosen])


def finish_gram_eigenvalues(
    ev: torch.Tensor, zeros: torch.Tensor, mode: str, long_side: int, windows: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gram eigenvalues ``ev`` (B, size) -> exact structural zeros, then refinement by ``mode``.

    ``"gram"``: nearly singular windows re-solved by the SVD (``windows(mask)`` gives them);
    ``"defer"``: their small values get error bounds instead. Returns eigenvalues, SVD-solved mask, bounds.
    """
    size = ev.shape[-1]
    errors = torch.zeros_like(ev)
    structural = torch.arange(size, device=ev.device) < zeros[:, None]
    ev[structural] = 0.0
    svd = _needs_refinement(ev, zeros)
    if mode == "defer":
        bound = GRAM_ERROR_FACTOR * long_side * torch.finfo(torch.float64).eps * ev[:, -1:]
        uncertain = svd[:, None] & ~structural & (ev <= REFINE_RATIO * ev[:, -1:])
        errors = torch.where(uncertain, bound, errors)
        svd = torch.zeros_like(svd)
    elif bool(svd.any()):
        ev[svd] = svd_eigenvalues(windows(svd))
        ev[structural] = 0.0
    return ev, svd.cpu(), errors
