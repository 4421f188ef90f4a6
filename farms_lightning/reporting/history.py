"""The analysis history shared by the training integrations: scalars, entries, files, heatmap data.

Pure functions (no Lightning, no ``transformers``): a report in, logged scalars out; a history in,
a file or a layers x analyses matrix out. :class:`~farms_lightning.FARMSCallback` and
:class:`~farms_lightning.integrations.transformers.FARMSTrainerCallback` both use them, so the
two log the same keys and save the same files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

from farms_lightning.engine.report import FARMSReport
from farms_lightning.files import strict_json
from farms_lightning.files.safe_io import write_text
from farms_lightning.files.temp_files import remove_stale_temps

HISTORY_FORMATS = ("json", "csv")
#: Summary keys that count layers (charted apart from the alpha-scale summary values).
COUNT_KEYS = ("num_layers", "num_fitted", "num_looks_random", "num_too_small", "num_skipped", "num_failed",
              "num_under_trained", "num_over_trained")

History = list[dict[str, Any]]


def report_scalars(report: FARMSReport, prefix: str, metrics: Sequence[str], summary: bool,
                   elapsed: float) -> dict[str, float]:
    """``<prefix>/<metric>/<layer>`` for every fitted layer and ``metrics`` entry, plus (with ``summary``)
    ``<prefix>/<summary key>`` and ``<prefix>/time_s``. NaN summary values are left out: they would
    trip monitors such as ``EarlyStopping``."""
    scalars: dict[str, float] = {}
    for stats in report.layers:
        if stats.status != "ok":
            continue
        for metric in metrics:
            value = getattr(stats, metric)
            if value is not None:
                scalars[f"{prefix}/{metric}/{layer_key(stats.name)}"] = float(value)
    if summary:
        for key, value in report.summary.items():
            if not (isinstance(value, float) and math.isnan(value)):
                scalars[f"{prefix}/{key}"] = float(value)
        scalars[f"{prefix}/time_s"] = elapsed
    return scalars


def layer_key(name: str) -> str:
    """A layer's name in logged keys (a bare module analysed as a whole has the empty name)."""
    return name or "(model)"


def history_entry(report: FARMSReport, stage: str, epoch: int, step: int, elapsed: float) -> dict[str, Any]:
    """One analysis: ``{"stage", "epoch", "step", "time_s", "summary", "layers": [rows]}``."""
    return {"stage": stage, "epoch": epoch, "step": step, "time_s": elapsed,
            "summary": dict(report.summary), "layers": report.to_rows()}


def history_path(folder: str | os.PathLike, prefix: str, fmt: str) -> Path:
    """``<folder>/<prefix>_history.<fmt>`` (``/`` in the prefix becomes ``_``)."""
    return Path(folder) / f"{prefix.replace('/', '_')}_history.{fmt}"


def write_history(history: History, path: str | os.PathLike) -> None:
    """Write ``history`` as JSON (the entries) or CSV (one row per layer and analysis), by suffix.

    The file is replaced atomically (a reader, or a crash, sees the old file or the new one, never half
    of one); JSON is strict, ``null`` for a NaN. A ``path`` that is a symbolic link or not a regular
    file is refused (:class:`~farms_lightning.files.safe_io.UnsafeTarget`), never written through.

    Raises:
        CLIError: (:mod:`farms_lightning.files.safe_io`) the file cannot be written, or is a link or
            a special file; the previous file is intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)  # what a killed run left (its process gone): log folders are small
    if path.suffix == ".json":
        write_text(path, strict_json.dumps(history, indent=1))
        return
    rows = [{"stage": h["stage"], "epoch": h["epoch"], "step": h["step"], **row}
            for h in history for row in h["layers"]]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["stage", "epoch", "step"],
                            lineterminator="\r\n")  # the csv module's own line ending, as before
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def load_history(source: Union[History, str, os.PathLike]) -> History:
    """A history as saved by ``save_history``: the list itself, or a ``.json``/``.csv`` file.

    CSV files hold the layer rows only; their entries get ``summary = {}`` and ``time_s = None``.

    Raises:
        ValueError: a file that is not a history.
    """
    if not isinstance(source, (str, os.PathLike)):
        return list(source)
    path = Path(source)
    if path.suffix.lower() == ".csv":
        return _history_from_csv(path)
    with open(path) as f:
        try:
            history = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not a JSON history: {error}") from None
    if not isinstance(history, list) or not all(isinstance(h, dict) and "layers" in h for h in history):
        raise ValueError(f"{path} is not a FARMS history (a list of analyses with 'layers')")
    return history


def _history_from_csv(path: Path) -> History:
    history: History = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not {"stage", "epoch", "step", "name"} <= set(row):
                raise ValueError(f"{path} is not a FARMS history (needs stage, epoch, step and name columns)")
            key = (row["stage"], int(row["epoch"]), int(row["step"]))
            if not history or (history[-1]["stage"], history[-1]["epoch"], history[-1]["step"]) != key:
                history.append({"stage": key[0], "epoch": key[1], "step": key[2], "time_s": None, "summary": {},
                                "layers": []})
            history[-1]["layers"].append({k: _csv_value(v) for k, v in row.items()
                                          if k not in ("stage", "epoch", "step")})
    return history


def _csv_value(text: str) -> Any:
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def heatmap_metric(history: History) -> str:
    """``"alpha_delta"`` when the history's rows carry a random-matrix baseline, else ``"alpha"``."""
    rows = (row for h in history for row in h["layers"])
    return "alpha_delta" if any(row.get("alpha_delta") is not None for row in rows) else "alpha"


def analysis_label(entry: dict[str, Any], long: bool = False) -> str:
    """When an analysis was made: ``init`` (before training), ``e<epoch>`` (the end of that 0-based
    epoch, Lightning's ``current_epoch``), ``s<step>`` (after that optimizer step); ``long``:
    ``init (before training)``, ``epoch <epoch>``, ``step <step>``."""
    if entry["stage"] == "train_start":
        return "init (before training)" if long else "init"
    if entry["stage"] == "epoch":
        return f"epoch {entry['epoch']}" if long else f"e{entry['epoch']}"
    return f"step {entry['step']}" if long else f"s{entry['step']}"


def history_matrix(history: History, metric: str = "alpha") -> tuple[list[str], list[str], list[list[float]]]:
    """Layers (model order) x analyses of ``metric``: ``(layer names, column labels, rows)``, NaN where
    a layer has no value (not fitted, or not analysed then).

    Raises:
        ValueError: an empty history, or a metric that no row holds.
    """
    if not history:
        raise ValueError("the history is empty: no analysis to plot")
    names = list(_ordered(row["name"] for h in history for row in h["layers"]))
    if not any(metric in row for h in history for row in h["layers"]):
        keys = sorted({k for h in history for row in h["layers"] for k in row})
        raise ValueError(f"`metric` {metric!r} is not in the history's rows; they hold {keys}")
    values = [[math.nan] * len(history) for _ in names]
    position = {name: i for i, name in enumerate(names)}
    for j, entry in enumerate(history):
        for row in entry["layers"]:
            value = row.get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[position[row["name"]]][j] = float(value)
    return [layer_key(n) for n in names], [analysis_label(h) for h in history], values


def _ordered(items: Iterable[str]) -> dict[str, None]:
    return dict.fromkeys(items)  # insertion order: the first analysis' model order
