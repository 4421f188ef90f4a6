"""farms_lightning: FARMS heavy-tail eigenspectrum analysis of PyTorch weights, for Lightning."""

from farms_lightning.analysis import PRESETS, analyze
from farms_lightning.callback import FARMSCallback
from farms_lightning.layers import DEFAULT_LAYER_TYPES, LAYER_TYPES
from farms_lightning.lr_balancer import FARMSLRBalancer
from farms_lightning.metric import FARMSMetric
from farms_lightning.powerlaw import PowerLawFit
from farms_lightning.report import FARMSReport, LayerStats
from farms_lightning.tempbalance import farms_param_groups, lr_factors

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "FARMSCallback",
    "FARMSLRBalancer",
    "FARMSMetric",
    "FARMSReport",
    "LAYER_TYPES",
    "LayerStats",
    "PRESETS",
    "PowerLawFit",
    "analyze",
    "farms_param_groups",
    "lr_factors",
]
