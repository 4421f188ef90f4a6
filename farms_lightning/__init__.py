"""farms_lightning: FARMS heavy-tail eigenspectrum analysis of PyTorch weights, for Lightning.

The engine (``analyze``, the report, the fits) imports only torch and numpy; the Lightning and
torchmetrics consumers are imported on first use, so scripts and the CLI start fast.
"""

from typing import TYPE_CHECKING, Any

from farms_lightning._version import __version__ as __version__
from farms_lightning.engine.analysis import PRESETS, analyze
from farms_lightning.engine.powerlaw import PowerLawFit
from farms_lightning.engine.report import FARMSReport, LayerStats
from farms_lightning.models.layers import DEFAULT_LAYER_TYPES, LAYER_TYPES
from farms_lightning.policies.tempbalance import farms_param_groups, lr_factors

if TYPE_CHECKING:
    from farms_lightning.policies.pruners import prune_model
    from farms_lightning.policies.pruning import alpha_sparsity, uniform_sparsity
    from farms_lightning.training.callback import FARMSCallback
    from farms_lightning.training.lr_balancer import FARMSLRBalancer
    from farms_lightning.training.metric import FARMSMetric
    from farms_lightning.training.pruning_callback import FARMSModelPruning


_LAZY = {
    "FARMSCallback": "farms_lightning.training.callback",
    "FARMSLRBalancer": "farms_lightning.training.lr_balancer",
    "FARMSMetric": "farms_lightning.training.metric",
    "FARMSModelPruning": "farms_lightning.training.pruning_callback",
    "prune_model": "farms_lightning.policies.pruners",
    "alpha_sparsity": "farms_lightning.policies.pruning",
    "uniform_sparsity": "farms_lightning.policies.pruning",
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
