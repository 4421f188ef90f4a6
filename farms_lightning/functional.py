"""Pure functions of farms_lightning: eigenvalues of one matrix and power-law fits of an ESD."""

from typing import Any

from farms_lightning.engine.powerlaw import PowerLawFit, fit_power_law
from farms_lightning.engine.spectra import farms_eigenvalues, full_eigenvalues


def __getattr__(name: str) -> Any:
    if name == "farms_metrics":  # lives beside FARMSMetric (torchmetrics), imported on first use
        from farms_lightning.training.metric import farms_metrics

        return farms_metrics
    raise AttributeError(f"module 'farms_lightning.functional' has no attribute {name!r}")


__all__ = ["PowerLawFit", "farms_eigenvalues", "farms_metrics", "fit_power_law", "full_eigenvalues"]  # noqa: F822
