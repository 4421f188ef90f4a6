"""The layers' spectra for an analysis: solved in batches, refined only where a certificate asks.

Every window set is solved by Gram matrices with deferred refinement; a layer whose counts, fit or
ESD metrics could differ within the deferred values' error bounds (:mod:`certificate`) has its
windows re-solved by the SVD. Errors stay per layer: one failing set never fails the others.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from farms_lightning.engine.certificate import fit_certain, metrics_certain, zeros_certain
from farms_lightning.engine.powerlaw import PowerLawFit
from farms_lightning.engine.spectra import DTypeLike, WindowSet, refine_deferred, solve_window_sets


def solve_all(
    window_sets: list[WindowSet], dtype: DTypeLike, workers: int, on_solved: Callable[[WindowSet, int], None] | None,
    defer: bool = False,
) -> dict[int, list[torch.Tensor] | Exception]:
    """Eigenvalues of every set, batched; on an error, set by set so one bad layer fails alone.

    Deferred sets are only solved here (empty lists): their eigenvalues are sorted by the fits, in parallel.
    """
    def solved(ws: WindowSet) -> list[torch.Tensor]:
        return [] if defer else ws.eigenvalues()

    try:
        solve_window_sets(window_sets, dtype, workers, on_solved, defer_refinement=defer)
        return {id(ws): solved(ws) for ws in window_sets}
    except Exception:  # noqa: BLE001
        out: dict[int, list[torch.Tensor] | Exception] = {}
        for ws in window_sets:
            try:  # (no window progress: the layer's end covers it)
                solve_window_sets([ws], dtype, workers, defer_refinement=defer)
                out[id(ws)] = solved(ws)
            except Exception as error:  # noqa: BLE001
                out[id(ws)] = error
        return out


def refine_all(
    window_sets: list[WindowSet], workers: int, windows: list[torch.Tensor] | None
) -> list[list[torch.Tensor] | Exception]:
    """:func:`refine_deferred` of the sets; on an error, set by set so one bad layer fails alone."""
    try:
        return refine_deferred(window_sets, workers, windows)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001
        out: list[list[torch.Tensor] | Exception] = []
        for k, ws in enumerate(window_sets):
            try:
                out.append(refine_deferred([ws], workers, None if windows is None else [windows[k]])[0])
            except Exception as error:  # noqa: BLE001
                out.append(error)
        return out


def spectrum_certain(
    ev: torch.Tensor, errors: torch.Tensor, values: torch.Tensor, fit: PowerLawFit, settings: dict[str, Any],
    metrics: dict[str, float | None] | None = None,
) -> bool:
    """Whether the counts, the fit and the ESD metrics of one ESD hold for every value within ``errors``.

    ``metrics``: ``esd_metrics(values, fit.alpha)`` when the caller has computed them already.
    """
    if not bool((errors > 0).any()):
        return True
    if not bool(torch.isfinite(ev).all()) or not zeros_certain(ev, errors):
        return False
    kept = errors[len(ev) - len(values):]  # nonzero_eigenvalues drops the smallest (sorted) values
    return (fit_certain(values, kept, fit, settings["fit"], settings["peak_bound"])
            and metrics_certain(values, kept, fit.alpha, metrics))
