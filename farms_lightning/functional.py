"""Pure functions of farms_lightning: eigenvalues of one matrix and power-law fits of an ESD."""

from farms_lightning.metric import farms_metrics
from farms_lightning.powerlaw import PowerLawFit, fit_power_law
from farms_lightning.spectra import farms_eigenvalues, full_eigenvalues

__all__ = ["PowerLawFit", "farms_eigenvalues", "farms_metrics", "fit_power_law", "full_eigenvalues"]
