"""Per-ESD metrics besides alpha (WeightWatcher's names), on the non-zero eigenvalues."""

from __future__ import annotations

import math

import torch

#: Metric names in report order; alpha-dependent ones are ``None`` when no alpha was fitted.
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
        return dict.fromkeys(METRIC_NAMES)
    lambda_max = float(values[-1])
    total = float(values.sum())
    p = values / total
    entropy = float(-(p * torch.log(p)).sum() / math.log(len(values))) if len(values) > 1 else 0.0
    metrics: dict[str, float | None] = {
        "lambda_max": lambda_max,
        "log_spectral_norm": math.log10(lambda_max),
        "norm": total,
        "log_norm": math.log10(total),
        "alpha_weighted": None,
        "log_alpha_norm": None,
        "stable_rank": total / lambda_max,
        "entropy": entropy,
    }
    if alpha is not None:
        metrics["alpha_weighted"] = alpha * math.log10(lambda_max)
        metrics["log_alpha_norm"] = float(torch.logsumexp(alpha * torch.log(values), 0)) / math.log(10)
    return metrics
