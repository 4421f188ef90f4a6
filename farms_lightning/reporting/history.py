"""The analysis history shared by the training integrations: scalars, entries, files, heatmap data.

Pure functions (no Lightning, no ``transformers``): a report in, logged scalars out; a history in,
a file or a layers x analyses matrix out. :class:`~farms_lightning.FARMSCallback` and
:class:`~farms_lightning.integrations.transformers.FARMSTrainerCallback` both use them, so the
two log the same keys and save the same files.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

from farms_lightning.engine.report import LAYER_STATUSES, FARMSReport, LayerStats
from farms_lightning.files import strict_json
from farms_lightning.files.safe_io import write_text
from farms_lightning.files.temp_files import NotRegularFile, open_regular, remove_stale_temps

HISTORY_FORMATS = ("json", "csv")
#: Summary keys that count layers (charted apart from the alpha-scale summary values).
COUNT_KEYS = ("num_layers", "num_fitted", "num_looks_random", "num_too_small", "num_skipped", "num_failed",
              "num_under_trained", "num_over_trained")

#: When an analysis was made: before training, at an epoch's end, after an optimizer step.
STAGES = ("train_start", "epoch", "step")
#: Row fields that hold a number or ``None`` (``name``, ``type``, ``shape``, ``status``, ``reason`` do not).
NUMERIC_ROW_FIELDS = tuple(f.name for f in fields(LayerStats) if f.name not in ("name", "type", "shape", "status",
                                                                                "reason"))
#: CSV columns kept as text (a layer named ``0`` is not the number 0, the whole model's ``""`` not null).
_TEXT_COLUMNS = ("name", "type", "shape", "status", "reason")

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
    """A history as saved by ``save_history``: the list itself, or a ``.json``/``.csv`` file, validated
    (:func:`validate_history`).

    JSON is read strictly (:func:`~farms_lightning.files.strict_json.loads`: a depth bound, no
    duplicate keys) but accepts the bare ``NaN`` that earlier versions wrote. CSV files hold the layer
    rows only; their entries get ``summary = {}`` and ``time_s = None``. Only regular files are read:
    a FIFO or a device is refused, never waited on.

    Raises:
        ValueError: a file that is not a regular file, not a history, or a history of a wrong form
            (one line that says what is wrong).
        OSError: the file cannot be opened.
    """
    if not isinstance(source, (str, os.PathLike)):
        return validate_history(source, "the history")
    path = Path(source)
    data = _read_regular_file(path)
    if path.suffix.lower() == ".csv":
        return validate_history(_history_from_csv(path, data), f"history {path}")
    history = strict_json.loads(data, f"history {path}", allow_nan=True)
    return validate_history(history, f"history {path}")


def validate_history(value: Any, what: str = "the history") -> History:
    """``value`` checked to be a history: a list of analyses as :func:`history_entry` makes them.

    Each entry is a dict with ``stage`` among :data:`STAGES`, ``epoch`` and ``step`` integers >= 0,
    ``summary`` a dict of numbers (or ``None``), ``time_s`` a number or ``None``, ``layers`` a list of
    rows, each a dict with a string ``name`` and a ``status`` among :data:`LAYER_STATUSES`, and its
    numeric statistics numbers or ``None``; ``lr_factors``, where present, maps names to numbers.
    Every loader uses it (callback states, the Hugging Face callback's state, history files), so a
    tampered or foreign history fails where it is read, not an epoch later.

    Returns:
        The history as a new list (the entries themselves are not copied).

    Raises:
        ValueError: one line naming ``what`` and the first thing found wrong.
    """
    if not isinstance(value, list):
        raise ValueError(f"{what} is not a FARMS history: a list of analyses, got {_kind(value)}")
    for i, entry in enumerate(value):
        where = f"{what}: analysis {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is not an object (got {_kind(entry)})")
        missing = [key for key in ("stage", "epoch", "step", "layers") if key not in entry]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(map(repr, missing))}")
        if entry["stage"] not in STAGES:
            raise ValueError(f"{where} has stage {_short(entry['stage'])}; expected one of {STAGES}")
        for key in ("epoch", "step"):
            if not _is_int(entry[key]) or entry[key] < 0:
                raise ValueError(f"{where} has {key} {_short(entry[key])}; expected an integer >= 0")
        if not _is_number_or_none(entry.get("time_s")):
            raise ValueError(f"{where} has time_s {_short(entry['time_s'])}; expected a number or null")
        for key in ("summary", "lr_factors"):
            mapping = entry.get(key, {})
            if not isinstance(mapping, dict):
                raise ValueError(f"{where} has a {key} that is {_kind(mapping)}, not an object")
            bad = next((k for k, v in mapping.items() if not _is_number_or_none(v)), None)
            if bad is not None:
                raise ValueError(f"{where}: {key} {bad!r} is {_short(mapping[bad])}, not a number")
        if not isinstance(entry["layers"], list):
            raise ValueError(f"{where} has layers that are {_kind(entry['layers'])}, not a list of rows")
        for j, row in enumerate(entry["layers"]):
            _validate_row(row, f"{where}, layer row {j}")
    return list(value)


def validate_pending(value: Any, what: str = "the pending analysis") -> dict[str, int] | None:
    """A due analysis remembered by a checkpoint: ``None`` or ``{"epoch": int >= 0, "step": int >= 0}``.

    Raises:
        ValueError: anything else, in one line naming ``what``.
    """
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"epoch", "step"}:
        raise ValueError(f"{what} is {_short(value)}; expected null or an object with epoch and step")
    for key in ("epoch", "step"):
        if not _is_int(value[key]) or value[key] < 0:
            raise ValueError(f"{what} has {key} {_short(value[key])}; expected an integer >= 0")
    return dict(value)


def validate_factors(value: Any, what: str = "the LR factors") -> dict[str, float]:
    """Learning-rate factors by layer name: a dict of strings to finite numbers > 0.

    Raises:
        ValueError: anything else, in one line naming ``what``.
    """
    if not isinstance(value, dict):
        raise ValueError(f"{what} is {_kind(value)}, not an object of layer names to factors")
    for name, factor in value.items():
        if not isinstance(name, str) or not _is_number_or_none(factor) or factor is None \
                or not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"{what}: {_short(name)} has factor {_short(factor)}; expected a finite number > 0")
    return {name: float(factor) for name, factor in value.items()}


def _validate_row(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{where} is not an object (got {_kind(row)})")
    for key in ("name", "status"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"{where} has no string {key!r} (got {_short(row.get(key))})")
    if row["status"] not in LAYER_STATUSES:
        raise ValueError(f"{where} has status {_short(row['status'])}; expected one of {LAYER_STATUSES}")
    bad = next((k for k in NUMERIC_ROW_FIELDS if k in row and not _is_number_or_none(row[k])), None)
    if bad is not None:
        raise ValueError(f"{where} ({row['name']!r}) has {bad} {_short(row[bad])}, not a number")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_regular_file(path: Path) -> bytes:
    """The bytes of ``path``, opened without blocking and checked on the open descriptor to be a
    regular file (a FIFO would block the reader forever; a device never ends)."""
    try:
        with open_regular(path) as f:
            return f.read()
    except NotRegularFile:
        raise ValueError(f"history {path} is not a regular file (a FIFO, device or folder is not read)") from None


def _history_from_csv(path: Path, data: bytes) -> History:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"history {path} is not UTF-8 text: {error.reason} at byte {error.start}") from None
    history: History = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            if not {"stage", "epoch", "step", "name"} <= set(row):
                raise ValueError(f"history {path} is not a FARMS history (needs stage, epoch, step and name columns)")
            if None in row or None in row.values():  # more or fewer fields than the header names
                raise ValueError(f"history {path}, line {reader.line_num}: the row does not have the header's columns")
            try:
                key = (row["stage"], int(row["epoch"]), int(row["step"]))
            except ValueError:
                raise ValueError(f"history {path}, line {reader.line_num}: epoch {_short(row['epoch'])} or step "
                                 f"{_short(row['step'])} is not an integer") from None
            if not history or (history[-1]["stage"], history[-1]["epoch"], history[-1]["step"]) != key:
                history.append({"stage": key[0], "epoch": key[1], "step": key[2], "time_s": None, "summary": {},
                                "layers": []})
            history[-1]["layers"].append({k: v if k in _TEXT_COLUMNS else _csv_value(v) for k, v in row.items()
                                          if k not in ("stage", "epoch", "step")})
    except csv.Error as error:  # e.g. a field over csv.field_size_limit() (128 KiB)
        raise ValueError(f"history {path}, line {reader.line_num}: not a CSV history ({error})") from None
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
