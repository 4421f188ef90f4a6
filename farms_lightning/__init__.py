"""farms_lightning: FARMS heavy-tail eigenspectrum analysis of PyTorch weights, for Lightning.

The engine (``analyze``, the report, the fits) imports only torch and numpy; the Lightning and
torchmetrics consumers are imported on first use, so scripts and the CLI start fast.
"""

from typing import TYPE_CHECKING, Any

from farms_lightning.analysis import PRESETS, analyze
from farms_lightning.layers import DEFAULT_LAYER_TYPES, LAYER_TYPES
from farms_lightning.powerlaw import PowerLawFit
from farms_lightning.report import FARMSReport, LayerStats
from farms_lightning.tempbalance import farms_param_groups, lr_factors

if TYPE_CHECKING:
    from farms_lightning.callback import FARMSCallback
    from farms_lightning.lr_balancer import FARMSLRBalancer
    from farms_lightning.metric import FARMSMetric
    from farms_lightning.pruners import prune_model
    from farms_lightning.pruning_callback import FARMSModelPruning
    from farms_lightning.pruning import alpha_sparsity, uniform_sparsity

__version__ = "0.1.0"

_LAZY = {
    "FARMSCallback": "farms_lightning.callback",
    "FARMSLRBalancer": "farms_lightning.lr_balancer",
    "FARMSMetric": "farms_lightning.metric",
    "FARMSModelPruning": "farms_lightning.pruning_callback",
    "prune_model": "farms_lightning.pruners",
    "alpha_sparsity": "farms_lightning.pruning",
    "uniform_sparsity": "farms_lightning.pruning",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'farms_lightning' has no attribute {name!r}")


__all__ = [
    "DEFAULT_LAYER_TYPES",
    "FARMSCallback",
    "FARMSLRBalancer",
    "FARMSMetric",
    "FARMSModelPruning",
    "FARMSReport",
    "LAYER_TYPES",
    "LayerStats",
    "PRESETS",
    "PowerLawFit",
    "alpha_sparsity",
    "analyze",
    "farms_param_groups",
    "lr_factors",
    "prune_model",
    "uniform_sparsity",
]
