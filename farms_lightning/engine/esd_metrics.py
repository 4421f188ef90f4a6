"""Per-ESD metrics besides alpha (WeightWatcher's names), on the non-zero eigenvalues of the fitted ESD.

These describe the ESD that alpha was fitted on: the pooled FARMS windows (a convolution: each
block, scaled by 0.5, then averaged over blocks) or the full ESD. The whole-matrix metrics
(``lambda_max``, ``norm``, ``stable_rank``, ...) describe the weight matrix itself instead: see
:mod:`farms_lightning.engine.matrix_metrics`.
"""

from __future__ import annotations

import math

import torch

#: Metrics of the fitted ESD; ``log_alpha_norm`` is ``None`` when no alpha was fitted.
ESD_METRIC_NAMES = ("log_alpha_norm", "entropy")
#: Every per-layer metric besides the fit, in report order: the whole-matrix ones
#: (``matrix_metrics.MATRIX_METRIC_NAMES``), the ESD ones and ``alpha_weighted`` (alpha x log10 lambda_max).
METRIC_NAMES = (
    "lambda_max",
    "log_spectral_norm",
    "norm",
    "log_norm",
    "alpha_weighted",
    "log_alpha_norm",
    "stable_rank",
    "entropy",
)


def esd_metrics(values: torch.Tensor, alpha: float | None) -> dict[str, float | None]:
    """Metrics of a sorted, positive, float64 ESD (the output of ``nonzero_eigenvalues``).

    ``log_alpha_norm = log10 Σ λ^alpha`` goes through logsumexp because ``λ^alpha`` overflows;
    ``entropy`` is the Shannon entropy of ``λ / Σλ`` normalised by ``ln(len(λ))`` (0 for one λ).
    """
    if len(values) == 0:
        return dict.fromkeys(ESD_METRIC_NAMES)
    p = values / values.sum()
    entropy = float(-(p * torch.log(p)).sum() / math.log(len(values))) if len(values) > 1 else 0.0
    log_alpha_norm = None
    if alpha is not None:
        log_alpha_norm = float(torch.logsumexp(alpha * torch.log(values), 0)) / math.log(10)
    return {"log_alpha_norm": log_alpha_norm, "entropy": entropy}
