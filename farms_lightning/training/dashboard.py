"""What the Lightning loggers show besides scalars: TensorBoard's custom-scalars layout and figures.

* **Per-layer runs**: every logged per-layer metric is also written to one run per layer
  (``<log_dir>/<prefix>_by_layer/<layer>``), so TensorBoard draws one line per layer, in its own
  colour and with the layer's name; the ``<prefix>/<metric>/<layer>`` scalars stay in the main run.
* **Layout**: one "Custom Scalars" category per callback ``prefix``: a chart per logged per-layer
  metric over the per-layer runs, and the summary values grouped by scale. Layouts are merged per
  ``SummaryWriter``, so callbacks with different prefixes on one logger all show.
* **Figures** go to every logger that takes images: TensorBoard (``add_figure``), MLflow
  (``log_figure`` as ``<tag>/step_<step>.png`` artifacts), Weights & Biases (``log_image``) and
  Comet (``log_figure``). Other loggers get the scalars only.
"""

from __future__ import annotations

import os
import re
import weakref
from typing import Any, Iterable, Mapping

from farms_lightning.reporting.history import COUNT_KEYS

#: Per writer, the merged layout: category -> chart title -> tags (exact names, model order).
_LAYOUTS: "weakref.WeakKeyDictionary[Any, dict[str, dict[str, list[str]]]]" = weakref.WeakKeyDictionary()
#: Per writer, its per-layer runs: layer name -> the FileWriter of ``<log_dir>/<prefix>_by_layer/<layer>``.
_LAYER_RUNS: "weakref.WeakKeyDictionary[Any, dict[tuple[str, str], Any]]" = weakref.WeakKeyDictionary()
#: Summary values charted together because they share a scale (the rest get a chart each).
SUMMARY_GROUPS = {
    "alpha_delta (summary)": ("alpha_delta_mean", "alpha_delta_median"),
    "alpha (summary)": ("alpha_mean", "alpha_median", "alpha_random_mean"),
}


def by_layer_tag(prefix: str, metric: str) -> str:
    """The tag of a per-layer metric in the per-layer runs: ``<prefix>_by_layer/<metric>``."""
    return f"{prefix}_by_layer/{metric}"


def layout_charts(prefix: str, metrics: Iterable[str], summary_keys: Iterable[str],
                  with_time: bool = True) -> dict[str, list[str]]:
    """Chart title -> tags. Each per-layer metric charts its per-layer runs (one line, colour and name
    per layer); the summary values are grouped by scale (:data:`SUMMARY_GROUPS`, then one chart each),
    the layer counts together."""
    charts = {f"{metric} by layer": [by_layer_tag(prefix, metric)] for metric in metrics}
    summary = list(summary_keys)
    keys = [k for k in summary if k not in COUNT_KEYS]
    for title, group in SUMMARY_GROUPS.items():
        members = [f"{prefix}/{k}" for k in group if k in keys]
        if members:
            charts[title] = members
    grouped = {k for group in SUMMARY_GROUPS.values() for k in group}
    for key in keys:
        if key not in grouped:
            charts[key] = [f"{prefix}/{key}"]
    counts = [f"{prefix}/{k}" for k in COUNT_KEYS if k in summary]
    if counts:
        charts["layer counts"] = counts
    if with_time:
        charts["analysis time (s)"] = [f"{prefix}/time_s"]
    return charts


def write_layer_runs(writer: Any, prefix: str, values: Mapping[str, Mapping[str, float]], step: int) -> None:
    """Write ``values`` (metric -> layer -> value) as one TensorBoard run per layer.

    TensorBoard colours and names lines by run, so per-layer lines that live in one run are told
    apart only by hovering; as ``SummaryWriter.add_scalars`` does, each layer gets a run of its own,
    ``<log_dir>/<prefix>_by_layer/<layer>``, holding ``<prefix>_by_layer/<metric>``. The writers stay
    open until :func:`close_layer_runs`.
    """
    from torch.utils.tensorboard.summary import scalar
    from torch.utils.tensorboard.writer import FileWriter

    runs = _LAYER_RUNS.setdefault(writer, {})
    touched = []
    for metric, by_layer in values.items():
        for layer, value in by_layer.items():
            key = (prefix, layer)
            if key not in runs:
                folder = os.path.join(writer.log_dir, f"{prefix.replace('/', '_')}_by_layer", _folder_name(layer))
                runs[key] = FileWriter(folder, max_queue=100, flush_secs=60)
            runs[key].add_summary(scalar(by_layer_tag(prefix, metric), value), step)
            touched.append(runs[key])
    for run in dict.fromkeys(touched):  # readable at once, as the main run's scalars are
        run.flush()


def close_layer_runs(writer: Any) -> None:
    """Flush and close ``writer``'s per-layer runs (their writer threads end)."""
    for run in _LAYER_RUNS.pop(writer, {}).values():
        run.close()


def _folder_name(layer: str) -> str:
    """A layer name as one folder name: no separators, never ``.``/``..`` or hidden."""
    name = re.sub(r"[\\/\x00]", "_", layer) or "(model)"
    return "_" + name if name.startswith(".") else name


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
