"""What the Lightning loggers show besides scalars: TensorBoard's custom-scalars layout and figures.

* **Layout**: one "Custom Scalars" category per callback ``prefix``, with one multi-line chart per
  logged per-layer metric (every layer, model order) and charts of the summary values. Layouts are
  merged per ``SummaryWriter``, so callbacks with different prefixes on one logger all show.
* **Figures** go to every logger that takes images: TensorBoard (``add_figure``), MLflow
  (``log_figure`` as ``<tag>/step_<step>.png`` artifacts), Weights & Biases (``log_image``) and
  Comet (``log_figure``). Other loggers get the scalars only.
"""

from __future__ import annotations

import re
import weakref
from typing import Any, Iterable, Mapping, Sequence

from farms_lightning.reporting.history import COUNT_KEYS, layer_key

#: Per writer, the merged layout: category -> chart title -> tags (exact names, model order).
_LAYOUTS: "weakref.WeakKeyDictionary[Any, dict[str, dict[str, list[str]]]]" = weakref.WeakKeyDictionary()


def layout_charts(prefix: str, per_layer: Mapping[str, Sequence[str]], summary_keys: Iterable[str],
                  with_time: bool = True) -> dict[str, list[str]]:
    """Chart title -> tags: ``per_layer`` maps a metric to its layer names (model order); the summary
    keys are split into the alpha-scale values and the layer counts."""
    charts = {f"{metric} (all layers)": [f"{prefix}/{metric}/{layer_key(n)}" for n in names]
              for metric, names in per_layer.items() if names}
    keys = list(summary_keys)
    values = [k for k in keys if k not in COUNT_KEYS]
    counts = [k for k in keys if k in COUNT_KEYS]
    if values:
        charts["summary"] = [f"{prefix}/{k}" for k in values]
    if counts:
        charts["layer counts"] = [f"{prefix}/{k}" for k in counts]
    if with_time:
        charts["analysis time (s)"] = [f"{prefix}/time_s"]
    return charts


def add_layout(writer: Any, category: str, charts: dict[str, list[str]]) -> bool:
    """Merge ``category`` into ``writer``'s custom-scalars layout; write it when it changed.

    TensorBoard shows the last layout a run wrote, so the merged one is rewritten whole. Tags are
    written as anchored regular expressions that match exactly one scalar each. Returns whether
    a layout was written.
    """
    layout = _LAYOUTS.setdefault(writer, {})
    if layout.get(category) == charts:
        return False
    layout[category] = charts
    writer.add_custom_scalars({
        title: {chart: ["Multiline", [f"^{re.escape(tag)}$" for tag in tags]] for chart, tags in group.items()}
        for title, group in layout.items()})
    return True


def is_tensorboard(logger: Any) -> bool:
    from lightning.pytorch.loggers import TensorBoardLogger

    return isinstance(logger, TensorBoardLogger)


def takes_images(logger: Any) -> bool:
    """Whether :func:`log_figure` sends figures to ``logger``."""
    from lightning.pytorch.loggers import CometLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

    return isinstance(logger, (TensorBoardLogger, MLFlowLogger, WandbLogger, CometLogger))


def log_figure(loggers: Iterable[Any], tag: str, figure: Any, step: int) -> list[str]:
    """Send ``figure`` to every logger that takes images, then close it; returns the loggers' class names.

    Rank zero only (the caller's guard): image APIs are not collectives.
    """
    from lightning.pytorch.loggers import CometLogger, MLFlowLogger, WandbLogger

    reached = []
    try:
        for logger in loggers:
            if is_tensorboard(logger):
                logger.experiment.add_figure(tag, figure, step, close=False)
            elif isinstance(logger, MLFlowLogger):
                logger.experiment.log_figure(logger.run_id, figure, f"{tag}/step_{step:06d}.png")
            elif isinstance(logger, WandbLogger):
                logger.log_image(key=tag, images=[figure], step=step)
            elif isinstance(logger, CometLogger):
                logger.experiment.log_figure(figure_name=tag, figure=figure, step=step)
            else:
                continue
            reached.append(type(logger).__name__)
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)
    return reached
